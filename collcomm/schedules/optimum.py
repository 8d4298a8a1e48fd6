"""The exact allgather optimum of a fabric and the integer tree budget that reaches it.

Allgather of M bytes on N ranks cannot beat

    T* = (M/N) * max over cuts S of |S ∩ ranks| / B+(S)

(S holds a rank but not all of them; B+(S) is the bandwidth leaving S): every rank in
S must get its shard out of S. Write x* = min_S B+(S)/|S ∩ ranks| (per-rank
throughput); allgather algbw = N·x*. Spanning-tree packing reaches it exactly.

x* is found by a Newton/Dinkelbach iteration on the min-ratio cut in exact rational
arithmetic: a candidate τ is feasible iff, with a super-source feeding every rank at
τ, every rank v receives a max-flow of N·τ (a min cut with source side S ∪ {s}
costs τ·|ranks ∖ S| + B+(S)). An infeasible τ yields the most violated cut S, and
τ ← B+(S)/|S ∩ ranks| strictly decreases; on the presets it converges in one or two
rounds. No floating point is involved.

The integer form: with 1/x* = p/q in lowest terms (bandwidths scaled to integers)
and g = gcd(all bandwidths, q), every edge e holds U·b_e = p·b_e/g tree slots and
every root sends k = q/g trees of M/(N·k) bytes each; every edge then finishes at
exactly T*. Smaller k that still fit are tried first (fewer, larger trees).
With a cap on k, U is searched exactly over the breakpoints of floor(U·b_e).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from collcomm.errors import TopologyError
from collcomm.schedules.maxflow import flows_to_sinks, min_flow_over_sinks
from collcomm.topology.model import Topology
from collcomm.topology.symmetry import SymmetryGroup, symmetry_group


@dataclass(frozen=True)
class IntFabric:
    """A topology as integer arrays: ranks are nodes 0..N-1, switches N..n-1; bandwidths scaled
    by ``scale`` to integers (``bw = scale * GB/s``)."""

    topo: Topology
    n: int
    N: int
    tails: np.ndarray
    heads: np.ndarray
    bw: np.ndarray
    scale: int

    @staticmethod
    def of(topo: Topology, capacity: dict | None = None) -> "IntFabric":
        """The integer view of ``topo`` (or of ``capacity``, a replacement for its edge bandwidths)."""
        capacity = topo.capacity if capacity is None else capacity
        edges = sorted(((e, bw) for e, bw in capacity.items() if bw > 0),
                       key=lambda kv: (topo.index[kv[0][0]], topo.index[kv[0][1]]))
        scale = math.lcm(*(bw.denominator for _, bw in edges)) if edges else 1
        scaled = [int(bw * scale) for _, bw in edges]
        if sum(scaled) >= 1 << 40:
            raise TopologyError(f"{topo.name}: bandwidths are too fine-grained to schedule exactly "
                                f"(common denominator {scale}); round them to fewer digits")
        tails = np.array([topo.index[u] for (u, _), _ in edges], dtype=np.int64)
        heads = np.array([topo.index[v] for (_, v), _ in edges], dtype=np.int64)
        return IntFabric(topo, len(topo.order), topo.num_ranks, tails, heads,
                         np.array(scaled, dtype=np.int64), scale)

    def out_bandwidth(self, side: np.ndarray, caps: np.ndarray | None = None) -> int:
        """Sum of ``caps`` (default: bandwidths) over edges leaving the node set ``side`` (bool mask)."""
        caps = self.bw if caps is None else caps
        leaving = side[self.tails] & ~side[self.heads]
        return int(caps[leaving].sum())


def forwardable_capacity(topo: Topology) -> tuple[dict[tuple[str, str], Fraction], list[str]]:
    """Edge bandwidths with every switch's egress scaled down to what it can receive.

    A switch forwards but cannot replicate: what leaves it in a tree plan never exceeds
    what enters it. Where one-way links let a switch send more than it receives, the
    cut bound can be out of reach for any tree plan; the generator then plans for the
    forwardable fabric: every switch w scales its out-links by the largest f_w <= 1 with
    f_w·egress(w) <= sum over in-links (u, w) of f_u·c(u, w) (f = 1 for ranks). The
    largest such f is a fixed point, found exactly: the switches that ever exceed their
    ingress are held tight and the resulting linear system is solved in Fractions.
    Returns the capacities and the switches that were scaled."""
    switches = list(topo.switches)
    if not switches:
        return dict(topo.capacity), []
    is_switch = set(switches)
    egress = {w: Fraction(0) for w in switches}
    in_edges: dict[str, list[tuple[str, Fraction]]] = {w: [] for w in switches}
    for (u, v), bw in topo.capacity.items():
        if u in is_switch:
            egress[u] += bw
        if v in is_switch:
            in_edges[v].append((u, bw))
    f = {w: Fraction(1) for w in switches}

    def ingress(w):
        return sum((bw * f.get(u, 1) for u, bw in in_edges[w]), Fraction(0))

    tight: list[str] = []
    while True:
        over = [w for w in switches if w not in tight and egress[w] * f[w] > ingress(w)]
        if not over:
            break
        tight += over
        f.update(_solve_tight(tight, egress, in_edges, f, topo.name))
    cap = {e: (bw * f[e[0]] if e[0] in is_switch else bw) for e, bw in topo.capacity.items()}
    return cap, [w for w in switches if f[w] < 1]


def _solve_tight(tight, egress, in_edges, f, name) -> dict[str, Fraction]:
    """Solve egress(w)·f_w = sum over in-links of c(u, w)·f_u for the tight switches (others fixed)."""
    idx = {w: i for i, w in enumerate(tight)}
    n = len(tight)
    rows = []
    for w in tight:
        row = [Fraction(0)] * (n + 1)
        row[idx[w]] += egress[w]
        for u, bw in in_edges[w]:
            if u in idx:
                row[idx[u]] -= bw
            else:
                row[n] += bw * f.get(u, 1)
        rows.append(row)
    for col in range(n):  # Gauss-Jordan elimination, exact
        pivot = next((r for r in range(col, n) if rows[r][col] != 0), None)
        if pivot is None:
            raise TopologyError(f"{name}: switches {', '.join(tight[:4])} pass data only among themselves "
                                f"through one-way links; their forwarding capacity is undefined")
        rows[col], rows[pivot] = rows[pivot], rows[col]
        p = rows[col][col]
        rows[col] = [x / p for x in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col])]
    return {w: min(Fraction(1), max(Fraction(0), rows[idx[w]][n])) for w in tight}


def rooted_min_flow_arrays(n: int, N: int, tails: np.ndarray, heads: np.ndarray, caps: np.ndarray, per_rank: int,
                           sinks, want_cut: bool = False, stop_below: int | None = None
                           ) -> tuple[int, int, np.ndarray | None]:
    """min over sinks v of the max-flow from a super-source that feeds each of the ranks
    0..N-1 ``per_rank``, on ``n`` nodes joined by the given arcs.

    Returns (value, v, source-side mask over the n nodes, or None)."""
    src = n
    all_tails = np.concatenate([tails, np.full(N, src)])
    all_heads = np.concatenate([heads, np.arange(N)])
    all_caps = np.concatenate([caps, np.full(N, per_rank, dtype=np.int64)])
    value, v, side = min_flow_over_sinks(n + 1, all_tails, all_heads, all_caps, src, sinks,
                                         want_source_side=want_cut, stop_below=stop_below)
    mask = None
    if side is not None:
        mask = np.zeros(n + 1, dtype=bool)
        mask[side] = True
        mask = mask[:n]
    return value, v, mask


def rooted_flows(n: int, N: int, tails: np.ndarray, heads: np.ndarray, caps: np.ndarray, per_rank: int, sinks,
                 stop_below: int | None = None) -> list[tuple[int, int]]:
    """(v, max-flow to v) from a super-source feeding each rank ``per_rank``, for each sink in turn
    (stopping after the first below ``stop_below``)."""
    src = n
    all_tails = np.concatenate([tails, np.full(N, src)])
    all_heads = np.concatenate([heads, np.arange(N)])
    all_caps = np.concatenate([caps, np.full(N, per_rank, dtype=np.int64)])
    return flows_to_sinks(n + 1, all_tails, all_heads, all_caps, src, sinks, stop_below=stop_below)


def rooted_min_flow(fab: IntFabric, caps: np.ndarray, per_rank: int, sinks, want_cut: bool = False,
                    stop_below: int | None = None) -> tuple[int, int, np.ndarray | None]:
    """:func:`rooted_min_flow_arrays` on the fabric's edges with capacities ``caps``."""
    return rooted_min_flow_arrays(fab.n, fab.N, fab.tails, fab.heads, caps, per_rank, sinks, want_cut, stop_below)


