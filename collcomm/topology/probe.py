"""Topology probing: measure a running job's fabric and infer a ``collcomm.topology/1`` model.

Inside a running job (after ``collcomm.init()``) every rank calls :func:`probe_topology`;
all of them get the same :class:`~collcomm.topology.model.Topology`. The member with
group rank 0 conducts: it decides every measurement *phase*, sends the phase to the
others, takes part itself and gathers the results; the others serve phases until it
sends the inferred fabric (JSON) to everyone. Only point-to-point messages
(``send``/``recv`` on tags of their own) are used, so probing needs no planner and can
run while the runtime starts (``COLLCOMM_TOPOLOGY=probe``).

What is measured (:func:`measure`):

* **latency** and **hops** of every pair: 8-byte ping-pongs (half the median round trip)
  and the IP hop count as tracepath finds it (:func:`hop_count`), the pairs of one round
  of a round-robin tournament (a perfect matching) at a time;
* **bandwidth** of every ordered pair alone: the sender streams equal chunks, the
  receiver times their arrival over the window [start + skip, start + ``seconds``] of
  the phase (skip = a quarter: a token bucket's burst, slow start, connection set-up),
  then tells the sender to stop. Bytes are interpolated between arrivals, so the rates of
  flows that share a phase add up to their aggregate over one common window. The sender
  keeps only about 25 ms of the acknowledged rate in flight, so socket buffers never
  hold seconds of data to drain after the stop. Disjoint pairs run concurrently, in the
  rounds of the tournament (2(n-1) phases). Pairs of one round may still share a link
  (multi-hop routes, an oversubscribed uplink, or on one machine the CPUs): up to three
  pairs are measured again alone, and if one is more than 1.3x faster alone every pair
  is measured alone (n(n-1) phases);
* **link sharing**: ranks are clustered (:func:`clusters_of`: bandwidth classes, merged
  along one-hop wires); then for each rank the aggregate egress when it sends to all its
  cluster peers at once and the ingress when they all send to it, the same towards all
  ranks outside its cluster, and per cluster the aggregate when all its members send out
  at once (one outside peer each) and receive at once (:func:`plan_aggregates`; tests on
  disjoint ranks share a phase).

:func:`infer_topology` turns :class:`Measurements` into a fabric (pure: no network):
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

:class:`SimulatedFabric` measures a known Topology instead of a network (single-path
widest-shortest routing, max-min fair sharing of concurrent flows, optional noise), so
the whole pipeline can be tested without processes: ``infer_topology(simulate(topo,
noise=0.1))``.

``python -m collcomm.topology.probe --out FILE`` (under ``collcomm run``) probes the job
and has rank 0 write the fabric; ``collcomm topology --probe -np N`` runs it.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterable, Protocol, Sequence

from collcomm.errors import CollectiveError, CollectiveTimeout, TopologyError
from collcomm.topology.model import COMPUTE, SWITCH, Link, Node, Topology

DEFAULT_SECONDS = 0.5          # measuring window of one transfer (the receiver's clock)
CLASS_RATIO = 1.5              # pair bandwidths within this ratio are one class (clustering)
SHARED_RATIO = 1.5             # aggregate / pairwise below this: one shared port
LATENCY_GAP = 1.3              # sorted latencies jumping by this much separate nearer peers
INTERFERENCE_RATIO = 1.3       # alone vs in a round: faster by this much means the round interfered
SYMMETRIC_RATIO = 1.15         # two directions within this ratio make one duplex link
VERIFY_PAIRS = 3

CHUNK_BYTES = 256 << 10        # chunks of the pairwise phases (later phases size them by rate)
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 16 << 10, 1 << 20
MIN_INFLIGHT_BYTES, MAX_INFLIGHT_BYTES = 256 << 10, 8 << 20   # in flight per flow
INFLIGHT_SECONDS = 0.025       # ... about this much of the flow's measured rate
MIN_WINDOW_CHUNKS = 3
SKIP_FRACTION = 0.25
PING_WARMUP, PING_COUNT = 3, 15
HOPS_MAX_TTL, HOPS_WAIT, HOPS_PORT = 8, 0.2, 33434

TAG_BASE = 0x7FFFFF00          # point-to-point tags of the probe (user tags stay below)
TAG_CTRL, TAG_DATA, TAG_ACK, TAG_PING = TAG_BASE, TAG_BASE + 1, TAG_BASE + 2, TAG_BASE + 3

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


# ---------------------------------------------------------------------------- planning
def round_robin(n: int) -> list[list[Pair]]:
    """A round-robin tournament: n-1 rounds (n rounds when n is odd) of disjoint pairs (a < b)
    covering every pair once (the circle method)."""
    if n < 2:
        return []
    players: list[int | None] = list(range(n)) + ([None] if n % 2 else [])
    m = len(players)
    rounds = []
    for _ in range(m - 1):
        rnd = []
        for i in range(m // 2):
            a, b = players[i], players[m - 1 - i]
            if a is not None and b is not None:
                rnd.append((min(a, b), max(a, b)))
        rounds.append(sorted(rnd))
        players = [players[0], players[-1]] + players[1:-1]
    return rounds


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


def plan_aggregates(n: int, clusters: Sequence[Sequence[int]]) -> list[Aggregate]:
    """The concurrent tests that tell shared ports from direct links (see the module doc)."""
    tests: list[Aggregate] = []
    for ci, members in enumerate(clusters):
        members = list(members)
        if len(members) >= 3:
            for r in members:
                peers = [p for p in members if p != r]
                tests.append(Aggregate("egress", "intra", r, tuple((r, p) for p in peers)))
                tests.append(Aggregate("ingress", "intra", r, tuple((p, r) for p in peers)))
    if len(clusters) > 1:
        for ci, members in enumerate(clusters):
            outside = [x for x in range(n) if x not in members]
            if len(outside) >= 2:
                for r in members:
                    tests.append(Aggregate("egress", "cross", r, tuple((r, x) for x in outside)))
                    tests.append(Aggregate("ingress", "cross", r, tuple((x, r) for x in outside)))
            if len(members) >= 2:
                tests.append(Aggregate("egress", "cluster", ci,
                                       tuple((m, outside[i % len(outside)]) for i, m in enumerate(members))))
                tests.append(Aggregate("ingress", "cluster", ci,
                                       tuple((outside[i % len(outside)], m) for i, m in enumerate(members))))
    return tests


def pack_phases(tests: Sequence[Aggregate]) -> list[list[Aggregate]]:
    """Tests on disjoint sets of ranks share a phase (greedy, in order)."""
    phases: list[tuple[set[int], list[Aggregate]]] = []
    for t in tests:
        ranks = t.ranks()
        for used, phase in phases:
            if not used & ranks:
                used |= ranks
                phase.append(t)
                break
        else:
            phases.append((set(ranks), [t]))
    return [p for _, p in phases]


def steady_rate(times: Sequence[float], chunk_bytes: int, start: float | None = None,
                end: float | None = None) -> float:
    """Bytes per second of a flow of equal chunks arriving at ``times``, over [start, end]: the
    bytes received by time t grow by a chunk at each arrival and linearly in between, so the
    rates of flows measured over one common window add up to the aggregate exactly. ``start``
    before the first arrival (or None) means the first arrival; ``end`` (None: the last arrival)
    is clamped to the arrivals."""
    n = len(times)
    if n < 2:
        return 0.0
    lo = times[0] if start is None else min(max(start, times[0]), times[-1])
    hi = times[-1] if end is None else min(max(end, times[0]), times[-1])
    if hi - lo < 1e-9:
        lo, hi = times[0], times[-1]
        if hi - lo < 1e-9:
            return 0.0

    def received(t: float) -> float:
        k = bisect.bisect_right(times, t) - 1  # the last arrival at or before t
        if k >= n - 1:
            return n * chunk_bytes
        frac = (t - times[k]) / max(times[k + 1] - times[k], 1e-12)
        return (k + 1 + frac) * chunk_bytes

    return (received(hi) - received(lo)) / (hi - lo)


def chunk_for(gbps: float, seconds: float, sharing: int = 1) -> int:
    """Chunk size (bytes, a power of two in [16 KiB, 1 MiB]) giving about 32 chunks per window to
    a flow that gets ``gbps``/``sharing``."""
    want = gbps * 1e9 / max(sharing, 1) * seconds / 32
    size = 1 << max(0, int(want).bit_length() - 1)
    return min(max(size, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)


# ---------------------------------------------------------------------------- the driver
class Backend(Protocol):
    """Runs one measurement phase on every rank at once."""

    def latency(self, pairs: Sequence[Pair]) -> dict[Pair, tuple[float, int | None]]:
        """For each pair (a < b), all pairs at once: half the median round trip (microseconds), and
        the number of IP hops from a to b (None: unknown)."""

    def transfer(self, flows: Sequence[Pair], seconds: float, chunks: dict[Pair, int] | None = None
                 ) -> dict[Pair, float]:
        """The steady rate (GB/s) of each flow (src, dst) while all of them run at once, over one
        common window of about ``seconds``; ``chunks``: message size per flow (a hint)."""


def measure(backend: Backend, n: int, seconds: float = DEFAULT_SECONDS, *, concurrent: bool = True,
            log: Callable[[str], None] | None = None) -> Measurements:
    """Run the probe's phases on ``backend`` for ``n`` ranks (see the module doc)."""
    say = log or (lambda _msg: None)
    start = time.monotonic()
    m = Measurements(n, window=seconds)
    rounds = round_robin(n)

    def transfer(flows, chunks=None) -> dict[Pair, float]:
        m.phases += 1
        return backend.transfer(list(flows), seconds, chunks)

    for rnd in rounds:
        for pair, (lat, hops) in backend.latency(rnd).items():
            m.latency_us[pair] = lat
            if hops is not None:
                m.hops[pair] = hops
    say(f"latency of {n * (n - 1) // 2} pairs measured ({time.monotonic() - start:.1f} s)")
    ordered = [[(a, b) for a, b in rnd] for rnd in rounds] + [[(b, a) for a, b in rnd] for rnd in rounds]
    for flows in ordered:
        if concurrent:
            m.bandwidth.update(transfer(flows))
        else:
            for f in flows:
                m.bandwidth.update(transfer([f]))
    if concurrent:
        _verify_rounds(m, ordered, transfer, say)
    say(f"bandwidth of {n * (n - 1)} ordered pairs measured ({time.monotonic() - start:.1f} s)")
    clusters = clusters_of(m)
    tests = plan_aggregates(n, clusters)
    for phase in pack_phases(tests):
        chunks = {f: chunk_for(m.bandwidth.get(f, 0.0), seconds, len(t.flows)) for t in phase for f in t.flows}
        rates = transfer([f for t in phase for f in t.flows], chunks)
        for t in phase:
            t.gbps = sum(rates[f] for f in t.flows)
    m.aggregates = tests
    m.seconds = time.monotonic() - start
    say(f"{len(tests)} aggregate tests in {len(clusters)} cluster(s) measured ({m.seconds:.1f} s, "
        f"{m.phases} transfer phases)")
    return m


