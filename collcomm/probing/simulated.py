"""A simulated fabric: what probing a known Topology would measure, with no process or network.

:class:`SimulatedFabric` is a :class:`~collcomm.probing.procedure.Backend` over a Topology
(single-path widest-shortest routing, max-min fair sharing of concurrent flows,
:func:`~collcomm.topology.inference.max_min_rates`, optional noise), so the whole pipeline can
be tested without processes: ``infer_topology(simulate(topo, noise=0.1))``.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from collcomm.errors import TopologyError
from collcomm.probing.procedure import measure
from collcomm.topology.inference import Measurements, Pair, max_min_rates
from collcomm.topology.model import Topology


class SimulatedFabric:
    """A :class:`Backend` over a known Topology: flows follow one widest-shortest path each and
    share links max-min fairly; every measured value is multiplied by a uniform factor in
    [1 - noise, 1 + noise]. Latency is the sum of the links' ``latency_us`` along the path; the
    hop count is the path's length (``hops=False``: unknown, as where ICMP is filtered)."""

    def __init__(self, topo: Topology, noise: float = 0.0, seed: int | None = 0, *, hops: bool = True):
        self.topo = topo
        self.hops = hops
        self.noise = float(noise)
        self.rng = random.Random(seed)
        self._routes: dict[Pair, list[tuple[str, str]]] = {}

    def _jitter(self) -> float:
        return 1.0 + self.rng.uniform(-self.noise, self.noise) if self.noise else 1.0

    def route(self, a: int, b: int) -> list[tuple[str, str]]:
        """The directed edges from rank a to rank b: fewest hops, then widest, then lowest ids."""
        key = (a, b)
        if key not in self._routes:
            topo = self.topo
            src, dst = topo.compute[a], topo.compute[b]
            succ: dict[str, list[str]] = {}
            for (u, v) in topo.capacity:
                succ.setdefault(u, []).append(v)
            dist = {src: 0}
            frontier = [src]
            while frontier and dst not in dist:
                nxt = []
                for u in frontier:
                    for v in succ.get(u, ()):
                        if v not in dist:
                            dist[v] = dist[u] + 1
                            nxt.append(v)
                frontier = nxt
            if dst not in dist:
                raise TopologyError(f"rank {a} cannot reach rank {b}")
            # widest among the shortest: by layers from the source
            width = {src: math.inf}
            pred: dict[str, str] = {}
            for layer in range(1, dist[dst] + 1):
                for v in sorted((x for x, d in dist.items() if d == layer), key=topo.index.__getitem__):
                    cands = [(min(width[u], float(topo.capacity[(u, v)])), -topo.index[u], u)
                             for u in dist if dist[u] == layer - 1 and (u, v) in topo.capacity]
                    w, _, u = max(cands)
                    width[v], pred[v] = w, u
            path, v = [], dst
            while v != src:
                path.append((pred[v], v))
                v = pred[v]
            self._routes[key] = path[::-1]
        return self._routes[key]

    def latency(self, pairs: Sequence[Pair]) -> dict[Pair, tuple[float, int | None]]:
        lat = self.topo.latency_us
        return {(a, b): (sum(lat[e] for e in self.route(a, b)) * self._jitter(),
                         len(self.route(a, b)) if self.hops else None) for a, b in pairs}

    def transfer(self, flows: Sequence[Pair], seconds: float, chunks=None) -> dict[Pair, float]:
        rates = max_min_rates([self.route(s, d) for s, d in flows], self.topo.capacity)
        return {f: r * self._jitter() for f, r in zip(flows, rates)}


def simulate(topo: Topology, noise: float = 0.0, seed: int | None = 0, *, concurrent: bool = True,
             hops: bool = True) -> Measurements:
    """What probing ``topo`` would measure (see :class:`SimulatedFabric`)."""
    return measure(SimulatedFabric(topo, noise, seed, hops=hops), topo.num_ranks, concurrent=concurrent)
