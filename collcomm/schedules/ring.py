"""Ring baseline in NCCL's style: one ring per channel, with rank reordering.

A ring is a cyclic order o[0] -> o[1] -> ... -> o[N-1] -> o[0] of the ranks; every hop
is a logical edge on its route (:mod:`collcomm.schedules.routing`).

- allgather: the shard of o[i] travels along the ring, o[i] -> o[i+1] -> ... ->
  o[i-1]: an out-tree that is a chain of N-1 edges.
- reduce-scatter: the shard of o[i] is summed along the chain o[i+1] -> ... -> o[i]
  that ends at its owner: an in-tree (every other rank has one outgoing edge).
- allreduce: reduce-scatter, then allgather.

*Channels*: NCCL runs R rings at once, one per channel, and lets each channel's ring
enter and leave a host through different ranks (so through different NICs). Here each
of the R rings carries share 1/R of every root's shard, so every hop of a ring carries
(N-1)/R shards per direction used. *Two-way*: where every hop also has a route
backwards, each root gets two chains per ring with half of that share each, one per
direction (both directions of duplex links work at once); one-way rings are kept
instead where they are strictly faster (asymmetric links).

The candidates, all priced with the exact model (``max over links of load /
bandwidth``, the value :func:`routing.time_per_shard` gives, computed here with
integers by :class:`EdgePricer`):

1. *the best single ring* (R = 1), found by rank reordering: rank order, host-grouped
   order, a greedy widest-neighbour order from every start, a bounded backtracking
   search for any order whose hops all have routes (when none of those has), and
   finally bounded first-improvement 2-opt from the best;
2. *channel rings* for R = 1 .. min(largest host, MAX_CHANNELS), where the fabric has
   hosts (``Node.host``): the hosts are visited in the order of the best single ring,
   and inside each host the ranks follow a path between an entry and an exit rank along
   the host's cycle (the single ring's order inside the host, or a cycle with a wider
   narrowest hop where a bounded search finds one). Two bounded depth-first searches
   pick a path per host and channel, each preferring the path with the widest hops,
   then the entry and exit ranks used least by the other channels (so the rings cross
   between hosts at different ranks), then the widest crossing hop, then the path whose
   entry is nearest the channel's share of the cycle (rotations of the in-host order,
   as NCCL's channels): a *greedy* one, channel after channel, and a *balanced* one over
   all channels at once that lets no rank enter or leave its host more than
   ceil(2R / ranks of the host) times and backtracks across channels (it finds an even
   spread where the greedy one paints itself into a corner, e.g. three DGX-A100 boxes
   whose NICs sit on two switches by parity). Each set is priced two-way, one-way
   forward, one-way backward and with alternating directions.

The fastest candidate wins; ties go to fewer rings, then to the single ring of (1), so
a fabric where several rings do not help keeps the single ring. Everything is
deterministic. A fabric on which no order has a switch-only route for every hop (say,
two clusters joined by a single link) has no ring: :class:`~collcomm.errors.ScheduleError`.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

from collcomm.errors import ScheduleError
from collcomm.schedules import evaluate
from collcomm.schedules.ir import (ALLGATHER, ALLREDUCE, COLLECTIVES, REDUCE_SCATTER, Phase, Schedule, Tree,
                                   TreeEdge, merge_identical_trees)
from collcomm.schedules.routing import has_route, route, router, width
from collcomm.topology.model import Topology

MAX_2OPT_EVALUATIONS = 3000
MAX_SEARCH_STEPS = 20000
MAX_CHANNELS = 16
MAX_CYCLE_SEARCH_STEPS = 20000  # per host and width threshold
MAX_CHANNEL_SEARCH_STEPS = 5000  # per channel (greedy channel rings)
MAX_BALANCED_SEARCH_STEPS = 20000  # for all channels at once (balanced channel rings)
# Hosts (greedy search) or channels x hosts (balanced search) beyond which channel rings are not
# searched for: the searches recurse once per host and channel.
MAX_SEARCH_DEPTH = 400


# ---------------------------------------------------------------------------- pricing
class EdgePricer:
    """The exact model time of integer-weighted logical edges on their routes.

    ``time(edges, factor)`` is ``max over links of (sum of the weights of the edges whose
    route crosses the link) * factor / bandwidth``: what :func:`routing.time_per_shard`
    gives for the shares ``weight * factor``, with integers throughout and one Fraction
    at the end (the baselines price thousands of candidates).
    """

    def __init__(self, topo: Topology):
        self._router = router(topo)  # no reference to `topo`: pricers are cached weakly by topology
        links = sorted(topo.capacity)
        self._link = {hop: i for i, hop in enumerate(links)}
        # load / bandwidth = load * den / num = load * scale / L, with L the lcm of the numerators.
        self._lcm = math.lcm(*(bw.numerator for bw in topo.capacity.values())) if links else 1
        self._scale = [topo.capacity[hop].denominator * (self._lcm // topo.capacity[hop].numerator)
                       for hop in links]
        self._hops: dict[tuple[str, str], tuple[int, ...]] = {}

    def links(self, src: str, dst: str) -> tuple[int, ...]:
        """Indices of the links on the route ``src -> dst`` (ScheduleError if there is none)."""
        got = self._hops.get((src, dst))
        if got is None:
            path = self._router.path(src, dst)
            got = self._hops[(src, dst)] = tuple(self._link[h] for h in zip(path, path[1:]))
        return got

    def time(self, edges: Iterable[tuple[str, str, int]], factor: Fraction = Fraction(1)) -> Fraction:
        acc = [0] * len(self._scale)
        for (src, dst), w in _sum_weights(edges).items():
            for i in self.links(src, dst):
                acc[i] += w
        return Fraction(max(map(int.__mul__, acc, self._scale), default=0), self._lcm) * factor


def _sum_weights(edges: Iterable[tuple[str, str, int]]) -> Counter:
    total: Counter = Counter()
    for src, dst, w in edges:
        total[(src, dst)] += w
    return total


_PRICERS: dict[int, tuple[weakref.ref, EdgePricer]] = {}


def pricer(topo: Topology) -> EdgePricer:
    """The (cached) pricer of ``topo``; the entry goes away with its topology."""
    entry = _PRICERS.get(id(topo))
    if entry is not None and entry[0]() is topo:
        return entry[1]
    key = id(topo)

    def forget(ref, key=key):
        if _PRICERS.get(key, (None,))[0] is ref:
            del _PRICERS[key]

    found = EdgePricer(topo)
    _PRICERS[key] = (weakref.ref(topo, forget), found)
    return found


@dataclass(frozen=True)
class RingPlan:
    """A cyclic order of the ranks and whether data flows both ways around it."""

    order: tuple[str, ...]
    two_way: bool
    time: Fraction  # model seconds per GB of shard for one phase (allgather or reduce-scatter)


@dataclass(frozen=True)
class MultiRing:
    """R rings (each oriented: data flows along its order), each carrying share 1/R."""

    rings: tuple[tuple[str, ...], ...]
    two_way: bool
    time: Fraction  # model seconds per GB of shard for one phase


def _hops(order: tuple[str, ...]) -> list[tuple[str, str]]:
    n = len(order)
    return [(order[i], order[(i + 1) % n]) for i in range(n)]


def _reversed_ring(order: tuple[str, ...]) -> tuple[str, ...]:
    """The same cycle the other way round, starting at the same rank."""
    return (order[0],) + tuple(reversed(order[1:]))


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
    cost = pricer(topo)
    options = []
    if not miss_f and not miss_b:
        options.append((cost.time([(a, b, 1) for a, b in fwd + back], per_hop / 2), 0, True, order))
    if not miss_f:
        options.append((cost.time([(a, b, 1) for a, b in fwd], per_hop), 1, False, order))
    if not miss_b:
        options.append((cost.time([(a, b, 1) for a, b in back], per_hop), 2, False, _reversed_ring(order)))
    t, _, two_way, oriented = min(options, key=lambda o: (o[0], o[1]))
    return 0, t, two_way, oriented


def _cost(topo: Topology, order: tuple[str, ...]) -> tuple[int, Fraction]:
    miss, t, _, _ = price(topo, order)
    return miss, t


# ---------------------------------------------------------------------------- the best single ring
def host_grouped_order(topo: Topology) -> tuple[str, ...]:
    """Ranks of one host next to each other (hosts in order of first appearance), rank order inside."""
    first: dict[str, int] = {}
    for i, r in enumerate(topo.compute):
        h = topo.host_of(r)
        if h is not None:
            first.setdefault(h, i)
    key = {r: (first.get(topo.host_of(r), i), i) for i, r in enumerate(topo.compute)}
    return tuple(sorted(topo.compute, key=key.__getitem__))


def _neighbour_preferences(topo: Topology) -> dict[str, list[str]]:
    """For every rank, the other ranks by widest route, then same host, then rank order."""
    prefs = {}
    for i, here in enumerate(topo.compute):
        host = topo.host_of(here)
        others = [(-(width(topo, here, r) or 0), not (host is not None and topo.host_of(r) == host), j, r)
                  for j, r in enumerate(topo.compute) if j != i]
        prefs[here] = [r for *_, r in sorted(others)]
    return prefs


def greedy_widest_order(topo: Topology, start: str,
                        preferences: dict[str, list[str]] | None = None) -> tuple[str, ...]:
    """From ``start``, always hop to the unvisited rank with the widest route (then same host, then rank order)."""
    prefs = preferences if preferences is not None else _neighbour_preferences(topo)
    order = [start]
    seen = {start}
    while len(order) < topo.num_ranks:
        nxt = next(r for r in prefs[order[-1]] if r not in seen)
        order.append(nxt)
        seen.add(nxt)
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
    """The cheapest single ring found over the candidate orders (see the module docstring)."""
    ranks = tuple(topo.compute)
    prefs = _neighbour_preferences(topo)
    candidates = [ranks, host_grouped_order(topo)] + [greedy_widest_order(topo, r, prefs) for r in ranks]
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


# ---------------------------------------------------------------------------- hosts
def _both_ways(topo: Topology, a: str, b: str) -> Fraction:
    """The narrower of the routes a -> b and b -> a (0 where either is missing)."""
    return min(width(topo, a, b) or 0, width(topo, b, a) or 0)


def host_groups(topo: Topology, order: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The ranks of each host in the order ``order`` visits them, hosts in order of first visit;
    a rank without a host is a group of its own."""
    groups: dict[str, list[str]] = {}
    for r in order:
        host = topo.host_of(r)
        groups.setdefault(f"host:{host}" if host is not None else f"rank:{r}", []).append(r)
    return [tuple(g) for g in groups.values()]