def _verify_rounds(m: Measurements, ordered, transfer, say) -> None:
    """Measure a few pairs of crowded rounds again alone; if any is clearly faster alone, the
    rounds interfered (shared links, or shared CPUs): measure every pair alone."""
    crowded = [flows for flows in ordered if len(flows) > 1]
    if not crowded:
        return
    bw = m.bandwidth
    n = m.n
    row = [max((bw.get((a, b), 0.0) for b in range(n) if b != a), default=0.0) for a in range(n)]
    col = [max((bw.get((a, b), 0.0) for a in range(n) if a != b), default=0.0) for b in range(n)]
    in_crowd = {f for flows in crowded for f in flows}
    ratio = {f: bw[f] / max(row[f[0]], col[f[1]], 1e-12) for f in in_crowd}
    sample = sorted((f for f in in_crowd if ratio[f] < 0.85), key=lambda f: (ratio[f], f))[:VERIFY_PAIRS]
    for flows in crowded:  # and pairs of crowded rounds that look normal
        if len(sample) >= VERIFY_PAIRS:
            break
        if flows[0] not in sample:
            sample.append(flows[0])
    interfered = []
    for f in sample:
        alone = transfer([f])[f]
        if alone > INTERFERENCE_RATIO * bw[f]:
            interfered.append((f, bw[f], alone))
        bw[f] = alone
    if not interfered:
        return
    f, was, alone = interfered[0]
    m.notes.append(f"pairs measured in rounds interfered (rank {f[0]} -> {f[1]}: {was:.4g} GB/s in its round, "
                   f"{alone:.4g} GB/s alone); every pair was measured alone")
    say(m.notes[-1])
    done = set(sample)
    for flows in ordered:
        for f in flows:
            if f not in done:
                bw.update(transfer([f]))


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
    from collcomm.errors import TopologyError
    from collcomm.topology.symmetry import verify_automorphism

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


