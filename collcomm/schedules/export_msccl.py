"""Export a ``collcomm.schedule/1`` Schedule as an MSCCL algorithm XML program.

MSCCL (and RCCL's copy of it) runs collectives from XML programs: per GPU a list of
threadblocks, each a sequence of steps over chunks of three buffers ('i' input,
'o' output, 's' scratch). The mapping from a tree plan:

Chunks
    Trees with the same root and logical edges (ForestColl splits a tree class by
    the switches its copies cross) are merged, their shares added. With ``base`` the
    lcm of all share denominators (all phases together), a tree of share ``a/b``
    carries ``a/b * base`` chunks of its root's shard: a contiguous range, the trees
    of one root one after the other in schedule order. ``nchannels`` instances each
    run a copy of the program over their own ``base`` chunks of every shard, so a
    shard is ``cs = base * nchannels`` chunks and ``nchunksperloop = N * cs``. A range
    longer than one step may move (71 chunks) is cut into pieces, each moved by steps
    of its own.

Steps
    Each logical tree edge ``u -> v`` becomes one send at GPU u and one receive at GPU
    v (the physical path through switches does not appear: MSCCL's transport routes).
    Allgather out-trees: the root sends its input chunks; a GPU receives from its
    parent into 'o' with ``rcs`` (receive, copy, send on to one child) where a fused
    step fits, else ``r``, and sends ``s`` from 'o' to its other children after the
    receive (a cross-threadblock dependency). Each GPU also copies its own input into
    its slot of 'o' (``cpy``). Reduce-scatter in-trees: a leaf sends its input; a GPU
    with children folds them in one after another with ``rrc`` (receive, reduce with
    the local value, store: into scratch for reduce-scatter, into 'o' for allreduce)
    and passes the sum to its parent either fused into the last child's receive
    (``rrs``) or as a plain ``s``; the root's ``rrc`` chain writes the result. The
    first reduction reads the input, later ones the accumulator, so the programs are
    correct both in place and out of place (``inplace="1" outofplace="1"``).
    Allreduce is the reduce-scatter in-trees into 'o', then the allgather out-trees
    from 'o'; a root's broadcast of a range waits for the reductions that wrote it.

Threadblocks
    A threadblock has one send peer and one receive peer and runs its steps in order;
    on one channel a connection (peer and direction) belongs to one threadblock. Per
    GPU a fused step needs a threadblock owning both of its connections, so the
    pairs (receive-from q, send-to p) that would carry fused steps are matched
    greedily by the chunks they would fuse; every matched pair is one threadblock,
    a leftover receive and send with the same peer share one, others stand alone,
    and the allgather copies get a local threadblock.

Channels
    Each instance has channels of its own. If some threadblock would hold more steps
    than the runtime allows (64), an instance spreads its tree pieces round-robin
    over several channels ("lanes": each has its own connections and threadblocks),
    using the fewest lanes that fit; the XML's ``nchannels`` is instances x lanes.

Order
    Steps joined by a message or a fused step form a *chain* that moves one piece
    along a tree path. Chains are numbered by their level in the dependency DAG
    (then by creation order), and every threadblock runs its steps in chain order.
    Executing the chains one at a time in that order is a valid run even when every
    message needs its receiver to be at that very step (no buffering), so the
    program cannot deadlock with any amount of buffering, and every connection's
    sends and receives come in the same order. A step has one dependency of its own
    (``depid``/``deps``: threadblock and step index); further ones precede it as
    ``nop`` steps; ``hasdep="1"`` marks steps that others wait for.

Sources for the format: microsoft/msccl-tools ``msccl/language/ir.py`` (the writer:
attributes, nop expansion of extra dependencies, step indices counting nops) and the
runtime parser/kernel of Azure/msccl-executor-nccl and ROCm/rccl
(``src/misc/msccl/msccl_parser.cc``, ``msccl_struct.h``): required attributes, step
semantics and the limits checked in :data:`LIMITS`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

from collcomm.errors import ScheduleError
from collcomm.schedules import evaluate
from collcomm.schedules.ir import ALLGATHER, ALLREDUCE, REDUCE_SCATTER, Schedule, Tree
from collcomm.topology.model import Topology

PROTOCOLS = ("Simple", "LL", "LL128")
COLL_NAMES = {ALLGATHER: "allgather", REDUCE_SCATTER: "reducescatter", ALLREDUCE: "allreduce"}
MAX_BYTES = 1 << 40  # maxBytes: the program serves every buffer size up to 1 TiB

# Limits of the MSCCL runtime's parser and structures (strictest of the versions read).
LIMITS = {
    "count": 71,               # MSCCL_MAX_COUNT = 72, a step's cnt must be below it
    "steps_per_tb": 64,        # MSCCL_MAX_NUM_STEPS (64 in msccl-executor-nccl, 256 in older copies)
    "tbs_per_gpu": 128,        # dependentBid is an int8_t
    "peers_per_channel": 32,   # MSCCL_MAX_NUM_THREAD_BLOCKS_PER_CHANNEL send (and recv) threadblocks
    "channels": 32,            # MAXCHANNELS
    "offset": 32767,           # chunk offsets are int16_t
    "xml_nodes_per_rank": 4096,  # MAX_NODES of the XML parser: algo + gpus + own tbs + own steps
    "name_length": 255,        # MAX_STR_LEN
}
_NAME_OK = re.compile(r"[A-Za-z0-9 _.,:;()+=/#-]+")


@dataclass(frozen=True)
class Ref:
    """A range start in one of a GPU's buffers: 'i', 'o' or 's', chunk offset."""
    buf: str
    off: int


