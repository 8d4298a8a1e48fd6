"""Shared memory between the ranks of one machine: segments, step counters, futex waits.

:mod:`collcomm.transport.shm.segment` names, creates, maps and removes segments;
:mod:`collcomm.transport.shm.arena` is one group's set of them with the step protocol every
shared-memory collective uses (:mod:`collcomm.runtime.local` runs the collectives);
:mod:`collcomm.transport.shm.futex` sleeps and wakes; :mod:`collcomm.transport.shm.cma` reads another
process's memory directly; :mod:`collcomm.transport.shm.stream` copies into large results past the
cache (the one compiled part of collcomm, optional).
"""
