"""Ring baseline (as in NCCL / Baidu ring-allreduce), with rank reordering.

The ranks form a cycle o[0] -> o[1] -> ... -> o[N-1] -> o[0]; every hop is a logical
edge on its route (:mod:`collcomm.schedules.routing`).

- allgather: the shard of o[i] travels along the ring, o[i] -> o[i+1] -> ... ->
  o[i-1]: an out-tree that is a chain of N-1 edges.
- reduce-scatter: the shard of o[i] is summed along the chain o[i+1] -> ... -> o[i]
  that ends at its owner: an in-tree (every other rank has one outgoing edge).
- allreduce: reduce-scatter, then allgather.

Every hop carries N-1 shards per direction used. *Two-way*: where every hop also
has a route backwards, each root gets two chains with share 1/2, one per direction
(both directions of duplex links work at once); the one-way ring is kept instead in
the rare case where it is strictly faster (asymmetric links).

*Rank reordering*: the cyclic order decides which links the hops share, so the
generator looks for the order with the smallest bottleneck, pricing each candidate
with the exact model (:func:`routing.time_per_shard`): rank order, host-grouped order,
a greedy widest-neighbour order from every start, a bounded backtracking search for
any order whose hops all have routes (when none of those has), and finally bounded
first-improvement 2-opt from the best. Everything is deterministic. A fabric on which
no order has a switch-only route for every hop (say, two clusters joined by a single
link) has no ring: :class:`~collcomm.errors.ScheduleError`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from fractions import Fraction

from collcomm.errors import ScheduleError
from collcomm.schedules import evaluate
from collcomm.schedules.ir import (ALLGATHER, ALLREDUCE, COLLECTIVES, REDUCE_SCATTER, Phase, Schedule, Tree,
                                   TreeEdge, merge_identical_trees)
from collcomm.schedules.routing import has_route, route, time_per_shard, width
from collcomm.topology.model import Topology

MAX_2OPT_EVALUATIONS = 3000
MAX_SEARCH_STEPS = 20000


@dataclass(frozen=True)
class RingPlan:
    """A cyclic order of the ranks and whether data flows both ways around it."""

    order: tuple[str, ...]
    two_way: bool
    time: Fraction  # model seconds per GB of shard for one phase (allgather or reduce-scatter)


# ---------------------------------------------------------------------------- pricing
def _hops(order: tuple[str, ...]) -> list[tuple[str, str]]:
    n = len(order)
    return [(order[i], order[(i + 1) % n]) for i in range(n)]


def _missing(topo: Topology, hops: list[tuple[str, str]]) -> int:
    return sum(not has_route(topo, a, b) for a, b in hops)


def price(topo: Topology, order: tuple[str, ...]) -> tuple[int, Fraction, bool, tuple[str, ...]]:
    """(hops without a route, phase time, two-way?, oriented order) of the best ring on ``order``.

    The three rings on one cyclic order are: forward, backward (the forward ring of the
    reversed order) and two-way. A ring whose hops lack routes costs its number of missing
    hops (and time 0); comparing these tuples puts every complete ring first.
    """
    n = len(order)
    fwd = _hops(order)
    back = [(b, a) for a, b in fwd]
    miss_f, miss_b = _missing(topo, fwd), _missing(topo, back)
    if miss_f and miss_b:
        return min(miss_f, miss_b), Fraction(0), False, order
    per_hop = Fraction(n - 1)
    options = []
    if not miss_f and not miss_b:
        two = time_per_shard(topo, [(a, b, per_hop / 2) for a, b in fwd + back])
        options.append((two, 0, True, order))
    if not miss_f:
        options.append((time_per_shard(topo, [(a, b, per_hop) for a, b in fwd]), 1, False, order))
    if not miss_b:
        rev = (order[0],) + tuple(reversed(order[1:]))
        options.append((time_per_shard(topo, [(a, b, per_hop) for a, b in back]), 2, False, rev))
    t, _, two_way, oriented = min(options, key=lambda o: (o[0], o[1]))
    return 0, t, two_way, oriented


def _cost(topo: Topology, order: tuple[str, ...]) -> tuple[int, Fraction]:
    miss, t, _, _ = price(topo, order)
    return miss, t


# ---------------------------------------------------------------------------- candidate orders
def host_grouped_order(topo: Topology) -> tuple[str, ...]:
    """Ranks of one host next to each other (hosts in order of first appearance), rank order inside."""
    first: dict[str, int] = {}
    for i, r in enumerate(topo.compute):
        h = topo.host_of(r)
        if h is not None:
            first.setdefault(h, i)
    key = {r: (first.get(topo.host_of(r), i), i) for i, r in enumerate(topo.compute)}
    return tuple(sorted(topo.compute, key=key.__getitem__))


def greedy_widest_order(topo: Topology, start: str) -> tuple[str, ...]:
    """From ``start``, always hop to the unvisited rank with the widest route (then same host, then rank order)."""
    rank_index = {r: i for i, r in enumerate(topo.compute)}
    order = [start]
    left = [r for r in topo.compute if r != start]
    while left:
        here = order[-1]
        host = topo.host_of(here)
        nxt = max(left, key=lambda r: (width(topo, here, r) or 0,
                                       host is not None and topo.host_of(r) == host, -rank_index[r]))
        order.append(nxt)
        left.remove(nxt)
    return tuple(order)


def routable_cycle(topo: Topology, max_steps: int = MAX_SEARCH_STEPS) -> tuple[str, ...] | None:
    """Any cyclic order whose hops all have routes (bounded depth-first search, widest hops first)."""
    ranks = topo.compute
    succ = {a: sorted((b for b in ranks if b != a and has_route(topo, a, b)),
                      key=lambda b: (-width(topo, a, b), topo.rank(b))) for a in ranks}
    order = [ranks[0]]
    used = {ranks[0]}
    steps = 0

    def extend() -> bool:
        nonlocal steps
        steps += 1
        if steps > max_steps:
            return False
        if len(order) == len(ranks):
            return has_route(topo, order[-1], order[0])
        for b in succ[order[-1]]:
            if b not in used:
                order.append(b)
                used.add(b)
                if extend():
                    return True
                order.pop()
                used.discard(b)
        return False

    return tuple(order) if len(ranks) > 1 and extend() else None


def two_opt(topo: Topology, order: tuple[str, ...], max_evaluations: int = MAX_2OPT_EVALUATIONS) -> tuple[str, ...]:
    """First-improvement 2-opt (reverse a segment, the first rank fixed) for at most ``max_evaluations`` tries."""
    best, best_cost = order, _cost(topo, order)
    n = len(order)
    tries = 0
    improved = True
    while improved and tries < max_evaluations:
        improved = False
        for i in range(1, n - 1):
            for j in range(i + 1, n):
                if tries >= max_evaluations:
                    return best
                tries += 1
                cand = best[:i] + tuple(reversed(best[i:j + 1])) + best[j + 1:]
                c = _cost(topo, cand)
                if c < best_cost:
                    best, best_cost, improved = cand, c, True
                    break
            if improved:
                break
    return best


def best_ring(topo: Topology) -> RingPlan:
    """The cheapest ring found over the candidate orders (see the module docstring)."""
    ranks = tuple(topo.compute)
    candidates = [ranks, host_grouped_order(topo)] + [greedy_widest_order(topo, r) for r in ranks]
    best = min(candidates, key=lambda o: _cost(topo, o))
    if _cost(topo, best)[0]:
        found = routable_cycle(topo)
        if found is not None:
            best = found
    best = two_opt(topo, best)
    miss, t, two_way, oriented = price(topo, best)
    if miss:
        raise ScheduleError(f"ring: no cyclic order of the ranks of {topo.name!r} found in which every hop has a "
                            f"route through switches only; use forestcoll or blink on this fabric")
    return RingPlan(oriented, two_way, t)


# ---------------------------------------------------------------------------- trees
def _chain(topo: Topology, ranks: list[str]) -> tuple[TreeEdge, ...]:
    return tuple(TreeEdge(a, b, route(topo, a, b)) for a, b in zip(ranks, ranks[1:]))


def ring_trees(topo: Topology, plan: RingPlan, kind: str) -> list[Tree]:
    """One chain per root and direction: from the root on (allgather) or ending at it (reduce-scatter)."""
    n = len(plan.order)
    directions = [plan.order, (plan.order[0],) + tuple(reversed(plan.order[1:]))] if plan.two_way \
        else [plan.order]
    share = Fraction(1, len(directions))
    trees = []
    for seq in directions:
        for i, root in enumerate(seq):
            if kind == ALLGATHER:
                chain = [seq[(i + k) % n] for k in range(n)]
            else:
                chain = [seq[(i + k) % n] for k in range(1, n + 1)]
            trees.append(Tree(root, share, _chain(topo, chain)))
    return merge_identical_trees(trees)


def ring(topo: Topology, collective: str = ALLGATHER) -> Schedule:
    """The ring schedule of ``collective`` on ``topo`` over the best cyclic rank order found."""
    if collective not in COLLECTIVES:
        raise ScheduleError(f"unknown collective {collective!r}; choose one of {', '.join(COLLECTIVES)}")
    start = time.perf_counter()
    kinds = [REDUCE_SCATTER, ALLGATHER] if collective == ALLREDUCE else [collective]
    if topo.num_ranks == 1:
        phases = [Phase(k, [Tree(topo.compute[0], Fraction(1), ())]) for k in kinds]
        info = {}
    else:
        plan = best_ring(topo)
        phases = [Phase(k, ring_trees(topo, plan, k)) for k in kinds]
        info = {"order": list(plan.order), "two_way": plan.two_way}
    schedule = Schedule(collective, "ring", topo.name, list(topo.compute), phases, info=info)
    schedule.algbw = evaluate.algbw(schedule, topo)
    schedule.generation_seconds = time.perf_counter() - start
    return schedule