@dataclass(eq=False)
class Op:
    """One step before threadblock assignment."""
    seq: int
    gpu: int
    channel: int
    kind: str
    cnt: int
    src: Ref | None = None
    dst: Ref | None = None
    recv_from: int = -1
    send_to: int = -1
    deps: list["Op"] = field(default_factory=list)
    receiver: "Op | None" = None  # the op that receives what this one sends
    chain: int = -1
    tb: int = -1
    step: int = -1
    hasdep: bool = False


# ---------------------------------------------------------------------------- input checks
def _check_options(schedule: Schedule, nchannels: int, proto: str, name: str | None) -> str:
    if schedule.collective not in COLL_NAMES:
        raise ScheduleError(f"cannot export a {schedule.collective!r} schedule to MSCCL; "
                            f"supported: {', '.join(COLL_NAMES)}")
    if schedule.num_ranks < 2:
        raise ScheduleError("an MSCCL program needs at least 2 GPUs")
    if isinstance(nchannels, bool) or not isinstance(nchannels, int) or not 1 <= nchannels <= LIMITS["channels"]:
        raise ScheduleError(f"nchannels must be an integer from 1 to {LIMITS['channels']}, got {nchannels!r}")
    if proto not in PROTOCOLS:
        raise ScheduleError(f"proto must be one of {', '.join(PROTOCOLS)}, got {proto!r}")
    if name is None:
        raw = f"{schedule.algorithm}-{schedule.collective}-{schedule.topology}"
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", raw)[:LIMITS["name_length"]]
    if not _NAME_OK.fullmatch(name) or len(name) > LIMITS["name_length"]:
        raise ScheduleError(f"name {name!r} must be 1 to {LIMITS['name_length']} characters from "
                            f"letters, digits and ' _.,:;()+=/#-'")
    return name


@dataclass
class _TreeShape:
    """A tree over rank numbers, in either orientation: ``parent[v]`` is v's neighbour toward
    the root (out-tree: it sends to v; in-tree: v sends to it), ``children[v]`` the others."""
    root: int
    parent: dict[int, int]
    children: dict[int, list[int]]
    bfs: list[int]  # root first, every node after its parent


