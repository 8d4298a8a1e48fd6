"""The probe's measuring procedure: which phases run, on any backend that can run them.

The member with group rank 0 conducts (:func:`measure`): it decides every measurement
*phase*; a :class:`Backend` runs the phase on every rank at once (the job's network,
:mod:`collcomm.probing.network`, or a model of a fabric, :mod:`collcomm.probing.simulated`).
What is measured:

* **latency** and **hops** of every pair: 8-byte ping-pongs (half the median round trip)
  and the IP hop count as tracepath finds it (:func:`collcomm.probing.hops.hop_count`), the
  pairs of one round of a round-robin tournament (a perfect matching) at a time;
* **bandwidth** of every ordered pair alone: the sender streams equal chunks, the
  receiver times their arrival over the window [start + skip, start + ``seconds``] of
  the phase (skip = a quarter: a token bucket's burst, slow start, connection set-up),
  then tells the sender to stop. Bytes are interpolated between arrivals
  (:func:`steady_rate`), so the rates of flows that share a phase add up to their aggregate
  over one common window. Disjoint pairs run concurrently, in the rounds of the tournament
  (2(n-1) phases). Pairs of one round may still share a link (multi-hop routes, an
  oversubscribed uplink, or on one machine the CPUs): up to three pairs are measured again
  alone, and if one is more than 1.3x faster alone every pair is measured alone (n(n-1)
  phases);
* **link sharing**: ranks are clustered (:func:`collcomm.topology.inference.clusters_of`);
  then for each rank the aggregate egress when it sends to all its cluster peers at once
  and the ingress when they all send to it, the same towards all ranks outside its cluster,
  and per cluster the aggregate when all its members send out at once (one outside peer
  each) and receive at once (:func:`plan_aggregates`; tests on disjoint ranks share a phase).

The procedure is pure given its backend: the numbers go into
:class:`~collcomm.topology.inference.Measurements`, which
:func:`~collcomm.topology.inference.infer_topology` turns into a fabric.
"""

from __future__ import annotations

import bisect
import time
from typing import Callable, Protocol, Sequence

from collcomm.topology.inference import DEFAULT_SECONDS, Aggregate, Measurements, Pair, clusters_of

INTERFERENCE_RATIO = 1.3       # alone vs in a round: faster by this much means the round interfered
VERIFY_PAIRS = 3
CHUNK_BYTES = 256 << 10        # chunks of the pairwise phases (later phases size them by rate)
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 16 << 10, 1 << 20


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