def _cycle_at_least(topo: Topology, ranks: tuple[str, ...], least: Fraction, max_steps: int) -> tuple[str, ...] | None:
    """A cyclic order of ``ranks`` whose every hop is at least ``least`` wide both ways (bounded search)."""
    position = {r: i for i, r in enumerate(ranks)}
    succ = {a: sorted((b for b in ranks if b != a and _both_ways(topo, a, b) >= least),
                      key=lambda b: (-_both_ways(topo, a, b), position[b])) for a in ranks}
    order = [ranks[0]]
    used = {ranks[0]}
    steps = 0

    def extend() -> bool:
        nonlocal steps
        steps += 1
        if steps > max_steps:
            return False
        if len(order) == len(ranks):
            return _both_ways(topo, order[-1], order[0]) >= least
        for b in succ[order[-1]]:
            if b not in used:
                order.append(b)
                used.add(b)
                if extend():
                    return True
                order.pop()
                used.discard(b)
        return False

    return tuple(order) if extend() else None


def _narrowest(topo: Topology, cycle: tuple[str, ...]) -> Fraction:
    return min((_both_ways(topo, a, b) for a, b in _hops(cycle)), default=Fraction(0))


def host_cycle(topo: Topology, ranks: tuple[str, ...], max_steps: int = MAX_CYCLE_SEARCH_STEPS) -> tuple[str, ...]:
    """A cyclic order of one host's ranks: ``ranks`` itself, unless a bounded search finds one whose
    narrowest hop (either way) is wider."""
    if len(ranks) < 3:
        return ranks
    have = _narrowest(topo, ranks)
    widths = sorted({_both_ways(topo, a, b) for a in ranks for b in ranks if a != b}, reverse=True)
    for least in widths:
        if least <= have:
            break
        found = _cycle_at_least(topo, ranks, least, max_steps)
        if found is not None:
            return found
    return ranks


