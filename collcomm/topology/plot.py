"""Pictures of a fabric: ranks, switches, boxes and links, drawn with matplotlib (Agg).

The layout is deterministic and meant for people:

- every host (box) is a group of its own, drawn on a light panel with its name;
  hosts sit on a circle (two hosts face each other left and right), global
  switches (those of no host) in the middle;
- inside a host, ranks stand in a row (or on a circle when they are linked to each
  other directly); a host switch that reaches outside the host (a NIC, a leaf
  switch) stands on the inner side, toward the global switches, next to the rank
  it serves; a switch that links only the host's own ranks (an NVSwitch) stands on
  the outer side;
- fabrics without hosts: ranks on a circle with the switches in the middle, or a
  force-directed layout when ranks are linked directly (rings, tori, hypercubes).

Ranks are blue circles, host switches orange squares, global switches red
diamonds. A link's width and colour follow its bandwidth; a duplex link is a line,
a one-way link (or a pair with different bandwidths each way) an arrow.

:func:`fabric_layout` and :func:`draw_fabric` are shared with
:mod:`collcomm.schedules.plot`, which draws trees on the same picture.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from collcomm.topology.model import Topology

RANK_COLOR = "#1f77b4"
SWITCH_COLOR = "#ff7f0e"
GLOBAL_SWITCH_COLOR = "#d62728"
HOST_FACE = "#eef2f7"
HOST_EDGE = "#9aa7b8"
LABEL_LIMIT = 140  # draw node labels up to this many nodes


@dataclass
class FabricLayout:
    """Positions of every node, plus the host panels to draw behind them."""

    pos: dict[str, tuple[float, float]]
    # host name -> (corners of its panel polygon, (x, y) of its label, label rotation in degrees)
    panels: dict[str, tuple[list[tuple[float, float]], tuple[float, float], float]] = field(default_factory=dict)
    global_switches: frozenset[str] = frozenset()

    _blocked: dict = field(default_factory=dict, repr=False)

    def blocked(self, a: str, b: str, clearance: float = 0.3) -> bool:
        """Whether the straight line from ``a`` to ``b`` passes over another node (then draw an arc)."""
        key = (a, b) if a <= b else (b, a)
        if key not in self._blocked:
            import numpy as np

            if "_xy" not in self._blocked:
                self._blocked["_xy"] = (list(self.pos), np.array(list(self.pos.values()), dtype=float))
            ids, xy = self._blocked["_xy"]
            p, q = np.array(self.pos[a]), np.array(self.pos[b])
            d = q - p
            length2 = float(d @ d) or 1.0
            t = np.clip(((xy - p) @ d) / length2, 0.0, 1.0)
            dist = np.hypot(*(xy - (p + t[:, None] * d)).T)
            inner = (t > 0.0) & (t < 1.0)
            hit = inner & (dist < clearance)
            self._blocked[key] = any(hit[i] and ids[i] not in (a, b) for i in np.flatnonzero(hit))
        return self._blocked[key]

    def bend(self, a: str, b: str) -> float:
        """``arc3`` curvature for the link a-b: 0 (straight), or a bulge of about half a node
        spacing when a straight line would run over another node."""
        if not self.blocked(a, b):
            return 0.0
        (x0, y0), (x1, y1) = self.pos[a], self.pos[b]
        return min(0.25, 0.6 / max(math.hypot(x1 - x0, y1 - y0), 1e-9))

    def extent(self) -> tuple[float, float, float, float]:
        xs = [p[0] for p in self.pos.values()] + [c[0] for poly, _, _ in self.panels.values() for c in poly]
        ys = [p[1] for p in self.pos.values()] + [c[1] for poly, _, _ in self.panels.values() for c in poly]
        return min(xs), max(xs), min(ys), max(ys)


# ---------------------------------------------------------------------------- layout
def _hosts(topo: Topology) -> dict[str, list[str]]:
    """host -> its node ids in file order; ranks without a host form the pseudo host ''."""
    groups: dict[str, list[str]] = {}
    for n in topo.nodes:
        if n.host is not None:
            groups.setdefault(n.host, []).append(n.id)
    if groups:
        loose = [c for c in topo.compute if topo.node[c].host is None]
        if loose:
            groups[""] = loose
    return groups


def _neighbours(topo: Topology) -> dict[str, set[str]]:
    nb: dict[str, set[str]] = defaultdict(set)
    for u, v in topo.capacity:
        nb[u].add(v)
        nb[v].add(u)
    return nb


def _local_host_layout(topo: Topology, members: list[str], nb: dict[str, set[str]]
                       ) -> dict[str, tuple[float, float]]:
    """Coordinates (u along the host, v outward) of one host's nodes, host centre at (0, 0)."""
    member_set = set(members)
    ranks = [m for m in members if topo.is_compute(m)]
    switches = [m for m in members if not topo.is_compute(m)]
    direct = any(nb[r] & set(ranks) for r in ranks)
    local: dict[str, tuple[float, float]] = {}
    n = len(ranks)
    if direct and n > 2:
        radius = max(1.0, n * 0.75 / (2 * math.pi))
        for i, r in enumerate(ranks):
            a = -math.pi / 2 + 2 * math.pi * i / n  # first rank on the inner side, facing the others
            local[r] = (radius * math.cos(a), radius * math.sin(a))
        inner, outer = -(radius + 1.0), 0.0  # hubs in the middle of the circle
    else:
        radius = 0.0
        for i, r in enumerate(ranks):
            local[r] = ((i - (n - 1) / 2) * 1.0, 0.0)
        inner, outer = -1.2, 1.4
    # Switches: those that reach outside the host go inward, next to the ranks they serve.
    slots: dict[tuple[float, float], list[str]] = defaultdict(list)
    for s in switches:
        external = bool(nb[s] - member_set)
        anchors = [r for r in ranks if r in nb[s]]
        if radius and len(anchors) == 1:
            x, y = local[anchors[0]]
            scale = (radius + 0.8) / radius
            key = (round(x * scale, 6), round(y * scale, 6))
        else:
            u = sum(local[r][0] for r in anchors) / len(anchors) if anchors and not radius else 0.0
            key = (round(u, 6), inner if external else outer)
        slots[key].append(s)
    for (u, v), group in slots.items():
        for j, s in enumerate(group):
            local[s] = (u + (j - (len(group) - 1) / 2) * 0.9, v)
    return local


