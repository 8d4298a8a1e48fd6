"""A schedule lowered to GPU steps: per rank, a few lanes (CUDA streams, each with its own NCCL
communicator), each an ordered list of NCCL point-to-point groups, reduction kernels and events.

Pure: no CUDA, no torch, no NCCL. It walks the same pieces as the TCP executor
(:class:`~collcomm.runtime.executor.ExecutionPlan`: shards, exact tree shares, chunks), so the
two move the same bytes between the same ranks; only the order differs.

**Time steps.** Every transfer of a tree gets a step number that both of its ends compute alike:

* allgather (out-tree), chunk ``c`` from a parent to its child at depth ``d``: ``c + d - 1``
  (a rank receives chunk ``c`` one step before it forwards it);
* reduce-scatter (in-tree of depth ``D``), chunk ``c`` from a child at depth ``d``: ``c + D - d``
  (a rank receives its children's chunk ``c``, reduces it, and sends it on one step later);
* an allreduce's allgather steps follow all of its reduce-scatter steps.

A lane issues, for each step that has work on this rank, one NCCL group holding all of that
step's sends and receives (of every tree of the lane), then the reductions of what it received
into scratch, then the events others wait for. Matched operations sit in groups of the same
step on both ranks, so every group only waits for groups of its own step: no lane can deadlock,
and neither can a GPU that runs one kernel at a time, provided every rank issues its lanes'
groups in step order (:mod:`collcomm.runtime.gpu.streams` does). A send and a receive between
the same pair in one step are in one group, as NCCL needs.

**Lanes.** Trees of one lane advance together, one group per step; trees of different lanes
advance independently. NCCL runs one communicator's kernels one after the other, so a lane
that is to overlap another needs a communicator of its own (a split of the group's) as well as
a stream; hundreds of trees (ForestColl on large fabrics) cannot each have one. So trees are
spread over at most ``lanes`` lanes (default :data:`DEFAULT_LANES`), each phase's trees by size
onto the least-loaded lane, the same on every rank.

**Events.** In an allreduce the allgather of a part of a rank's shard may start only when that
part is final. On the lane of the reduce-scatter piece that made it final that is stream order;
on another lane the reduce-scatter lane records an event after its last reduction into the
piece, and the allgather lane waits for it before the group that first sends the part.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Union

from collcomm.errors import ScheduleError
from collcomm.runtime.executor import ExecutionPlan, shard_layout
from collcomm.schedules.ir import ALLGATHER, ALLREDUCE, REDUCE_SCATTER, Schedule

DEFAULT_LANES = 4
OUTPUT, SCRATCH = "output", "scratch"


# ---------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class Send:
    """ncclSend of ``count`` elements of the output buffer at ``offset`` to ``peer``."""

    peer: int
    phase: int
    tree: int
    chunk: int
    offset: int
    count: int


@dataclass(frozen=True)
class Recv:
    """ncclRecv of ``count`` elements from ``peer``: into the output at ``offset`` (``into`` is
    OUTPUT), or into the lane's scratch buffer ``slot`` (SCRATCH), to be reduced at ``offset``."""

    peer: int
    phase: int
    tree: int
    chunk: int
    offset: int
    count: int
    into: str = OUTPUT
    slot: int | None = None


@dataclass(frozen=True)
class Reduce:
    """A kernel: ``output[offset:offset + count] op= scratch[slot][:count]`` on the lane's stream."""

    phase: int
    tree: int
    chunk: int
    offset: int
    count: int
    slot: int


@dataclass(frozen=True)
class Record:
    """Record event ``event`` (numbered per rank) on the lane's stream."""

    event: int


@dataclass(frozen=True)
class Wait:
    """The lane's stream waits until event ``event`` has been reached on the stream that records it."""

    event: int


@dataclass(frozen=True)
class GroupStart:
    """ncclGroupStart; ``step`` is the time step of the group (the same on every rank it matches)."""

    step: int


@dataclass(frozen=True)
class GroupEnd:
    """ncclGroupEnd: the group's sends and receives are launched together."""