def _shape(tree: Tree, kind: str, rank: dict[str, int], where: str) -> _TreeShape:
    if tree.root not in rank:
        raise ScheduleError(f"{where}: root {tree.root!r} is not a rank of the schedule")
    parent: dict[int, int] = {}
    children: dict[int, list[int]] = defaultdict(list)
    for e in tree.edges:
        if e.src not in rank or e.dst not in rank:
            raise ScheduleError(f"{where}: edge {e.src} -> {e.dst} does not join two ranks")
        # Toward the root is "parent" in both orientations.
        child, par = (rank[e.dst], rank[e.src]) if kind == ALLGATHER else (rank[e.src], rank[e.dst])
        if child in parent:
            raise ScheduleError(f"{where}: rank {e.dst if kind == ALLGATHER else e.src!r} has two "
                                f"{'parents' if kind == ALLGATHER else 'successors'}")
        parent[child] = par
        children[par].append(child)
    root = rank[tree.root]
    order, seen = [root], {root}
    for v in order:
        for c in sorted(children[v]):
            if c not in seen:
                seen.add(c)
                order.append(c)
    if len(order) != len(rank) or root in parent:
        raise ScheduleError(f"{where}: the tree does not span all {len(rank)} ranks from its root")
    return _TreeShape(root, parent, {v: sorted(cs) for v, cs in children.items()}, order)


def _shapes(schedule: Schedule) -> list[list[tuple[_TreeShape, Fraction]]]:
    rank = {c: i for i, c in enumerate(schedule.compute_nodes)}
    want = evaluate.EXPECTED_PHASES[schedule.collective]
    if [p.collective for p in schedule.phases] != want:
        raise ScheduleError(f"a {schedule.collective} schedule needs phases {want}, has "
                            f"{[p.collective for p in schedule.phases]}")
    out = []
    for pi, phase in enumerate(schedule.phases):
        totals: dict[int, Fraction] = defaultdict(Fraction)
        merged: dict[tuple, list] = {}  # trees with the same logical edges are one tree to MSCCL
        for ti, tree in enumerate(phase.trees):
            where = f"phase {pi} ({phase.collective}) tree {ti}"
            if tree.share <= 0:
                raise ScheduleError(f"{where}: share must be positive, got {tree.share}")
            shape = _shape(tree, phase.collective, rank, where)
            totals[shape.root] += tree.share
            key = (shape.root, tuple(sorted(shape.parent.items())))
            merged.setdefault(key, [shape, Fraction(0)])[1] += tree.share
        for c, r in rank.items():
            if totals.get(r, 0) != 1:
                raise ScheduleError(f"phase {pi} ({phase.collective}): shares of root {c!r} sum to "
                                    f"{totals.get(r, 0)}, expected 1")
        out.append([(shape, share) for shape, share in merged.values()])
    return out


# ---------------------------------------------------------------------------- chunk layout
def _pieces(start: int, length: int, limit: int = LIMITS["count"]) -> list[tuple[int, int]]:
    """[start, start+length) cut into runs of at most ``limit`` chunks."""
    return [(s, min(limit, start + length - s)) for s in range(start, start + length, limit)]


def _tree_ranges(shapes: list[tuple[_TreeShape, Fraction]], base: int, cs: int,
                 instance: int) -> list[tuple[int, int]]:
    """(first global chunk, chunk count) of every tree in one instance."""
    used: dict[int, int] = defaultdict(int)
    ranges = []
    for shape, share in shapes:
        n = share * base
        assert n.denominator == 1
        start = shape.root * cs + instance * base + used[shape.root]
        used[shape.root] += int(n)
        ranges.append((start, int(n)))
    return ranges


