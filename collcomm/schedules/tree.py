"""Double binary tree baseline in the style of NCCL's tree algorithm: hierarchical where the
fabric has hosts, flat where it has none.

Two binary trees are laid over a sequence of positions 0..n-1:

- tree A: position p = b·(2k+1) (b its lowest set bit) has children p - b/2 and the
  largest p + b/2, p + b/4, ... that exists; position 0 has one child, the largest power
  of two below n. The interior nodes (degree > 1) are the even positions from 2 on; the
  odd positions and position 0 are leaves.
- tree B: tree A mirrored (p -> n-1-p) when n is even, shifted (p -> p+1 mod n) when n
  is odd. Either way the interior nodes of one tree are leaves of the other, so each
  position forwards (as an interior node) in at most one of them.

NCCL pipelines the data of one broadcast/reduce from a fixed root through both trees.
A ``collcomm.schedule/1`` tree, however, is rooted at the owner of the shard it
carries. So here **every root r uses every tree re-rooted at r**, each with its share:
the undirected tree oriented away from r (allgather: an out-tree) or toward r
(reduce-scatter: an in-tree). Allreduce is reduce-scatter, then allgather. This keeps
NCCL's link usage pattern (each rank sends and receives along at most three tree
edges per tree) in the common format.

*Hierarchical* (NCCL's tree; where the fabric has hosts, ``Node.host``): the positions
are the hosts, in the order of the best ring (:func:`ring.best_ring`). In each tree the
ranks of a host form a chain along the host's cycle (:func:`ring.host_cycle`), starting
at the host's representative, the head; the edge to the parent host leaves from the
head, the edges to the child hosts from the head or the chain's second rank, as in
NCCL's tree patterns (``PATTERNS``: *balanced*, NCCL's default: parent and first child
on the head, second child on the second rank; *split*: both children on the second rank;
*tree*: everything on the head). C channels (C = 1 .. min(largest host, MAX_CHANNELS))
each have their own pair of trees, every tree with share 1/(2C). Heads are chosen tree
after tree by a bounded search, the host trees walked from their roots: a route both
ways to the parent host's connecting rank first, then the head used least by earlier
trees, then the second rank used least (counting each rank's edges to other hosts),
then the head nearest the tree's share of the host's cycle, so the two trees of a
channel, and the channels, leave a host through different ranks (and NICs) where the
host has enough of them.

*Flat* (as before; the only construction where no host has two ranks): the positions
are the ranks, mapped by an order chosen like the ring's: rank order, host-grouped order
and the best ring order are priced with the exact model; if none of them has routes for
every tree edge, a bounded backtracking search looks for one that has; then a bounded
first-improvement search over swaps of two positions improves the best. Both trees carry
share 1/2.

Every candidate (the flat trees; the hierarchical ones for each C and pattern) is priced
with the exact model; the fastest wins, ties going to the hierarchical trees with the
fewest channels, then to the patterns in the order above. A tree edge is used in both
directions (there are roots on both of its sides), so it needs a switch-only route both
ways; where no candidate has one for every tree edge (one-way rings, sparse
direct-connect fabrics) the generator raises
:class:`~collcomm.errors.ScheduleError`.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from fractions import Fraction

from collcomm.errors import ScheduleError
from collcomm.schedules import evaluate
from collcomm.schedules.ir import (ALLGATHER, ALLREDUCE, COLLECTIVES, REDUCE_SCATTER, Phase, Schedule, Tree,
                                   TreeEdge, merge_identical_trees)
from collcomm.schedules.ring import best_ring, host_cycle, host_grouped_order, host_groups, pricer
from collcomm.schedules.routing import has_route, route
from collcomm.topology.model import Topology

MAX_SWAP_EVALUATIONS = 1500
MAX_SEARCH_STEPS = 20000
MAX_CHANNELS = 16
MAX_REPRESENTATIVE_STEPS = 5000  # per tree
MAX_HOSTS = 400  # beyond this the (recursive) search for hierarchical trees is not tried

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


def trees_time(topo: Topology, trees: list[list[tuple[str, str]]], kinds: list[str]) -> Fraction:
    """Model time of the phases ``kinds`` when every root uses each undirected tree of ``trees``
    re-rooted at itself, with share 1/len(trees) each."""
    nodes = tuple(topo.compute)
    total = Fraction(0)
    for kind in kinds:
        weighted = []
        for t in trees:
            for (u, v), k in _sides(t, nodes).items():
                # allgather: u -> v carries the shards of the roots on u's side; reduce-scatter: of v's side.
                weighted.append((u, v, k if kind == ALLGATHER else len(nodes) - k))
        total += pricer(topo).time(weighted, Fraction(1, len(trees)))
    return total


def _cost(topo: Topology, order: tuple[str, ...], kinds: list[str]) -> tuple[int, Fraction]:
    """(directed tree edges without a route, model time of the phases) of the flat trees over ``order``."""
    trees = _rank_trees(order)
    missing = sum(not has_route(topo, a, b) for t in trees for u, v in t for a, b in ((u, v), (v, u)))
    if missing:
        return missing, Fraction(0)
    return 0, trees_time(topo, trees, kinds)


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


def tree_order(topo: Topology, kinds: list[str], ring_order: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The order of ranks over the positions of the flat trees (see the module docstring);
    ``ring_order`` is the best ring's order where the caller has it (else it is computed)."""
    candidates = [tuple(topo.compute), host_grouped_order(topo)]
    if ring_order is None:
        try:
            ring_order = best_ring(topo).order
        except ScheduleError:
            pass
    if ring_order is not None:
        candidates.append(ring_order)
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