@dataclass(frozen=True)
class HostPath:
    """A path through all ranks of one host, from ``path[0]`` (entry) to ``path[-1]`` (exit)."""

    path: tuple[str, ...]
    # Widths only order the search, so floats do: the narrowest hop counting both directions
    # and forward only (0.0: some hop has no route).
    narrowest_both: float
    narrowest_forward: float
    entry_position: int  # of the entry on the host's cycle
    detour: int  # 0 for a rotation of the cycle, 1 for a reflection, more the farther the exit


def host_paths(topo: Topology, cycle: tuple[str, ...]) -> list[HostPath]:
    """For every (entry, exit) pair of the host: the path forward along ``cycle`` from the entry,
    skipping the exit until the end, and the path backward; a rotation of the cycle (the exit just
    before the entry) or its reflection comes first."""
    k = len(cycle)
    if k == 1:
        return [HostPath(cycle, math.inf, math.inf, 0, 0)]
    out = []
    for i, entry in enumerate(cycle):
        for d in range(1, k):
            for step in (1, -1):  # forward (exit d places before the entry) and backward (d places after)
                exit_ = cycle[(i - step * d) % k]
                path = (entry,) + tuple(cycle[(i + step * t) % k] for t in range(1, k)
                                        if cycle[(i + step * t) % k] != exit_) + (exit_,)
                hops = list(zip(path, path[1:]))
                both = float(min(_both_ways(topo, a, b) for a, b in hops))
                forward = float(min((width(topo, a, b) or Fraction(0)) for a, b in hops))
                out.append(HostPath(path, both, forward, i, 2 * (d - 1) + (step < 0)))
    # Rotations and reflections of two ranks coincide; keep one path per sequence.
    unique: dict[tuple[str, ...], HostPath] = {}
    for p in sorted(out, key=lambda p: (p.detour, p.entry_position)):
        unique.setdefault(p.path, p)
    return list(unique.values())