# ---------------------------------------------------------------------------- simulation
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


# ---------------------------------------------------------------------------- on the network
class _Network:
    """The probe's messages between the members of a group (point-to-point, probe tags)."""

    def __init__(self, rt, members: Sequence[int], timeout: float):
        import numpy as np

        from collcomm import runtime as r

        self.np, self.r = np, r
        self.rt = rt
        self.members = list(members)
        self.me = self.members.index(rt.rank)
        self.timeout = float(timeout)

    # ------------------------------------------------------------ messages
    def send(self, x, peer: int, tag: int) -> None:
        self.r.send(self.rt, x, self.members[peer], tag, self.timeout)

    def recv(self, x, peer: int, tag: int) -> None:
        self.r.recv(self.rt, x, self.members[peer], tag, self.timeout)

    def send_obj(self, obj, peer: int) -> None:
        np = self.np
        data = json.dumps(obj).encode()
        self.send(np.array([len(data)], dtype=np.int64), peer, TAG_CTRL)
        if data:
            self.send(np.frombuffer(bytearray(data), dtype=np.uint8), peer, TAG_CTRL)

    def recv_obj(self, peer: int):
        np = self.np
        size = np.zeros(1, dtype=np.int64)
        self.recv(size, peer, TAG_CTRL)
        buf = np.empty(int(size[0]), dtype=np.uint8)
        if buf.size:
            self.recv(buf, peer, TAG_CTRL)
        return json.loads(buf.tobytes().decode())

    # ------------------------------------------------------------ the conductor's side (Backend)
    def _phase(self, spec: dict) -> dict:
        for peer in range(1, len(self.members)):
            self.send_obj(spec, peer)
        results = dict(self.run(spec, time.perf_counter()))
        for peer in range(1, len(self.members)):
            results.update(self.recv_obj(peer))
        return results

    def latency(self, pairs):
        got = self._phase({"kind": "latency", "pairs": [list(p) for p in pairs]})
        return {tuple(map(int, k.split(","))): (v[0], v[1]) for k, v in got.items()}

    def transfer(self, flows, seconds, chunks=None):
        chunks = chunks or {}
        got = self._phase({"kind": "transfer", "seconds": seconds,
                           "flows": [[s, d, int(chunks.get((s, d), CHUNK_BYTES))] for s, d in flows]})
        return {tuple(map(int, k.split(","))): v for k, v in got.items()}

    def finish(self, message: dict) -> None:
        for peer in range(1, len(self.members)):
            self.send_obj(message, peer)

    # ------------------------------------------------------------ every member's side
    def serve(self) -> dict:
        """Run the conductor's phases until it sends the result (or an error)."""
        while True:
            spec = self.recv_obj(0)
            t_phase = time.perf_counter()
            if spec["kind"] == "done":
                return spec
            if spec["kind"] == "error":
                raise CollectiveError(f"topology probe failed on rank {self.members[0]}: {spec['message']}")
            self.send_obj(self.run(spec, t_phase), 0)

    def run(self, spec: dict, t_phase: float) -> dict[str, float]:
        """This member's part of one phase (which began at ``t_phase`` here); returns the values
        it measured, keyed "a,b"."""
        jobs: list[tuple[str, Callable[[], float | None]]] = []
        me = self.me
        if spec["kind"] == "latency":
            for a, b in spec["pairs"]:
                if a == me:
                    jobs.append((f"{a},{b}", lambda b=b: self._ping(b)))
                elif b == me:
                    jobs.append(("", lambda a=a: self._echo(a)))
        elif spec["kind"] == "transfer":
            seconds = float(spec["seconds"])
            for s, d, chunk in spec["flows"]:
                if s == me:
                    jobs.append(("", lambda d=d, c=chunk: self._send_flow(d, c)))
                elif d == me:
                    jobs.append((f"{s},{d}", lambda s=s, c=chunk: self._recv_flow(s, c, t_phase, seconds)))
        else:
            raise CollectiveError(f"topology probe: unknown phase {spec['kind']!r}")
        results: dict[str, float] = {}
        errors: list[BaseException] = []

        def work(key, fn):
            try:
                value = fn()
                if key:
                    results[key] = value
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        if len(jobs) == 1:
            work(*jobs[0])
        else:
            threads = [threading.Thread(target=work, args=job, daemon=True, name="collcomm-probe") for job in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return results

    def _ping(self, peer: int) -> float:
        np = self.np
        buf = np.zeros(1, dtype=np.int64)
        rtts = []
        for i in range(PING_WARMUP + PING_COUNT):
            t = time.perf_counter()
            buf[0] = i
            self.send(buf, peer, TAG_PING)
            self.recv(buf, peer, TAG_PING)
            rtts.append(time.perf_counter() - t)
        hops = None
        try:
            host = self.rt.transport._peers[self.members[peer]][0]
            hops = hop_count(host)
        except (KeyError, AttributeError, IndexError, OSError):
            pass
        return [statistics.median(rtts[PING_WARMUP:]) / 2 * 1e6, hops]

    def _echo(self, peer: int) -> None:
        buf = self.np.zeros(1, dtype=self.np.int64)
        for _ in range(PING_WARMUP + PING_COUNT):
            self.recv(buf, peer, TAG_PING)
            self.send(buf, peer, TAG_PING)

    def _send_flow(self, peer: int, chunk_bytes: int) -> None:
        """Stream chunks to ``peer`` until it says stop, keeping about INFLIGHT_SECONDS of the
        acknowledged rate in flight (so nothing much is left to drain after the stop); then one
        last chunk marked 1."""
        np = self.np
        chunk = np.zeros(max(chunk_bytes // 8, 1), dtype=np.int64)
        size = chunk.nbytes
        lowest = max(2, math.ceil(MIN_INFLIGHT_BYTES / size))
        highest = max(lowest, MAX_INFLIGHT_BYTES // size)
        cond = threading.Condition()
        state: dict = {"acked": 0, "stop": False, "limit": lowest, "error": None}

        def acks():
            ack = np.zeros(2, dtype=np.int64)
            mark_t, mark_n = None, 0
            try:
                while True:
                    self.recv(ack, peer, TAG_ACK)
                    now = time.perf_counter()
                    with cond:
                        state["acked"] = int(ack[0]) + 1
                        if mark_t is None:
                            mark_t, mark_n = now, state["acked"]
                        elif now - mark_t >= 0.02:
                            per_second = (state["acked"] - mark_n) / (now - mark_t)
                            state["limit"] = min(highest, max(lowest, math.ceil(per_second * INFLIGHT_SECONDS)))
                            mark_t, mark_n = now, state["acked"]
                        if ack[1]:
                            state["stop"] = True
                        cond.notify_all()
                    if ack[1]:
                        return
            except BaseException as e:  # noqa: BLE001 - reported by the sending thread
                with cond:
                    state["error"] = e
                    cond.notify_all()

        waiter = threading.Thread(target=acks, daemon=True, name="collcomm-probe-acks")
        waiter.start()
        deadline = time.monotonic() + self.timeout
        sent = 0
        while True:
            with cond:
                while not state["stop"] and state["error"] is None and sent - state["acked"] >= state["limit"]:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise CollectiveTimeout(f"topology probe: rank {self.members[peer]} stopped acknowledging")
                    cond.wait(min(left, 1.0))
                if state["error"] is not None:
                    raise state["error"]
                if state["stop"]:
                    break
            chunk[0] = 0
            self.send(chunk, peer, TAG_DATA)
            sent += 1
        chunk[0] = 1
        self.send(chunk, peer, TAG_DATA)
        waiter.join(self.timeout)

    def _recv_flow(self, peer: int, chunk_bytes: int, t_phase: float, seconds: float) -> float:
        """Receive a flow and time its chunks; the window is [t_phase + SKIP_FRACTION * seconds,
        t_phase + seconds] of this rank's clock (the same for every flow of the phase), stretched
        for a flow too slow to bring MIN_WINDOW_CHUNKS chunks into it. GB/s."""
        np = self.np
        buf = np.empty(max(chunk_bytes // 8, 1), dtype=np.int64)
        size = buf.nbytes
        ack = np.zeros(2, dtype=np.int64)
        start, end = t_phase + SKIP_FRACTION * seconds, t_phase + seconds
        times: list[float] = []
        window: tuple[list[float], float] | None = None
        while True:
            self.recv(buf, peer, TAG_DATA)
            now = time.perf_counter()
            if buf[0] == 1:
                break
            times.append(now)
            if window is not None:
                continue
            inside = len(times) - bisect.bisect_left(times, start)
            stop = now >= end and (inside >= MIN_WINDOW_CHUNKS or now >= t_phase + 4 * seconds)
            ack[0], ack[1] = len(times) - 1, int(stop)
            self.send(ack, peer, TAG_ACK)
            if stop:
                window = (times[:], end if inside >= MIN_WINDOW_CHUNKS else now)
        if window is None:  # pragma: no cover - the sender stops only when told
            window = (times, times[-1] if times else now)
        arrivals, until = window
        return steady_rate(arrivals, size, start, until) / 1e9


def hop_count(host: str, max_ttl: int = HOPS_MAX_TTL, wait: float = HOPS_WAIT) -> int | None:
    """IP hops to ``host`` as tracepath counts them, without privileges: UDP datagrams with TTL
    1, 2, ... to an unused port; routers answer "time exceeded" and the host "port
    unreachable", read from the socket's error queue (IP_RECVERR). None when unknown (IPv6, a
    silent host or firewall, ICMP rate limits)."""
    import socket
    import struct

    recverr = getattr(socket, "IP_RECVERR", 11)
    errqueue = getattr(socket, "MSG_ERRQUEUE", 0x2000)
    try:
        addr = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
    except (OSError, IndexError):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_IP, recverr, 1)
        s.setblocking(False)
        for ttl in range(1, max_ttl + 1):
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            try:
                s.sendto(b"collcomm-probe-hops", (addr, HOPS_PORT + ttl))
            except OSError:
                return None
            deadline = time.monotonic() + wait
            kind = None
            while kind is None:
                try:
                    _, anc, _, _ = s.recvmsg(256, 512, errqueue)
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return None
                    time.sleep(0.0005)
                    continue
                for level, typ, data in anc:
                    if level == socket.SOL_IP and typ == recverr and len(data) >= 8:
                        kind = struct.unpack_from("=IBBB", data)[2]  # sock_extended_err.ee_type
            if kind == 3:      # destination unreachable: the host itself answered
                return ttl
            if kind != 11:     # anything but "time exceeded" on the way
                return None
    return None


def probe_runtime(rt, members: Sequence[int] | None = None, *, seconds_per_pair: float | None = None,
                  timeout: float | None = None, concurrent: bool = True,
                  log: Callable[[str], None] | None = None) -> tuple[Topology, Measurements]:
    """Probe the fabric among ``members`` (world ranks; default: the world) of the Runtime ``rt``.
    Every member calls it; all get the same (Topology, Measurements)."""
    from collcomm.topology import jsonio

    members = list(range(rt.world_size)) if members is None else [int(x) for x in members]
    if rt.rank not in members:
        raise ValueError(f"rank {rt.rank} is not a member of {members}")
    seconds = DEFAULT_SECONDS if seconds_per_pair is None else float(seconds_per_pair)
    if not seconds > 0:
        raise ValueError(f"seconds_per_pair must be positive, got {seconds_per_pair!r}")
    net = _Network(rt, members, rt.timeout if timeout is None else timeout)
    if net.me == 0:
        try:
            m = measure(net, len(members), seconds, concurrent=concurrent, log=log)
            m.hostnames = [rt.hostnames[r] for r in members] if getattr(rt, "hostnames", None) else None
            text = jsonio.dumps(infer_topology(m))
        except BaseException as e:
            try:
                net.finish({"kind": "error", "message": f"{type(e).__name__}: {e}"})
            except BaseException:  # noqa: BLE001 - the others time out instead
                pass
            raise
        net.finish({"kind": "done", "topology": text, "measurements": m.to_json()})
        return jsonio.loads(text), m
    result = net.serve()
    return jsonio.loads(result["topology"]), Measurements.from_json(result["measurements"])


def probe_topology(*, group=None, seconds_per_pair: float | None = None, timeout: float | None = None) -> Topology:
    """Measure the fabric of the job (or of ``group``) and return it as a Topology.

    A collective: every member calls it after ``collcomm.init()``; all return the same fabric
    (ranks ``r0``.. in group order). ``seconds_per_pair`` is each transfer's measuring window
    (default 0.5 s; a probe runs about 4n such windows when pairs do not interfere)."""
    from collcomm import api

    rt = api.runtime()
    members = None if group is None else group.members
    topo, _ = probe_runtime(rt, members, seconds_per_pair=seconds_per_pair, timeout=timeout)
    return topo


def probe_at_init(rt) -> Topology:
    """``COLLCOMM_TOPOLOGY=probe``: the world's fabric, probed while the runtime starts
    (window from ``COLLCOMM_PROBE_SECONDS``)."""
    raw = os.environ.get("COLLCOMM_PROBE_SECONDS")
    seconds = float(raw) if raw else None
    topo, _ = probe_runtime(rt, seconds_per_pair=seconds)
    return topo


# ---------------------------------------------------------------------------- python -m
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m collcomm.topology.probe --out FILE``: run as every rank of a job."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m collcomm.topology.probe",
                                description="Probe the job's fabric; rank 0 writes collcomm.topology/1 JSON.")
    p.add_argument("--out", required=True, help="topology file (written by rank 0)")
    p.add_argument("--measurements", help="also write what was measured (JSON)")
    p.add_argument("--seconds", type=float, default=None, help="measuring window per transfer (s)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    import collcomm as cc

    os.environ.pop("COLLCOMM_TOPOLOGY", None)  # this job measures the fabric; no planner input wanted
    cc.init()
    try:
        rt = cc.api.runtime()
        log = None if args.quiet or rt.rank != 0 else (lambda msg: print(f"probe: {msg}", file=sys.stderr))
        topo, m = probe_runtime(rt, seconds_per_pair=args.seconds, log=log)
        if rt.rank == 0:
            from collcomm.topology import jsonio

            tmp = args.out + ".tmp"
            jsonio.save(topo, tmp)
            os.replace(tmp, args.out)
            if args.measurements:
                with open(args.measurements, "w") as f:
                    json.dump(m.to_json(), f, indent=1)
    finally:
        cc.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