# ---------------------------------------------------------------------------- hierarchical trees
# Where a host's tree edges to other hosts attach to its chain (NCCL's tree patterns, graph.h):
# the edge to the parent host always at the chain's head; the edges to the first and second
# child host at these chain positions.
PATTERNS: dict[str, tuple[int, int]] = {
    "balanced": (1, 0),  # NCCL_TOPO_PATTERN_BALANCED_TREE (NCCL's default): parent + one child on the head
    "split": (1, 1),  # NCCL_TOPO_PATTERN_SPLIT_TREE: parent on the head, both children on the second rank
    "tree": (0, 0),  # NCCL_TOPO_PATTERN_TREE: all of the host's edges to other hosts on the head
}


def _chain(topo: Topology, cycle: tuple[str, ...], head: str) -> tuple[str, ...] | None:
    """The host's ranks from ``head`` along its cycle (forward, else backward) as a chain whose hops
    have routes both ways; None if neither way has."""
    k, i = len(cycle), cycle.index(head)
    for step in (1, -1):
        seq = tuple(cycle[(i + step * t) % k] for t in range(k))
        if all(has_route(topo, a, b) and has_route(topo, b, a) for a, b in zip(seq, seq[1:])):
            return seq
    return None


def _child_end(chain: tuple[str, ...], pattern: str, child: int) -> str:
    """The rank of ``chain`` that carries the edge to the host's ``child``-th child host."""
    return chain[min(PATTERNS[pattern][child], len(chain) - 1)]


def _host_chains(topo: Topology, cycles: list[tuple[str, ...]], host_edges: list[Edge],
                 chains: list[dict[str, tuple[str, ...] | None]], pattern: str, uses: Counter, slot: int,
                 slots: int, max_steps: int = MAX_REPRESENTATIVE_STEPS) -> list[tuple[str, ...]] | None:
    """One chain per host for the host tree ``host_edges`` (edges (parent, child), the root's first;
    see the module docstring); ``uses`` (updated here) counts the edges to other hosts each rank
    carries in earlier trees. None where the bounded search finds no chains with routes."""
    m = len(cycles)
    children: dict[int, list[int]] = defaultdict(list)
    parent: dict[int, int] = {}
    for p, q in host_edges:
        children[p].append(q)
        parent[q] = p
    walk = [host_edges[0][0]]
    for p in walk:
        walk += children[p]
    chosen: dict[int, tuple[str, ...]] = {}
    steps = 0

    def place(i: int) -> bool:
        nonlocal steps
        steps += 1
        if steps > max_steps:
            return False
        if i == m:
            return True
        p = walk[i]
        cycle = cycles[p]
        shift = slot * len(cycle) // slots
        up = None
        if p in parent:
            q = parent[p]
            up = _child_end(chosen[q], pattern, children[q].index(p))
        ranked = []
        for j, head in enumerate(cycle):
            chain = chains[p][head]
            if chain is None or (up is not None and not (has_route(topo, head, up) and has_route(topo, up, head))):
                continue
            ends = {_child_end(chain, pattern, c) for c in range(len(children[p]))} - {head}
            ranked.append((uses[head], sum(uses[r] for r in ends), (j - shift) % len(cycle), chain))
        for *_, chain in sorted(ranked):
            chosen[p] = chain
            if place(i + 1):
                return True
            del chosen[p]
        return False

    if not place(0):
        return None
    for p in range(m):
        if p in parent:
            uses[chosen[p][0]] += 1
        for c in range(len(children[p])):
            uses[_child_end(chosen[p], pattern, c)] += 1
    return [chosen[p] for p in range(m)]


