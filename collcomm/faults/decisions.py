"""The link monitor's decisions, pure: reports, routes, blame and re-planning around bad links.

Topology and numbers in, a verdict out; no process, thread or socket (the monitor's control loop,
:class:`collcomm.runtime.monitor.GroupMonitor`, runs them every round). Rank pairs are compared
with the pairs whose route has the same bottleneck bandwidth in the fabric (a slow network link
is not "slow" next to an NVLink), each credited with what its path carries (its rate times the
number of the plan's pairs sharing its bottleneck, :func:`sharing`). Flagged pairs are mapped to
the fabric's physical links along their routes (:func:`blame`: the fewest links, not crossed by
healthy traffic, that explain every flagged pair); :func:`reroute` removes a down link and
down-weights a degraded or flapping one (to half its measured fraction: over-estimating a slow
link costs far more than under-estimating it); :func:`partition` names the two sides of a fabric
that a fault cuts in two; :func:`avoid_marginal_links` leaves out a sliver of a slow link that
adds little to the optimum.
"""

from __future__ import annotations

import math
from collections import deque
from fractions import Fraction
from typing import Iterable, Mapping

from collcomm.errors import TopologyError
from collcomm.faults.detector import DEGRADED, DOWN, FLAPPING, HEALTHY, Observation, Verdict
from collcomm.schedules.ir import ALLREDUCE
from collcomm.schedules.optimum import collective_bound
from collcomm.topology.model import Link, Topology

Edge = tuple[str, str]
SEVERITY = {HEALTHY: 0, DEGRADED: 1, FLAPPING: 2, DOWN: 3}
MIN_FRACTION = Fraction(1, 100)
# A degraded link is planned at this part of its measured fraction. Over-estimating what a slow
# link carries is expensive and under-estimating it is cheap: on two_box.json with one NIC at 10%,
# ForestColl planned for 12% runs at 2.6 GB/s on the real fabric (87% of the 3.0 of the fabric
# without that link), planned for 15% at 2.1 (70%), while planned for 5% it runs at 3.05. One
# round's measurement is easily 20-50% off, hence the margin.
DEGRADED_MARGIN = Fraction(1, 2)
FLAPPING_FRACTION = Fraction(1, 10)
# A slow link whose share adds less than this to the fabric's allreduce optimum is left out of
# the plan instead (see avoid_marginal_links).
MARGINAL_GAIN = Fraction(1, 20)
# TCP acknowledges over the reverse path: a slow pair whose reverse pair reads under this fraction
# of its own ratio is explained by the reverse pair's links (its ACKs queue behind their data).
ACK_SHADOW = 0.5


# ============================================================================ pure: reports
def observation_to_json(o: Observation, expected: float | None = None, offset: float = 0.0) -> dict:
    """An observation as JSON; ``offset`` turns its monotonic ``last_seen`` into wall time."""
    return {"rate": o.rate, "transfers": o.transfers, "errors": o.errors, "kinds": list(o.error_kinds),
            "last_seen": None if o.last_seen is None else o.last_seen + offset, "group": o.group,
            "active": o.active, "expected": expected, "source": o.source}


