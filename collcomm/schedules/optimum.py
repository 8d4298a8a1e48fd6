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


def collective_bound(topo: Topology, collective: str) -> Fraction | None:
    """The exact cut bound on algbw of ``collective``: allgather's, reduce-scatter's (allgather's on
    the reversed fabric), or for allreduce both in sequence (1/algbw = 1/AG + 1/RS). None for one rank."""
    if topo.num_ranks == 1:
        return None
    ag = allgather_optimum(topo).algbw if collective in ("allgather", "allreduce") else None
    rs = allgather_optimum(topo.reversed()).algbw if collective in ("reduce_scatter", "allreduce") else None
    if collective == "allgather":
        return ag
    if collective == "reduce_scatter":
        return rs
    return 1 / (1 / ag + 1 / rs)


FEWER_TREES_TRIED = 64


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
    # Fewer trees may already reach the optimum (floors that do not bind); try the small ones.
    for k in range(1, min(k_max, FEWER_TREES_TRIED + 1)):
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
