"""Pictures of a schedule: one root's trees drawn on the fabric (matplotlib, Agg).

People would rather look at a tree than read its edge list. :func:`plot_schedule`
draws the trees of one root in one phase: the fabric greyed out as a backdrop, each
tree in its own colour, every logical edge along the physical path it takes
(through the switches), with an arrow where the data arrives. The first panel
overlays all the root's trees (side by side where they share a link); then one panel
per tree, titled with its share of the root's shard and its depth.

Allgather trees are out-trees (data flows away from the root, the large ringed
node); reduce-scatter trees are in-trees (data flows toward it).
"""

from __future__ import annotations

import math
from fractions import Fraction

from collcomm.errors import ScheduleError
from collcomm.schedules.ir import ALLGATHER, Phase, Schedule, Tree
from collcomm.topology.model import Topology
from collcomm.topology.plot import (FabricLayout, _frame, draw_fabric, fabric_layout, figure_inches, node_size,
                                    save_figure)

TREE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b",
                "#bcbd22", "#7f7f7f", "#393b79", "#ad494a", "#637939", "#843c39", "#7b4173", "#3182bd")


def _frac(x: Fraction) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def resolve_phase(schedule: Schedule, phase: int | str | None) -> Phase:
    """``None``: the only phase, or the allgather phase of an allreduce; else a name or an index."""
    phases = schedule.phases
    if not phases:
        raise ScheduleError("schedule has no phases to draw")
    if phase is None:
        return next((p for p in phases if p.collective == ALLGATHER), phases[0])
    if isinstance(phase, int) and not isinstance(phase, bool):
        if not 0 <= phase < len(phases):
            raise ScheduleError(f"phase {phase} does not exist; the schedule has {len(phases)} phase(s)")
        return phases[phase]
    for p in phases:
        if p.collective == phase:
            return p
    raise ScheduleError(f"the {schedule.collective} schedule has no {phase!r} phase; it has "
                        f"{', '.join(p.collective for p in phases)}")


def resolve_root(schedule: Schedule, root: int | str | None) -> str:
    """``None``: the first rank; an int (or a string of digits): that rank; else a node id."""
    ranks = schedule.compute_nodes
    if not ranks:
        raise ScheduleError("schedule has no ranks")
    if root is None:
        return ranks[0]
    if isinstance(root, str) and root in ranks:
        return root
    if isinstance(root, str) and root.strip().isdigit():
        root = int(root)
    if isinstance(root, int) and not isinstance(root, bool):
        if not 0 <= root < len(ranks):
            raise ScheduleError(f"root rank {root} does not exist; ranks are 0..{len(ranks) - 1}")
        return ranks[root]
    raise ScheduleError(f"root {root!r} is neither a rank number nor a rank id of this schedule "
                        f"(ranks: {', '.join(ranks[:3])}{', ...' if len(ranks) > 3 else ''})")


def _check_nodes(trees: list[Tree], topo: Topology) -> None:
    for t in trees:
        for e in t.edges:
            for nid in e.path:
                if nid not in topo.node:
                    raise ScheduleError(f"schedule edge {e.src} -> {e.dst} passes through {nid!r}, "
                                        f"which is not a node of topology {topo.name!r}")


def _offset(points: list[tuple[float, float]], off: float) -> list[tuple[float, float]]:
    """Shift every segment of a polyline sideways by ``off`` (to show parallel trees side by side)."""
    if off == 0 or len(points) < 2:
        return points
    out = []
    for i, (x, y) in enumerate(points):
        a, b = (points[i], points[i + 1]) if i + 1 < len(points) else (points[i - 1], points[i])
        dx, dy = b[0] - a[0], b[1] - a[1]
        norm = math.hypot(dx, dy) or 1.0
        out.append((x - dy / norm * off, y + dx / norm * off))
    return out