Step = Union[Send, Recv, Reduce, Record, Wait, GroupStart, GroupEnd]


@dataclass(frozen=True)
class RankProgram:
    """One rank's lanes. ``scratch_slots[lane]``: chunk-sized scratch buffers the lane needs
    (``chunk_elems`` elements each); ``events``: how many events it records (ids 0..events-1)."""

    rank: int
    lanes: tuple[tuple[Step, ...], ...]
    scratch_slots: tuple[int, ...]
    events: int
    chunk_elems: int


@dataclass(frozen=True)
class Lowering:
    """A schedule lowered for every rank of its group, for one buffer layout and chunk size."""

    collective: str
    shards: dict[int, tuple[int, int]]
    chunk_elems: int
    lane_of: dict[tuple[int, int], int]  # (phase, tree) -> lane
    programs: tuple[RankProgram, ...]


# ---------------------------------------------------------------------------- layout
def shards_for(collective: str, n: int, count: int) -> dict[int, tuple[int, int]]:
    """Each root's (offset, size) in the work buffer, as collcomm.runtime.collectives lays it out:
    an allreduce of ``count`` elements splits them over the ranks; an allgather and a
    reduce-scatter of ``count`` elements per rank give rank r the r-th block of ``count``."""
    if collective == ALLREDUCE:
        return dict(enumerate(shard_layout(count, n)))
    if collective in (ALLGATHER, REDUCE_SCATTER):
        return {r: (r * count, count) for r in range(n)}
    raise ScheduleError(f"lower: no GPU lowering for collective {collective!r}")


def assign_lanes(schedule: Schedule, lanes: int) -> dict[tuple[int, int], int]:
    """(phase, tree) -> lane: each phase's trees, largest share first, onto the least-loaded lane
    (ties: the lowest). Exact shares, so every rank computes the same assignment."""
    out: dict[tuple[int, int], int] = {}
    for p, phase in enumerate(schedule.phases):
        load = [Fraction(0)] * lanes
        for t in sorted(range(len(phase.trees)), key=lambda t: (-phase.trees[t].share, t)):
            lane = min(range(lanes), key=lambda i: (load[i], i))
            load[lane] += phase.trees[t].share
            out[(p, t)] = lane
    return out


# ---------------------------------------------------------------------------- lowering
class _Block:
    """What one lane of one rank does at one time step."""

    __slots__ = ("waits", "ops", "records")

    def __init__(self):
        self.waits: set[int] = set()
        self.ops: list[tuple] = []  # (sort key, Send | Recv)
        self.records: list[int] = []


def lower(schedule: Schedule, shards: dict[int, tuple[int, int]], chunk_elems: int,
          lanes: int = DEFAULT_LANES, lane_of: dict[tuple[int, int], int] | None = None) -> Lowering:
    """Lower ``schedule`` over a work buffer laid out as ``shards`` (see :func:`shards_for`), in
    chunks of ``chunk_elems`` elements, onto at most ``lanes`` lanes per rank, the trees spread by
    :func:`assign_lanes` (which puts a root's reduce-scatter and allgather trees of equal shares
    on one lane: no events) or by ``lane_of``, (phase, tree) -> lane, the same on every rank."""
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
        raise ScheduleError(f"lower: lanes must be an integer >= 1, got {lanes!r}")
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems < 1:
        raise ScheduleError(f"lower: chunk_elems must be an integer >= 1, got {chunk_elems!r}")
    n = schedule.num_ranks
    plans = [ExecutionPlan(schedule, r, shards, chunk_elems) for r in range(n)]
    lanes = max(1, min(lanes, max((len(p.trees) for p in schedule.phases), default=1)))
    if lane_of is None:
        lane_of = assign_lanes(schedule, lanes)
    else:
        trees = {(p, t) for p, phase in enumerate(schedule.phases) for t in range(len(phase.trees))}
        if set(lane_of) != trees or not all(isinstance(v, int) and 0 <= v < lanes for v in lane_of.values()):
            raise ScheduleError(f"lower: lane_of must give every (phase, tree) of the schedule a lane in "
                                f"0..{lanes - 1}")
        lane_of = dict(lane_of)
    depth, height = _depths(plans)
    offset = _phase_offsets(plans, depth, height)
    chained = schedule.collective == ALLREDUCE
    programs = tuple(_lower_rank(plans[r], r, lanes, lane_of, depth, height, offset, chained, chunk_elems)
                     for r in range(n))
    return Lowering(schedule.collective, dict(shards), chunk_elems, lane_of, programs)


