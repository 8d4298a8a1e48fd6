"""Collectives of a group whose members share one machine: shared memory, in the calling thread.

Over sockets every byte of a collective crosses the kernel twice and several Python threads hand
each piece on; between processes of one machine neither is needed. When every member of a group
is on this machine (:func:`eligible`), the group forms an :class:`~collcomm.transport.shm.arena.Arena`
at its first collective (:meth:`LocalGroup.form`) and from then on runs allreduce, allgather,
reduce-scatter, broadcast, reduce and barrier here: each member writes what the others need into
its own segment, publishes a step, waits for the others' (spin, yield, futex), and reads their
data in place, reducing straight out of their segments into its own buffer. No thread hand-off,
coordinator call or allocation per operation.

Three algorithms: one-shot or two-step chosen per call by the alpha-beta model (:func:`choose`),
and direct reads from a size on:

* **one-shot** (small messages): every member writes its whole input, one step, every member
  reduces all inputs itself (in rank order, so every member computes the same bits): one
  synchronization.
* **two-step** (large messages, in rounds of at most the arena's half): every member writes the
  parts the others reduce; step; each reduces its own part from every segment and writes the
  result into its segment; step; each copies the others' results. Two synchronizations per
  round, each byte reduced once.
* **direct** (from ``COLLCOMM_SHM_DIRECT_BYTES``, when every member may read its peers' memory):
  every member publishes its buffer's address; each reduces its part reading the peers' buffers
  directly (``process_vm_readv``); step; each reads the others' results from their buffers;
  step. One copy per byte instead of two (reduce-scatter and alltoall read directly too).

Allgather and broadcast move no data by reduction: a member only copies. From
``COLLCOMM_SHM_STREAM_BYTES`` on (unset: 4 MiB, or more where the group's results fit half the
last-level cache) they stay on the segments and their copies into the result
bypass the cache (:mod:`collcomm.transport.shm.stream`): two copies per byte, the first into a
segment that stays in the cache and the second streamed, cost less than one direct read, whose
stores the kernel makes ordinary (each line read before it is written). Without the streaming
copy they read directly as the others do.

Failures keep the runtime's contract: a dead peer (its process exits: pidfd) is a PeerFailure at
once, a stopped one a CollectiveTimeout at the deadline, a failure seen elsewhere (the
coordinator's view) or written into a peer's control page is raised here, and a rank whose
operation fails writes why into its own page, so the members waiting for it fail with the same
error. The arena is then dropped and the group goes on over sockets (shrink and grow form new
groups, with arenas of their own).
"""

from __future__ import annotations

import os
import time

import numpy as np

from collcomm.errors import CollectiveError, MismatchError
from collcomm.runtime import failures
from collcomm.runtime.lane import SmallLane
from collcomm.runtime.local_settings import SPIN, SPIN_CROWDED, direct_bytes, enabled, half_bytes, stream_bytes
from collcomm.runtime.operation import describe_fields
from collcomm.transport import frames
from collcomm.transport.shm import arena as shm_arena, cma, stream
from collcomm.transport.shm.segment import Segment, name as segment_name

# The alpha-beta model of the algorithms: alpha, the cost of one step, is measured by every arena
# when it forms (Arena.calibrate); the costs per byte of a copy and of a reduction (one input into
# the output) are this kind of machine's (bench/shm_collectives.py).
BETA_COPY, BETA_REDUCE = 0.2e-9, 0.4e-9
TELEMETRY_EVERY_BYTES = 1 << 20  # record shared-memory traffic in the link telemetry in batches
BROADCAST_PART_BYTES = 1 << 20  # a direct broadcast of 3 or more members goes in rounds of n parts this size
DIRECT_CHUNK_BYTES = 256 << 10  # a direct read to be reduced goes through a scratch of this size (stays in cache)


