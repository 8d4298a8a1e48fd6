"""Exact model bandwidth and an alpha-beta time estimate of any schedule on any fabric.

``algbw`` follows ARCHITECTURE.md: for one phase,
``algbw = N / max over links e of load(e) / bandwidth(e)`` where ``load(e)`` is the
sum of the shares of the tree-edges whose physical path crosses ``e`` (once per
crossing). Phases run one after the other, so an allreduce takes the sum of its
phases' times: ``1 / algbw = sum of 1 / algbw(phase)``. Everything is exact
(:class:`fractions.Fraction`); ``None`` stands for "nothing moves" (one rank).
"""

from __future__ import annotations

import math
from collections import defaultdict
from fractions import Fraction

from collcomm.errors import ScheduleError
from collcomm.schedules.ir import ALLGATHER, ALLREDUCE, REDUCE_SCATTER, Phase, Schedule, Tree
from collcomm.topology.model import Topology

EXPECTED_PHASES = {
    ALLGATHER: [ALLGATHER],
    REDUCE_SCATTER: [REDUCE_SCATTER],
    ALLREDUCE: [REDUCE_SCATTER, ALLGATHER],
}


# ---------------------------------------------------------------------------- validation
def _check_tree(tree: Tree, kind: str, topo: Topology, where: str) -> None:
    compute = set(topo.compute)
    if tree.root not in compute:
        raise ScheduleError(f"{where}: root {tree.root!r} is not a compute node of {topo.name!r}")
    if tree.share <= 0:
        raise ScheduleError(f"{where}: share must be positive, got {tree.share}")
    out_edges: dict[str, list[str]] = defaultdict(list)
    in_edges: dict[str, list[str]] = defaultdict(list)
    for e in tree.edges:
        for end in (e.src, e.dst):
            if end not in compute:
                raise ScheduleError(f"{where}: edge {e.src} -> {e.dst} ends at {end!r}, not a compute node")
        for a, b in zip(e.path, e.path[1:]):
            if (a, b) not in topo.capacity:
                raise ScheduleError(f"{where}: edge {e.src} -> {e.dst} uses {a} -> {b}, which is not a link")
        for mid in e.path[1:-1]:
            if mid not in topo.node or topo.is_compute(mid):
                raise ScheduleError(f"{where}: edge {e.src} -> {e.dst} passes through {mid!r}, "
                                    f"which is not a switch")
        out_edges[e.src].append(e.dst)
        in_edges[e.dst].append(e.src)
    if len(tree.edges) != len(compute) - 1:
        raise ScheduleError(f"{where}: a spanning tree of {len(compute)} ranks needs {len(compute) - 1} edges, "
                            f"has {len(tree.edges)}")
    # Out-tree: one parent per non-root node; in-tree: one successor per non-root node.
    toward = in_edges if kind == ALLGATHER else out_edges
    for c in topo.compute:
        want = 0 if c == tree.root else 1
        if len(toward.get(c, [])) != want:
            what = "incoming" if kind == ALLGATHER else "outgoing"
            raise ScheduleError(f"{where}: node {c!r} has {len(toward.get(c, []))} {what} edges, expected {want}")
    away = out_edges if kind == ALLGATHER else in_edges
    seen = {tree.root}
    stack = [tree.root]
    while stack:
        for y in away.get(stack.pop(), []):
            if y not in seen:
                seen.add(y)
                stack.append(y)
    if seen != compute:
        missing = sorted(compute - seen)[:3]
        raise ScheduleError(f"{where}: tree does not span the ranks (cannot reach {', '.join(missing)})")


def validate(schedule: Schedule, topo: Topology) -> None:
    """Raise ScheduleError unless ``schedule`` is a well-formed plan on ``topo``."""
    if list(schedule.compute_nodes) != list(topo.compute):
        raise ScheduleError(f"schedule ranks {schedule.compute_nodes[:4]}... do not match topology "
                            f"{topo.name!r} ranks {list(topo.compute[:4])}...")
    want = EXPECTED_PHASES.get(schedule.collective)
    if want is None or [p.collective for p in schedule.phases] != want:
        raise ScheduleError(f"a {schedule.collective} schedule needs phases {want}, has "
                            f"{[p.collective for p in schedule.phases]}")
    for pi, phase in enumerate(schedule.phases):
        totals: dict[str, Fraction] = defaultdict(Fraction)
        for ti, tree in enumerate(phase.trees):
            _check_tree(tree, phase.collective, topo, f"phase {pi} ({phase.collective}) tree {ti}")
            totals[tree.root] += tree.share
        for c in topo.compute:
            if totals.get(c, 0) != 1:
                raise ScheduleError(f"phase {pi} ({phase.collective}): shares of root {c!r} sum to "
                                    f"{totals.get(c, 0)}, expected 1")