def _depths(plans: list[ExecutionPlan]):
    """depth[(phase, tree)][rank] (the root is 0) and height[(phase, tree)] (the deepest rank),
    from every rank's parent in the executor's pieces."""
    parent: dict[tuple[int, int], dict[int, int | None]] = defaultdict(dict)
    for r, plan in enumerate(plans):
        for pieces in plan.phases:
            for pc in pieces:
                parent[(pc.phase, pc.tree)][r] = pc.parent
    depth: dict[tuple[int, int], dict[int, int]] = {}
    for key, up in parent.items():
        d: dict[int, int] = {}
        for r in up:
            chain = []
            while r not in d:
                if up.get(r) is None:
                    d[r] = 0
                    break
                chain.append(r)
                r = up[r]
                if len(chain) > len(up):
                    raise ScheduleError(f"lower: phase {key[0]} tree {key[1]} has a cycle through rank {r}")
            for x in reversed(chain):
                d[x] = d[r] + 1
                r = x
        depth[key] = d
    return depth, {key: max(d.values()) for key, d in depth.items()}


def _transfer_step(kind: str, chunk: int, child_depth: int, height: int) -> int:
    """The time step (within its phase) of moving ``chunk`` between a child at ``child_depth`` and
    its parent: see the module's docstring."""
    if kind == ALLGATHER:
        return chunk + child_depth - 1
    return chunk + height - child_depth


def _phase_offsets(plans: list[ExecutionPlan], depth, height) -> list[int]:
    """The first time step of each phase: a phase starts after the last step of the one before."""
    plan = plans[0]
    last = [-1] * len(plan.phases)
    for r, pl in enumerate(plans):
        for kind, pieces in zip(pl.kinds, pl.phases):
            for pc in pieces:
                if pc.parent is not None:
                    key = (pc.phase, pc.tree)
                    last[pc.phase] = max(last[pc.phase],
                                         _transfer_step(kind, pc.chunk, depth[key][r], height[key]))
    offsets, at = [], 0
    for p in range(len(plan.phases)):
        offsets.append(at)
        at += last[p] + 1
    return offsets


def _lower_rank(plan: ExecutionPlan, me: int, lanes: int, lane_of, depth, height, offset, chained,
                chunk_elems: int) -> RankProgram:
    blocks: list[dict[int, _Block]] = [defaultdict(_Block) for _ in range(lanes)]
    final_at: dict[tuple[int, int], tuple[int, int]] = {}  # final RS piece -> (lane, step) of its last reduce
    for kind, pieces in zip(plan.kinds, plan.phases):
        for pc in pieces:
            key = (pc.phase, pc.tree)
            lane, d, h, base = lane_of[key], depth[key][me], height[key], offset[pc.phase]
            order = (pc.phase, pc.tree, pc.chunk)
            n = pc.stop - pc.start
            if kind == ALLGATHER:
                if pc.parent is not None:
                    blocks[lane][base + _transfer_step(kind, pc.chunk, d, h)].ops.append(
                        (order, Recv(pc.parent, pc.phase, pc.tree, pc.chunk, pc.start, n, OUTPUT)))
                for child in pc.children:
                    blocks[lane][base + _transfer_step(kind, pc.chunk, d + 1, h)].ops.append(
                        (order, Send(child, pc.phase, pc.tree, pc.chunk, pc.start, n)))
            else:
                for child in pc.children:
                    at = base + _transfer_step(kind, pc.chunk, d + 1, h)
                    blocks[lane][at].ops.append(
                        (order, Recv(child, pc.phase, pc.tree, pc.chunk, pc.start, n, SCRATCH)))
                    if pc.parent is None:
                        final_at[(pc.frame_tree, pc.chunk)] = (lane, at)
                if pc.parent is not None:
                    blocks[lane][base + _transfer_step(kind, pc.chunk, d, h)].ops.append(
                        (order, Send(pc.parent, pc.phase, pc.tree, pc.chunk, pc.start, n)))
    events = _link_events(plan, lane_of, offset, blocks, final_at) if chained else 0
    return _emit(me, blocks, events, chunk_elems)