def merge_reports(reports: Iterable[Mapping]) -> tuple[dict[tuple[int, int], Observation], dict]:
    """The observations of every rank pair from the members' reports (``{"links": [{"src", "dst",
    ...observation_to_json}]}``): where both ends report a pair, the lower rate, the errors and
    transfers of both, the latest activity; but a rate from the kernel's counters of the path
    (``source: "wire"``, the sender's end) wins over one from per-chunk times (whose lows are
    often the receiver's scheduling). Returns (observations, expected rates)."""
    merged: dict[tuple[int, int], dict] = {}
    for rep in reports:
        for l in rep.get("links", []):
            key = (int(l["src"]), int(l["dst"]))
            m = merged.get(key)
            if m is None:
                merged[key] = dict(l, kinds=list(l.get("kinds") or []))
                continue
            wire = [x for x in (m, l) if x.get("source") == "wire"]
            if len(wire) == 1:
                m["rate"], m["source"] = wire[0].get("rate"), "wire"
            else:
                rates = [r for r in (m.get("rate"), l.get("rate")) if r is not None]
                m["rate"] = min(rates) if rates else None
            m["transfers"] = max(m.get("transfers") or 0, l.get("transfers") or 0)
            m["errors"] = (m.get("errors") or 0) + (l.get("errors") or 0)
            m["kinds"] = sorted(set(m["kinds"]) | set(l.get("kinds") or []))
            seen = [s for s in (m.get("last_seen"), l.get("last_seen")) if s is not None]
            m["last_seen"] = max(seen) if seen else None
            m["active"] = bool(m.get("active")) or bool(l.get("active"))
            m["group"] = m.get("group") if m.get("group") is not None else l.get("group")
            m["expected"] = m.get("expected") or l.get("expected")
    obs = {k: Observation(rate=m.get("rate"), transfers=int(m.get("transfers") or 0), errors=int(m.get("errors") or 0),
                          error_kinds=tuple(m.get("kinds") or ()), last_seen=m.get("last_seen"), group=m.get("group"),
                          active=bool(m.get("active", True)), source=m.get("source"))
           for k, m in merged.items()}
    expected = {k: float(m["expected"]) for k, m in merged.items() if m.get("expected")}
    return obs, expected


# ============================================================================ pure: the fabric
def routes(topo: Topology, a: str, b: str, schedules: Iterable = ()) -> set[Edge]:
    """The physical links that traffic from compute node ``a`` to ``b`` crosses: the paths of the
    schedules' tree edges ``a -> b`` where they have one, else every link on a shortest path."""
    edges: set[Edge] = set()
    for s in schedules:
        for phase in getattr(s, "phases", ()):
            for tree in phase.trees:
                for e in tree.edges:
                    if e.src == a and e.dst == b and len(e.path) > 1:
                        edges.update(zip(e.path, e.path[1:]))
    if edges:
        return edges
    if (a, b) in topo.capacity:
        return {(a, b)}
    succ: dict[str, list[str]] = {}
    for u, v in topo.capacity:
        succ.setdefault(u, []).append(v)
    # BFS distances from a and (on the reversed graph) to b; an edge is on a shortest path when
    # dist_a[u] + 1 + dist_b[v] == dist_a[b].
    pred: dict[str, list[str]] = {}
    for u, v in topo.capacity:
        pred.setdefault(v, []).append(u)

    def bfs(start: str, adj: dict) -> dict[str, int]:
        dist = {start: 0}
        q = deque([start])
        while q:
            u = q.popleft()
            for w in adj.get(u, ()):
                if w not in dist and (w == b or w == a or not topo.is_compute(w)):  # ranks do not forward
                    dist[w] = dist[u] + 1
                    q.append(w)
        return dist

    da, db = bfs(a, succ), bfs(b, pred)
    if b not in da:
        return set()
    return {(u, v) for (u, v) in topo.capacity if u in da and v in db and da[u] + 1 + db[v] == da[b]}


def plan_routes(schedules: Iterable) -> dict[Edge, set[Edge]]:
    """Per compute-node pair that a tree edge of the schedules joins: the physical links of its paths."""
    out: dict[Edge, set[Edge]] = {}
    for s in schedules:
        for phase in getattr(s, "phases", ()):
            for tree in phase.trees:
                for e in tree.edges:
                    if len(e.path) > 1:
                        out.setdefault((e.src, e.dst), set()).update(zip(e.path, e.path[1:]))
    return out


def sharing(topo: Topology, used: Mapping[Edge, set[Edge]], route: Iterable[Edge]) -> Fraction:
    """How many ways the plan splits the bottleneck of ``route``: the route's bottleneck bandwidth
    over the pair's fair share of it (the least, over the route's links, of the link's bandwidth
    over the number of the plan's pairs, ``used``, that cross it, this one included). 1 for a
    pair alone on its bottleneck. One TCP connection per pair shares a link fairly with the
    others, so the pair's rate times this is what the path carries."""
    route = [e for e in route if e in topo.capacity]
    if not route:
        return Fraction(1)
    flows: dict[Edge, int] = {}
    for edges in used.values():
        for e in edges:
            flows[e] = flows.get(e, 0) + 1
    mine = set(route)
    on = any(edges == mine for edges in used.values())  # the pair is one of the plan's flows
    fair = min(topo.capacity[e] / max(1, flows.get(e, 0) + (0 if on else 1)) for e in route)
    return max(Fraction(1), min(topo.capacity[e] for e in route) / fair)