# ---------------------------------------------------------------------------- fusion matching
def _fusion_matching(phases, kinds) -> dict[int, dict[int, int]]:
    """Per GPU, the pairs (recv-from q -> send-to p) that get a threadblock for fused steps:
    a greedy maximum-weight matching on the chunks each pair could fuse."""
    weight: dict[int, dict[tuple[int, int], Fraction]] = defaultdict(lambda: defaultdict(Fraction))
    for shapes, kind in zip(phases, kinds):
        for shape, share in shapes:
            for v in shape.bfs:
                kids = shape.children.get(v, [])
                if v == shape.root or not kids:
                    continue
                p = shape.parent[v]
                for k in kids:
                    pair = (p, k) if kind == ALLGATHER else (k, p)
                    weight[v][pair] += share
    matching: dict[int, dict[int, int]] = {}
    for v, pairs in weight.items():
        used_in, used_out, m = set(), set(), {}
        for (q, p), _ in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])):
            if q not in used_in and p not in used_out:
                used_in.add(q)
                used_out.add(p)
                m[q] = p
        matching[v] = m
    return matching


# ---------------------------------------------------------------------------- building ops
class _Builder:
    """Creates the ops of tree pieces; ``matching`` says where fused steps fit."""

    def __init__(self, matching: dict[int, dict[int, int]]):
        self.matching = matching
        self.ops: list[Op] = []
        self.scratch: dict[int, int] = defaultdict(int)  # chunks of scratch used per GPU

    def op(self, gpu: int, channel: int, kind: str, cnt: int, **kw) -> Op:
        o = Op(len(self.ops), gpu, channel, kind, cnt, **kw)
        o.deps = [d for d in o.deps if d is not None]
        self.ops.append(o)
        return o

    def fused(self, v: int, q: int, p: int) -> bool:
        return self.matching.get(v, {}).get(q) == p

    def scratch_ref(self, gpu: int, cnt: int) -> Ref:
        off = self.scratch[gpu]
        self.scratch[gpu] += cnt
        return Ref("s", off)

    def broadcast(self, shape: _TreeShape, ch: int, start: int, cnt: int, root_src: Ref,
                  root_deps: list[Op]) -> None:
        """One piece down an out-tree: every rank ends with it at o[start]."""
        out = Ref("o", start)
        sender: dict[tuple[int, int], Op] = {}
        for v in shape.bfs:
            kids = shape.children.get(v, [])
            if v == shape.root:
                for k in kids:
                    sender[v, k] = self.op(v, ch, "s", cnt, src=root_src, dst=root_src, send_to=k,
                                           deps=list(root_deps))
                continue
            q = shape.parent[v]
            fused = next((k for k in kids if self.fused(v, q, k)), None)
            if fused is None:
                got = self.op(v, ch, "r", cnt, src=out, dst=out, recv_from=q)
            else:
                got = self.op(v, ch, "rcs", cnt, src=out, dst=out, recv_from=q, send_to=fused)
                sender[v, fused] = got
            sender.pop((q, v)).receiver = got
            for k in kids:
                if k != fused:
                    sender[v, k] = self.op(v, ch, "s", cnt, src=out, dst=out, send_to=k, deps=[got])

    def reduce(self, shape: _TreeShape, ch: int, start: int, cnt: int, acc_of, root_out: Ref) -> Op:
        """One piece up an in-tree: the root ends with the sum at ``root_out``; returns the
        root's last step. ``acc_of(v)`` is where a non-root GPU accumulates."""
        mine = Ref("i", start)
        sender: dict[tuple[int, int], Op] = {}
        last = None
        for v in reversed(shape.bfs):
            kids = shape.children.get(v, [])
            p = shape.parent.get(v)
            fused = None if p is None else next((k for k in kids if self.fused(v, k, p)), None)
            folded = [k for k in kids if k != fused]  # received with rrc, one after another
            acc = root_out if p is None else acc_of(v) if folded else None
            cur, prev = mine, None
            for k in folded:
                prev = self.op(v, ch, "rrc", cnt, src=cur, dst=acc, recv_from=k, deps=[prev])
                sender.pop((k, v)).receiver = prev
                cur = acc
            if p is None:
                last = prev
            elif fused is not None:
                sender[v, p] = self.op(v, ch, "rrs", cnt, src=cur, dst=cur, recv_from=fused, send_to=p,
                                       deps=[prev])
                sender.pop((fused, v)).receiver = sender[v, p]
            else:
                sender[v, p] = self.op(v, ch, "s", cnt, src=cur, dst=cur, send_to=p, deps=[prev])
        assert last is not None and not sender
        return last


