"""The small-message lane: a collective of a few KB on shared memory in one short Python call.

A small collective on shared memory is mostly Python. Measured on 2 cores (bench/RESULTS.md,
issue 16): of a 4 KB allreduce's 9 us of a rank's time, the layers between the API and the arena
took about 4 (argument checks that build a Buffer, the group's ``submit`` and its closure, the
dispatch by transport, the choice of algorithm). With more ranks than cores every operation waits
until every process has been scheduled, and each runs its share cache-cold after a switch: there
the same 4 KB allreduce took 71 us through the API and 43 us when the prepared operation was
called directly.

So the first call of a shape takes the full path, which checks everything, chooses the algorithm
and prepares the operation (:meth:`SmallLane.prepare`: its views of every member's segment by
half, its reduction and its description). The lane keeps it under the exact key of what decided
it. Later calls of that shape with NumPy arrays come here straight from the API
(:mod:`collcomm.api`): one dictionary look-up, the checks the full path makes of such an array
(contiguous, writeable, a timeout that is a plain number), the group's lock, and the operation.
Anything else (a torch tensor, ``async_op``, another shape, asynchronous work pending, a shrunk
group, a bool where an int is asked) returns False and takes the full path, which also raises
every usage error: the lane refuses nothing and decides nothing the full path would not.

Every operation here is one round: each member writes its input into one half of its segment,
publishes one step (:meth:`~collcomm.transport.shm.arena.Arena.sync`, which also compares the
members' descriptions of the operation), and reads its peers' halves in place.
"""

from __future__ import annotations

import time

import numpy as np

from collcomm.errors import CollectiveError
from collcomm.runtime.arguments import MAX_TIMEOUT, overlaps_beside_block

_ndarray = np.ndarray
_FULL_PATH = object()  # (_result: a call the lane leaves to the full path)


def _result(x, out):
    """Where a lane call's result lands, given ``x`` (an ndarray) and the caller's ``out``: None
    (in place: ``out`` None or ``x`` itself, ``x`` contiguous and writeable), ``out`` flattened
    (another contiguous, writeable ndarray of ``x``'s dtype and size sharing no memory with it,
    ``x`` contiguous), or _FULL_PATH (anything else, which the full path checks)."""
    flags = x.flags
    if out is None or out is x:
        return None if flags.c_contiguous and flags.writeable else _FULL_PATH
    if type(out) is not _ndarray or out.dtype != x.dtype or out.size != x.size:
        return _FULL_PATH
    fo = out.flags
    if not (flags.c_contiguous and fo.c_contiguous and fo.writeable) or np.may_share_memory(x, out):
        return _FULL_PATH
    return out if out.ndim == 1 else out.reshape(-1)