def bottleneck(topo: Topology, edges: Iterable[Edge]) -> Fraction | None:
    caps = [topo.capacity[e] for e in edges if e in topo.capacity]
    return min(caps) if caps else None


def measured_fraction(v: Verdict) -> Fraction:
    """How much of its reference a degraded link still carries (from the detector's evidence; the
    plan gives it :data:`DEGRADED_MARGIN` of this)."""
    ev = v.evidence or {}
    for key in ("peer_ratio", "own_ratio", "normalized"):
        x = ev.get(key)
        if isinstance(x, (int, float)) and math.isfinite(x) and x > 0:
            return max(MIN_FRACTION, min(Fraction(1), Fraction(round(x * 100), 100)))
    return Fraction(1, 2)


def blame(topo: Topology, verdicts: Mapping[Edge, Verdict], pair_routes: Mapping[Edge, set[Edge]],
          observed: Iterable[Edge] = (), alive: Iterable[Edge] = ()) -> dict[Edge, tuple[str, Fraction, str]]:
    """Map the verdicts of compute-node pairs to the fabric's physical links.

    ``verdicts`` and ``pair_routes`` are keyed by (src node, dst node); ``observed``: the pairs
    that carried traffic this round (a healthy observed pair crossing a link clears it). A flagged
    pair's suspects are the links of its route that no healthy observed pair crosses. When every
    link of the route also carries healthy traffic, a slow pair (degraded, flapping) blames
    nothing: a slow link slows every flow across it, so the cause is at an end (a busy receiver,
    a flow that forwards a trickle and never fills its window) and no plan avoids it; a pair with
    connection errors (down) blames the links shared by the largest fraction of flagged pairs.
    A slow pair whose reverse pair is much slower (under :data:`ACK_SHADOW` of its ratio) blames
    nothing: TCP's ACKs take the reverse path and queue behind the slow direction's data. Of the
    suspects, the fewest links that explain every flagged pair are blamed (greedy cover: the
    links that most flagged pairs share first, ties all blamed): one cut cable between two
    switches stalls every pair across it, and it alone is blamed, not the uplinks of the ranks
    behind it. ``alive``: pairs that carried traffic without errors this round, too little to
    measure a rate: a link they cross is not suspected of being down (it may still be slow).
    Returns {physical link: (state, fraction of its bandwidth to keep — 0 for a down link —,
    reason)}."""
    flagged = {p: v for p, v in verdicts.items() if v.state != HEALTHY and p in pair_routes}
    # Seen on the emulated two-box fabric with 64 KB chunks: box0.gpu0 -> net shaped to 10% read 9%
    # of its peers, and box1.gpu0 -> box0.gpu0, whose ACKs wait in that shaper's queue, 36%; both
    # NICs were planned around, both ways. A slow pair in the shadow of its slower reverse blames
    # nothing of its own (a cable slow both ways reads alike both ways: both blame).
    shadowed = {p for p, v in flagged.items() if _ack_shadowed(v, flagged.get((p[1], p[0])))}
    flagged = {p: v for p, v in flagged.items() if p not in shadowed}
    healthy = {p for p in observed if p in pair_routes and verdicts.get(p) is not None
               and verdicts[p].state == HEALTHY}
    crossing_ok: dict[Edge, int] = {}
    crossing_bad: dict[Edge, int] = {}
    for p in healthy:
        for e in pair_routes[p]:
            crossing_ok[e] = crossing_ok.get(e, 0) + 1
    for p in flagged:
        for e in pair_routes[p]:
            crossing_bad[e] = crossing_bad.get(e, 0) + 1
    carries = {e for p in alive if p in pair_routes and (verdicts.get(p) is None or verdicts[p].state == HEALTHY)
               for e in pair_routes[p]}
    suspects: dict[Edge, set[Edge]] = {}
    for p in flagged:
        route = pair_routes[p]
        if not route:
            continue
        only_bad = [e for e in route if crossing_ok.get(e, 0) == 0 and
                    not (flagged[p].state == DOWN and e in carries)]
        if not only_bad:
            if flagged[p].state != DOWN:
                # Seen on the emulated two-box fabric after a link-down reroute with 64 KB chunks:
                # box1.gpu3 -> box1.gpu0 read 23% of its peers two rounds in a row while the pairs
                # sharing both its links read full rate; planning around those links took the next
                # operations from 0.92 to 0.24-0.5 of the optimum.
                continue
            score = {e: crossing_bad[e] / (crossing_bad[e] + crossing_ok.get(e, 0)) for e in route}
            best = max(score.values())
            only_bad = [e for e in route if score[e] == best]
        suspects[p] = set(only_bad)
    chosen: set[Edge] = set()
    uncovered = set(suspects)
    while uncovered:
        count: dict[Edge, int] = {}
        for p in uncovered:
            for e in suspects[p]:
                count[e] = count.get(e, 0) + 1
        most = max(count.values())
        pick = {e for e, c in count.items() if c == most}
        chosen |= pick
        uncovered = {p for p in uncovered if not suspects[p] & pick}
    out: dict[Edge, tuple[str, Fraction, str]] = {}
    for p, v in sorted(flagged.items()):
        state = v.state
        frac = Fraction(0) if state == DOWN else (
            FLAPPING_FRACTION if state == FLAPPING else max(MIN_FRACTION, measured_fraction(v) * DEGRADED_MARGIN))
        for e in sorted(suspects.get(p, set()) & chosen):
            prev = out.get(e)
            if prev is None or SEVERITY[state] > SEVERITY[prev[0]] or \
                    (state == prev[0] and frac < prev[1]):
                out[e] = (state, frac, f"{p[0]}->{p[1]}: {v.reason}")
    return out


