"""How the backend's operations run: lanes, and the ``Work`` handle each operation returns.

Every collective returns at once with a :class:`Work`; the operation runs in the group's
:class:`Lane`, which runs the group's operations one at a time in issue order (every rank issues a
group's collectives in the same order) on daemon threads. The work completes its future with the
list of output tensors, or with the error (``wait()`` raises it; the future's ``wait()`` raises a
RuntimeError that carries it); callbacks run after the lane moved on, so they may wait for further
collectives. Point-to-point messages run in lanes of their own (:func:`p2p_lane`), one per
direction and peer, so a send never waits behind a receive.
"""

from __future__ import annotations

import collections
import threading

import torch
import torch.distributed as dist

from collcomm.integrations.torch import timeouts
from collcomm.integrations.torch.errors import CollcommTimeout


class Lane:
    """Runs operations one at a time, in the order they were put, on daemon threads.

    An operation's completion (its future's callbacks: DDP's, a comm hook's) runs after the lane
    is released, so a callback may issue another operation and wait for it (PowerSGD does): that
    operation runs on another thread of the lane. Threads park when idle and end after a while."""

    IDLE_SECONDS = 30.0

    def __init__(self, name: str):
        self._name = name
        self._cond = threading.Condition()
        self._jobs: collections.deque = collections.deque()
        self._busy = False  # a thread runs an operation (the lane's order is held)
        self._idle = 0      # threads parked, waiting for operations
        self._closed = False

    def put(self, job) -> None:
        """``job()`` runs the operation and returns its completion (a callable)."""
        with self._cond:
            self._jobs.append(job)
            if self._busy:
                return  # the running thread takes it next (or hands it over)
            if self._idle:
                self._cond.notify()
            else:
                self._spawn()

    def _spawn(self) -> None:
        threading.Thread(target=self._run, name=self._name, daemon=True).start()

    def _run(self) -> None:
        with self._cond:
            while True:
                while not self._jobs or self._busy:
                    if self._closed:
                        return
                    self._idle += 1
                    woken = self._cond.wait(self.IDLE_SECONDS)
                    self._idle -= 1
                    if not woken and not self._jobs:
                        return
                job = self._jobs.popleft()
                self._busy = True
                self._cond.release()
                try:
                    finish = job()
                finally:
                    self._cond.acquire()
                    self._busy = False
                if self._jobs:  # the next operation must not wait for this one's callbacks
                    if self._idle:
                        self._cond.notify()
                    else:
                        self._spawn()
                self._cond.release()
                try:
                    finish()
                finally:
                    self._cond.acquire()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# p2p lanes are per process (not per group): collcomm numbers messages per peer and tag, so
# messages to one peer must leave in issue order whichever group issued them.
_P2P_LANES: dict[tuple[str, int], Lane] = {}
_P2P_LOCK = threading.Lock()


def p2p_lane(direction: str, peer: int) -> Lane:
    """The process's lane for point-to-point messages in ``direction`` ("send", "recv") with the
    world rank ``peer`` (-1: receives from any source)."""
    with _P2P_LOCK:
        lane = _P2P_LANES.get((direction, peer))
        if lane is None:
            lane = _P2P_LANES[(direction, peer)] = Lane(f"collcomm-torch-{direction}-{peer}")
        return lane


class _Failed:
    """A failed operation's future value (unwrapped into an error by ``_unwrap``)."""

    def __init__(self, error: BaseException):
        self.error = error


def _unwrap(fut):
    value = fut.value()
    if isinstance(value, _Failed):
        raise value.error
    return value


class Work(dist.Work):
    """The handle of one operation: ``wait()`` raises its error; ``get_future()`` gives a future whose
    value is the list of output tensors (an error in it makes the future's ``wait()`` raise).

    The operation's lane ends it with ``_complete()`` or ``_fail(error)``; a receive records its
    source (a group rank) in ``_source``."""

    def __init__(self, what: str, outputs: list):
        super().__init__()
        self._what = what
        self._outputs = outputs
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._source = -1
        self._base = torch.futures.Future()
        self._future = self._base.then(_unwrap)  # a C++-level error: DDP's reducer sees it too

    # -- completion (the lane's thread)
    def _complete(self) -> None:
        try:
            self._base.set_result(self._outputs)  # runs the callbacks chained on the future (DDP's)
        finally:
            self._done.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        try:
            self._base.set_result(_Failed(error))
        finally:
            self._done.set()

    # -- the Work interface
    def wait(self, timeout=None) -> bool:
        secs = timeouts.seconds(timeout, None)
        if not self._done.wait(secs):
            raise CollcommTimeout(f"collcomm {self._what}: Timed out waiting {secs:g} s, the time given to wait()")
        if self._error is not None:
            raise self._error
        return True

    def get_future(self):
        return self._future

    def is_completed(self) -> bool:
        return self._done.is_set() or self._base.done()

    def is_success(self) -> bool:
        return self.is_completed() and self._error is None

    def exception(self):
        return self._error

    def result(self) -> list:
        self.wait()
        return self._outputs

    def source_rank(self) -> int:
        return self._source

    def _source_rank(self) -> int:
        return self._source

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        state = "failed" if self._error is not None else "done" if self._done.is_set() else "pending"
        return f"<collcomm work {self._what} ({state})>"