def _build_ops(schedule: Schedule, phases, base: int, instances: int, lanes: int,
               matching) -> tuple[list[Op], dict[int, int]]:
    """All ops of the program. Instance ``j`` moves chunks ``j*base ..`` of every shard on
    channels ``j*lanes ..``; its tree pieces take those ``lanes`` channels in turn."""
    n = schedule.num_ranks
    cs = base * instances
    b = _Builder(matching)
    coll = schedule.collective
    for inst in range(instances):
        turn = itertools.count()
        reduced: dict[int, list[tuple[int, int, Op]]] = defaultdict(list)  # root -> (start, cnt, final op)
        if coll in (REDUCE_SCATTER, ALLREDUCE):
            shapes = phases[0]
            for (shape, _), (start, length) in zip(shapes, _tree_ranges(shapes, base, cs, inst)):
                r = shape.root
                for s0, cnt in _pieces(start, length):
                    ch = inst * lanes + next(turn) % lanes
                    if coll == ALLREDUCE:
                        acc_of, out = (lambda v, s0=s0: Ref("o", s0)), Ref("o", s0)
                    else:
                        acc_of, out = (lambda v, cnt=cnt: b.scratch_ref(v, cnt)), Ref("o", s0 - r * cs)
                    reduced[r].append((s0, cnt, b.reduce(shape, ch, s0, cnt, acc_of, out)))
        if coll in (ALLGATHER, ALLREDUCE):
            shapes = phases[-1]
            for (shape, _), (start, length) in zip(shapes, _tree_ranges(shapes, base, cs, inst)):
                r = shape.root
                for s0, cnt in _pieces(start, length):
                    ch = inst * lanes + next(turn) % lanes
                    if coll == ALLGATHER:
                        src, deps = Ref("i", s0 - r * cs), []
                    else:
                        src = Ref("o", s0)
                        deps = [op for a, m, op in reduced[r] if a < s0 + cnt and s0 < a + m]
                    b.broadcast(shape, ch, s0, cnt, src, deps)
        if coll == ALLGATHER:  # every GPU's own part, input to output, in local threadblocks
            for k, (s0, cnt) in enumerate(_pieces(inst * base, base)):
                for r in range(n):
                    b.op(r, inst * lanes + k % lanes, "cpy", cnt, src=Ref("i", s0), dst=Ref("o", r * cs + s0))
    return b.ops, dict(b.scratch)


# ---------------------------------------------------------------------------- order
def _chains(ops: list[Op]) -> list[list[Op]]:
    """Ops joined by messages: each chain starts at an op that receives nothing."""
    received = {id(o.receiver) for o in ops if o.receiver is not None}
    chains = []
    for o in ops:
        if id(o) not in received:
            chain = [o]
            while chain[-1].receiver is not None:
                chain.append(chain[-1].receiver)
            chains.append(chain)
    assert sum(map(len, chains)) == len(ops)
    return chains


def _number_chains(ops: list[Op]) -> None:
    """Number the chains by dependency level (longest path of dependencies below them),
    ties by creation, and give every op its chain's number."""
    chains = _chains(ops)
    member = {id(o): ci for ci, chain in enumerate(chains) for o in chain}
    below = [sorted({member[id(d)] for o in chain for d in o.deps}) for chain in chains]
    level: dict[int, int] = {}
    for ci in range(len(chains)):
        if ci in level:
            continue
        stack = [ci]
        while stack:  # depth-first, without recursion (chains can be long)
            c = stack[-1]
            todo = [b for b in below[c] if b not in level]
            if todo:
                stack += todo
            else:
                level[c] = 1 + max((level[b] for b in below[c]), default=-1)
                stack.pop()
    order = sorted(range(len(chains)), key=lambda ci: (level[ci], chains[ci][0].seq))
    for number, ci in enumerate(order):
        for o in chains[ci]:
            o.chain = number