def eligible(rt, group) -> bool:
    """Whether ``group``'s members share this machine: the same registered host and, when the job
    has a fabric (a topology file, an emulated one), the same box in it. A fault-injection plan
    acts on frames and a named algorithm is a plan for the executor, so either keeps the group on
    sockets."""
    if group.size < 2 or not enabled() or rt.transport.faults is not None or rt.algorithm:
        return False
    if len({rt.hostnames.get(m) for m in group.members}) != 1:
        return False
    if rt.has_fabric:
        topo = rt.world_topology()
        boxes = {topo.host_of(topo.compute[m]) or topo.compute[m] for m in group.members}
        return len(boxes) == 1
    return True


def choose(n: int, nbytes: int, capacity: int, alpha: float) -> str:
    """"one_shot" or "two_step" for an allreduce of ``nbytes`` among ``n`` members whose steps
    cost ``alpha`` seconds: the one the alpha-beta model says is faster (one-shot only when the
    input fits a half)."""
    if nbytes > capacity:
        return "two_step"
    one = alpha + BETA_COPY * nbytes + (n - 1) * BETA_REDUCE * nbytes
    two = 2 * alpha + BETA_COPY * nbytes * (n - 1) / n + BETA_REDUCE * nbytes * (n - 1) / n \
        + BETA_COPY * nbytes / n + BETA_COPY * nbytes * (n - 1) / n
    return "one_shot" if one <= two else "two_step"


def parts(count: int, n: int) -> list[tuple[int, int]]:
    """Split ``count`` elements into ``n`` (offset, length) parts, the first ones longer by one."""
    base, extra = divmod(count, n)
    out, off = [], 0
    for i in range(n):
        length = base + (1 if i < extra else 0)
        out.append((off, length))
        off += length
    return out