def low_now(v: Verdict) -> bool:
    """Whether a flagged pair's verdict rests on this round's reading (a down pair, or a slow one
    whose latest reading was low), not only on the state the detector keeps."""
    return v.state == DOWN or (v.evidence or {}).get("low_run", 1) > 0


def _ack_shadowed(v: Verdict, reverse: Verdict | None) -> bool:
    """Whether slow pair ``v`` reads well above its slower ``reverse`` pair (see ACK_SHADOW)."""
    if reverse is None or v.state not in (DEGRADED, FLAPPING) or reverse.state not in (DEGRADED, FLAPPING):
        return False
    mine, theirs = (x.evidence.get("peer_ratio") if x.evidence else None for x in (v, reverse))
    if not all(isinstance(r, (int, float)) and math.isfinite(r) and r > 0 for r in (mine, theirs)):
        return False
    return theirs < ACK_SHADOW * mine


def partition(topo: Topology, capacity: Mapping[Edge, Fraction]) -> tuple[list[str], list[str]] | None:
    """None when every compute node of ``topo`` reaches every other over the edges of ``capacity``;
    else (the side of the first compute node, the rest): the compute nodes that reach it and are
    reached from it, and those that do not."""
    succ: dict[str, list[str]] = {}
    pred: dict[str, list[str]] = {}
    for (u, v), bw in capacity.items():
        if bw > 0:
            succ.setdefault(u, []).append(v)
            pred.setdefault(v, []).append(u)

    def reach(adj) -> set[str]:
        first = topo.compute[0]
        seen, stack = {first}, [first]
        while stack:
            for w in adj.get(stack.pop(), ()):
                if w not in seen:
                    seen.add(w)
                    stack.append(w)
        return seen

    both = reach(succ) & reach(pred)
    side = [c for c in topo.compute if c in both]
    rest = [c for c in topo.compute if c not in both]
    return None if not rest else (side, rest)