# ---------------------------------------------------------------------------- threadblocks
@dataclass
class _Tb:
    send: int
    recv: int
    chan: int
    ops: list[Op] = field(default_factory=list)
    steps: list[tuple[str, Op | None, Op | None]] = field(default_factory=list)  # (type, op, dep target)


def _assign_threadblocks(ops: list[Op], n: int, matching) -> dict[int, list[_Tb]]:
    by_gpu: dict[int, list[Op]] = defaultdict(list)
    for o in ops:
        by_gpu[o.gpu].append(o)
    result: dict[int, list[_Tb]] = {}
    for v in range(n):
        tbs: dict[tuple[int, int, int], _Tb] = {}
        recv_owner: dict[tuple[int, int], _Tb] = {}
        send_owner: dict[tuple[int, int], _Tb] = {}
        mine = by_gpu.get(v, [])
        for ch in sorted({o.channel for o in mine}):
            ins = {o.recv_from for o in mine if o.channel == ch and o.recv_from >= 0}
            outs = {o.send_to for o in mine if o.channel == ch and o.send_to >= 0}
            pairs = [(q, p) for q, p in matching.get(v, {}).items() if q in ins and p in outs]
            left_in = ins - {q for q, _ in pairs}
            left_out = outs - {p for _, p in pairs}
            pairs += [(q, q) for q in left_in & left_out]
            pairs += [(q, -1) for q in left_in - left_out] + [(-1, p) for p in left_out - left_in]
            for q, p in pairs:
                tb = tbs.setdefault((ch, p, q), _Tb(p, q, ch))
                if q >= 0:
                    recv_owner[ch, q] = tb
                if p >= 0:
                    send_owner[ch, p] = tb
        for o in mine:
            if o.recv_from >= 0:
                tb = recv_owner[o.channel, o.recv_from]
                assert o.send_to < 0 or tb.send == o.send_to, "fused step without its threadblock"
            elif o.send_to >= 0:
                tb = send_owner[o.channel, o.send_to]
            else:
                tb = tbs.setdefault((o.channel, -1, -1), _Tb(-1, -1, o.channel))
            tb.ops.append(o)
        ordered = [tbs[k] for k in sorted(tbs)]
        for i, tb in enumerate(ordered):
            tb.ops.sort(key=lambda o: o.chain)
            assert len({o.chain for o in tb.ops}) == len(tb.ops), "two steps of one chain in a threadblock"
            for o in tb.ops:
                o.tb = i
        result[v] = ordered
    return result


def _lay_out_steps(tbs: list[_Tb]) -> None:
    """Step lists with dependencies: one per step, extra ones as nops before it. A dependency
    on the same threadblock is dropped (steps run in order), and so is one on a step that an
    earlier step of this threadblock already waited for, or waited past (flags only grow)."""
    pos = {id(o): k for tb in tbs for k, o in enumerate(tb.ops)}
    for tb in tbs:
        waited: dict[int, int] = {}  # threadblock -> latest op position already waited for
        for o in tb.ops:
            latest: dict[int, Op] = {}
            for d in o.deps:
                if d.tb != o.tb and (d.tb not in latest or pos[id(d)] > pos[id(latest[d.tb])]):
                    latest[d.tb] = d
            needed = [d for t, d in sorted(latest.items()) if waited.get(t, -1) < pos[id(d)]]
            for d in needed:
                waited[d.tb] = pos[id(d)]
                d.hasdep = True
            tb.steps += [("nop", None, d) for d in needed[1:]]
            tb.steps.append((o.kind, o, needed[0] if needed else None))
    for tb in tbs:
        for k, (_, o, _) in enumerate(tb.steps):
            if o is not None:
                o.step = k


