"""Which operation takes the frames that arrive for a group: the mailbox every transport shares.

An operation registers itself (a :class:`~collcomm.transport.interface.Receiver`) under its
sequence number before it starts; a transport's receiving side asks the mailbox for the receiver
of each frame's operation and waits while that operation has not started here yet (its frames
stay in the connection meanwhile). Frames of finished operations are stale (None), and an abort
that arrives before its operation registered is handed to it when it does.

Such early aborts are kept within bounds, since a peer's ABORT frames name any operation number
it likes: the first abort per operation is kept, for at most :data:`MAX_EARLY_ABORTS` operations
(the nearest ones) less than :data:`ABORT_WINDOW` operations past the floor. An abort beyond is
dropped, counted (:attr:`GroupMailbox.dropped_aborts`) and logged as a refusal
(:mod:`collcomm.refusals`). A dropped abort costs time, not correctness: the failure is also
recorded in the coordinator, where a waiting collective looks for it (collcomm.runtime.failures),
and any operation ends at its timeout.
"""

from __future__ import annotations

import atexit
import logging
import threading

from collcomm.refusals import RefusalLog
from collcomm.transport.interface import Receiver

# Aborts kept for operations that have not started here. A peer is legitimately ahead by a few
# operations (its part of one may end before ours starts: a send, a leaf's part of a reduce),
# each aborted once; far more is a peer gone wrong or an attacker growing this table.
MAX_EARLY_ABORTS = 64
ABORT_WINDOW = 1 << 16  # operations past the floor: an abort for one further ahead is dropped
# One log for every mailbox of the process, so that dropped aborts write a bounded number of lines.
_REFUSALS = RefusalLog(logging.getLogger("collcomm.transport"), "abort frames")
atexit.register(_REFUSALS.flush)  # what is still counted (there is no listener whose close would write it)


class GroupMailbox:
    """Which receiver takes the frames of each operation of one group."""

    def __init__(self, group: int):
        self.group = group
        self._cond = threading.Condition()
        self._receivers: dict[int, Receiver] = {}
        self._aborts: dict[int, BaseException] = {}
        self._floor = 0  # operations below are finished; their frames are stale
        self._closed = False
        self.dropped_aborts = 0  # early aborts dropped by the bounds above

    def register(self, op: int, receiver: Receiver) -> None:
        with self._cond:
            self._receivers[op] = receiver
            early = self._aborts.pop(op, None)
            self._cond.notify_all()
        if early is not None:
            receiver.failed(early)

    def finish(self, op: int) -> None:
        with self._cond:
            self._receivers.pop(op, None)
            self._floor = max(self._floor, op + 1)
            for stale in [o for o in self._aborts if o < self._floor]:
                del self._aborts[stale]

    def receiver_for(self, op: int) -> Receiver | None:
        """Wait until ``op`` is registered; None when its frames are stale or the mailbox closed."""
        with self._cond:
            while True:
                if self._closed or op < self._floor:
                    return None
                r = self._receivers.get(op)
                if r is not None:
                    return r
                self._cond.wait(1.0)

    def withdraw(self, op: int, receiver: Receiver) -> None:
        """Unregister ``receiver`` from ``op`` if it is still the one registered there, without
        finishing ``op``: a later receiver may still take its frames (a receive from any source
        that another peer won, see collcomm.runtime.p2p.recv_any)."""
        with self._cond:
            if self._receivers.get(op) is receiver:
                del self._receivers[op]

    def current(self, op: int) -> Receiver | None:
        """The receiver of ``op`` if it is registered now (never waits)."""
        return self._receivers.get(op)

    @property
    def floor(self) -> int:
        return self._floor

    def abort(self, op: int, error: BaseException, source: str | None = None) -> bool:
        """Fail ``op``'s receiver with ``error``, or keep the error for when ``op`` registers (see
        the module for the bounds). False when it was dropped by them; ``source`` names the sender
        in the refusal's log line."""
        dropped = None
        with self._cond:
            r = self._receivers.get(op)
            if r is None and op >= self._floor and op not in self._aborts:  # (the first abort per op stays)
                if op - self._floor >= ABORT_WINDOW:
                    dropped, why = op, f"{ABORT_WINDOW} or more past operation {self._floor}, the next to run here"
                elif len(self._aborts) < MAX_EARLY_ABORTS:
                    self._aborts[op] = error
                else:  # full: keep the nearest operations
                    farthest = max(self._aborts)
                    dropped = op if op > farthest else farthest
                    why = f"{MAX_EARLY_ABORTS} nearer operations not started here have an abort kept already"
                    if dropped != op:
                        del self._aborts[farthest]
                        self._aborts[op] = error
            if dropped is not None:
                self.dropped_aborts += 1
        if r is not None:
            r.failed(error)
        if dropped is None:
            return True
        _REFUSALS.refused(source or f"group {self.group}", "abort too far ahead",
                          f"group {self.group}: dropped an abort of operation {dropped} from "
                          f"{source or 'a peer'}: {why}")
        return dropped != op

    def fail_all(self, error: BaseException) -> None:
        with self._cond:
            receivers = list(self._receivers.values())
        for r in receivers:
            r.failed(error)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