def reroute(topo: Topology, faults: Mapping[Edge, tuple[str, Fraction, str] | Fraction | float],
            name: str | None = None) -> Topology:
    """``topo`` with each faulty directed link removed (fraction 0: down) or its bandwidth scaled
    to the fraction it still carries. A duplex link with one faulty direction becomes two one-way
    links. Raises TopologyError naming both sides when the remaining fabric is cut in two."""
    frac: dict[Edge, Fraction] = {}
    for e, f in faults.items():
        f = f[1] if isinstance(f, tuple) else f
        frac[e] = Fraction(f).limit_denominator(1000) if not isinstance(f, Fraction) else f
    unknown = [e for e in frac if e not in topo.capacity]
    if unknown:
        raise TopologyError(f"reroute: {', '.join(f'{u}->{v}' for u, v in unknown)} is not a link of {topo.name}")
    links: list[Link] = []
    for l in topo.links:
        dirs = [(l.src, l.dst)] + ([(l.dst, l.src)] if l.duplex else [])
        if not any(d in frac for d in dirs):
            links.append(l)
            continue
        for u, v in dirs:
            f = frac.get((u, v), Fraction(1))
            if f > 0:
                links.append(Link(u, v, l.bandwidth * f, l.latency_us, duplex=False))
    capacity: dict[Edge, Fraction] = {}
    for l in links:
        for d in [(l.src, l.dst)] + ([(l.dst, l.src)] if l.duplex else []):
            capacity[d] = capacity.get(d, Fraction(0)) + Fraction(l.bandwidth)
    cut = partition(topo, capacity)
    if cut is not None:
        removed = ", ".join(sorted(f"{u}->{v}" for (u, v), f in frac.items() if f == 0)) or "the faulty links"
        raise TopologyError(f"the fabric {topo.name} is partitioned without {removed}: "
                            f"{{{', '.join(cut[0])}}} cannot exchange data with {{{', '.join(cut[1])}}}")
    return Topology(name or topo.name, topo.nodes, links)


def avoid_marginal_links(topo: Topology, faults: Mapping[Edge, tuple[str, Fraction, str]],
                         gain: Fraction = MARGINAL_GAIN) -> dict[Edge, tuple[str, Fraction, str]]:
    """``faults`` with each slow link (degraded or flapping, planned at a fraction > 0) whose
    share adds less than ``gain`` to the allreduce optimum of the rerouted fabric planned at
    fraction 0 instead: left out of the plan, its verdict unchanged. Smallest fractions first;
    a link whose removal would cut the fabric stays.

    Why: a sliver of a slow link buys little bandwidth and costs a lot. On two_box.json with one
    NIC at 10%, planning it at 5% lifts the optimum by 1.7% (3.05 against 3.0) but puts a few
    trees on a TCP flow that a shaper's drops send into retransmission timeouts: measured with
    64 MB allreduces (and the splitting of that time, 32 trees per phase against 19-20; now
    11-20 against 10), that plan ran at 0.56 of the optimum of the fabric without the link."""
    out = dict(faults)
    slow = sorted((f[1], e) for e, f in faults.items() if f[0] != DOWN and f[1] > 0)
    if not slow:
        return out
    best = collective_bound(reroute(topo, out), ALLREDUCE)
    for frac, e in slow:
        trial = dict(out)
        trial[e] = (out[e][0], Fraction(0), f"{out[e][2]}; left out of the plan: keeping it at {float(frac):.1%} "
                                            f"adds less than {float(gain):.0%} to the optimum")
        try:
            without = collective_bound(reroute(topo, trial), ALLREDUCE)
        except TopologyError:
            continue
        if best is None or without is None or without >= best * (1 - gain):
            out = trial
    return out


def stalled_only(why: str) -> bool:
    """Whether a down verdict rests on the kernel's counters alone (connections read as stalled),
    not on connection errors or silence."""
    return "stalled" in why and not any(w in why for w in ("reset", "refused", "eof", "timeout", "silent", "detour"))


def fault_classes(faults: Mapping[Edge, tuple]) -> dict[Edge, str]:
    return {e: f[0] for e, f in faults.items()}


def faults_to_json(faults: Mapping[Edge, tuple]) -> list[dict]:
    return [{"link": [e[0], e[1]], "state": s, "fraction": str(f), "reason": why}
            for e, (s, f, why) in sorted(faults.items())]


def faults_from_json(items: list[dict]) -> dict[Edge, tuple[str, Fraction, str]]:
    return {(d["link"][0], d["link"][1]): (d["state"], Fraction(d["fraction"]), d.get("reason", "")) for d in items}