def _global_positions(ids: list[str], vertical: bool) -> dict[str, tuple[float, float]]:
    g = len(ids)
    if g == 1:
        return {ids[0]: (0.0, 0.0)}
    if vertical or g == 2:
        return {s: (0.0, ((g - 1) / 2 - i) * 1.2) for i, s in enumerate(ids)}
    radius = max(0.9, g * 1.0 / (2 * math.pi))
    return {s: (radius * math.cos(2 * math.pi * i / g), radius * math.sin(2 * math.pi * i / g))
            for i, s in enumerate(ids)}


def _hostless_layout(topo: Topology) -> dict[str, tuple[float, float]]:
    ranks, switches = list(topo.compute), list(topo.switches)
    n = len(ranks)
    if n == 1 and not switches:
        return {ranks[0]: (0.0, 0.0)}
    direct = any(topo.is_compute(u) and topo.is_compute(v) for u, v in topo.capacity)
    if direct and len(topo.order) <= 80:
        import networkx as nx

        g = nx.Graph()
        g.add_nodes_from(topo.order)
        g.add_edges_from({tuple(sorted(e)) for e in topo.capacity})
        # A seeded spring layout refined by Kamada-Kawai: cubes look like cubes, rings like rings.
        pos = nx.kamada_kawai_layout(g, pos=nx.spring_layout(g, seed=1))
        scale = max(2.0, math.sqrt(len(topo.order)) * 0.9)
        return {k: (float(x) * scale, float(y) * scale) for k, (x, y) in pos.items()}
    radius = max(2.0, n * 1.0 / (2 * math.pi))
    angle = lambda i: math.pi / 2 - 2 * math.pi * i / n  # noqa: E731 - clockwise from the top
    pos = {c: (radius * math.cos(angle(i)), radius * math.sin(angle(i))) for i, c in enumerate(ranks)}
    pos.update(_global_positions(switches, vertical=False))
    return pos