def _draw_tree(ax, tree: Tree, layout: FabricLayout, colour: str, lw: float, offset: float = 0.0) -> None:
    from matplotlib.patches import FancyArrowPatch

    for e in tree.edges:
        pts = _offset([layout.pos[n] for n in e.path], offset)
        hops = list(zip(e.path, e.path[1:]))
        for i, (a, b) in enumerate(hops):
            last = i == len(hops) - 1
            ax.add_patch(FancyArrowPatch(
                pts[i], pts[i + 1], arrowstyle="-|>" if last else "-", mutation_scale=10 + 2 * lw, lw=lw,
                color=colour, zorder=3, shrinkA=0, shrinkB=7 if last else 0, alpha=0.9, capstyle="round",
                connectionstyle=f"arc3,rad={layout.bend(a, b)}"))


def _mark_root(ax, layout: FabricLayout, root: str, size: float) -> None:
    x, y = layout.pos[root]
    ax.scatter([x], [y], s=size * 2.6, facecolors="none", edgecolors="black", linewidths=2.0, zorder=6)


def plot_schedule(schedule: Schedule, topo: Topology, path, root: int | str | None = None,
                  phase: int | str | None = None, max_panels: int = 12) -> None:
    """Draw ``root``'s trees of ``phase`` of ``schedule`` on ``topo`` to an image file.

    ``root``: rank number or rank id (default: the first rank); ``phase``: ``"allgather"``,
    ``"reduce_scatter"`` or an index (default: the allgather phase when there is one);
    at most ``max_panels`` trees get a panel of their own.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    the_phase = resolve_phase(schedule, phase)
    root_id = resolve_root(schedule, root)
    if root_id not in topo.node:
        raise ScheduleError(f"root {root_id!r} is not a node of topology {topo.name!r}")
    trees = [t for t in the_phase.trees if t.root == root_id]
    if not trees:
        raise ScheduleError(f"the {the_phase.collective} phase has no tree rooted at {root_id!r}")
    _check_nodes(trees, topo)
    layout = fabric_layout(topo)
    shown = trees[:max(1, max_panels)]
    panels = ([None] if len(trees) > 1 else []) + list(range(len(shown)))
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    x0, x1, y0, y1 = layout.extent()
    w, _ = figure_inches(layout, per_unit=0.42, lo=3.5, hi=9.0)
    h = w * (y1 - y0 + 1.6) / (x1 - x0 + 1.6)  # equal aspect: no empty bands between rows
    fig = Figure(figsize=(cols * w + 1.5, rows * (h + 0.45) + 0.6), layout="constrained")
    size = node_size(topo)
    labels = len(topo.order) <= 60
    lw = 2.2 if len(topo.compute) <= 32 else 1.2
    colour = lambda i: TREE_COLOURS[i % len(TREE_COLOURS)]  # noqa: E731
    spacing = 0.07 if len(shown) > 1 else 0.0
    for k, which in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        draw_fabric(ax, topo, layout, faint=True, labels=labels, legend=False)
        if which is None:
            for i, tree in enumerate(shown):
                _draw_tree(ax, tree, layout, colour(i), lw * 0.7, (i - (len(shown) - 1) / 2) * spacing)
            title = f"all {len(trees)} trees" + (f" (first {len(shown)} drawn)" if len(shown) < len(trees) else "")
            if len(shown) <= 16:
                ax.legend(handles=[Line2D([], [], color=colour(i), lw=2, label=f"tree {i}: {_frac(t.share)}")
                                   for i, t in enumerate(shown)],
                          loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
        else:
            tree = shown[which]
            _draw_tree(ax, tree, layout, colour(which), lw)
            title = f"tree {which}: share {_frac(tree.share)}, depth {tree.depth()}"
        _mark_root(ax, layout, root_id, size)
        _frame(ax, layout, pad=0.8)
        ax.set_title(title, fontsize=10)
    flow = "from" if the_phase.collective == ALLGATHER else "toward"
    more = f"; {len(trees) - len(shown)} more not drawn" if len(shown) < len(trees) else ""
    plural = "s" if len(trees) != 1 else ""
    fig.suptitle(f"{schedule.algorithm} {the_phase.collective} on {topo.name}: {len(trees)} tree{plural} of root "
                 f"{root_id} (rank {schedule.compute_nodes.index(root_id)}), data flows {flow} the ringed "
                 f"root{more}", fontsize=12)
    save_figure(fig, path)
