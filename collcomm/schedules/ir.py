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
from collcomm.inputs import Limits, current_limits, exact_number, one_line, parse_json, read_bounded, shown

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


MAX_NAME_CHARS = 256  # of a node id, or the algorithm's and the topology's names
MAX_SECONDS = 1e9     # generation_seconds


def _fraction(value: Any, where: str, limits: Limits, low=0, high=None) -> Fraction:
    """An exact share or bandwidth: an integer or a string like "1/13", positive, at most ``high``."""
    if isinstance(value, float):  # exact numbers only: a float here is a schedule written by hand
        raise ScheduleError(f"{where}: expected an exact number like \"1/13\", got {shown(value)}")
    return exact_number(value, where, error=ScheduleError, limits=limits, low=low, low_open=True, high=high,
                        what='an exact number like "1/13"')


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS or not value.isprintable():
        raise ScheduleError(f"{where} must be a string of 1 to {MAX_NAME_CHARS} printable characters, "
                            f"got {shown(value)}")
    return value


def _names(value: Any, where: str, limit: int, field: str, limits: Limits) -> list[str]:
    if not isinstance(value, list):
        raise ScheduleError(f"{where} must be a list of node ids, got {shown(value)}")
    if len(value) > limit:
        raise ScheduleError(f"{where} has {len(value)} entries; {limits.describe(field)}")
    return [_name(x, f"{where} entry {i}") for i, x in enumerate(value)]


def from_dict(d: Any, limits: Limits | None = None) -> Schedule:
    """A Schedule from the parsed ``collcomm.schedule/1`` document ``d``, within ``limits``."""
    limits = current_limits(limits)
    try:
        return _from_dict(d, limits)
    except ScheduleError as e:
        raise ScheduleError(one_line(str(e))) from None


def _from_dict(d: Any, limits: Limits) -> Schedule:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ScheduleError(f"schedule format must be {FORMAT!r}")
    coll = d.get("collective")
    if coll not in COLLECTIVES:
        raise ScheduleError(f"'collective' must be one of {', '.join(COLLECTIVES)}, got {shown(coll)}")
    nodes = _names(d.get("compute_nodes"), "'compute_nodes'", limits.max_nodes, "max_nodes", limits)
    phases = []
    raw_phases = d.get("phases")
    if not isinstance(raw_phases, list) or len(raw_phases) > 2:
        raise ScheduleError("'phases' must be a list of one or two phases")
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
            root = _name(t["root"], f"{where}: 'root'")
            edges = []
            for ei, e in enumerate(t["edges"]):
                if not (isinstance(e, dict) and isinstance(e.get("src"), str) and isinstance(e.get("dst"), str)):
                    raise ScheduleError(f"{where} edge {ei}: needs 'src' and 'dst'")
                src, dst = _name(e["src"], f"{where} edge {ei}: 'src'"), _name(e["dst"], f"{where} edge {ei}: 'dst'")
                path = e.get("path", [src, dst])
                if not isinstance(path, list) or not all(isinstance(x, str) for x in path):
                    raise ScheduleError(f"{where} edge {ei}: 'path' must be a list of node ids")
                path = _names(path, f"{where} edge {ei}: 'path'", limits.max_nodes, "max_nodes", limits)
                edges.append(TreeEdge(src, dst, tuple(path)))
            share = _fraction(t.get("share"), f"{where} share", limits, high=1)
            trees.append(Tree(root, share, tuple(edges)))
        phases.append(Phase(p["collective"], trees))
    algbw = d.get("algbw")
    seconds = d.get("generation_seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_SECONDS:
        raise ScheduleError(f"'generation_seconds' must be a number of seconds in [0, {MAX_SECONDS:g}], "
                            f"got {shown(seconds)}")
    info = d.get("info", {})
    if not isinstance(info, dict):
        raise ScheduleError(f"'info' must be an object, got {shown(info)}")
    names = {key: d.get(key, default) for key, default in (("algorithm", "unknown"), ("topology", ""))}
    for key, value in names.items():
        if not isinstance(value, str) or len(value) > MAX_NAME_CHARS or not value.isprintable():
            raise ScheduleError(f"{key!r} must be a string of at most {MAX_NAME_CHARS} printable characters, "
                                f"got {shown(value)}")
    return Schedule(
        collective=coll,
        algorithm=names["algorithm"],
        topology=names["topology"],
        compute_nodes=nodes,
        phases=phases,
        algbw=None if algbw is None else _fraction(algbw, "algbw", limits),
        generation_seconds=float(seconds),
        info=dict(info),
    )


def loads(text: str, limits: Limits | None = None) -> Schedule:
    """A Schedule from ``collcomm.schedule/1`` text, within ``limits`` (:mod:`collcomm.inputs.limits`)."""
    limits = current_limits(limits)
    return from_dict(parse_json(text, what="schedule", error=ScheduleError, limits=limits), limits)


def load(path: str | Path, limits: Limits | None = None) -> Schedule:
    """A Schedule from a ``collcomm.schedule/1`` file; a bad file is one ScheduleError naming the
    file, the field and the limit."""
    limits = current_limits(limits)
    p = Path(path)
    text = read_bounded(p, what="schedule file", error=ScheduleError, limits=limits)
    try:
        return loads(text, limits)
    except ScheduleError as e:
        raise ScheduleError(f"{p.name}: {e}") from None


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
