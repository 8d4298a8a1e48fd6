"""Topology inference: what a probe measured, turned into a ``collcomm.topology/1`` fabric (pure).

:class:`Measurements` holds a probe's numbers (latency and IP hops of every pair, bandwidth of
every ordered pair alone, aggregate tests), in group ranks 0..n-1; :mod:`collcomm.probing`
measures them in a running job (or on a simulated fabric). Ranks are clustered
(:func:`clusters_of`: bandwidth classes, merged along one-hop wires).

:func:`infer_topology` turns :class:`Measurements` into a fabric, with no network:
inside a cluster a rank whose aggregate is about its pairwise rate shares one port (a
switch ``cI.switch`` with one link per rank at its measured egress/ingress); a rank
whose aggregate is the sum of several pairwise rates has direct links: to its one-hop
peers where hop counts are informative, else to every peer or, when latencies show
nearer peers, to as many of the nearest as the aggregate says (a ring, a torus).
Between clusters the same decision gives a ``network`` switch with one link per rank at
its cross-cluster egress/ingress, or direct links; when a cluster's members together
get no more out than about one of them alone, they share an uplink (``cI.uplink``).
Bandwidths are GB/s rounded to 3 significant digits (exact decimal fractions in the
file); latencies (microseconds) go into the links' ``latency_us``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterable, Sequence

from collcomm.errors import TopologyError
from collcomm.topology.model import COMPUTE, SWITCH, Link, Node, Topology
from collcomm.topology.symmetry import verify_automorphism

DEFAULT_SECONDS = 0.5          # measuring window of one transfer (the receiver's clock)
CLASS_RATIO = 1.5              # pair bandwidths within this ratio are one class (clustering)
SHARED_RATIO = 1.5             # aggregate / pairwise below this: one shared port
LATENCY_GAP = 1.3              # sorted latencies jumping by this much separate nearer peers
SYMMETRIC_RATIO = 1.15         # two directions within this ratio make one duplex link

Pair = tuple[int, int]


# ---------------------------------------------------------------------------- measurements
@dataclass
class Aggregate:
    """One concurrent test: ``flows`` (src, dst) at once; ``gbps`` is their summed rate.

    kind ``egress``/``ingress``; scope ``intra`` (a rank and its cluster peers), ``cross``
    (a rank and every rank outside its cluster) or ``cluster`` (all members of cluster
    ``owner`` at once, one outside peer each). ``owner`` is a rank, or a cluster index."""

    kind: str
    scope: str
    owner: int
    flows: tuple[Pair, ...]
    gbps: float = 0.0

    def ranks(self) -> set[int]:
        return {r for f in self.flows for r in f}


@dataclass
class Measurements:
    """What a probe measured, in group ranks 0..n-1: the input of :func:`infer_topology`."""

    n: int
    latency_us: dict[Pair, float] = field(default_factory=dict)   # unordered pairs, key (a, b) with a < b
    hops: dict[Pair, int] = field(default_factory=dict)           # IP hops (TTL), unordered pairs, where known
    bandwidth: dict[Pair, float] = field(default_factory=dict)    # ordered pairs alone, GB/s
    aggregates: list[Aggregate] = field(default_factory=list)
    phases: int = 0                  # measurement phases run (each about one window long)
    seconds: float = 0.0             # wall time of the measuring
    window: float = DEFAULT_SECONDS
    notes: list[str] = field(default_factory=list)
    hostnames: list[str] | None = None

    def latency(self, a: int, b: int) -> float | None:
        return self.latency_us.get((min(a, b), max(a, b)))

    def hop_count(self, a: int, b: int) -> int | None:
        return self.hops.get((min(a, b), max(a, b)))

    def to_json(self) -> dict:
        return {"format": "collcomm.probe/1", "n": self.n,
                "latency_us": [[a, b, v] for (a, b), v in sorted(self.latency_us.items())],
                "hops": [[a, b, v] for (a, b), v in sorted(self.hops.items())],
                "bandwidth_gbps": [[a, b, v] for (a, b), v in sorted(self.bandwidth.items())],
                "aggregates": [{"kind": g.kind, "scope": g.scope, "owner": g.owner,
                                "flows": [list(f) for f in g.flows], "gbps": g.gbps} for g in self.aggregates],
                "phases": self.phases, "seconds": self.seconds, "window": self.window, "notes": list(self.notes),
                "hostnames": self.hostnames}

    @classmethod
    def from_json(cls, data: dict) -> "Measurements":
        return cls(n=int(data["n"]),
                   latency_us={(int(a), int(b)): float(v) for a, b, v in data.get("latency_us", [])},
                   hops={(int(a), int(b)): int(v) for a, b, v in data.get("hops", [])},
                   bandwidth={(int(a), int(b)): float(v) for a, b, v in data.get("bandwidth_gbps", [])},
                   aggregates=[Aggregate(g["kind"], g["scope"], int(g["owner"]),
                                         tuple((int(s), int(d)) for s, d in g["flows"]), float(g["gbps"]))
                               for g in data.get("aggregates", [])],
                   phases=int(data.get("phases", 0)), seconds=float(data.get("seconds", 0.0)),
                   window=float(data.get("window", DEFAULT_SECONDS)), notes=list(data.get("notes", [])),
                   hostnames=data.get("hostnames"))


# ---------------------------------------------------------------------------- clusters
def _pair_rate(bw: dict[Pair, float], a: int, b: int) -> float:
    vals = [bw[p] for p in ((a, b), (b, a)) if p in bw]
    return sum(vals) / len(vals) if vals else 0.0


def cluster_ranks(n: int, bandwidth: dict[Pair, float], ratio: float = CLASS_RATIO) -> list[list[int]]:
    """Ranks grouped by pairwise bandwidth class (single linkage): a and b are linked when their
    bandwidth (mean of both directions) is within ``ratio`` of the smaller of the two ranks' best
    pair; clusters are the connected components, each sorted, in order of their first rank."""
    w = {(a, b): _pair_rate(bandwidth, a, b) for a in range(n) for b in range(n) if a != b}
    best = [max((w[(a, b)] for b in range(n) if b != a), default=0.0) for a in range(n)]
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a in range(n):
        for b in range(a + 1, n):
            if w[(a, b)] > 0 and w[(a, b)] * ratio >= min(best[a], best[b]):
                parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for r in range(n):
        groups.setdefault(find(r), []).append(r)
    return sorted(groups.values(), key=lambda g: g[0])


def informative_hops(m: "Measurements") -> bool:
    """Hop counts known for every pair and not all equal (on one flat L2 network or one machine
    every pair is one hop away, which says nothing)."""
    pairs = [(a, b) for a in range(m.n) for b in range(a + 1, m.n)]
    hops = [m.hops.get(p) for p in pairs]
    return bool(pairs) and all(h is not None for h in hops) and len(set(hops)) > 1


def clusters_of(m: "Measurements") -> list[list[int]]:
    """The clusters a probe plans and infers with: bandwidth classes (:func:`cluster_ranks`), merged
    where informative hop counts show a direct wire (one hop) between two of them."""
    clusters = cluster_ranks(m.n, m.bandwidth)
    if not informative_hops(m):
        return clusters
    label = {r: i for i, c in enumerate(clusters) for r in c}
    parent = list(range(len(clusters)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for (a, b), h in m.hops.items():
        if h == 1:
            parent[find(label[a])] = find(label[b])
    merged: dict[int, list[int]] = {}
    for i, c in enumerate(clusters):
        merged.setdefault(find(i), []).extend(c)
    return sorted((sorted(c) for c in merged.values()), key=lambda c: c[0])


# ---------------------------------------------------------------------------- inference
def _q(x: float) -> Fraction:
    """A bandwidth rounded to 3 significant digits, exact."""
    return Fraction(f"{max(float(x), 1e-9):.3g}")


def _lat(x: float | None) -> float:
    return float(f"{max(x, 0.0):.3g}") if x is not None and math.isfinite(x) else 1.0


def _median(values: Iterable[float], default: float | None = None) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else default


def _pair_links(links: list[Link], u: str, v: str, up: float, down: float, latency_us: float) -> None:
    """Links u -> v at ``up`` and v -> u at ``down``: one duplex link when they agree."""
    if max(up, down) <= SYMMETRIC_RATIO * min(up, down):
        links.append(Link(u, v, _q((up + down) / 2), _lat(latency_us)))
    else:
        links.append(Link(u, v, _q(up), _lat(latency_us), duplex=False))
        links.append(Link(v, u, _q(down), _lat(latency_us), duplex=False))


def _neighbour_count(hops: list[int | None], latencies: list[float | None], rho: float) -> int:
    """How many of the sorted peers a rank with aggregate/pairwise ratio ``rho`` has direct links
    to: of the cuts where the hop count grows (or, with hops unknown, where the latency jumps by
    LATENCY_GAP), or all peers, the one closest to ``rho``."""
    m = len(latencies)
    cuts = [m]
    if all(h is not None for h in hops):
        cuts += [j for j in range(1, m) if hops[j] > hops[j - 1]]
    elif all(x is not None and x > 0 for x in latencies):
        cuts += [j for j in range(1, m) if latencies[j] >= LATENCY_GAP * latencies[j - 1]]
    return min(cuts, key=lambda j: (abs(math.log(j / max(rho, 1e-9))), j))


def _direct_edges(m: Measurements, ranks: list[int], peers_of: Callable[[int], list[int]],
                  rho: dict[int, float]) -> set[tuple[int, int]]:
    """Unordered direct links: each rank to its nearest peers, as many as its aggregate shows
    (both ends' choices count); every peer when that would leave the ranks unconnected."""
    edges: set[tuple[int, int]] = set()
    for r in ranks:
        def key(x, r=r):
            hops, lat = m.hop_count(r, x), m.latency(r, x)
            return (hops if hops is not None else 0, lat if lat is not None else 0.0, x)

        peers = sorted(peers_of(r), key=key)
        k = _neighbour_count([m.hop_count(r, x) for x in peers], [m.latency(r, x) for x in peers], rho[r])
        edges |= {(min(r, x), max(r, x)) for x in peers[:k]}
    return edges


def _hop_wires(m: Measurements, ranks: list[int], peers_of: Callable[[int], list[int]],
               up: dict[int, tuple[float | None, float]], down: dict[int, tuple[float | None, float]]
               ) -> set[tuple[int, int]] | None:
    """With informative hop counts: direct links from each rank to its one-hop peers, when what
    the rank gets out (in) at once to all the peers is about the sum of those wires' pairwise
    rates; None (a shared port) when no peer is one hop away or the aggregates disagree."""
    edges: set[tuple[int, int]] = set()
    ratios = []
    for r in ranks:
        wires = [x for x in peers_of(r) if m.hop_count(r, x) == 1]
        edges |= {(min(r, x), max(r, x)) for x in wires}
        for (agg, _), total in ((up[r], sum(m.bandwidth.get((r, x), 0.0) for x in wires)),
                                (down[r], sum(m.bandwidth.get((x, r), 0.0) for x in wires))):
            if agg is None:
                ratios.append(1.0 if wires else 0.0)  # nothing to compare with (one peer): trust the hops
            else:
                ratios.append(agg / total if total > 0 else 0.0)
    if not edges or not 1 / SHARED_RATIO <= _median(ratios) <= SHARED_RATIO:
        return None
    return edges


def _wires(m: Measurements, ranks: list[int], peers_of: Callable[[int], list[int]], rho: dict[int, float],
           need_all: bool) -> set[tuple[int, int]] | None:
    """Direct links the measurements support, or None (then a shared port models the ranks): the
    chosen neighbours must be one IP hop away where hop counts are known; without them, the
    choice must reach every peer when ``need_all`` and connect the ranks."""
    edges = _direct_edges(m, ranks, peers_of, rho)
    hops = [m.hop_count(a, b) for a, b in edges]
    if all(h is not None for h in hops):
        if not all(h == 1 for h in hops):
            return None
        return edges if need_all or _connected(ranks, edges) else None
    every = {(min(r, x), max(r, x)) for r in ranks for x in peers_of(r)}
    if need_all and edges != every:
        return None
    return edges if _connected(ranks, edges) else None


def _connected(nodes: Iterable[int], edges: set[tuple[int, int]]) -> bool:
    nodes = list(nodes)
    if not nodes:
        return True
    adj: dict[int, set[int]] = {v: set() for v in nodes}
    for a, b in edges:
        if a in adj and b in adj:
            adj[a].add(b)
            adj[b].add(a)
    seen, stack = {nodes[0]}, [nodes[0]]
    while stack:
        for w in adj[stack.pop()]:
            if w not in seen:
                seen.add(w)
                stack.append(w)
    return len(seen) == len(nodes)


def infer_topology(m: Measurements, *, name: str | None = None) -> Topology:
    """The fabric that explains ``m`` (pure; see the module doc for the rules)."""
    n = m.n
    name = name or f"probed{n}"
    ids = [f"r{i}" for i in range(n)]
    if n == 1:
        return Topology(name, [Node(ids[0])], [])
    bw = m.bandwidth
    clusters = clusters_of(m)
    hops_known = informative_hops(m)
    cluster_of = {r: ci for ci, c in enumerate(clusters) for r in c}
    agg = {(a.kind, a.scope, a.owner): a for a in m.aggregates}

    def rate(kind: str, scope: str, owner: int) -> float | None:
        a = agg.get((kind, scope, owner))
        return a.gbps if a is not None and a.gbps > 0 else None

    def out_median(r: int, peers: list[int]) -> float:
        return _median((bw.get((r, x)) for x in peers), 0.0) or 1e-9

    def in_median(r: int, peers: list[int]) -> float:
        return _median((bw.get((x, r)) for x in peers), 0.0) or 1e-9

    def lat_median(r: int, peers: list[int]) -> float | None:
        return _median(m.latency(r, x) for x in peers)

    nodes = [Node(ids[r], COMPUTE, f"c{cluster_of[r]}") for r in range(n)]
    switches: list[Node] = []
    links: list[Link] = []

    def direct(edges: set[tuple[int, int]]) -> None:
        for a, b in sorted(edges):
            up = bw.get((a, b)) or bw.get((b, a)) or 1e-9
            down = bw.get((b, a)) or up
            _pair_links(links, ids[a], ids[b], up, down, m.latency(a, b))

    # ------------------------------------------------------------ inside each cluster
    for ci, members in enumerate(clusters):
        if len(members) == 1:
            continue
        if len(members) == 2:
            direct({(members[0], members[1])})
            continue
        peers_of = lambda r, members=members: [x for x in members if x != r]  # noqa: E731
        up = {r: (rate("egress", "intra", r), out_median(r, peers_of(r))) for r in members}
        down = {r: (rate("ingress", "intra", r), in_median(r, peers_of(r))) for r in members}
        rho = {r: _median([up[r][0] / up[r][1] if up[r][0] else None,
                           down[r][0] / down[r][1] if down[r][0] else None], 1.0) for r in members}
        if hops_known:
            edges = _hop_wires(m, members, peers_of, up, down)
        else:
            edges = _wires(m, members, peers_of, rho, need_all=False) if _median(rho.values()) >= SHARED_RATIO \
                else None
        if edges is None:
            sw = f"c{ci}.switch"
            switches.append(Node(sw, SWITCH, f"c{ci}"))
            for r in members:
                lat = lat_median(r, peers_of(r))
                _pair_links(links, ids[r], sw, max(up[r][0] or 0, up[r][1]), max(down[r][0] or 0, down[r][1]),
                            None if lat is None else lat / 2)
        else:
            direct(edges)

    # ------------------------------------------------------------ between clusters
    if len(clusters) > 1:
        network_used = False
        for ci, members in enumerate(clusters):
            outside = [x for x in range(n) if cluster_of[x] != ci]
            up = {r: (rate("egress", "cross", r), out_median(r, outside)) for r in members}
            down = {r: (rate("ingress", "cross", r), in_median(r, outside)) for r in members}
            rho = {r: _median([up[r][0] / up[r][1] if up[r][0] else None,
                               down[r][0] / down[r][1] if down[r][0] else None], 1.0) for r in members}
            if hops_known:
                edges = _hop_wires(m, members, lambda r, outside=outside: outside, up, down)
            else:
                edges = _wires(m, members, lambda r, outside=outside: outside, rho, need_all=True) \
                    if _median(rho.values()) >= SHARED_RATIO else None
            if edges is not None:
                direct(edges)
                continue
            network_used = True
            cap_up = {r: max(up[r][0] or 0, up[r][1]) for r in members}
            cap_down = {r: max(down[r][0] or 0, down[r][1]) for r in members}
            uplink_up, uplink_down = _shared_uplink(m, ci, members, clusters, cap_up, cap_down, agg, bw)
            if uplink_up is None and uplink_down is None:
                for r in members:
                    lat = lat_median(r, outside)
                    _pair_links(links, ids[r], "network", cap_up[r], cap_down[r], None if lat is None else lat / 2)
            else:
                hub = f"c{ci}.uplink"
                switches.append(Node(hub, SWITCH, f"c{ci}"))
                for r in members:
                    lat = lat_median(r, outside)
                    _pair_links(links, ids[r], hub, cap_up[r], cap_down[r], None if lat is None else lat / 2)
                _pair_links(links, hub, "network", uplink_up or sum(cap_up.values()),
                            uplink_down or sum(cap_down.values()), 0.0)
        if network_used:
            switches.append(Node("network", SWITCH))
    topo = Topology(name, nodes + switches, snap_bandwidth_classes(links))
    return _with_rotation_symmetry(topo, clusters, ids)


def _with_rotation_symmetry(topo: Topology, clusters: list[list[int]], ids: list[str]) -> Topology:
    """Attach the rotation of every cluster's ranks as an automorphism hint when it is one.

    The schedule generator exploits symmetry it is told about (and verifies every hint): on the
    emulated two-box fabric the plan built without this hint had trees one level deeper and
    ran ~20% slower than the plan of the true file, which lists the same rotation."""
    rotation = {ids[c[i]]: ids[c[(i + 1) % len(c)]] for c in clusters if len(c) > 1 for i in range(len(c))}
    if not rotation:
        return topo
    try:
        verify_automorphism(topo, rotation)
    except TopologyError:
        return topo  # the measured fabric is not that regular: no hint
    return Topology(topo.name, topo.nodes, topo.links, [rotation])


SNAP_RATIO = 1.10  # measured rates within 10% of a class's slowest member are one class


def snap_bandwidth_classes(links: list[Link], ratio: float = SNAP_RATIO) -> list[Link]:
    """Give the links of one bandwidth class the class's median rate.

    Measured rates of identical links differ by a few percent; taken as they are they break the
    fabric's symmetry, and ForestColl then packs many more trees (76 instead of 16 on the
    emulated two-box fabric) with small shares, which pipeline worse: the plan on the raw
    probe ran 16% slower than the plan on the true file. Snapping keeps the structure."""
    values = sorted({float(l.bandwidth) for l in links})
    classes: list[list[float]] = []
    for v in values:
        if classes and v <= classes[-1][0] * ratio:
            classes[-1].append(v)
        else:
            classes.append([v])
    snapped = {v: _q(statistics.median(c)) for c in classes for v in c}
    return [Link(l.src, l.dst, snapped[float(l.bandwidth)], l.latency_us, l.duplex) for l in links]


def _shared_uplink(m: Measurements, ci: int, members: list[int], clusters, cap_up: dict[int, float],
                   cap_down: dict[int, float], agg: dict, bw: dict) -> tuple[float | None, float | None]:
    """The capacity of cluster ``ci``'s shared uplink in each direction (None: not shared): the
    members sending out together get less than 1/SHARED_RATIO of what their own ports (and the
    receivers' ports) would allow."""
    n = m.n
    cluster_of = {r: k for k, c in enumerate(clusters) for r in c}
    out_up: dict[int, float] = {}
    out_down: dict[int, float] = {}
    for x in range(n):  # the outside ranks' own cross-cluster ports
        if cluster_of[x] == ci:
            continue
        others = [y for y in range(n) if cluster_of[y] != cluster_of[x]]
        eg, ig = agg.get(("egress", "cross", x)), agg.get(("ingress", "cross", x))
        out_up[x] = max(eg.gbps if eg else 0.0, _median((bw.get((x, y)) for y in others), 0.0))
        out_down[x] = max(ig.gbps if ig else 0.0, _median((bw.get((y, x)) for y in others), 0.0))
    result: list[float | None] = []
    for kind in ("egress", "ingress"):
        test = agg.get((kind, "cluster", ci))
        if test is None or test.gbps <= 0 or len(members) < 2:
            result.append(None)
            continue
        caps: dict[tuple[str, int], float] = {}
        paths = []
        for s, d in test.flows:
            caps[("up", s)] = cap_up.get(s, out_up.get(s, 0.0)) or 1e-9
            caps[("down", d)] = cap_down.get(d, out_down.get(d, 0.0)) or 1e-9
            paths.append([("up", s), ("down", d)])
        expected = sum(max_min_rates(paths, caps))
        result.append(test.gbps if test.gbps * SHARED_RATIO < expected else None)
    return result[0], result[1]


def max_min_rates(paths: Sequence[Sequence], capacity: dict) -> list[float]:
    """Max-min fair rates of flows along ``paths`` (lists of edge keys) over edge ``capacity``."""
    rates: list[float | None] = [None] * len(paths)
    left = {e: float(c) for e, c in capacity.items()}
    active = set(range(len(paths)))
    for i in list(active):
        if not paths[i]:
            rates[i] = math.inf
            active.discard(i)
    while active:
        count: dict = {}
        for i in active:
            for e in paths[i]:
                count[e] = count.get(e, 0) + 1
        e_min = min(count, key=lambda e: (left[e] / count[e], str(e)))
        share = max(left[e_min], 0.0) / count[e_min]
        for i in [i for i in active if e_min in paths[i]]:
            rates[i] = share
            active.discard(i)
            for e in paths[i]:
                left[e] -= share
    return [float(r) for r in rates]
