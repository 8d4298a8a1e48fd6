"""The schedule: a plan of spanning trees, as data (format ``collcomm.schedule/1``).

A :class:`Schedule` has one phase for allgather and reduce-scatter and two for
allreduce (reduce-scatter, then allgather). A phase is a list of trees; a tree has a
root, an exact ``share`` of the root's shard, and logical edges, each with the
physical path it takes through the fabric. Allgather trees are out-arborescences
(data flows away from the root); reduce-scatter trees are in-arborescences (data
flows toward the root). Every algorithm, ForestColl and the baselines alike,
produces this one structure, so one evaluator, executor and exporter serve them all.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable

from collcomm.errors import ScheduleError

FORMAT = "collcomm.schedule/1"
ALLGATHER = "allgather"
REDUCE_SCATTER = "reduce_scatter"
ALLREDUCE = "allreduce"
COLLECTIVES = (ALLGATHER, REDUCE_SCATTER, ALLREDUCE)
PHASE_COLLECTIVES = (ALLGATHER, REDUCE_SCATTER)


@dataclass(frozen=True)
class TreeEdge:
    src: str
    dst: str
    path: tuple[str, ...]

    def __post_init__(self):
        if len(self.path) < 2 or self.path[0] != self.src or self.path[-1] != self.dst:
            raise ScheduleError(f"edge {self.src} -> {self.dst}: path {list(self.path)} must run from src to dst")


@dataclass(frozen=True)
class Tree:
    root: str
    share: Fraction
    edges: tuple[TreeEdge, ...]

    def depth(self) -> int:
        """Longest chain of logical edges between the root and a leaf (either orientation)."""
        adj = defaultdict(list)
        for e in self.edges:
            adj[e.src].append(e.dst)
            adj[e.dst].append(e.src)
        depth = {self.root: 0}
        frontier = [self.root]
        while frontier:
            nxt = []
            for x in frontier:
                for y in adj[x]:
                    if y not in depth:
                        depth[y] = depth[x] + 1
                        nxt.append(y)
            frontier = nxt
        return max(depth.values())


@dataclass
class Phase:
    collective: str
    trees: list[Tree]


@dataclass
class Schedule:
    collective: str
    algorithm: str
    topology: str
    compute_nodes: list[str]
    phases: list[Phase]
    algbw: Fraction | None = None
    generation_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_ranks(self) -> int:
        return len(self.compute_nodes)

    def num_trees(self) -> int:
        return sum(len(p.trees) for p in self.phases)


# ---------------------------------------------------------------------------- JSON
def _frac(x: Fraction) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def to_dict(s: Schedule) -> dict[str, Any]:
    out: dict[str, Any] = {
        "format": FORMAT,
        "collective": s.collective,
        "algorithm": s.algorithm,
        "topology": s.topology,
        "compute_nodes": list(s.compute_nodes),
        "phases": [
            {"collective": p.collective,
             "trees": [{"root": t.root, "share": _frac(t.share),
                        "edges": [{"src": e.src, "dst": e.dst, "path": list(e.path)} for e in t.edges]}
                       for t in p.trees]}
            for p in s.phases
        ],
        "algbw": None if s.algbw is None else _frac(s.algbw),
        "generation_seconds": round(float(s.generation_seconds), 6),
    }
    if s.info:
        out["info"] = s.info
    return out


def dumps(s: Schedule) -> str:
    return json.dumps(to_dict(s), indent=1)


def save(s: Schedule, path: str | Path) -> None:
    Path(path).write_text(dumps(s) + "\n")


def _parse_fraction(value: Any, where: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ScheduleError(f"{where}: expected an exact number like \"1/13\", got {value!r}")
    try:
        return Fraction(value)
    except (ValueError, ZeroDivisionError):
        raise ScheduleError(f"{where}: expected an exact number like \"1/13\", got {value!r}") from None


def from_dict(d: Any) -> Schedule:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ScheduleError(f"schedule format must be {FORMAT!r}")
    coll = d.get("collective")
    if coll not in COLLECTIVES:
        raise ScheduleError(f"'collective' must be one of {', '.join(COLLECTIVES)}, got {coll!r}")
    nodes = d.get("compute_nodes")
    if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
        raise ScheduleError("'compute_nodes' must be a list of node ids")
    phases = []
    raw_phases = d.get("phases")
    if not isinstance(raw_phases, list):
        raise ScheduleError("'phases' must be a list")
    for pi, p in enumerate(raw_phases):
        if not isinstance(p, dict) or p.get("collective") not in PHASE_COLLECTIVES:
            raise ScheduleError(f"phase {pi}: 'collective' must be allgather or reduce_scatter")
        trees = []
        if not isinstance(p.get("trees"), list):
            raise ScheduleError(f"phase {pi}: 'trees' must be a list")
        for ti, t in enumerate(p["trees"]):
            where = f"phase {pi} tree {ti}"
            if not isinstance(t, dict) or not isinstance(t.get("root"), str) or not isinstance(t.get("edges"), list):
                raise ScheduleError(f"{where}: needs 'root', 'share' and 'edges'")
            edges = []
            for ei, e in enumerate(t["edges"]):
                if not (isinstance(e, dict) and isinstance(e.get("src"), str) and isinstance(e.get("dst"), str)):
                    raise ScheduleError(f"{where} edge {ei}: needs 'src' and 'dst'")
                path = e.get("path", [e["src"], e["dst"]])
                if not isinstance(path, list) or not all(isinstance(x, str) for x in path):
                    raise ScheduleError(f"{where} edge {ei}: 'path' must be a list of node ids")
                edges.append(TreeEdge(e["src"], e["dst"], tuple(path)))
            trees.append(Tree(t["root"], _parse_fraction(t.get("share"), f"{where} share"), tuple(edges)))
        phases.append(Phase(p["collective"], trees))
    algbw = d.get("algbw")
    return Schedule(
        collective=coll,
        algorithm=str(d.get("algorithm", "unknown")),
        topology=str(d.get("topology", "")),
        compute_nodes=list(nodes),
        phases=phases,
        algbw=None if algbw is None else _parse_fraction(algbw, "algbw"),
        generation_seconds=float(d.get("generation_seconds", 0.0)),
        info=dict(d.get("info", {})),
    )


def loads(text: str) -> Schedule:
    try:
        return from_dict(json.loads(text))
    except json.JSONDecodeError as e:
        raise ScheduleError(f"schedule is not valid JSON: {e.msg} at line {e.lineno}") from None


def load(path: str | Path) -> Schedule:
    try:
        return loads(Path(path).read_text())
    except FileNotFoundError:
        raise ScheduleError(f"schedule file {str(path)!r} does not exist") from None


# ---------------------------------------------------------------------------- helpers
def merge_identical_trees(trees: Iterable[Tree]) -> list[Tree]:
    """Join trees with the same root and the same edges and paths, adding their shares."""
    acc: dict[tuple, Fraction] = {}
    first: dict[tuple, Tree] = {}
    for t in trees:
        key = (t.root, frozenset(t.edges))
        if key not in acc:
            acc[key] = Fraction(0)
            first[key] = t
        acc[key] += t.share
    return [Tree(t.root, acc[key], t.edges) for key, t in first.items()]


def reverse_tree(t: Tree) -> Tree:
    """An out-tree on the reversed fabric becomes an in-tree on the fabric (and back)."""
    return Tree(t.root, t.share, tuple(TreeEdge(e.dst, e.src, tuple(reversed(e.path))) for e in t.edges))
