"""Packing k spanning out-trees per root on a switch-free logical graph.

Trees are grown in *classes*: a class is a partial tree (root, vertex set, edges)
with a multiplicity C, standing for C identical trees. A partial packing can be
completed iff every rank v receives a max-flow of sum(C) from a super-source that
feeds each incomplete class C, class i entering the graph at any vertex it already
spans (a generalisation of Edmonds' branching theorem). A class grows by an edge
(x, y), x inside, y outside, taken by as many of its copies as that condition
allows; the copies that do not fit split off and continue later.

Two ways to test a step:

* trivial symmetry: the exact slack of edge (x, y) for class j is one max-flow from x
  to y, with x feeding every other incomplete class its multiplicity, minus those
  multiplicities (only cuts that class j already enters lose capacity);
* a symmetry group acting freely on the ranks: classes are grown for one root per
  orbit and every step is applied to all images at once; the condition is checked
  for one sink per rank orbit. Steps are proposed in batches (a breadth-first layer,
  one edge per new vertex, all copies) and halved on failure, so a well-behaved
  fabric is packed with a handful of max-flows; edges that fit only some copies
  split the class as above.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from collcomm.errors import ScheduleError
from collcomm.schedules.maxflow import STATS, build_solver, infinity_for, min_flow_over_sinks
from collcomm.schedules.splitting import LogicalGraph
from collcomm.topology.symmetry import SymmetryGroup


@dataclass
class TreeClass:
    root: int
    count: int
    edges: list[tuple[int, int]] = field(default_factory=list)
    depth: dict[int, int] = field(default_factory=dict)

    @staticmethod
    def start(root: int, count: int) -> "TreeClass":
        return TreeClass(root, count, [], {root: 0})

    def copy(self, count: int) -> "TreeClass":
        return TreeClass(self.root, count, list(self.edges), dict(self.depth))

    def add(self, x: int, y: int) -> None:
        self.edges.append((x, y))
        self.depth[y] = self.depth[x] + 1


class PackingStuck(ScheduleError):
    pass


class _Packer:
    def __init__(self, lg: LogicalGraph, group: SymmetryGroup):
        self.N, self.k = lg.N, lg.k
        self.arcs = lg.arcs.copy()  # packing consumes slots; the logical graph stays as split
        self.group = group
        self.elements = group.elements[:, :self.N]  # actions on the ranks
        self.G = group.order
        self.reps = group.rank_representatives
        self.done: list[TreeClass] = []  # complete base classes
        self.queue: deque[TreeClass] = deque(TreeClass.start(r, self.k) for r in self.reps)
        self.flows = 0

    # ------------------------------------------------------------------ helpers
    def _candidates(self, cls: TreeClass, skip: set) -> list[tuple[int, int]]:
        inside = cls.depth
        out = []
        for x in inside:
            for y in self.arcs.succ[x]:
                if y not in inside and (x, y) not in skip:
                    out.append((x, y))
        out.sort(key=lambda e: (inside[e[0]], -self.arcs.cap(*e), e[0], e[1]))
        return out

    def _class_arcs(self, classes: list[TreeClass], first_node: int) -> tuple[np.ndarray, np.ndarray]:
        """Arcs class-node -> every vertex of the class, for each class and each image."""
        tails, heads = [], []
        node = first_node
        for cls in classes:
            verts = np.fromiter(cls.depth, dtype=np.int64, count=len(cls.depth))
            imgs = self.elements[:, verts]  # (G, L)
            heads.append(imgs.reshape(-1))
            tails.append(np.repeat(np.arange(node, node + self.G), len(verts)))
            node += self.G
        if not tails:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(tails), np.concatenate(heads)

    # ------------------------------------------------------------------ symmetric (global) test
    def _global_ok(self, classes: list[TreeClass], cap_delta: dict[int, int]) -> bool:
        """Is the packing state (incomplete ``classes``, each with all its images, plus the
        logical capacities changed by ``cap_delta``) completable?"""
        incomplete = [c for c in classes if len(c.depth) < self.N]
        need = sum(c.count for c in incomplete) * self.G
        caps = self.arcs.caps.copy()
        for s, d in cap_delta.items():
            caps[s] += d
        if (caps < 0).any():
            return False
        if need == 0:
            return True
        n_cls = len(incomplete) * self.G
        src = self.N + n_cls
        ct, ch = self._class_arcs(incomplete, self.N)
        inf = infinity_for(caps) + need
        tails = np.concatenate([self.arcs.tails, ct, np.full(n_cls, src)])
        heads = np.concatenate([self.arcs.heads, ch, np.arange(self.N, self.N + n_cls)])
        counts = np.repeat(np.array([c.count for c in incomplete], dtype=np.int64), self.G)
        all_caps = np.concatenate([caps, np.full(len(ct), inf, dtype=np.int64), counts])
        self.flows += len(self.reps)
        value, _, _ = min_flow_over_sinks(src + 1, tails, heads, all_caps, src, self.reps, stop_below=need)
        return value >= need

    def _image_delta(self, edges: list[tuple[int, int]], m: int) -> dict[int, int] | None:
        """Capacity changes when every image of ``edges`` takes ``m`` copies (None: over capacity)."""
        delta: dict[int, int] = {}
        for x, y in edges:
            for gx, gy in zip(self.elements[:, x].tolist(), self.elements[:, y].tolist()):
                s = self.arcs.slot_of.get((gx, gy))
                if s is None:
                    return None
                delta[s] = delta.get(s, 0) - m
        caps = self.arcs.caps
        if any(caps[s] + d < 0 for s, d in delta.items()):
            return None
        return delta

    def _commit(self, cls: TreeClass, edges: list[tuple[int, int]], m: int) -> None:
        for x, y in edges:
            for gx, gy in zip(self.elements[:, x].tolist(), self.elements[:, y].tolist()):
                self.arcs.add(gx, gy, -m)
            cls.add(x, y)

    def _grow_symmetric(self, cls: TreeClass) -> None:
        failed: set[tuple[int, int]] = set()
        while len(cls.depth) < self.N:
            cands = self._candidates(cls, failed)
            # A breadth-first batch: one edge per new vertex, all copies of the class.
            batch: list[tuple[int, int]] = []
            taken: set[int] = set()
            usage: dict[int, int] = {}
            for x, y in cands:
                if y in taken:
                    continue
                slots = [self.arcs.slot_of[(gx, gy)] for gx, gy in
                         zip(self.elements[:, x].tolist(), self.elements[:, y].tolist())]
                if any(self.arcs.caps[s] < (usage.get(s, 0) + 1) * cls.count for s in slots):
                    continue
                for s in slots:
                    usage[s] = usage.get(s, 0) + 1
                batch.append((x, y))
                taken.add(y)
            if not batch:
                self._partial_step(cls)
                continue
            while True:
                trial = cls.copy(cls.count)
                for x, y in batch:
                    trial.add(x, y)
                delta = self._image_delta(batch, cls.count)
                if delta is not None and self._global_ok(self._others(cls) + [trial], delta):
                    self._commit(cls, batch, cls.count)
                    break
                if len(batch) == 1:
                    failed.add(batch[0])
                    break
                batch = batch[:len(batch) // 2]

    def _others(self, cls: TreeClass) -> list[TreeClass]:
        return [c for c in self.queue if c is not cls]

    def _partial_step(self, cls: TreeClass) -> None:
        """No edge fits every copy: take the edge that fits the most copies, splitting the class."""
        for x, y in self._candidates(cls, set()):
            hi = min(cls.count - 1, self.arcs.cap(x, y))
            lo = 0
            # largest m in [1, hi] whose state is completable (monotone in m)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                trial = cls.copy(mid)
                trial.add(x, y)
                rest = cls.copy(cls.count - mid)
                delta = self._image_delta([(x, y)], mid)
                if delta is not None and self._global_ok(self._others(cls) + [trial, rest], delta):
                    lo = mid
                else:
                    hi = mid - 1
            if lo > 0:
                rest = cls.copy(cls.count - lo)
                self.queue.append(rest)
                cls.count = lo
                self._commit(cls, [(x, y)], lo)
                return
        raise PackingStuck("tree packing found no admissible edge; the fabric breaks an assumption "
                           "of the generator")

    # ------------------------------------------------------------------ sequential (exact slack)
    def _grow_sequential(self, cls: TreeClass) -> None:
        while len(cls.depth) < self.N:
            others = [c for c in self.queue if c is not cls and len(c.depth) < self.N]
            solver, src, feed_arc, total_other = self._slack_network(cls, others)
            best = None
            for x, y in self._candidates(cls, set()):
                c_xy = self.arcs.cap(x, y)
                solver.set_arc_capacity(feed_arc[x], self._inf)
                self.flows += 1
                STATS.calls += 1
                solver.solve(src, y)
                solver.set_arc_capacity(feed_arc[x], 0)
                slack = int(solver.optimal_flow()) - total_other
                m = min(cls.count, c_xy, slack)
                if m > 0 and (best is None or m > best[0]):
                    best = (m, x, y)
                if m == cls.count:
                    break
            if best is None:
                raise PackingStuck("tree packing found no admissible edge; the fabric breaks an "
                                   "assumption of the generator")
            m, x, y = best
            if m < cls.count:
                self.queue.append(cls.copy(cls.count - m))
                cls.count = m
            self.arcs.add(x, y, -m)
            cls.add(x, y)

    def _slack_network(self, cls: TreeClass, others: list[TreeClass]):
        """x* feeds every other incomplete class its count and (switched on per candidate) the
        tail x of the candidate edge; the flow to y minus the feeds is the edge's slack."""
        n_cls = len(others)
        src = self.N + n_cls
        ct, ch = self._class_arcs(others, self.N)
        caps = self.arcs.caps
        total_other = sum(c.count for c in others)
        self._inf = infinity_for(caps) + total_other + 1
        verts = np.fromiter(cls.depth, dtype=np.int64, count=len(cls.depth))
        tails = np.concatenate([self.arcs.tails, ct, np.full(n_cls, src), np.full(len(verts), src)])
        heads = np.concatenate([self.arcs.heads, ch, np.arange(self.N, src), verts])
        all_caps = np.concatenate([caps, np.full(len(ct), self._inf, dtype=np.int64),
                                   np.array([c.count for c in others], dtype=np.int64),
                                   np.zeros(len(verts), dtype=np.int64)])
        solver = build_solver(src + 1, tails, heads, all_caps)
        first_feed = len(tails) - len(verts)
        feed_arc = {int(v): first_feed + i for i, v in enumerate(verts)}
        return solver, src, feed_arc, total_other

    # ------------------------------------------------------------------ driver
    def run(self) -> list[TreeClass]:
        grow = self._grow_sequential if self.G == 1 else self._grow_symmetric
        while self.queue:
            cls = self.queue[0]
            grow(cls)
            self.queue.popleft()
            self.done.append(cls)
        # Expand every base class into its images.
        out = []
        for cls in self.done:
            for g in range(self.G):
                e = self.elements[g]
                out.append(TreeClass(int(e[cls.root]), cls.count, [(int(e[x]), int(e[y])) for x, y in cls.edges]))
        return out


def pack_trees(lg: LogicalGraph, group: SymmetryGroup) -> tuple[list[TreeClass], dict]:
    """k spanning out-trees per rank (in classes with multiplicities) within ``lg``'s slots."""
    packer = _Packer(lg, group)
    classes = packer.run()
    return classes, {"packing_flows": packer.flows}