# ---------------------------------------------------------------------------- bandwidth
def link_loads(phase: Phase) -> dict[tuple[str, str], Fraction]:
    """Sum of the shares crossing each directed link, once per crossing."""
    # Accumulate integers over the common denominator of the shares: exact and fast.
    denom = math.lcm(*(t.share.denominator for t in phase.trees)) if phase.trees else 1
    acc: dict[tuple[str, str], int] = defaultdict(int)
    for tree in phase.trees:
        units = tree.share.numerator * (denom // tree.share.denominator)
        for e in tree.edges:
            path = e.path
            for i in range(len(path) - 1):
                acc[(path[i], path[i + 1])] += units
    return {hop: Fraction(units, denom) for hop, units in acc.items()}


def phase_time_per_shard(phase: Phase, topo: Topology) -> Fraction:
    """Time to move one shard's worth of data (M/N bytes) per tree share, in seconds per GB:
    ``max over links of load / bandwidth``."""
    worst = Fraction(0)
    for hop, load in link_loads(phase).items():
        bw = topo.capacity.get(hop)
        if bw is None:
            raise ScheduleError(f"schedule uses {hop[0]} -> {hop[1]}, which is not a link of {topo.name!r}")
        worst = max(worst, load / bw)
    return worst


def phase_algbw(phase: Phase, topo: Topology) -> Fraction | None:
    t = phase_time_per_shard(phase, topo)
    return None if t == 0 else Fraction(topo.num_ranks) / t


def algbw(schedule: Schedule, topo: Topology) -> Fraction | None:
    """The exact model algbw (GB/s): total buffer size over the time of all phases."""
    total = sum((phase_time_per_shard(p, topo) for p in schedule.phases), Fraction(0))
    return None if total == 0 else Fraction(topo.num_ranks) / total


def busbw_factor(collective: str, n: int) -> Fraction:
    """nccl-tests' busbw / algbw: 2(n-1)/n for allreduce, (n-1)/n for allgather and reduce-scatter."""
    if n <= 1:
        return Fraction(0)
    return Fraction(2 * (n - 1), n) if collective == ALLREDUCE else Fraction(n - 1, n)


# ---------------------------------------------------------------------------- alpha-beta
def _tree_latency_us(tree: Tree, topo: Topology, alpha_us: float) -> tuple[float, int]:
    """(latency of the slowest root-leaf chain in microseconds, its depth in logical edges)."""
    adj: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for e in tree.edges:
        w = alpha_us + sum(topo.latency_us[h] for h in zip(e.path, e.path[1:]))
        adj[e.src].append((e.dst, w))
        adj[e.dst].append((e.src, w))
    dist = {tree.root: (0.0, 0)}
    stack = [tree.root]
    while stack:
        x = stack.pop()
        for y, w in adj[x]:
            if y not in dist:
                dist[y] = (dist[x][0] + w, dist[x][1] + 1)
                stack.append(y)
    return max(d[0] for d in dist.values()), max(d[1] for d in dist.values())


def estimate_phase_seconds(phase: Phase, topo: Topology, nbytes: int, chunk_bytes: int = 1 << 20,
                           alpha_us: float = 5.0) -> float:
    """Alpha-beta estimate of one phase moving a buffer of ``nbytes`` in total.

    bandwidth term   nbytes / algbw                                (the fluid model)
    latency term     slowest root-leaf chain: per logical hop alpha_us + link latencies
    pipeline fill    (depth - 1) chunks on the tree's slowest link
    chunk overhead   alpha_us per chunk of the largest tree share
    """
    n = topo.num_ranks
    per_shard = phase_time_per_shard(phase, topo)
    if per_shard == 0 or nbytes <= 0:
        return 0.0
    bw_seconds = float(per_shard) * (nbytes / n) / 1e9
    worst = 0.0
    for tree in phase.trees:
        lat_us, depth = _tree_latency_us(tree, topo, alpha_us)
        tree_bytes = float(tree.share) * nbytes / n
        chunk = min(float(chunk_bytes), tree_bytes)
        slowest = min((topo.capacity[h] for e in tree.edges for h in zip(e.path, e.path[1:])), default=None)
        fill = 0.0 if slowest is None else max(depth - 1, 0) * chunk / (float(slowest) * 1e9)
        chunks = max(1.0, tree_bytes / chunk_bytes)
        worst = max(worst, lat_us * 1e-6 + fill + chunks * alpha_us * 1e-6)
    return bw_seconds + worst


def estimate_seconds(schedule: Schedule, topo: Topology, nbytes: int, chunk_bytes: int = 1 << 20,
                     alpha_us: float = 5.0) -> float:
    """Alpha-beta estimate of the whole collective on a buffer of ``nbytes`` (phases in sequence)."""
    return sum(estimate_phase_seconds(p, topo, nbytes, chunk_bytes, alpha_us) for p in schedule.phases)