class SmallLane:
    """The prepared one-round operations of one shared-memory group (a
    :class:`~collcomm.runtime.local.LocalGroup`), by shape."""

    MAX_SHAPES = 64  # prepared shapes kept per kind (a program that cycles through more re-prepares)

    def __init__(self, local):
        self.local, self.group, self.arena = local, local.group, local.arena
        self.n, self.me = local.n, local.me
        # by kind, what decided the operation -> (views by half, reduction, (hash, text))
        self.allreduces: dict = {}        # (NumPy dtype, count, op)
        self.reduce_scatters: dict = {}   # (NumPy dtype, output count, op)
        self.allgathers: dict = {}        # (NumPy dtype, input count)
        self.broadcasts: dict = {}        # (NumPy dtype, count, root)
        self.barrier_shot = None

    # ------------------------------------------------------------------ preparing (the full path)
    def prepare(self, table: dict | None, key, fields: tuple, views, reduce) -> tuple:
        """Prepare the one-round operation ``fields`` (``views(half)`` for both halves, the
        reduction, the description) and keep it in ``table`` under ``key`` (None: not kept)."""
        shot = ((views(0), views(1)), reduce, self.local.describe(fields))
        if table is not None:
            if len(table) >= self.MAX_SHAPES:
                table.clear()
            table[key] = shot
        return shot

    def run(self, shot, step, x, y, timeout: float, nbytes: int) -> None:
        """Run a prepared operation: ``step(x, y, views, reduce, deadline, desc)`` writes,
        synchronizes once and reads. (:meth:`LocalGroup.run` written out: a small operation is
        mostly Python's calls.)"""
        halves, reduce, current = shot
        local, arena = self.local, self.arena
        seq = local.start(current)
        parity = arena.begin(*current)
        start = time.monotonic()
        try:
            step(x, y, halves[arena.next_half()], reduce, start + timeout, (parity, *current))
        except CollectiveError as e:
            local.fail(seq, e)
        local.count(nbytes, time.monotonic() - start)

    # ------------------------------------------------------------------ the steps
    def allreduce_step(self, x, y, views, reduce, deadline, desc) -> None:
        """One-shot: write the input, step, reduce every member's input into ``y`` (None: ``x``,
        in place)."""
        mine, ins = views
        np.copyto(mine, x)
        self.arena.sync(deadline, self.local.poll, desc)
        if y is None:
            y = x
        if self.n == 2:
            # a (op) b == b (op) a bit for bit (IEEE addition and multiplication commute; NaN
            # payloads aside), so both members compute the same bits without a copy
            if y is not x:
                np.copyto(y, x)
            reduce(y, ins[1 - self.me])
        else:  # in rank order, in place: every member computes the same bits
            np.copyto(y, ins[0])
            for other in ins[1:]:
                reduce(y, other)

    def reduce_scatter_step(self, x, y, views, reduce, deadline, desc) -> None:
        mine, others = views
        np.copyto(mine, x)  # every block, this member's own too: one copy instead of n - 1
        self.arena.sync(deadline, self.local.poll, desc)
        m = y.size
        own = x[self.me * m:(self.me + 1) * m]
        if not np.may_share_memory(y, own):  # (in place: ``y`` is that very block)
            np.copyto(y, own)
        for o in others:
            reduce(y, o)

    def allgather_step(self, x, y, views, reduce, deadline, desc) -> None:
        mine, others = views
        np.copyto(mine, x)
        self.arena.sync(deadline, self.local.poll, desc)
        m = x.size
        for off, theirs in others:
            np.copyto(y[off:off + m], theirs)

    def broadcast_step(self, x, y, views, reduce, deadline, desc) -> None:
        """``y``: (the root, the result's array or None: ``x``)."""
        root, out = y
        if root == self.me:
            np.copyto(views, x)
            self.arena.sync(deadline, self.local.poll, desc)
            if out is not None:
                np.copyto(out, x)
        else:
            self.arena.sync(deadline, self.local.poll, desc)
            np.copyto(x if out is None else out, views)

    def barrier_step(self, x, y, views, reduce, deadline, desc) -> None:
        self.arena.sync(deadline, self.local.poll, desc)

    # ------------------------------------------------------------------ from the API
    def _ready(self, timeout):
        """The seconds to run with, or None when the full path must run: a timeout that is not a
        plain number in range, asynchronous work pending, an arena dropped since the API looked
        (the caller holds the group's lock), a shrunk group."""
        if timeout is None:
            timeout = self.group.runtime.timeout
        elif not ((type(timeout) is float or type(timeout) is int) and 0 < timeout <= MAX_TIMEOUT):
            return None
        group = self.group
        if group._pending or group.lane is not self or group.successor is not None:
            return None  # (the lane of a dropped arena or of a shrunk group is not the group's)
        return float(timeout)

    def _run_ready(self, shot, step, x, y, timeout, nbytes: int) -> bool:
        """Run a prepared operation under the group's lock when :meth:`_ready` says the lane may."""
        with self.group._lock:
            t = self._ready(timeout)
            if t is None:
                return False
            self.run(shot, step, x, y, t, nbytes)
        return True

    def allreduce(self, x, op, timeout, out=None) -> bool:
        """``cc.allreduce(x, op, out=out, timeout=timeout)`` done here (True), or nothing done (False)."""
        if type(x) is not _ndarray or type(op) is not str:
            return False
        shot = self.allreduces.get((x.dtype, x.size, op))
        if shot is None:
            return False
        y = _result(x, out)
        if y is _FULL_PATH:
            return False
        if not self._run_ready(shot, self.allreduce_step, x if x.ndim == 1 else x.reshape(-1), y, timeout,
                               x.nbytes):
            return False
        if op == "avg":
            res = x if y is None else y
            np.divide(res, self.n, out=res, casting="unsafe")
        return True

    def reduce_scatter(self, out, x, op, timeout) -> bool:
        if type(x) is not _ndarray or type(out) is not _ndarray or type(op) is not str:
            return False
        shot = self.reduce_scatters.get((x.dtype, out.size, op))
        if shot is None or out.dtype != x.dtype or x.size != self.n * out.size:
            return False
        fx, fo = x.flags, out.flags
        if not (fx.c_contiguous and fx.writeable and fo.c_contiguous and fo.writeable):
            return False
        if not self._run_ready(shot, self.reduce_scatter_step, x if x.ndim == 1 else x.reshape(-1),
                               out if out.ndim == 1 else out.reshape(-1), timeout, x.nbytes):
            return False
        if op == "avg":
            np.divide(out, self.n, out=out, casting="unsafe")
        return True

    def allgather(self, out, x, timeout) -> bool:
        if type(x) is not _ndarray or type(out) is not _ndarray:
            return False
        shot = self.allgathers.get((x.dtype, x.size))
        if shot is None or out.dtype != x.dtype or out.size != self.n * x.size:
            return False
        fx, fo = x.flags, out.flags
        if not (fx.c_contiguous and fo.c_contiguous and fo.writeable):  # (x is only read)
            return False
        if overlaps_beside_block(x, out, self.me):
            return False  # the full path refuses it
        m = x.size
        with self.group._lock:
            t = self._ready(timeout)
            if t is None:
                return False
            x1, y = x if x.ndim == 1 else x.reshape(-1), out if out.ndim == 1 else out.reshape(-1)
            y[self.me * m:(self.me + 1) * m] = x1
            self.run(shot, self.allgather_step, x1, y, t, out.nbytes)
        return True

    def broadcast(self, x, root, timeout, out=None) -> bool:
        if type(x) is not _ndarray or type(root) is not int:
            return False
        shot = self.broadcasts.get((x.dtype, x.size, root))
        if shot is None:
            return False
        y = _result(x, out)
        if y is _FULL_PATH:
            return False
        return self._run_ready(shot, self.broadcast_step, x if x.ndim == 1 else x.reshape(-1), (root, y), timeout,
                               x.nbytes)

    def barrier(self, timeout) -> bool:
        shot = self.barrier_shot
        return shot is not None and self._run_ready(shot, self.barrier_step, None, None, timeout, 0)
