"""Routing for the baselines: the physical path of a logical edge between two ranks.

Classic algorithms (ring, tree, halving-doubling, Blink) are written over logical
edges "rank x sends to rank y"; a schedule also needs the physical path of each. A
logical edge is one transfer, so only switches may forward it: a path never passes
through another compute node (a rank that forwards data does so as a tree edge of
its own). Among those paths :func:`route` takes

1. the widest one: the largest bottleneck bandwidth over ``topo.capacity``;
2. among the widest, the one with the fewest hops;
3. among those, the smallest sequence of node ids (so the choice is deterministic).

Routes are computed lazily and cached per topology (baselines ask O(N^2) times).
:func:`time_per_shard` prices a multiset of weighted logical edges with the exact
model of :mod:`collcomm.schedules.evaluate`, which the baselines use to compare
rank orders without building whole schedules.
"""

from __future__ import annotations

import heapq
import weakref
from collections import defaultdict
from fractions import Fraction
from typing import Iterable

from collcomm.errors import ScheduleError
from collcomm.schedules import evaluate
from collcomm.schedules.ir import ALLGATHER, Phase, Tree, TreeEdge
from collcomm.topology.model import Topology


class Router:
    """Widest, then shortest, then lexicographically smallest switch-only paths on one topology."""

    def __init__(self, topo: Topology):
        # No reference to `topo` itself: the cache below is keyed weakly by the topology.
        self.name = topo.name
        self._ranks = frozenset(topo.compute)
        self._succ: dict[str, list[tuple[str, Fraction]]] = defaultdict(list)
        self._pred: dict[str, list[tuple[str, Fraction]]] = defaultdict(list)
        for (u, v), bw in sorted(topo.capacity.items()):
            self._succ[u].append((v, bw))
            self._pred[v].append((u, bw))
        self._widths: dict[str, dict[str, Fraction]] = {}
        self._paths: dict[tuple[str, str], tuple[str, ...] | None] = {}

    def _is_switch(self, nid: str) -> bool:
        return nid not in self._ranks

    def _check_ranks(self, src: str, dst: str) -> None:
        for end in (src, dst):
            if end not in self._ranks:
                raise ScheduleError(f"cannot route {src} -> {dst}: {end!r} is not a rank of {self.name!r}")
        if src == dst:
            raise ScheduleError(f"cannot route {src} -> {dst}: a logical edge joins two different ranks")

    def _widths_from(self, src: str) -> dict[str, Fraction]:
        """Widest switch-only bottleneck from ``src`` to every node (maximin Dijkstra)."""
        if src in self._widths:
            return self._widths[src]
        best: dict[str, Fraction] = {}
        heap: list[tuple[Fraction, str]] = []
        for v, bw in self._succ[src]:
            if v != src and bw > best.get(v, 0):
                best[v] = bw
                heapq.heappush(heap, (-bw, v))
        done: set[str] = set()
        while heap:
            neg, x = heapq.heappop(heap)
            if x in done:
                continue
            done.add(x)
            if not self._is_switch(x):
                continue  # a rank ends a logical edge; it never forwards one
            for y, bw in self._succ[x]:
                w = min(-neg, bw)
                if y != src and w > best.get(y, 0):
                    best[y] = w
                    heapq.heappush(heap, (-w, y))
        self._widths[src] = best
        return best

    def width(self, src: str, dst: str) -> Fraction | None:
        """Bottleneck bandwidth of the widest switch-only path, or None if there is none."""
        self._check_ranks(src, dst)
        return self._widths_from(src).get(dst)

    def has_route(self, src: str, dst: str) -> bool:
        return self.width(src, dst) is not None

    def path(self, src: str, dst: str) -> tuple[str, ...]:
        """The route of the logical edge ``src -> dst``; ScheduleError if no switch-only path exists."""
        key = (src, dst)
        if key not in self._paths:
            width = self.width(src, dst)
            self._paths[key] = None if width is None else self._shortest_smallest(src, dst, width)
        found = self._paths[key]
        if found is None:
            raise ScheduleError(f"no route {src} -> {dst} in {self.name!r} that passes through switches "
                                f"only; this algorithm needs that logical edge")
        return found

    def _shortest_smallest(self, src: str, dst: str, width: Fraction) -> tuple[str, ...]:
        """Fewest hops, then smallest node-id sequence, over links at least ``width`` wide."""
        hops = {dst: 0}  # hops to dst through switches only, on links at least `width` wide
        frontier = [dst]
        while frontier:
            nxt = []
            for x in frontier:
                for u, bw in self._pred[x]:
                    if bw >= width and u not in hops:
                        hops[u] = hops[x] + 1
                        if self._is_switch(u):
                            nxt.append(u)
            frontier = nxt
        path = [src]
        while path[-1] != dst:
            here = path[-1]
            step = min(v for v, bw in self._succ[here]
                       if bw >= width and hops.get(v) == hops[here] - 1 and (v == dst or self._is_switch(v)))
            path.append(step)
        return tuple(path)


# Cache keyed by identity (comparing topologies for equality costs more than a lookup should);
# an entry goes away with its topology.
_ROUTERS: dict[int, tuple[weakref.ref, Router]] = {}


def router(topo: Topology) -> Router:
    """The (cached) router of ``topo``."""
    entry = _ROUTERS.get(id(topo))
    if entry is not None and entry[0]() is topo:
        return entry[1]
    key = id(topo)

    def forget(ref, key=key):
        if _ROUTERS.get(key, (None,))[0] is ref:
            del _ROUTERS[key]

    found = Router(topo)
    _ROUTERS[key] = (weakref.ref(topo, forget), found)
    return found


def route(topo: Topology, src: str, dst: str) -> tuple[str, ...]:
    """The physical path of the logical edge ``src -> dst``: widest, then fewest hops, then
    lexicographically smallest; only switches in between. Raises ScheduleError if none exists."""
    return router(topo).path(src, dst)


def has_route(topo: Topology, src: str, dst: str) -> bool:
    """Whether ``src -> dst`` has a switch-only path."""
    return router(topo).has_route(src, dst)


def width(topo: Topology, src: str, dst: str) -> Fraction | None:
    """Bottleneck bandwidth of the route ``src -> dst`` (None if there is none)."""
    return router(topo).width(src, dst)


def time_per_shard(topo: Topology, weighted_edges: Iterable[tuple[str, str, Fraction]]) -> Fraction:
    """Model time (seconds per GB of shard) of logical edges ``(src, dst, weight)`` on their routes.

    The load a schedule puts on a link only depends on which logical edges cross it and with
    what total share, so a phase can be priced from its edges alone: one single-edge tree per
    weighted edge, handed to :func:`evaluate.phase_time_per_shard`.
    """
    trees = [Tree(src, Fraction(w), (TreeEdge(src, dst, route(topo, src, dst)),))
             for src, dst, w in weighted_edges]
    return evaluate.phase_time_per_shard(Phase(ALLGATHER, trees), topo)