# ---------------------------------------------------------------------------- limits
def _longest_threadblock(gpus: dict[int, list[_Tb]]) -> tuple[int, int, int]:
    """(steps, gpu, threadblock id) of the threadblock with the most steps."""
    return max((len(tb.steps), v, i) for v, tbs in gpus.items() for i, tb in enumerate(tbs))


def _check_limits(gpus: dict[int, list[_Tb]], n: int, scratch: dict[int, int]) -> None:
    if max(scratch.values(), default=0) - 1 > LIMITS["offset"]:
        raise ScheduleError(f"{max(scratch.values())} scratch chunks exceed MSCCL's chunk offsets (at most "
                            f"{LIMITS['offset'] + 1}); use fewer trees per root or fewer channels")
    for v, tbs in gpus.items():
        if len(tbs) > LIMITS["tbs_per_gpu"]:
            raise ScheduleError(f"GPU {v} needs {len(tbs)} threadblocks, MSCCL allows {LIMITS['tbs_per_gpu']}; "
                                f"use fewer channels")
        per_chan: dict[tuple[int, str], int] = defaultdict(int)
        for tb in tbs:
            per_chan[tb.chan, "send"] += tb.send >= 0
            per_chan[tb.chan, "recv"] += tb.recv >= 0
        for (chan, what), count in per_chan.items():
            if count > LIMITS["peers_per_channel"]:
                raise ScheduleError(f"GPU {v} has {count} {what} threadblocks on channel {chan}, MSCCL allows "
                                    f"{LIMITS['peers_per_channel']}")
        nodes = 1 + n + len(tbs) + sum(len(tb.steps) for tb in tbs)
        if nodes > LIMITS["xml_nodes_per_rank"]:
            raise ScheduleError(f"GPU {v}'s part of the XML has {nodes} elements, the MSCCL parser reads "
                                f"{LIMITS['xml_nodes_per_rank']}; use fewer trees per root")


# ---------------------------------------------------------------------------- rendering
def _step_xml(k: int, kind: str, op: Op | None, dep: Op | None) -> str:
    if op is None:
        src, dst, cnt, hasdep = Ref("i", -1), Ref("o", -1), 0, False
    else:
        src = op.src if op.src is not None else op.dst
        dst = op.dst if op.dst is not None else op.src
        cnt, hasdep = op.cnt, op.hasdep
    depid, deps = (dep.tb, dep.step) if dep is not None else (-1, -1)
    return (f'      <step s="{k}" type="{kind}" srcbuf="{src.buf}" srcoff="{src.off}" '
            f'dstbuf="{dst.buf}" dstoff="{dst.off}" cnt="{cnt}" depid="{depid}" deps="{deps}" '
            f'hasdep="{int(hasdep)}"/>')


def _render(name: str, proto: str, nchannels: int, coll: str, n: int, cs: int,
            gpus: dict[int, list[_Tb]], scratch: dict[int, int]) -> str:
    nchunks = n * cs
    i_chunks = cs if coll == ALLGATHER else nchunks
    o_chunks = cs if coll == REDUCE_SCATTER else nchunks
    algo = (f'<algo name="{name}" proto="{proto}" nchannels="{nchannels}" nchunksperloop="{nchunks}" '
            f'ngpus="{n}" coll="{COLL_NAMES[coll]}" inplace="1" outofplace="1" minBytes="0" '
            f'maxBytes="{MAX_BYTES}"' + (' redop="sum"' if coll != ALLGATHER else "") + ">")
    lines = [algo]
    for v in range(n):
        lines.append(f'  <gpu id="{v}" i_chunks="{i_chunks}" o_chunks="{o_chunks}" '
                     f's_chunks="{scratch.get(v, 0)}">')
        for i, tb in enumerate(gpus[v]):
            lines.append(f'    <tb id="{i}" send="{tb.send}" recv="{tb.recv}" chan="{tb.chan}">')
            lines += [_step_xml(k, kind, op, dep) for k, (kind, op, dep) in enumerate(tb.steps)]
            lines.append("    </tb>")
        lines.append("  </gpu>")
    lines.append("</algo>")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- entry point
