"""Switch removal by edge splitting, keeping the optimum.

Switches forward but neither produce nor consume data, so a tree can only pass
through them. With integer edge slots c(e) and k trees per root, the plan exists iff
every rank v receives a max-flow of N·k from a super-source that feeds each rank k
(Edmonds / Bang-Jensen–Frank–Jackson). Splitting replaces m units of a path
u -> w -> t through switch w by a direct logical edge u -> t, as long as that
condition still holds; once every switch is isolated, the fabric is a graph on the
ranks alone, each logical edge remembering the physical paths it stands for.

The largest admissible m is found with the condition itself (one max-flow per rank
orbit, binary search on m: the condition is monotone in m). With a symmetry group,
a whole orbit of triples (g·u, g·w, g·t) is split at once so the result stays
symmetric, and one sink per rank orbit suffices. Two heuristics shape the result
without touching optimality: switches are split in order of increasing degree
(NICs before the fabric switch behind them), and a first pass spreads each in-edge
evenly over the other hosts, one rank per host (nearest position first), so trees
come out shallow (a star across boxes rather than a chain through them) and a NIC
carries one connection per remote host in each phase, not one per remote rank (the
rank-by-rank spread made 19-20 trees per phase and 2-4 TCP connections per NIC on
the two-box fabric without one NIC, which ran at 0.84 of its optimum against the
healthy plan's 0.92; by host: 10 trees, one connection). Targets on the rank's own
host, or without a host, are spread over one by one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from collcomm.errors import ScheduleError
from collcomm.schedules.arcs import ArcStore
from collcomm.schedules.optimum import IntFabric, TreeBudget, rooted_flows
from collcomm.topology.symmetry import SymmetryGroup

Path = tuple[int, ...]


@dataclass
class LogicalGraph:
    """Ranks joined by logical edges: ``arcs`` holds the slots of each (u, v) between ranks
    and ``bundles[(u, v)]`` the physical paths (node indices) with the slots each carries."""

    N: int
    k: int
    arcs: ArcStore
    bundles: dict[tuple[int, int], deque]
    symmetric: bool
    stats: dict = field(default_factory=dict)


def take_slots(bundle: deque, m: int) -> list[tuple[Path, int]]:
    """Remove ``m`` slots from the front of a bundle list."""
    out = []
    while m > 0:
        path, amount = bundle[0]
        use = min(amount, m)
        out.append((path, use))
        m -= use
        if use == amount:
            bundle.popleft()
        else:
            bundle[0] = (path, amount - use)
    return out


def _join(first: list[tuple[Path, int]], second: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
    """Pair the slots of u->w paths with those of w->t paths (equal totals) into u->t paths."""
    out = []
    i = j = 0
    a = list(first)
    b = list(second)
    while i < len(a) and j < len(b):
        (p, x), (q, y) = a[i], b[j]
        use = min(x, y)
        out.append((p + q[1:], use))
        a[i] = (p, x - use)
        b[j] = (q, y - use)
        if x == use:
            i += 1
        if y == use:
            j += 1
    return out


class _Splitter:
    def __init__(self, fab: IntFabric, budget: TreeBudget, group: SymmetryGroup, strict: bool):
        self.fab = fab
        self.N, self.n, self.k = fab.N, fab.n, budget.k
        self.group = group
        self.arcs = ArcStore()
        self.bundles: dict[tuple[int, int], deque] = {}
        for u, v, c in zip(fab.tails.tolist(), fab.heads.tolist(), budget.slots.tolist()):
            if c > 0:
                self.arcs.add(u, v, c)
                self.bundles[(u, v)] = deque([((u, v), c)])
        self.symmetric = True
        self.strict = strict
        self.checks = 0
        self.flows = 0
        self.lb: dict[int, int] = {}  # lower bounds on each sink's max-flow in the current state
        self._host_keys(fab)

    def _host_keys(self, fab: IntFabric) -> None:
        topo = fab.topo
        hosts: dict[str, int] = {}
        pos_in_host: dict[str, int] = {}
        self.host = np.full(self.n, -1, dtype=np.int64)
        self.pos = np.zeros(self.n, dtype=np.int64)
        for node in topo.nodes:
            if node.host is None:
                continue
            h = hosts.setdefault(node.host, len(hosts))
            self.host[topo.index[node.id]] = h
            self.pos[topo.index[node.id]] = pos_in_host.get(node.host, 0)
            pos_in_host[node.host] = pos_in_host.get(node.host, 0) + 1
        self.n_hosts = max(len(hosts), 1)
        self.n_pos = max(pos_in_host.values(), default=1)

    def _spread_group(self, u: int, t: int):
        """What the spread pass spreads ``u``'s slots over: the other hosts (one NIC reaches
        another box through one peer, so a box pair costs one connection per NIC, not one per
        rank), and single ranks on ``u``'s own host or where no host is known."""
        ht = int(self.host[t])
        return ht if ht >= 0 and ht != int(self.host[u]) else ("rank", t)

    def _target_order(self, u: int, targets) -> list[int]:
        hu, pu = int(self.host[u]), int(self.pos[u])

        def key(t: int):
            ht = int(self.host[t])
            same = hu >= 0 and ht == hu
            return (same, (int(self.pos[t]) - pu) % self.n_pos, (ht - hu) % self.n_hosts, t)

        return sorted(targets, key=key)

    # ---------------------------------------------------------------- condition
    def _sinks(self):
        return self.group.rank_representatives if self.symmetric else range(self.N)

    def _feasible(self, triples: list[tuple[int, int, int]], m: int) -> bool:
        """Does splitting ``m`` units of every triple keep every rank's max-flow at N·k?

        A split of m units lowers any cut by at most m, so a sink whose known lower bound
        stays above N·k after ``m * len(triples)`` is safe without a max-flow."""
        self.checks += 1
        need = self.N * self.k
        drop = m * len(triples)
        todo = [v for v in self._sinks() if self.lb.get(v, -1) - drop < need]
        if not todo:
            return True
        arcs = self.arcs
        # New arcs (u, t) may have no slot yet: create them (capacity 0 is harmless).
        for u, w, t in triples:
            arcs.slot(u, t)
        caps = arcs.caps.copy()
        for u, w, t in triples:
            caps[arcs.slot_of[(u, w)]] -= m
            caps[arcs.slot_of[(w, t)]] -= m
            caps[arcs.slot_of[(u, t)]] += m
        results = rooted_flows(self.n, self.N, arcs.tails, arcs.heads, caps, self.k, todo, stop_below=need)
        self.flows += len(results)
        for v, value in results:
            # the current state carries at least what the tentative (split) state carries
            self.lb[v] = max(self.lb.get(v, -1), value)
        return len(results) == len(todo) and all(value >= need for _, value in results)

    def _apply(self, triples: list[tuple[int, int, int]], m: int) -> None:
        for u, w, t in triples:
            self.arcs.add(u, w, -m)
            self.arcs.add(w, t, -m)
            self.arcs.add(u, t, m)
            joined = _join(take_slots(self.bundles[(u, w)], m), take_slots(self.bundles[(w, t)], m))
            self.bundles.setdefault((u, t), deque()).extend(joined)
        drop = m * len(triples)
        for v in self.lb:
            self.lb[v] -= drop

    def _largest_split(self, triples: list[tuple[int, int, int]], m_hi: int) -> int:
        if m_hi <= 0:
            return 0
        if self._feasible(triples, m_hi):
            return m_hi
        lo, hi = 0, m_hi  # lo feasible, hi not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._feasible(triples, mid):
                lo = mid
            else:
                hi = mid
        return lo

    def _orbit(self, triple: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        if not self.symmetric:
            return [triple]
        rows = self.group.elements[:, list(triple)]
        return list(dict.fromkeys(tuple(int(x) for x in r) for r in rows))

    def _bound(self, triples: list[tuple[int, int, int]]) -> int:
        use: dict[tuple[int, int], int] = {}
        for u, w, t in triples:
            use[(u, w)] = use.get((u, w), 0) + 1
            use[(w, t)] = use.get((w, t), 0) + 1
        return min(self.arcs.cap(*e) // c for e, c in use.items())

    # ---------------------------------------------------------------- passes
    def _split_pass(self, w: int, spread: bool) -> None:
        done: set[tuple[int, int, int]] = set()
        for u in sorted(self.arcs.pred[w]):
            targets = [t for t in self.arcs.succ[w] if t != u]
            if not targets:
                continue
            ordered = self._target_order(u, targets)
            unit = None
            taken: dict = {}  # spread pass: slots of u already split towards each host
            if spread:
                others = [t for t in ordered if not (self.host[u] >= 0 and self.host[t] == self.host[u])]
                groups = {self._spread_group(u, t) for t in (others or ordered)}
                unit = math.ceil(self.arcs.cap(u, w) / max(len(groups), 1))
            for t in ordered:
                if self.arcs.cap(u, w) == 0:
                    break
                if self.arcs.cap(w, t) == 0 or (u, w, t) in done:
                    continue
                orbit = self._orbit((u, w, t))
                group = self._spread_group(u, t)
                m_hi = self._bound(orbit)
                if unit is not None:
                    m_hi = min(m_hi, unit - taken.get(group, 0))
                    if m_hi <= 0:
                        continue  # u's share for that host is split: left to the second pass
                done.update(orbit)
                m = self._largest_split(orbit, m_hi)
                if m > 0:
                    self._apply(orbit, m)
                    taken[group] = taken.get(group, 0) + m

    def _leftover(self, switches) -> bool:
        """Is some path u -> w -> t (u != t) still unsplit at one of ``switches``?"""
        return any(u != t for w in switches for u in self.arcs.pred[w] for t in self.arcs.succ[w])

    def run(self) -> LogicalGraph:
        pending = list(range(self.N, self.n))
        degree = {w: len(self.arcs.pred[w]) + len(self.arcs.succ[w]) for w in pending}
        pending.sort(key=lambda w: (degree[w], w))
        processed: set[int] = set()
        for w0 in pending:
            if w0 in processed:
                continue
            orbit = sorted(set(int(x) for x in self.group.elements[:, w0])) if self.symmetric else [w0]
            processed.update(orbit)
            for spread in (True, False):
                self._split_pass(w0, spread)
            if self._leftover(orbit) and self.symmetric and not self.group.trivial:
                # The symmetric splits could not empty the orbit: give up (strict) or go on switch by switch.
                if self.strict:
                    return None
                self.symmetric = False
                for w in orbit:
                    for spread in (True, False):
                        self._split_pass(w, spread)
            self._drop(orbit)
        logical = ArcStore()
        for (u, v), s in self.arcs.slot_of.items():
            c = int(self.arcs.caps[s])
            if c > 0:
                assert u < self.N and v < self.N, "a switch was left with capacity"
                logical.add(u, v, c)
        bundles = {e: b for e, b in self.bundles.items() if e[0] < self.N and e[1] < self.N and b}
        return LogicalGraph(self.N, self.k, logical, bundles, self.symmetric,
                            {"split_checks": self.checks, "split_flows": self.flows})

    def _drop(self, switches) -> None:
        """Remove what is left at split switches (dead ends and loops only) and re-check."""
        dropped = False
        for w in switches:
            for u in list(self.arcs.pred[w]):
                self.arcs.add(u, w, -self.arcs.cap(u, w))
                self.bundles[(u, w)] = deque()
                dropped = True
            for t in list(self.arcs.succ[w]):
                self.arcs.add(w, t, -self.arcs.cap(w, t))
                self.bundles[(w, t)] = deque()
                dropped = True
        if dropped:
            self.lb.clear()  # dropped capacity can lower any cut
        if dropped and not self._feasible([], 0):
            raise ScheduleError("switch splitting left capacity that the plan needs; "
                                "this fabric breaks an assumption of the generator")


def split_switches(fab: IntFabric, budget: TreeBudget, group: SymmetryGroup,
                   strict: bool = False) -> LogicalGraph | None:
    """Remove every switch of ``fab`` by edge splitting under ``budget``'s slots and k.

    With ``strict``, returns None as soon as the splits cannot stay symmetric under ``group``
    (so the caller can try a smaller group); otherwise finishes without symmetry."""
    return _Splitter(fab, budget, group, strict).run()
