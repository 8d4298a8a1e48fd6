"""An operation as a count of frame events: what every operation of a group shares.

A collective on one rank is a fixed set of events (frames to receive, frames whose peer
acknowledged them); it completes when the count reaches zero and fails at the first error.
:class:`OperationEvents` keeps that count, the frames still expected from each peer, and the
waiting (with a deadline and a poll for failures known elsewhere). The schedule executor's
:class:`~collcomm.runtime.executor.Operation` and :class:`~collcomm.runtime.alltoall.Alltoall`
build on it; each adds what its frames mean (the transport's
:class:`~collcomm.transport.interface.Receiver`) and how it starts (``start``).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from collcomm.errors import CollectiveTimeout


class OperationEvents:
    """Completion and failure of one operation on one rank.

    ``links(member)`` gives the transport's link to a member (by its index in the group);
    ``member_of(world_rank)`` turns the transport's peer numbers into member indices; ``events``
    is how many events complete the operation and ``from_peer`` how many frames each member is
    to send here (a peer that leaves after its last frame does not fail the operation)."""

    def __init__(self, *, links: Callable[[int], object], member_of: Callable[[int], int], me: int, group: int,
                 epoch: int, op_seq: int, desc: int, describe: str, events: int, from_peer: dict[int, int]):
        self._links = links
        self._member_of = member_of
        self.me, self.group, self.epoch, self.op_seq = me, group, epoch, op_seq
        self.desc, self.describe = desc, describe
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.error: BaseException | None = None
        self._events = events
        self._from_peer = dict(from_peer)

    def _event_done(self, from_peer: int | None = None) -> None:
        """One event completed (a frame from member ``from_peer``, or an acknowledged send)."""
        with self._lock:
            self._events -= 1
            if from_peer is not None:
                self._from_peer[from_peer] -= 1
            finished = self._events == 0
        if finished:
            self._done.set()

    def failed(self, error: BaseException) -> None:
        with self._lock:
            rank = getattr(error, "rank", None)
            if getattr(error, "while_receiving", False) and rank is not None and self.error is None:
                try:
                    peer = self._member_of(rank)
                except (KeyError, IndexError, ValueError):
                    peer = None
                if peer is not None and self._from_peer.get(peer, 0) == 0:
                    return  # a peer this operation expects nothing more from went away (it finished and left)
            if self.error is None:
                self.error = error
        self._done.set()

    def wait(self, timeout: float, poll: Callable[[], BaseException | None] | None = None,
             poll_every: float = 0.25) -> None:
        """Block until done; raise the operation's error, or CollectiveTimeout after ``timeout`` s.
        ``poll`` (called every ``poll_every`` s while waiting) may report an outside failure."""
        deadline = time.monotonic() + timeout
        while not self._done.wait(min(poll_every, max(deadline - time.monotonic(), 0))):
            if time.monotonic() >= deadline:
                self.failed(CollectiveTimeout(f"{self.describe} did not complete within {timeout:g} s"))
                break
            if poll is not None:
                outside = poll()
                if outside is not None:
                    self.failed(outside)
                    break
        if self.error is not None:
            raise self.error

    @property
    def done(self) -> bool:
        return self._done.is_set()


def describe_fields(fields: tuple) -> str:
    """What an operation is, in words, from its description fields (kind, dtype, count, op, root):
    "allreduce of 1024 float32 (sum)", "broadcast of 10 int64 (root 1)"."""
    kind, dtype, count, op, root = fields
    if kind == "barrier":
        return "barrier"
    per = " per rank" if kind in ("allgather", "reduce_scatter") else ""
    extra = ", ".join(x for x in (op, f"root {root}" if root >= 0 else "") if x)
    return f"{kind} of {count} {dtype}{per}" + (f" ({extra})" if extra else "")
