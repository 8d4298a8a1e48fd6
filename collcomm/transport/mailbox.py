"""Which operation takes the frames that arrive for a group: the mailbox every transport shares.

An operation registers itself (a :class:`~collcomm.transport.interface.Receiver`) under its
sequence number before it starts; a transport's receiving side asks the mailbox for the receiver
of each frame's operation and waits while that operation has not started here yet (its frames
stay in the connection meanwhile). Frames of finished operations are stale (None), and an abort
that arrives before its operation registered is handed to it when it does.
"""

from __future__ import annotations

import threading

from collcomm.transport.interface import Receiver


class GroupMailbox:
    """Which receiver takes the frames of each operation of one group."""

    def __init__(self, group: int):
        self.group = group
        self._cond = threading.Condition()
        self._receivers: dict[int, Receiver] = {}
        self._aborts: dict[int, BaseException] = {}
        self._floor = 0  # operations below are finished; their frames are stale
        self._closed = False

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

    def abort(self, op: int, error: BaseException) -> None:
        with self._cond:
            r = self._receivers.get(op)
            if r is None and op >= self._floor:
                self._aborts[op] = error
        if r is not None:
            r.failed(error)

    def fail_all(self, error: BaseException) -> None:
        with self._cond:
            receivers = list(self._receivers.values())
        for r in receivers:
            r.failed(error)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