def _program(schedule: Schedule, phases, base: int, instances: int, lanes: int, matching):
    ops, scratch = _build_ops(schedule, phases, base, instances, lanes, matching)
    _number_chains(ops)
    gpus = _assign_threadblocks(ops, schedule.num_ranks, matching)
    for tbs in gpus.values():
        _lay_out_steps(tbs)
    return gpus, scratch


def _fewest_lanes(schedule: Schedule, phases, base: int, instances: int, matching):
    """The program on the fewest channels per instance whose threadblocks fit MSCCL's step
    limit: jump ahead by the overflow ratio, then take the first fit from below."""
    limit, max_lanes = LIMITS["steps_per_tb"], LIMITS["channels"] // instances
    fits: dict[int, tuple] = {}

    def attempt(lanes: int) -> bool:
        gpus, scratch = _program(schedule, phases, base, instances, lanes, matching)
        longest = _longest_threadblock(gpus)
        fits[lanes] = (longest, gpus, scratch)
        return longest[0] <= limit

    lo, hi = 0, 1  # lanes <= lo do not fit; try hi
    while not attempt(hi):
        if hi == max_lanes:
            steps, v, tb = fits[hi][0]
            raise ScheduleError(f"GPU {v} threadblock {tb} needs {steps} steps even on {hi * instances} "
                                f"channels, MSCCL allows {limit}; generate with fewer trees per root "
                                f"(forestcoll max_trees_per_root)")
        lo, hi = hi, min(max_lanes, max(hi + 1, -(-hi * fits[hi][0][0] // limit)))
    lanes = next(k for k in range(lo + 1, hi + 1) if k == hi or attempt(k))
    return lanes, fits[lanes][1], fits[lanes][2]


def to_msccl_xml(schedule: Schedule, topo: Topology | None = None, name: str | None = None,
                 nchannels: int = 1, proto: str = "Simple") -> str:
    """The MSCCL XML program of an allgather, reduce-scatter or allreduce ``schedule``.

    ``topo``, if given, is used to validate the schedule first. ``nchannels`` runs that
    many copies of the program side by side, each moving its own part of every chunk
    range on channels of its own; where a threadblock would exceed MSCCL's step limit,
    each copy spreads its tree pieces over several channels, so the XML's ``nchannels``
    can be a multiple of the argument. ``proto`` is the NCCL protocol the runtime uses
    (Simple, LL or LL128). GPU ids are the positions in ``schedule.compute_nodes``.
    Raises ScheduleError for a schedule that is malformed or exceeds MSCCL's limits
    (:data:`LIMITS`).
    """
    name = _check_options(schedule, nchannels, proto, name)
    if topo is not None:
        evaluate.validate(schedule, topo)
    phases = _shapes(schedule)
    kinds = [p.collective for p in schedule.phases]
    base = math.lcm(*(share.denominator for shapes in phases for _, share in shapes))
    n = schedule.num_ranks
    if n * base * nchannels - 1 > LIMITS["offset"]:
        raise ScheduleError(f"{n * base * nchannels} chunks per loop exceed MSCCL's chunk offsets (at most "
                            f"{LIMITS['offset'] + 1}); use fewer trees per root or fewer channels")
    matching = _fusion_matching(phases, kinds)
    lanes, gpus, scratch = _fewest_lanes(schedule, phases, base, nchannels, matching)
    _check_limits(gpus, n, scratch)
    return _render(name, proto, nchannels * lanes, schedule.collective, n, base * nchannels, gpus, scratch)


__all__ = ["LIMITS", "to_msccl_xml"]