def fabric_layout(topo: Topology) -> FabricLayout:
    """Deterministic positions of every node of ``topo`` (see the module docstring)."""
    hosts = _hosts(topo)
    if not hosts:
        return FabricLayout(_hostless_layout(topo), {}, frozenset(topo.switches))
    nb = _neighbours(topo)
    grouped = {m for members in hosts.values() for m in members}
    globals_ = [s for s in topo.switches if s not in grouped]
    locals_ = {h: _local_host_layout(topo, members, nb) for h, members in hosts.items()}
    H = len(hosts)
    margin = 0.7
    widths = [max(u for u, _ in loc.values()) - min(u for u, _ in loc.values()) for loc in locals_.values()]
    inward = max(-min(v for _, v in loc.values()) for loc in locals_.values())
    glob = _global_positions(globals_, vertical=H <= 2) if globals_ else {}
    g_radius = max((math.hypot(x, y) for x, y in glob.values()), default=0.0)
    core = (g_radius + 1.6) if globals_ else 0.8
    if H == 1:
        angles, radius = [math.pi / 2], (inward + core if globals_ else 0.0)
    else:
        angles = [math.pi - 2 * math.pi * i / H for i in range(H)]  # first host on the left, clockwise
        # Neighbouring panels must not meet even at their inner edges (inward + margin from the centre).
        half = max(widths) / 2 + margin + 0.4
        if H == 2:
            radius = inward + core
        else:
            radius = max(half / math.tan(math.pi / H) + inward + margin, inward + core)
    pos: dict[str, tuple[float, float]] = dict(glob)
    panels = {}
    for (host, loc), theta in zip(locals_.items(), angles):
        cx, cy = radius * math.cos(theta), radius * math.sin(theta)
        nx_, ny_ = math.cos(theta), math.sin(theta)  # outward
        tx, ty = ny_, -nx_  # along the host (clockwise), so hosts read left to right at the top
        if H == 2:
            tx, ty = 0.0, -1.0  # two hosts: both columns read top to bottom
        to_global = lambda u, v: (cx + u * tx + v * nx_, cy + u * ty + v * ny_)  # noqa: E731
        for nid, (u, v) in loc.items():
            pos[nid] = to_global(u, v)
        us = [u for u, _ in loc.values()]
        vs = [v for _, v in loc.values()]
        u0, u1, v0, v1 = min(us) - margin, max(us) + margin, min(vs) - margin, max(vs) + margin + 0.5
        if host:
            corners = [to_global(u0, v0), to_global(u1, v0), to_global(u1, v1), to_global(u0, v1)]
            rot = math.degrees(math.atan2(ty, tx))
            if rot > 90 or rot < -90:
                rot += 180
            panels[host] = (corners, to_global(0.0, v1 - 0.25), rot)
    return FabricLayout(pos, panels, frozenset(globals_))


# ---------------------------------------------------------------------------- drawing
def short_label(topo: Topology, nid: str) -> str:
    """Ranks by their rank number, switches by their id without the host prefix."""
    if topo.is_compute(nid):
        return str(topo.index[nid])
    host = topo.host_of(nid)
    if host and nid.startswith(host + "."):
        return nid[len(host) + 1:]
    return nid


def format_bandwidth(bw: Fraction) -> str:
    bw = Fraction(bw)
    if bw.denominator == 1:
        return f"{bw.numerator} GB/s"
    return f"{float(bw):.4g} GB/s"


def _link_pairs(topo: Topology):
    """(u, v, bw_uv, bw_vu) for every linked unordered pair, in a stable order."""
    seen = set()
    for (u, v) in topo.capacity:
        key = (u, v) if topo.index[u] < topo.index[v] else (v, u)
        if key in seen:
            continue
        seen.add(key)
        a, b = key
        yield a, b, topo.capacity.get((a, b)), topo.capacity.get((b, a))


def node_size(topo: Topology) -> float:
    """Marker area (points^2) for a node, smaller as the fabric grows."""
    n = len(topo.order)
    return max(30.0, min(320.0, 5000.0 / max(n, 1)))


