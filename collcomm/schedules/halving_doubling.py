"""Recursive halving / doubling baseline (Thakur, Rabenseifner and Gropp, as in MPICH and Gloo).

Ranks are taken in rank order, x = 0..N-1. For N = P a power of two:

- allgather by recursive doubling (partner distance 1, 2, 4, ...): the shard of r
  reaches rank x ≠ r from x XOR h, where h is the highest set bit of x XOR r (the
  last bit in which x differs from r is the last one crossed). That is an out-tree
  from r.
- reduce-scatter by recursive halving (partner distance P/2, P/4, ..., 1): rank
  x ≠ r sends its partial sum of shard r to x XOR h (h as above); an in-tree toward r.

For other N, with P the largest power of two <= N, each extra rank e >= P is folded
onto its partner e - P, the standard way: in reduce-scatter e first sends its whole
buffer to e - P (edge e -> e - P in every tree but its own), the P core ranks run
recursive halving, and the shard of e, finished at e - P, is sent back to e (edge
e - P -> e). Allgather mirrors it: e - P passes e's shard into the core (e -> e - P
in e's tree) and hands every other shard on to e (e - P -> e). Every tree stays a
spanning arborescence rooted at its owner. Allreduce is reduce-scatter, then allgather.

Every logical edge needs a switch-only route (:mod:`~collcomm.schedules.routing`);
fabrics whose rank order pairs ranks without one (rings, tori, sparse direct-connect
boxes) have no such schedule and raise :class:`~collcomm.errors.ScheduleError`.
"""

from __future__ import annotations

import time
from fractions import Fraction

from collcomm.errors import ScheduleError
from collcomm.schedules import evaluate
from collcomm.schedules.ir import (ALLGATHER, ALLREDUCE, COLLECTIVES, REDUCE_SCATTER, Phase, Schedule, Tree,
                                   TreeEdge)
from collcomm.schedules.routing import has_route, route
from collcomm.topology.model import Topology


def core_size(n: int) -> int:
    """P: the largest power of two <= n."""
    return 1 << (n.bit_length() - 1)


def toward(x: int, r: int) -> int:
    """The core rank x talks to about the shard of r: x XOR (highest set bit of x XOR r)."""
    return x ^ (1 << ((x ^ r).bit_length() - 1))


def in_tree_edges(n: int, r: int) -> list[tuple[int, int]]:
    """Reduce-scatter edges (sender, receiver) over rank indices of the tree of shard ``r``."""
    p = core_size(n)
    sink = r if r < p else r - p  # the core rank where the shard of r is finished
    edges = [(x, toward(x, sink)) for x in range(p) if x != sink]
    edges += [(e, e - p) for e in range(p, n) if e != r]
    if r >= p:
        edges.append((sink, r))
    return edges


def out_tree_edges(n: int, r: int) -> list[tuple[int, int]]:
    """Allgather edges (sender, receiver) over rank indices of the tree of shard ``r``."""
    p = core_size(n)
    source = r if r < p else r - p  # the core rank that spreads the shard of r
    edges = [] if r < p else [(r, source)]
    edges += [(toward(x, source), x) for x in range(p) if x != source]
    edges += [(e - p, e) for e in range(p, n) if e != r]
    return edges


def _tree(topo: Topology, root: int, pairs: list[tuple[int, int]]) -> Tree:
    ranks = topo.compute
    edges = tuple(TreeEdge(ranks[a], ranks[b], route(topo, ranks[a], ranks[b])) for a, b in pairs)
    return Tree(ranks[root], Fraction(1), edges)


def _check_routes(topo: Topology, kinds: list[str]) -> None:
    n, ranks = topo.num_ranks, topo.compute
    for kind in kinds:
        build = out_tree_edges if kind == ALLGATHER else in_tree_edges
        for r in range(n):
            for a, b in build(n, r):
                if not has_route(topo, ranks[a], ranks[b]):
                    raise ScheduleError(f"halving-doubling: ranks {ranks[a]} and {ranks[b]} of {topo.name!r} are "
                                        f"partners but {ranks[a]} -> {ranks[b]} has no route through switches "
                                        f"only; use ring, forestcoll or blink on this fabric")


def halving_doubling(topo: Topology, collective: str = ALLGATHER) -> Schedule:
    """The recursive halving (reduce-scatter) / doubling (allgather) schedule of ``collective`` on ``topo``."""
    if collective not in COLLECTIVES:
        raise ScheduleError(f"unknown collective {collective!r}; choose one of {', '.join(COLLECTIVES)}")
    start = time.perf_counter()
    kinds = [REDUCE_SCATTER, ALLGATHER] if collective == ALLREDUCE else [collective]
    _check_routes(topo, kinds)
    n = topo.num_ranks
    phases = []
    for kind in kinds:
        build = out_tree_edges if kind == ALLGATHER else in_tree_edges
        phases.append(Phase(kind, [_tree(topo, r, build(n, r)) for r in range(n)]))
    schedule = Schedule(collective, "halving-doubling", topo.name, list(topo.compute), phases,
                        info={"core_ranks": core_size(n)})
    schedule.algbw = evaluate.algbw(schedule, topo)
    schedule.generation_seconds = time.perf_counter() - start
    return schedule
