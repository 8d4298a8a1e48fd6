"""Double binary tree baseline (in the style of NCCL's tree algorithm).

Two binary trees span the ranks, laid over a sequence of positions 0..N-1:

- tree A: position p = b·(2k+1) (b its lowest set bit) has children p - b/2 and the
  largest p + b/2, p + b/4, ... that exists; position 0 has one child, the largest power
  of two below N. The interior nodes (degree > 1) are the even positions from 2 on; the
  odd positions and position 0 are leaves.
- tree B: tree A mirrored (p -> N-1-p) when N is even, shifted (p -> p+1 mod N) when N
  is odd. Either way the interior nodes of one tree are leaves of the other, so each
  rank forwards (as an interior node) in at most one of them.

NCCL pipelines the data of one broadcast/reduce from a fixed root through both trees.
A ``collcomm.schedule/1`` tree, however, is rooted at the owner of the shard it
carries. So here **every root r uses both trees re-rooted at r**, with share 1/2 each:
the undirected tree oriented away from r (allgather: an out-tree) or toward r
(reduce-scatter: an in-tree). Allreduce is reduce-scatter, then allgather. This keeps
NCCL's link usage pattern (each rank sends and receives along at most three tree
edges per tree) in the common format.

Positions are mapped to ranks by an order chosen like the ring's: rank order,
host-grouped order and the best ring order are priced with the exact model; if none
of them has routes for every tree edge, a bounded backtracking search looks for one
that has; then a bounded first-improvement search over swaps of two positions
improves the best. A
tree edge is used in both directions (there are roots on both of its sides), so it
needs a switch-only route both ways; where no order found has one for every tree edge
(one-way rings, sparse direct-connect fabrics) the generator raises
:class:`~collcomm.errors.ScheduleError`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from fractions import Fraction

from collcomm.errors import ScheduleError
from collcomm.schedules import evaluate
from collcomm.schedules.ir import (ALLGATHER, ALLREDUCE, COLLECTIVES, REDUCE_SCATTER, Phase, Schedule, Tree,
                                   TreeEdge, merge_identical_trees)
from collcomm.schedules.ring import best_ring, host_grouped_order
from collcomm.schedules.routing import has_route, route, time_per_shard
from collcomm.topology.model import Topology

MAX_SWAP_EVALUATIONS = 1500
MAX_SEARCH_STEPS = 20000

Edge = tuple[int, int]


# ---------------------------------------------------------------------------- the two trees
def binary_tree(n: int) -> list[Edge]:
    """Undirected edges (parent, child) over positions 0..n-1 of tree A; even positions >= 2 are interior."""
    if n < 2:
        return []
    top = 1 << ((n - 1).bit_length() - 1)  # largest power of two below n
    edges = [(0, top)]
    stack = [top]
    while stack:
        p = stack.pop()
        b = p & -p
        if b == 1:
            continue
        left = p - b // 2
        edges.append((p, left))
        stack.append(left)
        step = b // 2
        while step and p + step >= n:
            step //= 2
        if step:
            edges.append((p, p + step))
            stack.append(p + step)
    return edges


def double_binary_tree_positions(n: int) -> tuple[list[Edge], list[Edge]]:
    """Trees A and B over positions: B is A mirrored (even n) or shifted by one (odd n)."""
    a = binary_tree(n)
    move = (lambda p: n - 1 - p) if n % 2 == 0 else (lambda p: (p + 1) % n)
    return a, [(move(u), move(v)) for u, v in a]


def _sides(edges: list[tuple[str, str]], nodes: tuple[str, ...]) -> dict[tuple[str, str], int]:
    """For each tree edge (u, v) in both orientations: the number of nodes on u's side."""
    adj = defaultdict(list)
    for u, v in edges:
        adj[u].append(v)
        adj[v].append(u)
    root = nodes[0]
    parent = {root: None}
    order = [root]
    for x in order:
        for y in adj[x]:
            if y not in parent:
                parent[y] = x
                order.append(y)
    below = {x: 1 for x in order}
    for x in reversed(order[1:]):
        below[parent[x]] += below[x]
    n = len(nodes)
    sides = {}
    for x in order[1:]:
        p = parent[x]
        sides[(x, p)] = below[x]
        sides[(p, x)] = n - below[x]
    return sides


# ---------------------------------------------------------------------------- pricing orders
def _rank_trees(order: tuple[str, ...]) -> list[list[tuple[str, str]]]:
    return [[(order[u], order[v]) for u, v in t] for t in double_binary_tree_positions(len(order))]


def _cost(topo: Topology, order: tuple[str, ...], kinds: list[str]) -> tuple[int, Fraction]:
    """(directed tree edges without a route, model time of the phases) of the trees over ``order``."""
    trees = _rank_trees(order)
    missing = sum(not has_route(topo, a, b) for t in trees for u, v in t for a, b in ((u, v), (v, u)))
    if missing:
        return missing, Fraction(0)
    total = Fraction(0)
    for kind in kinds:
        weighted = []
        for t in trees:
            sides = _sides(t, order)
            for (u, v), k in sides.items():
                # allgather: u -> v carries the shards of the roots on u's side; reduce-scatter: of v's side.
                roots = k if kind == ALLGATHER else len(order) - k
                weighted.append((u, v, Fraction(roots, 2)))
        total += time_per_shard(topo, weighted)
    return 0, total