@dataclass(frozen=True)
class Optimum:
    """The allgather optimum: per-rank throughput ``x_star`` (GB/s), ``algbw`` = N·x*, and a
    cut ``cut`` (node ids) with B+(cut)/|cut ∩ ranks| = x*. ``None`` when N = 1."""

    x_star: Fraction | None
    algbw: Fraction | None
    cut: frozenset[str]
    rounds: int


def allgather_optimum(topo: Topology, group: SymmetryGroup | None = None, fab: IntFabric | None = None) -> Optimum:
    """The exact allgather optimum of ``topo`` with a cut certifying it (Dinkelbach on min cuts)."""
    fab = fab or IntFabric.of(topo)
    group = group or symmetry_group(topo)
    N = fab.N
    if N == 1:
        return Optimum(None, None, frozenset(), 0)
    ingress = np.zeros(fab.n, dtype=np.int64)
    np.add.at(ingress, fab.heads, fab.bw)
    v0 = int(np.argmin(ingress[:N]))
    tau = Fraction(int(ingress[v0]), N - 1)
    cut = np.ones(fab.n, dtype=bool)
    cut[v0] = False
    rounds = 0
    while True:
        rounds += 1
        # Scale to integers: feed tau.numerator per rank, edges carry bw * tau.denominator.
        value, _, side = rooted_min_flow(fab, fab.bw * tau.denominator, tau.numerator,
                                         group.rank_representatives, want_cut=True)
        if value >= N * tau.numerator:
            break
        ranks_in = int(side[:N].sum())
        new_tau = Fraction(fab.out_bandwidth(side), ranks_in)
        assert new_tau < tau, "Dinkelbach step must decrease the ratio"
        tau, cut = new_tau, side
    x_star = tau / fab.scale
    ids = frozenset(topo.order[i] for i in np.flatnonzero(cut))
    return Optimum(x_star, x_star * N, ids, rounds)


