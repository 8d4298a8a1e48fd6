"""Blink-style baseline: greedy spanning-tree packing by multiplicative weights.

Blink (Wang et al., MLSys 2020) packs spanning trees into the fabric so that many
trees share the links evenly. This is the packing step in its spirit (Blink itself
prunes the trees with an integer program afterwards; here every tree keeps the same
share):

1. Every physical link e has a load u_e (shards crossing it divided by its bandwidth)
   and a price w_e = exp(GAMMA · u_e / L) / c_e, where L is a lower bound on the
   phase's time per shard (each rank must take in N-1 shards through its in-links).
2. Roots take turns (round-robin, so later roots see earlier roots' load). A root's
   next tree is a minimum-price spanning out-arborescence rooted at it on the complete
   digraph of ranks (Chu-Liu/Edmonds), pricing logical edge (x, y) as the sum of w_e
   along its route (:mod:`~collcomm.schedules.routing`); it gets share
   1/trees_per_root, and every link it crosses is charged, which raises its price.
3. After ``trees_per_root`` rounds every root holds trees whose shares sum to 1;
   identical trees are merged.

Reduce-scatter packs out-trees on the reversed fabric and turns them around with
:func:`~collcomm.schedules.ir.reverse_tree`; allreduce is reduce-scatter, then
allgather. Prices are floats (a heuristic); shares are exact fractions.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction

from collcomm.errors import ScheduleError
from collcomm.schedules import evaluate
from collcomm.schedules.ir import (ALLGATHER, ALLREDUCE, COLLECTIVES, REDUCE_SCATTER, Phase, Schedule, Tree,
                                   TreeEdge, merge_identical_trees, reverse_tree)
from collcomm.schedules.routing import route, router
from collcomm.topology.model import Topology

GAMMA = 4.0  # how fast prices grow with load; of 1, 2, 4, ..., 32, 4 came closest to the optimum on the presets


class LinkPrices:
    """Loads and multiplicative-weights prices of the physical links of one fabric."""

    def __init__(self, topo: Topology):
        self.capacity = {e: float(bw) for e, bw in topo.capacity.items()}
        self.load = {e: 0.0 for e in topo.capacity}  # shards crossing / bandwidth
        n = topo.num_ranks
        self.scale = max((n - 1) / float(topo.ingress(r)) for r in topo.compute)

    def prices(self) -> dict[tuple[str, str], float]:
        return {e: math.exp(GAMMA * self.load[e] / self.scale) / c for e, c in self.capacity.items()}

    def charge(self, tree: Tree) -> None:
        for e in tree.edges:
            for hop in zip(e.path, e.path[1:]):
                self.load[hop] += float(tree.share) / self.capacity[hop]


class NoArborescence(Exception):
    """Some node cannot be reached from the root."""


def min_arborescence(nodes: list, root, edges: list[tuple]) -> list[tuple]:
    """Chu-Liu/Edmonds: a minimum-weight spanning out-arborescence rooted at ``root``.

    ``edges`` are tuples ``(u, v, weight, ...)``; the chosen ones are returned as given.
    Every node but the root takes its cheapest incoming edge; the cycles this makes are
    contracted (an edge entering a cycle at v costs what it saves over v's choice) and
    the smaller problem is solved the same way. Ties go to the edge listed first, so the
    result is deterministic.
    """
    cheapest_in: dict = {}
    for e in edges:
        u, v, w = e[0], e[1], e[2]
        if v != root and u != v and (v not in cheapest_in or w < cheapest_in[v][2]):
            cheapest_in[v] = e
    if any(v != root and v not in cheapest_in for v in nodes):
        raise NoArborescence
    cycles = _cycles(nodes, root, cheapest_in)
    if not cycles:
        return [cheapest_in[v] for v in nodes if v != root]
    label = {}
    merged = []
    for i, cycle in enumerate(cycles):
        merged.append(("cycle", len(nodes), i))  # len(nodes) shrinks at every level: labels never clash
        for v in cycle:
            label[v] = merged[-1]
    contracted: dict = {}  # (tail, head) -> cheapest contracted edge, keeping the original
    for e in edges:
        u, v, w = e[0], e[1], e[2]
        a, b = label.get(u, u), label.get(v, v)
        if a == b:
            continue
        if v in label:
            w = w - cheapest_in[v][2]
        if (a, b) not in contracted or w < contracted[(a, b)][2]:
            contracted[(a, b)] = (a, b, w, e)
    chosen = min_arborescence([x for x in nodes if x not in label] + merged, root, list(contracted.values()))
    result = [c[3] for c in chosen]
    entry_of = {c[1]: c[3][1] for c in chosen if c[1] in label.values()}
    for lab, cycle in zip(merged, cycles):
        result += [cheapest_in[v] for v in cycle if v != entry_of[lab]]
    return result


def _cycles(nodes: list, root, cheapest_in: dict) -> list[list]:
    """The (disjoint) cycles of the graph of cheapest incoming edges."""
    walk_of: dict = {}
    found = []
    for start in nodes:
        path = []
        x = start
        while x != root and x not in walk_of:
            walk_of[x] = start
            path.append(x)
            x = cheapest_in[x][0]
        if x != root and walk_of[x] == start:
            found.append(path[path.index(x):])
    return found


def cheapest_arborescence(topo: Topology, root: str, prices: LinkPrices, share: Fraction) -> Tree:
    """Minimum-price spanning out-arborescence rooted at ``root`` over the routable logical edges."""
    price = prices.prices()
    paths = router(topo)
    edges = []
    for x in topo.compute:
        for y in topo.compute:
            if x != y and y != root and paths.has_route(x, y):
                path = paths.path(x, y)
                edges.append((x, y, sum(price[hop] for hop in zip(path, path[1:]))))
    try:
        chosen = min_arborescence(list(topo.compute), root, edges)
    except NoArborescence:
        raise ScheduleError(f"blink: no spanning tree from {root} over routes through switches only "
                            f"in {topo.name!r}") from None
    chosen.sort(key=lambda e: (topo.rank(e[0]), topo.rank(e[1])))
    return Tree(root, share, tuple(TreeEdge(x, y, route(topo, x, y)) for x, y, _ in chosen))


def pack_out_trees(topo: Topology, trees_per_root: int) -> list[Tree]:
    """``trees_per_root`` out-trees per root, packed round-robin against rising link prices."""
    prices = LinkPrices(topo)
    share = Fraction(1, trees_per_root)
    trees = []
    for _ in range(trees_per_root):
        for root in topo.compute:
            tree = cheapest_arborescence(topo, root, prices, share)
            prices.charge(tree)
            trees.append(tree)
    return merge_identical_trees(trees)


def blink(topo: Topology, collective: str = ALLGATHER, trees_per_root: int = 8) -> Schedule:
    """The Blink-style packed-trees schedule of ``collective`` on ``topo``."""
    if collective not in COLLECTIVES:
        raise ScheduleError(f"unknown collective {collective!r}; choose one of {', '.join(COLLECTIVES)}")
    if isinstance(trees_per_root, bool) or not isinstance(trees_per_root, int) or trees_per_root < 1:
        raise ScheduleError(f"blink: trees_per_root must be an integer >= 1, got {trees_per_root!r}")
    start = time.perf_counter()
    kinds = [REDUCE_SCATTER, ALLGATHER] if collective == ALLREDUCE else [collective]
    phases = []
    for kind in kinds:
        if topo.num_ranks == 1:
            trees = [Tree(topo.compute[0], Fraction(1), ())]
        elif kind == ALLGATHER:
            trees = pack_out_trees(topo, trees_per_root)
        else:
            trees = [reverse_tree(t) for t in pack_out_trees(topo.reversed(), trees_per_root)]
        phases.append(Phase(kind, trees))
    schedule = Schedule(collective, "blink", topo.name, list(topo.compute), phases,
                        info={"trees_per_root": trees_per_root})
    schedule.algbw = evaluate.algbw(schedule, topo)
    schedule.generation_seconds = time.perf_counter() - start
    return schedule