def _swap_search(topo: Topology, order: tuple[str, ...], kinds: list[str],
                 max_evaluations: int = MAX_SWAP_EVALUATIONS) -> tuple[str, ...]:
    """First-improvement search over swaps of two positions, at most ``max_evaluations`` tries."""
    best, best_cost = order, _cost(topo, order, kinds)
    n = len(order)
    tries = 0
    improved = True
    while improved:
        improved = False
        for i in range(n - 1):
            for j in range(i + 1, n):
                if tries >= max_evaluations:
                    return best
                tries += 1
                cand = list(best)
                cand[i], cand[j] = cand[j], cand[i]
                cand = tuple(cand)
                c = _cost(topo, cand, kinds)
                if c < best_cost:
                    best, best_cost, improved = cand, c, True
                    break
            if improved:
                break
    return best


def routable_embedding(topo: Topology, max_steps: int = MAX_SEARCH_STEPS) -> tuple[str, ...] | None:
    """Any order of the ranks under which every edge of both trees has routes both ways
    (bounded backtracking over positions, neighbours in the trees placed first)."""
    ranks = topo.compute
    n = len(ranks)
    adj: dict[int, set[int]] = defaultdict(set)
    for t in double_binary_tree_positions(n):
        for u, v in t:
            adj[u].add(v)
            adj[v].add(u)
    both = {a: {b for b in ranks if b != a and has_route(topo, a, b) and has_route(topo, b, a)} for a in ranks}
    # Place positions in breadth-first order of the union of the trees, busiest first.
    order = [max(range(n), key=lambda p: (len(adj[p]), -p))]
    for p in order:
        order += sorted((q for q in adj[p] if q not in order), key=lambda q: (-len(adj[q]), q))
    placed: dict[int, str] = {}
    used: set[str] = set()
    steps = 0

    def place(i: int) -> bool:
        nonlocal steps
        steps += 1
        if steps > max_steps:
            return False
        if i == n:
            return True
        pos = order[i]
        fixed = [placed[q] for q in adj[pos] if q in placed]
        for r in ranks:
            if r not in used and all(r in both[f] for f in fixed) and len(both[r]) >= len(adj[pos]):
                placed[pos] = r
                used.add(r)
                if place(i + 1):
                    return True
                del placed[pos]
                used.discard(r)
        return False

    return tuple(placed[p] for p in range(n)) if place(0) else None


def tree_order(topo: Topology, kinds: list[str]) -> tuple[str, ...]:
    """The order of ranks over tree positions (see the module docstring)."""
    candidates = [tuple(topo.compute), host_grouped_order(topo)]
    try:
        candidates.append(best_ring(topo).order)
    except ScheduleError:
        pass
    best = min(candidates, key=lambda o: _cost(topo, o, kinds))
    if _cost(topo, best, kinds)[0]:
        found = routable_embedding(topo)
        if found is not None:
            best = found
    best = _swap_search(topo, best, kinds)
    missing, _ = _cost(topo, best, kinds)
    if missing:
        raise ScheduleError(f"tree: no order of the ranks of {topo.name!r} found in which every double-binary-tree "
                            f"edge has a route through switches only in both directions; use forestcoll or "
                            f"blink on this fabric")
    return best


# ---------------------------------------------------------------------------- schedule
def _oriented(topo: Topology, edges: list[tuple[str, str]], root: str, kind: str, share: Fraction) -> Tree:
    """The undirected tree ``edges`` oriented away from ``root`` (allgather) or toward it (reduce-scatter)."""
    adj = defaultdict(list)
    for u, v in edges:
        adj[u].append(v)
        adj[v].append(u)
    seen = {root}
    frontier = [root]
    out = []
    while frontier:
        nxt = []
        for x in frontier:
            for y in adj[x]:
                if y not in seen:
                    seen.add(y)
                    nxt.append(y)
                    src, dst = (x, y) if kind == ALLGATHER else (y, x)
                    out.append(TreeEdge(src, dst, route(topo, src, dst)))
        frontier = nxt
    return Tree(root, share, tuple(out))


def double_binary_tree(topo: Topology, collective: str = ALLGATHER) -> Schedule:
    """The double-binary-tree schedule of ``collective`` on ``topo`` (both trees re-rooted at every root)."""
    if collective not in COLLECTIVES:
        raise ScheduleError(f"unknown collective {collective!r}; choose one of {', '.join(COLLECTIVES)}")
    start = time.perf_counter()
    kinds = [REDUCE_SCATTER, ALLGATHER] if collective == ALLREDUCE else [collective]
    if topo.num_ranks == 1:
        phases = [Phase(k, [Tree(topo.compute[0], Fraction(1), ())]) for k in kinds]
        info = {}
    else:
        order = tree_order(topo, kinds)
        trees = _rank_trees(order)
        phases = [Phase(k, merge_identical_trees(_oriented(topo, t, r, k, Fraction(1, 2))
                                                 for r in topo.compute for t in trees)) for k in kinds]
        info = {"order": list(order)}
    schedule = Schedule(collective, "tree", topo.name, list(topo.compute), phases, info=info)
    schedule.algbw = evaluate.algbw(schedule, topo)
    schedule.generation_seconds = time.perf_counter() - start
    return schedule