@dataclass(frozen=True)
class TreeBudget:
    """Integer form of a plan: ``k`` trees per root and ``slots[e]`` trees allowed on edge e
    (aligned with the IntFabric's arrays). ``x`` is the per-rank throughput it guarantees."""

    k: int
    slots: np.ndarray
    x: Fraction
    optimal: bool


def _budget_x(fab: IntFabric, k: int, slots: np.ndarray) -> Fraction:
    worst = max(Fraction(int(s), int(b)) for s, b in zip(slots, fab.bw) if s > 0)
    return Fraction(k) / worst / fab.scale


def _feasible(fab: IntFabric, slots: np.ndarray, k: int, group: SymmetryGroup) -> bool:
    value, _, _ = rooted_min_flow(fab, slots, k, group.rank_representatives, stop_below=fab.N * k)
    return value >= fab.N * k


def optimal_budget(fab: IntFabric, opt: Optimum, group: SymmetryGroup) -> TreeBudget:
    """The fewest trees per root that reach the optimum exactly, with their edge slots."""
    x_scaled = opt.x_star * fab.scale  # = q/p
    p, q = x_scaled.denominator, x_scaled.numerator
    g = math.gcd(q, *(int(b) for b in fab.bw))
    k_max = q // g
    for k in range(1, k_max):
        slots = (fab.bw * k * p) // q  # floor(k/x * b)
        if _feasible(fab, slots, k, group):
            return TreeBudget(k, slots, opt.x_star, True)
    assert not ((fab.bw * p) % g).any(), "U·b_e must be integral"
    slots = (fab.bw * p) // g
    return TreeBudget(k_max, slots, opt.x_star, True)


def fixed_k_budget(fab: IntFabric, opt: Optimum, k: int, group: SymmetryGroup) -> TreeBudget:
    """The best plan with exactly ``k`` trees per root: the least U with floor(U·b_e) slots feasible."""
    N = fab.N
    U = Fraction(k) / (opt.x_star * fab.scale)
    while True:
        slots = np.array([(U * int(b)).__floor__() for b in fab.bw], dtype=np.int64)
        value, _, side = rooted_min_flow(fab, slots, k, group.rank_representatives, want_cut=True,
                                         stop_below=N * k)
        if value >= N * k:
            x = _budget_x(fab, k, slots)
            return TreeBudget(k, slots, x, x == opt.x_star)
        # The violated cut needs sum over its edges of floor(U·b) >= k·|cut ∩ ranks|.
        leaving = side[fab.tails] & ~side[fab.heads]
        bws = [int(b) for b in fab.bw[leaving]]
        demand = k * int(side[:N].sum())
        U = max(U, Fraction(demand, sum(bws)))
        while sum((U * b).__floor__() for b in bws) < demand:
            U = min(Fraction((U * b).__floor__() + 1, b) for b in bws)