def _link_events(plan: ExecutionPlan, lane_of, offset, blocks, final_at) -> int:
    """Records and waits for an allreduce: every allgather piece this rank roots waits for the
    final reduce-scatter pieces it overlaps (the executor's gates) that end on another lane."""
    event_of: dict[tuple[int, int], int] = {}
    for rs_key, gated in sorted(plan.gates.items()):
        if rs_key not in final_at:
            continue  # a piece without children is final from the start
        rs_lane, rs_step = final_at[rs_key]
        for a in gated:
            a_lane = lane_of[(a.phase, a.tree)]
            if a_lane == rs_lane:
                continue  # stream order: the lane's reduce-scatter steps come first
            if rs_key not in event_of:
                event_of[rs_key] = len(event_of)
                blocks[rs_lane][rs_step].records.append(event_of[rs_key])
            blocks[a_lane][offset[a.phase] + a.chunk].waits.add(event_of[rs_key])  # the root sends at depth 0
    return len(event_of)


def _emit(me: int, blocks: list[dict[int, _Block]], events: int, chunk_elems: int) -> RankProgram:
    lanes, slots = [], []
    for lane_blocks in blocks:
        steps: list[Step] = []
        waited: set[int] = set()
        most = 0
        for at in sorted(lane_blocks):
            block = lane_blocks[at]
            for e in sorted(block.waits - waited):  # a wait holds the stream: once per lane is enough
                steps.append(Wait(e))
            waited |= block.waits
            # Matching NCCL operations between a pair pair up in the order issued: both ends sort
            # by (phase, tree, chunk), so the k-th send to a peer meets the peer's k-th receive.
            ops = [op for _, op in sorted(block.ops, key=lambda o: (o[0], isinstance(o[1], Send), o[1].peer))]
            reduces, slot = [], 0
            steps.append(GroupStart(at))
            for op in ops:
                if isinstance(op, Recv) and op.into == SCRATCH:
                    op = Recv(op.peer, op.phase, op.tree, op.chunk, op.offset, op.count, SCRATCH, slot)
                    reduces.append(Reduce(op.phase, op.tree, op.chunk, op.offset, op.count, slot))
                    slot += 1
                steps.append(op)
            steps.append(GroupEnd())
            steps.extend(reduces)  # kernels go after the group: inside one they would run before it
            steps.extend(Record(e) for e in block.records)
            most = max(most, slot)
        lanes.append(tuple(steps))
        slots.append(most)
    return RankProgram(me, tuple(lanes), tuple(slots), events, chunk_elems)


def transfers(lowering: Lowering, itemsize: int) -> list[tuple[int, int, int, int]]:
    """Every send of the lowering as (phase, src, dst, bytes): what the TCP executor's plan sends too."""
    out = []
    for prog in lowering.programs:
        for steps in prog.lanes:
            out.extend((s.phase, prog.rank, s.peer, s.count * itemsize) for s in steps if isinstance(s, Send))
    return out


__all__ = ["DEFAULT_LANES", "GroupEnd", "GroupStart", "Lowering", "OUTPUT", "RankProgram", "Record",
           "Recv", "Reduce", "SCRATCH", "Send", "Step", "Wait", "assign_lanes", "lower", "shards_for",
           "transfers"]