def channel_rings_search(topo: Topology, paths: list[list[HostPath]], channels: int, two_way: bool,
                         balanced: bool, widths: dict | None = None) -> list[tuple[str, ...]] | None:
    """``channels`` rings, each a path per host with the hosts in order (see the module docstring),
    or None where the bounded search finds none.

    Greedy (``balanced`` false): one channel after the other, each by its own depth-first search
    that prefers entry and exit ranks used least by the earlier channels. Balanced: one search over
    all channels that allows no rank to enter or leave its host more than ceil(2R / ranks of the
    host) times, so that the rings spread evenly over the ranks (and NICs) of every host where the
    fabric lets them; it backtracks across channels. ``widths`` caches hop widths between calls.
    """
    m = len(paths)
    if (channels * m if balanced else m) > MAX_SEARCH_DEPTH:
        return None
    widths = {} if widths is None else widths  # the search only orders by widths: floats will do
    caps = [math.ceil(2 * channels / len(p[0].path)) for p in paths] if balanced else None
    uses: Counter = Counter()
    chosen: list[list[HostPath]] = [[] for _ in range(channels)]
    steps = 0

    def hop(a: str, b: str) -> float:
        got = widths.get((a, b))
        if got is None:
            got = widths[(a, b)] = float(_both_ways(topo, a, b) if two_way else (width(topo, a, b) or 0))
        return got

    def options(c: int, g: int) -> list[HostPath]:
        ring = chosen[c]
        k = len(paths[g][0].path)
        shift = c * k // channels
        ranked = []
        for p in paths[g]:
            inside = p.narrowest_both if two_way else p.narrowest_forward
            if not inside:
                continue
            entry, exit_ = p.path[0], p.path[-1]
            if caps is not None and (uses[entry] + 1 + (entry == exit_) > caps[g] or uses[exit_] + 1 > caps[g]):
                continue
            w_in = hop(ring[-1].path[-1], entry) if g else 0.0
            if g and not w_in:
                continue
            if g == m - 1 and not hop(exit_, ring[0].path[0] if g else entry):
                continue
            ranked.append(((-inside, uses[entry] + uses[exit_], -w_in, (p.entry_position - shift) % k, p.detour),
                           len(ranked), p))
        return [p for *_, p in sorted(ranked, key=lambda x: x[:2])]

    def extend(c: int, g: int, end: int) -> bool:
        nonlocal steps
        steps += 1
        if steps > (MAX_BALANCED_SEARCH_STEPS if balanced else MAX_CHANNEL_SEARCH_STEPS):
            return False
        if g == m:
            return c + 1 == end or extend(c + 1, 0, end)
        for p in options(c, g):
            chosen[c].append(p)
            uses[p.path[0]] += 1
            uses[p.path[-1]] += 1
            if extend(c, g + 1, end):
                return True
            chosen[c].pop()
            uses[p.path[0]] -= 1
            uses[p.path[-1]] -= 1
        return False

    if balanced:
        if not extend(0, 0, channels):
            return None
    else:
        for c in range(channels):
            steps = 0
            if not extend(c, 0, c + 1):
                return None
    return [tuple(r for p in ring for r in p.path) for ring in chosen]


