"""What switches can forward: the fabric a tree plan can actually use.

A switch forwards but cannot replicate: in a tree plan, what leaves a switch never
exceeds what enters it. On fabrics built from duplex links every switch receives as
much as it can send and nothing changes. Where one-way links let a switch send more
than it receives, the cut bound (which counts each rank's cut on its own) can be out
of reach for every tree plan. The best tree plan then uses some split of each
switch's egress, and the best split is the solution of a linear program:

    maximise x  subject to, for every rank v, a flow that delivers N·x to v from a
    source feeding every rank x, where each switch out-link e carries at most o_e,
    0 <= o_e <= c_e, and every switch's sum of o over its out-links is at most what
    its in-links can bring (c for links from ranks, o for links from switches).

The LP is solved in floating point (OR-Tools GLOP); its split is rounded to nearby
fractions with small denominators, settled so that no switch sends more than it receives (exactly, by
:func:`settle`), and the exact optimum of the resulting fabric is what the
generator plans for. The plan is then optimal up to that rounding, which is tried
with growing denominators until it matches the LP's value to 1e-9 (the best found
is used otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from collcomm.errors import TopologyError
from collcomm.topology.model import Topology


@dataclass(frozen=True)
class Forwarding:
    capacity: dict[tuple[str, str], Fraction]
    scaled_switches: list[str]
    lp_x_star: float | None  # the LP's per-rank throughput (GB/s) when switches had to be scaled


def _over_switches(topo: Topology, cap: dict) -> list[str]:
    ingress = {w: Fraction(0) for w in topo.switches}
    egress = {w: Fraction(0) for w in topo.switches}
    for (u, v), bw in cap.items():
        if u in egress:
            egress[u] += bw
        if v in ingress:
            ingress[v] += bw
    return [w for w in topo.switches if egress[w] > ingress[w]]


def forwardable_capacity(topo: Topology, exact_x=None) -> Forwarding:
    """The capacities a tree plan can use (see the module docstring).

    ``exact_x(capacity) -> Fraction`` computes the exact per-rank optimum of a capacity
    map (passed in by the caller to keep this module free of the max-flow code)."""
    if not _over_switches(topo, topo.capacity):
        return Forwarding(dict(topo.capacity), [], None)
    lp_x, split = _best_split_lp(topo)
    best = None
    if split is not None and exact_x is not None:
        # LP vertices have small denominators: recover them, smallest first, and stop at the LP's value.
        for denom in (1, 2, 3, 4, 6, 8, 12, 16, 24, 60, 120, 360, 720, 5040, 55440, 720720):
            cap = dict(topo.capacity)
            for e, value in split.items():
                cap[e] = min(topo.capacity[e], Fraction(value).limit_denominator(denom))
            cap = settle(topo, cap)
            x = exact_x(cap)
            if best is None or x > best[0]:
                best = (x, cap)
            if float(x) >= lp_x * (1 - 1e-9):
                break
    cap = best[1] if best is not None else settle(topo, dict(topo.capacity))
    scaled = [w for w in topo.switches
              if any(cap[e] < topo.capacity[e] for e in topo.capacity if e[0] == w)]
    return Forwarding(cap, scaled, lp_x)


def _best_split_lp(topo: Topology) -> tuple[float | None, dict | None]:
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:  # pragma: no cover - GLOP ships with OR-Tools
        return None, None
    switches = set(topo.switches)
    edges = list(topo.capacity.items())
    inf = solver.infinity()
    x = solver.NumVar(0, inf, "x")
    o = {e: solver.NumVar(0, float(bw), f"o{i}") for i, (e, bw) in enumerate(edges) if e[0] in switches}
    for w in topo.switches:
        out = [o[e] for e, _ in edges if e[0] == w]
        into = [o[e] if e in o else float(bw) for e, bw in edges if e[1] == w]
        if out:
            solver.Add(sum(out) <= sum(into))
    n = topo.num_ranks
    for v in topo.compute:
        f = {e: solver.NumVar(0, float(bw), "") for e, bw in edges}
        for e, var in o.items():
            solver.Add(f[e] <= var)
        for u in topo.order:
            if u == v:
                continue
            balance = sum(f[e] for e, _ in edges if e[1] == u) - sum(f[e] for e, _ in edges if e[0] == u)
            solver.Add(balance + (x if u in topo.node and topo.is_compute(u) else 0) == 0)
    # Prefer keeping capacity where it costs no throughput.
    solver.Maximize(x + 1e-7 * sum(var * (1.0 / float(topo.capacity[e])) for e, var in o.items()))
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        return None, None
    return x.solution_value(), {e: var.solution_value() for e, var in o.items()}


def settle(topo: Topology, capacity: dict[tuple[str, str], Fraction]) -> dict[tuple[str, str], Fraction]:
    """Scale each switch's out-links by the largest f_w <= 1 with f_w·egress(w) <= what its
    in-links bring (f = 1 for ranks): the greatest fixed point, found exactly by holding the
    switches that ever exceed their ingress tight and solving the linear system in Fractions."""
    switches = list(topo.switches)
    if not switches:
        return dict(capacity)
    is_switch = set(switches)
    egress = {w: Fraction(0) for w in switches}
    in_edges: dict[str, list[tuple[str, Fraction]]] = {w: [] for w in switches}
    for (u, v), bw in capacity.items():
        if u in is_switch:
            egress[u] += bw
        if v in is_switch:
            in_edges[v].append((u, bw))
    f = {w: Fraction(1) for w in switches}

    def ingress(w):
        return sum((bw * f.get(u, 1) for u, bw in in_edges[w]), Fraction(0))

    tight: list[str] = []
    while True:
        over = [w for w in switches if w not in tight and egress[w] * f[w] > ingress(w)]
        if not over:
            break
        tight += over
        f.update(_solve_tight(tight, egress, in_edges, f, topo.name))
    return {e: (bw * f[e[0]] if e[0] in is_switch else bw) for e, bw in capacity.items()}


def _solve_tight(tight, egress, in_edges, f, name) -> dict[str, Fraction]:
    """Solve egress(w)·f_w = sum over in-links of c(u, w)·f_u for the tight switches (others fixed)."""
    idx = {w: i for i, w in enumerate(tight)}
    n = len(tight)
    rows = []
    for w in tight:
        row = [Fraction(0)] * (n + 1)
        row[idx[w]] += egress[w]
        for u, bw in in_edges[w]:
            if u in idx:
                row[idx[u]] -= bw
            else:
                row[n] += bw * f.get(u, 1)
        rows.append(row)
    for col in range(n):  # Gauss-Jordan elimination, exact
        pivot = next((r for r in range(col, n) if rows[r][col] != 0), None)
        if pivot is None:
            raise TopologyError(f"{name}: switches {', '.join(tight[:4])} pass data only among themselves "
                                f"through one-way links; their forwarding capacity is undefined")
        rows[col], rows[pivot] = rows[pivot], rows[col]
        p = rows[col][col]
        rows[col] = [x / p for x in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col])]
    return {w: min(Fraction(1), max(Fraction(0), rows[idx[w]][n])) for w in tight}