def hierarchical_trees(topo: Topology, cycles: list[tuple[str, ...]], channels: int,
                       pattern: str = "balanced") -> tuple[list[list[tuple[str, str]]], list[list[str]]] | None:
    """The 2·``channels`` undirected trees of NCCL's hierarchical double binary tree over hosts whose
    ranks lie along ``cycles`` (hosts in position order), and each tree's representatives (the head
    of every host's chain, in position order); None where no chains are found. Trees 2c and 2c+1
    are channel c's trees A and B."""
    chains = [{r: _chain(topo, c, r) for r in c} for c in cycles]
    uses: Counter = Counter()
    trees, heads = [], []
    for slot in range(2 * channels):
        host_edges = double_binary_tree_positions(len(cycles))[slot % 2]
        got = _host_chains(topo, cycles, host_edges, chains, pattern, uses, slot, 2 * channels)
        if got is None:
            return None
        child_index: dict[int, int] = defaultdict(int)
        edges = []
        for p, q in host_edges:
            edges.append((_child_end(got[p], pattern, child_index[p]), got[q][0]))
            child_index[p] += 1
        trees.append(edges + [hop for chain in got for hop in zip(chain, chain[1:])])
        heads.append([chain[0] for chain in got])
    return trees, heads


def _candidates(topo: Topology, kinds: list[str]) -> list[tuple[Fraction, tuple, list[list[tuple[str, str]]], dict]]:
    """(model time, tie-break, undirected trees, info) of every construction that has routes."""
    try:
        ring_order = best_ring(topo).order
    except ScheduleError:
        ring_order = None
    found = []
    groups = host_groups(topo, ring_order or host_grouped_order(topo))
    largest = max(len(g) for g in groups)
    if 2 <= len(groups) <= MAX_HOSTS and largest >= 2:
        cycles = [host_cycle(topo, g) for g in groups]
        for channels in range(1, min(largest, MAX_CHANNELS) + 1):
            for rank, pattern in enumerate(PATTERNS):
                got = hierarchical_trees(topo, cycles, channels, pattern)
                if got is not None:
                    trees, heads = got
                    info = {"hierarchical": True, "pattern": pattern, "channels": channels,
                            "hosts": [list(c) for c in cycles], "representatives": heads}
                    found.append((trees_time(topo, trees, kinds), (0, channels, rank), trees, info))
    try:
        order = tree_order(topo, kinds, ring_order)
    except ScheduleError:
        if not found:
            raise
    else:
        found.append((_cost(topo, order, kinds)[1], (1,), _rank_trees(order),
                      {"hierarchical": False, "channels": 1, "order": list(order)}))
    return found


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
    """The double-binary-tree schedule of ``collective`` on ``topo`` (every tree re-rooted at every root)."""
    if collective not in COLLECTIVES:
        raise ScheduleError(f"unknown collective {collective!r}; choose one of {', '.join(COLLECTIVES)}")
    start = time.perf_counter()
    kinds = [REDUCE_SCATTER, ALLGATHER] if collective == ALLREDUCE else [collective]
    if topo.num_ranks == 1:
        phases = [Phase(k, [Tree(topo.compute[0], Fraction(1), ())]) for k in kinds]
        info = {}
    else:
        _, _, trees, info = min(_candidates(topo, kinds), key=lambda c: c[:2])
        share = Fraction(1, len(trees))
        phases = [Phase(k, merge_identical_trees(_oriented(topo, t, r, k, share)
                                                 for r in topo.compute for t in trees)) for k in kinds]
    schedule = Schedule(collective, "tree", topo.name, list(topo.compute), phases, info=info)
    schedule.algbw = evaluate.algbw(schedule, topo)
    schedule.generation_seconds = time.perf_counter() - start
    return schedule