def price_rings(topo: Topology, rings: list[tuple[str, ...]]) -> MultiRing | None:
    """The fastest way to run ``rings`` (each with share 1/R): two-way, all forward, all backward or
    alternating directions; None if no way has routes for every hop."""
    n, r = topo.num_ranks, len(rings)
    cost = pricer(topo)
    fwd = [_hops(o) for o in rings]
    ok_f = all(not _missing(topo, h) for h in fwd)
    ok_b = all(not _missing(topo, [(b, a) for a, b in h]) for h in fwd)
    options = []
    if ok_f and ok_b:
        options.append((cost.time([(a, b, 1) for h in fwd for x, y in h for a, b in ((x, y), (y, x))],
                                  Fraction(n - 1, 2 * r)), True, tuple(rings)))
    ways = [("forward", lambda i: True)] if ok_f else []
    if ok_b:
        ways.append(("backward", lambda i: False))
    if ok_f and ok_b and r > 1:
        ways.append(("alternating", lambda i: i % 2 == 0))
    for _, forward in ways:
        oriented = tuple(o if forward(i) else _reversed_ring(o) for i, o in enumerate(rings))
        options.append((cost.time([(a, b, 1) for o in oriented for a, b in _hops(o)], Fraction(n - 1, r)),
                        False, oriented))
    if not options:
        return None
    t, two_way, oriented = min(options, key=lambda o: o[0])  # min keeps the first of equals
    return MultiRing(oriented, two_way, t)


def channel_rings(topo: Topology, order: tuple[str, ...]) -> list[MultiRing]:
    """The channel-ring candidates for R = 1 .. min(largest host, MAX_CHANNELS), hosts visited as in
    ``order`` (the best single ring); empty where the fabric has fewer than two hosts or no host
    with two ranks."""
    groups = host_groups(topo, order)
    largest = max(len(g) for g in groups)
    if len(groups) < 2 or largest < 2:
        return []
    paths = [host_paths(topo, host_cycle(topo, g)) for g in groups]
    widths: dict[bool, dict] = {True: {}, False: {}}
    found: list[MultiRing] = []
    for channels in range(1, min(largest, MAX_CHANNELS) + 1):
        for two_way in (True, False):
            sets = []
            for balanced in (True, False):
                rings = channel_rings_search(topo, paths, channels, two_way, balanced, widths[two_way])
                if rings is not None and rings not in sets:
                    sets.append(rings)
            plans = [plan for plan in map(lambda rs: price_rings(topo, rs), sets) if plan is not None]
            if plans:
                found.append(min(plans, key=lambda plan: plan.time))
                break
    return found


def best_rings(topo: Topology) -> MultiRing:
    """The fastest of the single best ring and the channel-ring sets (see the module docstring)."""
    single = best_ring(topo)
    best = MultiRing((single.order,), single.two_way, single.time)
    for plan in channel_rings(topo, single.order):
        if (plan.time, len(plan.rings)) < (best.time, len(best.rings)):
            best = plan
    return best


# ---------------------------------------------------------------------------- trees
def _chain(topo: Topology, ranks: list[str]) -> tuple[TreeEdge, ...]:
    return tuple(TreeEdge(a, b, route(topo, a, b)) for a, b in zip(ranks, ranks[1:]))


def ring_trees(topo: Topology, plan: RingPlan | MultiRing, kind: str) -> list[Tree]:
    """One chain per ring, root and direction: from the root on (allgather) or ending at it (reduce-scatter)."""
    rings = plan.rings if isinstance(plan, MultiRing) else (plan.order,)
    directions = [seq for o in rings for seq in ((o, _reversed_ring(o)) if plan.two_way else (o,))]
    share = Fraction(1, len(directions))
    trees = []
    for seq in directions:
        n = len(seq)
        for i, root in enumerate(seq):
            if kind == ALLGATHER:
                chain = [seq[(i + k) % n] for k in range(n)]
            else:
                chain = [seq[(i + k) % n] for k in range(1, n + 1)]
            trees.append(Tree(root, share, _chain(topo, chain)))
    return merge_identical_trees(trees)


def ring(topo: Topology, collective: str = ALLGATHER) -> Schedule:
    """The ring schedule of ``collective`` on ``topo``: the fastest ring set found (one ring or one per channel)."""
    if collective not in COLLECTIVES:
        raise ScheduleError(f"unknown collective {collective!r}; choose one of {', '.join(COLLECTIVES)}")
    start = time.perf_counter()
    kinds = [REDUCE_SCATTER, ALLGATHER] if collective == ALLREDUCE else [collective]
    if topo.num_ranks == 1:
        phases = [Phase(k, [Tree(topo.compute[0], Fraction(1), ())]) for k in kinds]
        info = {}
    else:
        plan = best_rings(topo)
        phases = [Phase(k, ring_trees(topo, plan, k)) for k in kinds]
        info = {"order": list(plan.rings[0]), "two_way": plan.two_way, "channels": len(plan.rings),
                "rings": [list(o) for o in plan.rings]}
    schedule = Schedule(collective, "ring", topo.name, list(topo.compute), phases, info=info)
    schedule.algbw = evaluate.algbw(schedule, topo)
    schedule.generation_seconds = time.perf_counter() - start
    return schedule
