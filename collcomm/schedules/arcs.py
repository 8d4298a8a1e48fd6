"""A growable set of directed arcs with integer capacities, kept as NumPy arrays.

The splitting and packing steps change capacities one arc at a time and run a
max-flow on the whole arc set after each tentative change; keeping the arcs in
arrays (with a (tail, head) -> slot index) lets a check copy one array and patch a
few slots instead of rebuilding a graph.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


class ArcStore:
    def __init__(self):
        self._tails = np.zeros(64, dtype=np.int64)
        self._heads = np.zeros(64, dtype=np.int64)
        self._caps = np.zeros(64, dtype=np.int64)
        self.m = 0
        self.slot_of: dict[tuple[int, int], int] = {}
        self.succ: dict[int, set[int]] = defaultdict(set)
        self.pred: dict[int, set[int]] = defaultdict(set)

    # ------------------------------------------------------------ arrays
    @property
    def tails(self) -> np.ndarray:
        return self._tails[:self.m]

    @property
    def heads(self) -> np.ndarray:
        return self._heads[:self.m]

    @property
    def caps(self) -> np.ndarray:
        return self._caps[:self.m]

    def slot(self, u: int, v: int) -> int:
        """The slot of arc (u, v), created with capacity 0 if new."""
        s = self.slot_of.get((u, v))
        if s is None:
            if self.m == len(self._caps):
                grow = len(self._caps)
                self._tails = np.concatenate([self._tails, np.zeros(grow, dtype=np.int64)])
                self._heads = np.concatenate([self._heads, np.zeros(grow, dtype=np.int64)])
                self._caps = np.concatenate([self._caps, np.zeros(grow, dtype=np.int64)])
            s = self.m
            self._tails[s], self._heads[s] = u, v
            self.slot_of[(u, v)] = s
            self.m += 1
        return s

    # ------------------------------------------------------------ capacities
    def cap(self, u: int, v: int) -> int:
        s = self.slot_of.get((u, v))
        return 0 if s is None else int(self._caps[s])

    def add(self, u: int, v: int, amount: int) -> None:
        s = self.slot(u, v)
        new = int(self._caps[s]) + amount
        assert new >= 0, f"capacity of arc {u}->{v} would become negative"
        self._caps[s] = new
        if new > 0:
            self.succ[u].add(v)
            self.pred[v].add(u)
        else:
            self.succ[u].discard(v)
            self.pred[v].discard(u)

    def copy(self) -> "ArcStore":
        other = ArcStore()
        other._tails, other._heads, other._caps = self._tails.copy(), self._heads.copy(), self._caps.copy()
        other.m = self.m
        other.slot_of = dict(self.slot_of)
        other.succ = defaultdict(set, {u: set(vs) for u, vs in self.succ.items()})
        other.pred = defaultdict(set, {v: set(us) for v, us in self.pred.items()})
        return other
