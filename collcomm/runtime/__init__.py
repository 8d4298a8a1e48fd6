"""The runtime: what one process needs to run operations with the others.

Groups and their membership (:mod:`.runtime`, :mod:`.group`, :mod:`.membership`), the executor
that walks a schedule over a transport (:mod:`.executor`, :mod:`.operation`), the collectives
(:mod:`.collectives`, :mod:`.alltoall`), point-to-point messages (:mod:`.p2p`), how a failure
reaches every member (:mod:`.failures`), user buffers (:mod:`.buffers`) and the link monitor's
control loop (:mod:`.monitor`). It sits on the wire tier (:mod:`collcomm.transport`,
:mod:`collcomm.coordinator`) and the model (:mod:`collcomm.topology`, :mod:`collcomm.schedules`,
:mod:`collcomm.faults`); :mod:`collcomm.api` is its public face.
"""

from collcomm.runtime.group import Group, Work
from collcomm.runtime.runtime import Runtime, own_address

__all__ = ["Group", "Runtime", "Work", "own_address"]
