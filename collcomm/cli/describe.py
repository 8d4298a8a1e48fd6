"""What ``collcomm topology`` prints: a summary of a fabric, and of what a probe measured."""

from __future__ import annotations

from fractions import Fraction

from collcomm.cli.formatting import bw_short


def describe_topology(topo) -> str:
    """A readable summary: ranks, switches, hosts, links by bandwidth, ingress/egress, symmetry."""
    from collcomm.topology.symmetry import symmetry_group

    lines = [f"topology   {topo.name}"]

    def listing(ids, limit=4):
        ids = list(ids)
        if len(ids) <= limit:
            return ", ".join(ids)
        return f"{', '.join(ids[:limit - 1])}, ..., {ids[-1]}"

    lines.append(f"ranks      {topo.num_ranks}: {listing(topo.compute)}")
    lines.append(f"switches   {len(topo.switches)}" + (f": {listing(topo.switches)}" if topo.switches else ""))
    hosts: dict[str, list[int]] = {}
    for n in topo.nodes:
        if n.host is not None:
            counts = hosts.setdefault(n.host, [0, 0])
            counts[0 if n.kind == "compute" else 1] += 1
    if hosts:
        shapes: dict[tuple[int, int], list[str]] = {}
        for h, (r, s) in hosts.items():
            shapes.setdefault((r, s), []).append(h)
        parts = [f"{listing(hs, 3)} ({r} ranks, {s} switches{' each' if len(hs) > 1 else ''})"
                 for (r, s), hs in shapes.items()]
        lines.append(f"hosts      {len(hosts)}: " + "; ".join(parts))
    else:
        lines.append("hosts      none")

    def kind(nid):
        if topo.is_compute(nid):
            return "rank"
        return "host switch" if topo.host_of(nid) else "switch"

    classes: dict[tuple[Fraction, bool], dict[str, int]] = {}
    for link in topo.links:
        a, b = sorted((kind(link.src), kind(link.dst)), key=("rank", "host switch", "switch").index)
        ends = f"{a} - {b}" if link.duplex else f"{kind(link.src)} -> {kind(link.dst)}"
        bucket = classes.setdefault((link.bandwidth, link.duplex), {})
        bucket[ends] = bucket.get(ends, 0) + 1
    duplex = sum(1 for l in topo.links if l.duplex)
    lines.append(f"links      {len(topo.links)} ({duplex} duplex, {len(topo.links) - duplex} one-way), "
                 f"by bandwidth:")
    width = max((len(bw_short(bw)) for bw, _ in classes), default=0)
    for (bw, dup), ends in sorted(classes.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        total = sum(ends.values())
        what = ", ".join(f"{e} ({c})" if len(ends) > 1 else e for e, c in ends.items())
        lines.append(f"  {bw_short(bw):>{width}} GB/s  {total:>4} {'duplex' if dup else 'one-way':7}  {what}")
    ingress: dict[str, Fraction] = {c: Fraction(0) for c in topo.compute}
    egress: dict[str, Fraction] = {c: Fraction(0) for c in topo.compute}
    for (u, v), bw in topo.capacity.items():
        if v in ingress:
            ingress[v] += bw
        if u in egress:
            egress[u] += bw
    runs: list[list] = []  # [first rank, last rank, ingress, egress]
    for r, c in enumerate(topo.compute):
        if runs and runs[-1][2:] == [ingress[c], egress[c]]:
            runs[-1][1] = r
        else:
            runs.append([r, r, ingress[c], egress[c]])
    lines.append("per rank   ingress / egress")
    for first, last, i, o in runs[:12]:
        span = f"rank {first}" if first == last else f"ranks {first}-{last}"
        lines.append(f"  {span:<13} {bw_short(i)} / {bw_short(o)} GB/s")
    if len(runs) > 12:
        lines.append(f"  ... {len(runs) - 12} more ranges")
    group = symmetry_group(topo)
    orbits = len(group.rank_representatives)
    lines.append(f"symmetry   group of order {group.order} acting freely on the ranks; {orbits} rank "
                 f"orbit{'s' if orbits != 1 else ''} (trees are built for {orbits} root{'s' if orbits != 1 else ''}"
                 f" and mapped to the rest)")
    return "\n".join(lines)


def describe_probe(data: dict, elapsed: float) -> str:
    """What a probe measured: time, pairwise bandwidth (MB/s) and latency (us)."""
    import statistics

    from collcomm.topology.inference import Measurements

    m = Measurements.from_json(data)
    lines = [f"probed     {m.n} ranks in {elapsed:.1f} s ({m.seconds:.1f} s measuring, {m.phases} transfer phases "
             f"of {m.window:g} s)"]
    lines += [f"note       {note}" for note in m.notes]
    if m.n <= 16:
        width = max([8] + [len(f"{v * 1000:.4g}") + 1 for v in m.bandwidth.values()])
        lines.append("bandwidth  MB/s alone, row sends to column")
        lines.append(" " * 9 + "".join(f"{c:>{width}}" for c in range(m.n)))
        for a in range(m.n):
            cells = []
            for b in range(m.n):
                cells.append("-" if a == b else f"{m.bandwidth.get((a, b), 0.0) * 1000:.4g}")
            lines.append(f"  {a:<7}" + "".join(f"{c:>{width}}" for c in cells))
        lat = [m.latency_us[k] for k in sorted(m.latency_us)]
        if lat:
            lines.append(f"latency    {min(lat):.0f}-{max(lat):.0f} us (median {statistics.median(lat):.0f})"
                         + (f"; hops {min(m.hops.values())}-{max(m.hops.values())}" if m.hops else ""))
    return "\n".join(lines)