def draw_fabric(ax, topo: Topology, layout: FabricLayout, faint: bool = False, labels: bool | None = None,
                legend: bool = True) -> None:
    """Draw host panels, links and nodes on ``ax``; ``faint`` greys links out (a backdrop for trees)."""
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, Polygon

    import matplotlib as mpl

    pos = layout.pos
    labels = len(topo.order) <= LABEL_LIMIT if labels is None else labels
    for host, (corners, (lx, ly), rot) in layout.panels.items():
        ax.add_patch(Polygon(corners, closed=True, facecolor=HOST_FACE, edgecolor=HOST_EDGE, lw=1.0, zorder=0,
                             joinstyle="round"))
        ax.text(lx, ly, host, ha="center", va="center", fontsize=9, color="#44546a", rotation=rot, zorder=1,
                fontweight="bold")
    bws = sorted({bw for bw in topo.capacity.values()})
    top = max(bws)
    cmap = mpl.colormaps["viridis"]
    colour = {bw: cmap(0.15 + 0.7 * (i / max(len(bws) - 1, 1))) for i, bw in enumerate(bws)}
    width = lambda bw: 0.6 + 3.4 * math.sqrt(float(bw / top))  # noqa: E731
    segs, widths, colours, arrows, arcs = [], [], [], [], []
    for u, v, fwd, back in _link_pairs(topo):
        if fwd is not None and fwd == back and layout.blocked(u, v):
            arcs.append((u, v, fwd))
        elif fwd is not None and fwd == back:
            segs.append([pos[u], pos[v]])
            widths.append(width(fwd))
            colours.append("#c8c8c8" if faint else colour[fwd])
        else:
            for a, b, bw in ((u, v, fwd), (v, u, back)):
                if bw is not None:
                    arrows.append((a, b, bw))
    ax.add_collection(LineCollection(segs, linewidths=widths, colors=colours, zorder=2, alpha=0.85,
                                     capstyle="round"))
    for a, b, bw in arrows:
        ax.add_patch(FancyArrowPatch(pos[a], pos[b], arrowstyle="-|>", mutation_scale=12, lw=width(bw),
                                     color="#c8c8c8" if faint else colour[bw], connectionstyle="arc3,rad=0.12",
                                     zorder=2, shrinkA=6, shrinkB=6))
    for a, b, bw in arcs:  # a straight line would run over another node
        ax.add_patch(FancyArrowPatch(pos[a], pos[b], arrowstyle="-", lw=width(bw), alpha=0.85,
                                     color="#c8c8c8" if faint else colour[bw],
                                     connectionstyle=f"arc3,rad={layout.bend(a, b)}", zorder=2, shrinkA=0, shrinkB=0))
    size = node_size(topo)
    kinds = (
        ([c for c in topo.compute], "o", RANK_COLOR, "rank"),
        ([s for s in topo.switches if s not in layout.global_switches], "s", SWITCH_COLOR, "host switch"),
        ([s for s in topo.switches if s in layout.global_switches], "D", GLOBAL_SWITCH_COLOR, "switch"),
    )
    for ids, marker, col, _ in kinds:
        if ids:
            ax.scatter([pos[i][0] for i in ids], [pos[i][1] for i in ids], s=size, marker=marker, c=col,
                       edgecolors="white", linewidths=0.8, zorder=4)
    if labels:
        fs = max(5.0, min(9.0, 260.0 / max(len(topo.order), 1)))
        for nid in topo.order:
            x, y = pos[nid]
            if topo.is_compute(nid):
                ax.text(x, y, short_label(topo, nid), ha="center", va="center", fontsize=fs * 0.9,
                        color="white", zorder=5, fontweight="bold")
            else:
                ax.text(x, y - 0.32, short_label(topo, nid), ha="center", va="top", fontsize=fs * 0.85,
                        color="#333333", zorder=5)
    if legend:
        handles = [Line2D([], [], marker=m, color="none", markerfacecolor=c, markeredgecolor="white",
                          markersize=9, label=name) for ids, m, c, name in kinds if ids]
        if not faint:
            shown = bws[::-1][:8]
            handles += [Line2D([], [], color=colour[bw], lw=width(bw), label=format_bandwidth(bw)) for bw in shown]
            if len(bws) > len(shown):
                handles.append(Line2D([], [], color="none", label=f"... {len(bws) - len(shown)} more"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)


def _frame(ax, layout: FabricLayout, pad: float = 1.0) -> None:
    x0, x1, y0, y1 = layout.extent()
    ax.set_xlim(x0 - pad, x1 + pad)
    ax.set_ylim(y0 - pad, y1 + pad)
    ax.set_aspect("equal")
    ax.axis("off")


def figure_inches(layout: FabricLayout, per_unit: float = 0.55, lo: float = 4.0, hi: float = 22.0
                  ) -> tuple[float, float]:
    x0, x1, y0, y1 = layout.extent()
    w = min(hi, max(lo, (x1 - x0 + 2) * per_unit))
    h = min(hi, max(lo, (y1 - y0 + 2) * per_unit))
    return w, h


def save_figure(fig, path) -> None:
    """Save with the Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(str(Path(path)), dpi=110, bbox_inches="tight")


def plot_topology(topo: Topology, path) -> None:
    """Draw ``topo`` to an image file (format from the extension: .png, .svg, .pdf, ...)."""
    from matplotlib.figure import Figure

    layout = fabric_layout(topo)
    w, h = figure_inches(layout)
    fig = Figure(figsize=(w + 2.0, h + 0.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    draw_fabric(ax, topo, layout)
    _frame(ax, layout)
    links = sum(1 for _ in _link_pairs(topo))
    count = lambda n, word, plural: f"{n} {word if n == 1 else plural}"  # noqa: E731
    ax.set_title(f"{topo.name}: {count(topo.num_ranks, 'rank', 'ranks')}, "
                 f"{count(len(topo.switches), 'switch', 'switches')}, {count(links, 'link', 'links')}", fontsize=11)
    save_figure(fig, path)