class LocalGroup:
    """The shared-memory collectives of one group (one arena generation)."""

    def __init__(self, group, arena: shm_arena.Arena, alpha: float, direct: int | None = None,
                 streamed: int | None = None):
        self.group, self.arena, self.alpha = group, arena, alpha
        self.direct = direct  # from what size on members read each other's buffers directly (None: never)
        self.streamed = streamed  # from what size of result copies into it bypass the cache (None: never)
        self._scratch: np.ndarray | None = None
        self.n, self.me = group.size, group.me
        self._descs: dict[tuple, tuple[int, bytes]] = {}
        self._one_shots: dict[tuple, tuple] = {}  # prepared one-round operations by shape (_one_round)
        self._traffic_seconds = 0.0
        self._pending_bytes = 0
        self._seq, self._current = -1, (0, b"")  # the operation running (for poll)
        self.lane = SmallLane(self)  # the same one-round operations, straight from the API

    # ------------------------------------------------------------------ forming
    @classmethod
    def form(cls, group, generation: int, timeout: float) -> "LocalGroup | None":
        """Create this member's segment, agree (over the group's sockets) that every member mapped
        every segment, then remove the names. None (the group stays on sockets) when any member
        could not; every member decides the same."""
        rt = group.runtime
        capacity = half_bytes()
        size = shm_arena.segment_size(capacity)
        fields = dict(group=group.id, epoch=group.epoch, generation=generation, capacity=capacity)
        own, segments, ok = None, [None] * group.size, 1
        try:
            own = Segment.create(segment_name(rt.job_tag, group.id, group.epoch, generation, rt.rank), size)
            shm_arena.Arena.initialize(own, rank=rt.rank, **fields)
            segments[group.me] = own
        except OSError:
            ok = 0
        try:
            ok = _agree(group, ok, timeout)  # every member created its own (or gave up)
            if ok:
                try:
                    for i, member in enumerate(group.members):
                        if i != group.me:
                            seg = Segment.attach(segment_name(rt.job_tag, group.id, group.epoch, generation, member),
                                                 size)
                            segments[i] = seg
                            shm_arena.Arena.verify(seg, rank=member, **fields)
                except OSError:
                    ok = 0
                ok = _agree(group, ok, timeout)  # every member mapped every segment
        except BaseException:
            for s in segments:
                if s is not None:
                    s.close()
            raise
        if own is not None:
            own.unlink()  # mapped everywhere (or abandoned): no name is left behind
        if not ok:
            for s in segments:
                if s is not None:
                    s.close()
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        neighbours = sum(1 for h in rt.hostnames.values() if h == rt.hostname)  # the job's ranks on this machine
        # more processes than cores: spinning would starve the one waited for
        crowded = max(group.size, neighbours) > cores
        spin, yields = (SPIN_CROWDED if crowded else SPIN)
        arena = shm_arena.Arena(segments, group.me, list(group.members), capacity, spin=spin, yields=yields)
        arena.watch_processes()
        try:
            alpha = arena.calibrate(time.monotonic() + timeout)
            direct, streamed = arena.agree_thresholds(time.monotonic() + timeout,
                                                      direct_bytes() if cma.AVAILABLE else None,
                                                      stream_bytes(group.size) if stream.AVAILABLE else None)
        except BaseException:
            arena.close()
            raise
        return cls(group, arena, alpha, direct, streamed)

    def close(self) -> None:
        self._flush_telemetry()
        self.arena.close()

    # ------------------------------------------------------------------ running
    def run(self, fields: tuple, timeout: float, body, nbytes: int = 0) -> None:
        """Run ``body(deadline, poll, desc)`` as operation ``fields`` of the group; a failure is
        raised as the typed error every member raises, and drops the arena."""
        current = self.describe(fields)
        seq = self.start(current)
        parity = self.arena.begin(*current)
        desc_hash, text = current
        start = time.monotonic()
        try:
            body(start + timeout, self.poll, (parity, desc_hash, text))
        except CollectiveError as e:
            self.fail(seq, e)
        if nbytes:
            self.count(nbytes, time.monotonic() - start)

    def start(self, current: tuple[int, bytes]) -> int:
        """Number the next operation (described by ``current``: its hash and text, for poll)."""
        seq = self._seq = self.group.next_seq()
        self._current = current
        return seq

    def fail(self, seq: int, error: CollectiveError) -> None:
        """Say why in this member's control page, drop the arena, raise the group's typed error."""
        if isinstance(error, MismatchError) and error.rank is None:  # told by a peer: in this member's terms
            error = self._disagreement(error)
        self.arena.abort(frames.abort_text(error))
        self.group.drop_local(self)
        self.group.raise_failure(seq, error)

    def _disagreement(self, told: MismatchError) -> MismatchError:
        """A disagreement another member saw, told as this member's operation and a peer's that
        differs (every member's description of the operation is in its control page)."""
        parity = self.arena.operation & 1
        desc, text = self._current
        peer = self.arena.differing(parity, desc)
        return told if peer is None else self.arena.mismatch(peer, parity, text)

    def poll(self):
        """What the coordinator knows of the current operation (asked while a wait sleeps)."""
        desc_hash, text = self._current
        return failures.outside_failure(self.group.runtime, self.group, self._seq, desc_hash, text.decode())

    def describe(self, fields: tuple) -> tuple[int, bytes]:
        """The operation's hash (what every member must agree on) and its text (for errors)."""
        d = self._descs.get(fields)
        if d is None:
            if len(self._descs) > 256:
                self._descs.clear()
            h = frames.describe(self.group.id, self.group.epoch, *fields) >> 1  # fits int64
            d = self._descs[fields] = (h, describe_fields(fields).encode()[:shm_arena.DESC_TEXT_MAX])
        return d

    def count(self, nbytes: int, seconds: float) -> None:
        """What this member read from its peers' segments, for the link monitor (in batches; each
        peer's share is ``nbytes / n``)."""
        self._traffic_seconds += seconds
        self._pending_bytes += nbytes
        if self._pending_bytes >= TELEMETRY_EVERY_BYTES:
            self._flush_telemetry()

    def _flush_telemetry(self) -> None:
        if not self._pending_bytes:
            return
        rt, members = self.group.runtime, self.group.members
        telemetry = rt.transport.telemetry
        share = self._pending_bytes // self.n
        for i in range(self.n):
            if i != self.me and share:
                telemetry.record_transfer(members[i], rt.rank, share, self._traffic_seconds)
        self._traffic_seconds = 0.0
        self._pending_bytes = 0

    def _is_direct(self, nbytes: int) -> bool:
        return self.direct is not None and nbytes >= self.direct

    def _landing(self, nbytes: int):
        """How allgather and broadcast bring a result of ``nbytes`` out of the segments: the
        streamed copy (from the agreed size on, at every size), np.copyto, or None where the
        members read each other's buffers directly instead."""
        if self.streamed is not None and nbytes >= self.streamed:
            return stream.copy
        return None if self._is_direct(nbytes) else np.copyto

    def _scratch_for(self, dtype: np.dtype) -> np.ndarray:
        if self._scratch is None:
            self._scratch = np.empty(DIRECT_CHUNK_BYTES, np.uint8)
        return self._scratch[:DIRECT_CHUNK_BYTES // dtype.itemsize * dtype.itemsize].view(dtype)

    def _reduce_direct(self, reduce, out: np.ndarray, offset: int, first: np.ndarray | None = None,
                       combine=None) -> None:
        """out (op)= every peer's published buffer from element ``offset`` on, peer by peer in
        rank order, through the scratch (a chunk at a time). ``first`` (with ``combine``): this
        member's own input, when ``out`` is not it (out = first (op) peers...)."""
        arena, size = self.arena, out.dtype.itemsize
        tmp = self._scratch_for(out.dtype)
        for c0 in range(0, out.size, tmp.size):
            piece = out[c0:c0 + tmp.size]
            t = tmp[:piece.size]
            for k, j in enumerate(arena.peers):
                arena.read_direct(j, (offset + c0) * size, t)
                if k == 0 and first is not None:
                    combine(piece, first[c0:c0 + piece.size], t)
                else:
                    reduce(piece, t)

    # ------------------------------------------------------------------ collectives
    def allreduce(self, buf, op: str, timeout: float, out=None) -> None:
        """Reduce ``buf`` in place, or into ``out`` (a Buffer of its dtype and count sharing no
        memory with it; ``buf`` is then only read): every path writes the result straight into
        ``out``, so out of place costs no copy."""
        x, arena, n = buf.array, self.arena, self.n
        res = buf if out is None else out
        y = res.array
        fields = ("allreduce", buf.dtype, buf.count, op, -1)
        if self._is_direct(buf.nbytes):
            self._allreduce_direct(buf, res, op, fields, timeout)
            return
        shot = self._one_shots.get(fields)
        if shot is None and choose(n, buf.nbytes, arena.capacity, self.alpha) == "one_shot":
            # this member's input view and every member's (in rank order), by half
            shot = self._one_round(fields, buf, self.lane.allreduces, (x.dtype, x.size, op),
                                   lambda h: (arena.view(self.me, h, x.dtype)[:x.size],
                                              tuple(arena.view(j, h, x.dtype)[:x.size] for j in range(n))),
                                   buf.reducer(op))
        if shot is not None:  # the small-message path: every view and function prepared once
            self.lane.run(shot, self.lane.allreduce_step, x, None if out is None else y, timeout, buf.nbytes)
            if op == "avg":
                res.divide(n)
            return
        reduce = buf.reducer(op)
        combine = None if out is None else buf.combiner(op)
        capacity = arena.capacity // x.dtype.itemsize

        def body(deadline, poll, desc):
            for start in range(0, x.size, capacity):
                chunk, result = x[start:start + capacity], y[start:start + capacity]
                layout = parts(chunk.size, n)
                h = arena.next_half()
                mine = arena.view(self.me, h, x.dtype)
                for j, (off, length) in enumerate(layout):
                    if j != self.me:
                        np.copyto(mine[off:off + length], chunk[off:off + length])
                arena.sync(deadline, poll, desc)
                desc = None
                off, length = layout[self.me]
                part = result[off:off + length]  # this member's part of the result
                _reduce_into(reduce, part, None if out is None else chunk[off:off + length],
                             [arena.view(j, h, x.dtype)[off:off + length] for j in arena.peers], combine)
                np.copyto(mine[off:off + length], part)  # for the peers
                arena.sync(deadline, poll)
                for j, (off, length) in enumerate(layout):
                    if j != self.me:
                        np.copyto(result[off:off + length], arena.view(j, h, x.dtype)[off:off + length])

        self.run(fields, timeout, body, buf.nbytes)
        if op == "avg":
            res.divide(n)

    def _allreduce_direct(self, buf, res, op: str, fields: tuple, timeout: float) -> None:
        """Large allreduce, one copy per byte: every member publishes its input and its result's
        buffer (``res``; the input's own, in place); each reduces its part into its result
        reading its peers' inputs directly; step; each reads the others' reduced parts straight
        from their results; step (no member returns while its buffers are being read). Each part
        is reduced by one member in rank order of the peers: every member gets the same bits."""
        x, y, arena, n, me = buf.array, res.array, self.arena, self.n, self.me
        reduce = buf.reducer(op)
        combine = None if res is buf else buf.combiner(op)
        layout = parts(x.size, n)
        size = x.dtype.itemsize

        def body(deadline, poll, desc):
            arena.mine[shm_arena.W_BUF] = cma.address(x)
            arena.mine[shm_arena.W_OUT] = cma.address(y)
            arena.sync(deadline, poll, desc)
            off, length = layout[me]
            self._reduce_direct(reduce, y[off:off + length], off, None if res is buf else x[off:off + length],
                                combine)
            arena.sync(deadline, poll)
            for j in arena.peers:
                off, length = layout[j]
                arena.read_direct(j, off * size, y[off:off + length], shm_arena.W_OUT)
            arena.sync(deadline, poll)

        self.run(fields, timeout, body, buf.nbytes)
        if op == "avg":
            res.divide(n)

    def _one_round(self, fields: tuple, buf, table: dict, key, views, reduce) -> tuple:
        """Prepare the one-round operation ``fields`` (:meth:`SmallLane.prepare`), kept here by
        its fields and, for a NumPy dtype (not bfloat16, which travels as uint16), in the lane's
        ``table`` under ``key``, for the API's later calls of this shape."""
        if len(self._one_shots) > 64:
            self._one_shots.clear()
        shot = self._one_shots[fields] = self.lane.prepare(
            table if buf.dtype == buf.array.dtype.name else None, key, fields, views, reduce)
        return shot

    def reduce(self, buf, root: int, op: str, timeout: float, out=None) -> None:
        """Reduce into the root's buffer, or the root's ``out`` (as :meth:`allreduce`'s); the
        others' buffers stay as they were."""
        x, arena, n, me = buf.array, self.arena, self.n, self.me
        res = buf if out is None else out
        y = res.array
        reduce = buf.reducer(op)
        combine = None if out is None else buf.combiner(op)
        fields = ("reduce", buf.dtype, buf.count, op, root)
        capacity = arena.capacity // x.dtype.itemsize

        def body(deadline, poll, desc):
            for start in range(0, x.size, capacity):
                chunk = x[start:start + capacity]
                layout = parts(chunk.size, n)
                h = arena.next_half()
                mine = arena.view(me, h, x.dtype)
                np.copyto(mine[:chunk.size], chunk)
                arena.sync(deadline, poll, desc)
                desc = None
                off, length = layout[me]
                # the root's result lands in its result buffer (first its own input: ``first``
                # out of place); the others' in their segment, for the root (it holds their input)
                if me == root:
                    result = y[start:start + capacity]
                    target, first = result[off:off + length], None if out is None else chunk[off:off + length]
                else:
                    target, first = arena.view(me, h, x.dtype)[off:off + length], None
                _reduce_into(reduce, target, first, [arena.view(j, h, x.dtype)[off:off + length] for j in arena.peers],
                             combine)
                arena.sync(deadline, poll)
                if me == root:
                    for j, (off, length) in enumerate(layout):
                        if j != me:
                            np.copyto(result[off:off + length], arena.view(j, h, x.dtype)[off:off + length])

        self.run(fields, timeout, body, buf.nbytes)
        if op == "avg" and me == root:
            res.divide(n)

    def reduce_scatter(self, dst, src, op: str, timeout: float) -> None:
        """``dst`` = this member's block of the reduction of every member's ``src``."""
        x, y, arena, n, me = src.array, dst.array, self.arena, self.n, self.me
        m = y.size
        fields = ("reduce_scatter", src.dtype, m, op, -1)
        reduce, combine = src.reducer(op), src.combiner(op)
        if self._is_direct(x.nbytes):  # read the peers' inputs directly
            def direct(deadline, poll, desc):
                arena.mine[shm_arena.W_BUF] = cma.address(x)
                arena.sync(deadline, poll, desc)
                mine = x[me * m:(me + 1) * m]
                self._reduce_direct(reduce, y, me * m, None if np.may_share_memory(y, mine) else mine, combine)
                arena.sync(deadline, poll)  # nobody returns while its input is being read

            self.run(fields, timeout, direct, src.nbytes)
            if op == "avg":
                dst.divide(n)
            return
        if x.nbytes <= arena.capacity:  # one round: the whole input in one copy, views prepared
            shot = self._one_shots.get(fields) or self._one_round(
                fields, src, self.lane.reduce_scatters, (x.dtype, m, op),
                lambda h: (arena.view(me, h, x.dtype)[:x.size],
                           tuple(arena.view(j, h, x.dtype)[me * m:(me + 1) * m] for j in arena.peers)),
                reduce)
            self.lane.run(shot, self.lane.reduce_scatter_step, x, y, timeout, src.nbytes)
            if op == "avg":
                dst.divide(n)
            return
        step = max(1, arena.capacity // x.dtype.itemsize // n)

        def body(deadline, poll, desc):
            for start in range(0, m, step):
                length = min(step, m - start)
                h = arena.next_half()
                mine = arena.view(me, h, x.dtype)
                for j in range(n):
                    if j != me:
                        np.copyto(mine[j * step:j * step + length], x[j * m + start:j * m + start + length])
                arena.sync(deadline, poll, desc)
                desc = None
                # this member's own input first: ``out`` may be that very block (in place)
                _reduce_into(reduce, y[start:start + length], x[me * m + start:me * m + start + length],
                             [arena.view(j, h, x.dtype)[me * step:me * step + length] for j in arena.peers],
                             combine)

        self.run(fields, timeout, body, src.nbytes)
        if op == "avg":
            dst.divide(n)

    def allgather(self, dst, src, timeout: float) -> None:
        """``dst`` = every member's ``src``, in rank order. A result large enough to stream goes
        through the segments at every size: two copies per byte, the second past the cache, cost
        less than one direct read, whose stores the kernel makes ordinary."""
        x, y, arena, n, me = src.array, dst.array, self.arena, self.n, self.me
        m = x.size
        own = y[me * m:(me + 1) * m]
        fields = ("allgather", src.dtype, m, "", -1)
        land = self._landing(dst.nbytes)
        if land is None:  # read each peer's input directly
            def direct(deadline, poll, desc):
                arena.mine[shm_arena.W_BUF] = cma.address(x)
                arena.sync(deadline, poll, desc)
                np.copyto(own, x)  # after the step: a member that waited for the others did no work meanwhile
                for j in arena.peers:
                    arena.read_direct(j, 0, y[j * m:(j + 1) * m])
                arena.sync(deadline, poll)  # nobody returns while its input is being read

            self.run(fields, timeout, direct, dst.nbytes)
            return
        if x.nbytes <= arena.capacity:  # one round, views prepared
            land(own, x)
            shot = self._one_shots.get(fields) or self._one_round(
                fields, src, self.lane.allgathers, (x.dtype, m),
                lambda h: (arena.view(me, h, x.dtype)[:m],
                           tuple((j * m, arena.view(j, h, x.dtype)[:m]) for j in arena.peers)), None)
            self.lane.run(shot, self.lane.allgather_step, x, y, timeout, dst.nbytes)
            return
        step = arena.capacity // x.dtype.itemsize
        # this member's own block too is copied out of its segment, round by round, where the
        # piece is in the cache: x is read from memory once (in place there is nothing to copy)
        copied = range(n) if cma.address(own) != cma.address(x) else arena.peers

        def body(deadline, poll, desc):
            for start in range(0, m, step):
                length = min(step, m - start)
                h = arena.next_half()
                np.copyto(arena.view(me, h, x.dtype)[:length], x[start:start + length])  # read at once: cached
                arena.sync(deadline, poll, desc)
                desc = None
                for j in copied:
                    land(y[j * m + start:j * m + start + length], arena.view(j, h, x.dtype)[:length])

        self.run(fields, timeout, body, dst.nbytes)

    def alltoall(self, dst, src, timeout: float) -> None:
        """Block j of ``src`` goes to member j: block i of ``dst`` = member i's block ``me``.
        ``dst`` may be ``src``: through the segments every block of a round is staged before any
        is overwritten; read directly, the peers read the input while blocks land, so it is copied."""
        x, y, arena, n, me = src.array, dst.array, self.arena, self.n, self.me
        m = x.size // n
        fields = ("alltoall", src.dtype, dst.count, "", -1)
        in_place = np.may_share_memory(x, y)
        if in_place and (self._is_direct(x.nbytes) or cma.address(x) != cma.address(y)):
            # (read directly, or overlapping without being the same) a copy of the input, in the
            # group's work array: kept for the next call of this shape, no allocation per call
            copy = self.group.scratch(x.size, x.dtype)
            np.copyto(copy, x)
            x, in_place = copy, False
        if not in_place:
            np.copyto(y[me * m:(me + 1) * m], x[me * m:(me + 1) * m])
        if self._is_direct(x.nbytes):  # read this member's block of each peer's input directly

            def direct(deadline, poll, desc):
                arena.mine[shm_arena.W_BUF] = cma.address(x)
                arena.sync(deadline, poll, desc)
                for j in arena.peers:
                    arena.read_direct(j, me * m * x.dtype.itemsize, y[j * m:(j + 1) * m])
                arena.sync(deadline, poll)  # nobody returns while its input is being read

            self.run(fields, timeout, direct, src.nbytes)
            return
        step = max(1, arena.capacity // x.dtype.itemsize // n)  # of every block, per round

        def body(deadline, poll, desc):
            for start in range(0, m, step):
                length = min(step, m - start)
                h = arena.next_half()
                mine = arena.view(me, h, x.dtype)
                for j in arena.peers:
                    np.copyto(mine[j * step:j * step + length], x[j * m + start:j * m + start + length])
                arena.sync(deadline, poll, desc)
                desc = None
                for j in arena.peers:
                    np.copyto(y[j * m + start:j * m + start + length],
                              arena.view(j, h, x.dtype)[me * step:me * step + length])

        self.run(fields, timeout, body, src.nbytes)

    def broadcast(self, buf, root: int, timeout: float, out=None) -> None:
        """The root's ``buf`` into every member's ``buf``, or into every member's ``out`` (the
        root's ``buf`` is then only read; the root copies it into its ``out`` itself). As the
        allgather, a result large enough to stream goes through the root's segment at every size:
        the readers' copies out of it stream past the cache."""
        x, arena, me = buf.array, self.arena, self.me
        res = buf if out is None else out
        y = res.array
        fields = ("broadcast", buf.dtype, buf.count, "", root)
        land = self._landing(buf.nbytes)
        if land is None:
            self._broadcast_direct(buf, res, root, fields, timeout)
            return
        if x.nbytes <= arena.capacity:  # one round, views prepared (the root's half)
            shot = self._one_shots.get(fields) or self._one_round(
                fields, buf, self.lane.broadcasts, (x.dtype, x.size, root),
                lambda h: arena.view(root, h, x.dtype)[:x.size], None)
            self.lane.run(shot, self.lane.broadcast_step, x, (root, None if out is None else y), timeout,
                          buf.nbytes)
            return
        step = arena.capacity // x.dtype.itemsize

        def body(deadline, poll, desc):
            for start in range(0, x.size, step):
                chunk = x[start:start + step]
                h = arena.next_half()
                if me == root:
                    np.copyto(arena.view(me, h, x.dtype)[:chunk.size], chunk)
                arena.sync(deadline, poll, desc)
                desc = None
                if me != root:
                    land(y[start:start + chunk.size], arena.view(root, h, x.dtype)[:chunk.size])
            if me == root and out is not None:
                land(y, x)

        self.run(fields, timeout, body, buf.nbytes)

    def _broadcast_direct(self, buf, res, root: int, fields: tuple, timeout: float) -> None:
        """Broadcast, one copy per byte received, spread over the members. Each round cuts its
        stretch of the buffer into parts, one per *holder*; the root writes its own part (when it
        holds one) into each reader's result while each reader reads its part from the root's
        input; with two or more readers: step; each reader reads the other readers' parts from
        their results. A step after the last round: no member returns while its buffer is being
        read.

        The holders are every member, or only the readers when the root copies its input into its
        own result (out of place: its control page's W_OUT is not its W_BUF, which every member
        reads after the first step): that copy is the root's share then, done round by round
        while the readers read (64 MB on 4 ranks: the root's core did its copy and its writes
        while the other did two readers' reads). Rounds of parts of BROADCAST_PART_BYTES when
        readers exchange parts (a reader then reads the others' parts while they are still in
        the cache: 64 MB on 4 ranks 3.19 against 2.96 and 3.68 against 3.45 GB/s,
        bench/RESULTS.md); otherwise one round."""
        x, y, arena, n, me = buf.array, res.array, self.arena, self.n, self.me
        size = x.dtype.itemsize
        readers = [j for j in range(n) if j != root]

        def body(deadline, poll, desc):
            arena.mine[shm_arena.W_BUF] = cma.address(x if me == root else y)  # what the others read or write
            arena.mine[shm_arena.W_OUT] = cma.address(y)
            arena.sync(deadline, poll, desc)
            top = arena.ctl[root]
            root_copies = top[shm_arena.W_OUT] != top[shm_arena.W_BUF]
            holders = readers if root_copies else list(range(n))
            exchange = len(readers) > 1
            per_round = max(1, BROADCAST_PART_BYTES // size) * len(holders) if exchange else x.size
            for start in range(0, x.size, per_round):
                stretch = min(per_round, x.size - start)
                layout = {j: (start + off, length) for j, (off, length) in zip(holders, parts(stretch, len(holders)))}
                if me == root:
                    if not root_copies:
                        off, length = layout[root]
                        for j in arena.peers:
                            arena.write_direct(j, off * size, x[off:off + length])
                    else:
                        np.copyto(y[start:start + stretch], x[start:start + stretch])
                else:
                    off, length = layout[me]
                    arena.read_direct(root, off * size, y[off:off + length])
                if exchange:
                    arena.sync(deadline, poll)
                    if me != root:
                        for j in readers:
                            if j != me:
                                off, length = layout[j]
                                arena.read_direct(j, off * size, y[off:off + length])
            arena.sync(deadline, poll)

        self.run(fields, timeout, body, buf.nbytes)

    def barrier(self, timeout: float) -> None:
        lane = self.lane
        if lane.barrier_shot is None:
            lane.barrier_shot = lane.prepare(None, None, ("barrier", "", 0, "", -1), lambda h: None, None)
        lane.run(lane.barrier_shot, lane.barrier_step, None, None, timeout, 0)


def _reduce_into(reduce, out: np.ndarray, first: np.ndarray | None, others: list[np.ndarray], combine=None) -> None:
    """out = first (op) others[0] (op) others[1] ... with in-place reductions; ``first`` None:
    ``out`` holds it already, as it does when ``first`` is ``out`` itself. ``combine(out, a, b)``
    (out = a (op) b) saves copying ``first`` into ``out``."""
    if first is not None and not np.may_share_memory(out, first):
        if combine is not None and others:
            combine(out, first, others[0])
            others = others[1:]
        else:
            np.copyto(out, first)
    for o in others:
        reduce(out, o)


def _agree(group, ok: int, timeout: float) -> int:
    """The minimum of ``ok`` over the members, over the group's sockets."""
    from collcomm.runtime.collectives import allreduce

    flag = np.array([ok], dtype=np.int32)
    allreduce(group.runtime, group, flag, "min", timeout)
    return int(flag[0])
