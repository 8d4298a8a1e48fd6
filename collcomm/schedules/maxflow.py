"""Maximum flow on integer capacities, in compiled code.

OR-Tools' push-relabel solver (``ortools.graph.python.max_flow``) does the work on
int64 capacities; networks whose capacities could overflow int64 fall back to
NetworkX on Python integers (exact, slower). Arcs are passed as NumPy arrays so a
network of a million arcs is built without a Python loop.
"""

from __future__ import annotations

import numpy as np
from ortools.graph.python import max_flow as _ortools_max_flow

from collcomm.errors import ScheduleError

# Sum of all finite capacities must stay below this for the compiled solver.
_INT64_SAFE = 1 << 60


class MaxFlowStats:
    """Counts solver calls (reported in schedule info and benchmarks)."""

    def __init__(self):
        self.calls = 0


STATS = MaxFlowStats()


def build_solver(n_nodes: int, tails, heads, caps):
    """An OR-Tools solver holding the arcs; a zero arc on the last node makes every node exist
    (OR-Tools sizes its graph by the arcs it is given)."""
    solver = _ortools_max_flow.SimpleMaxFlow()
    solver.add_arcs_with_capacity(
        np.append(np.asarray(tails, dtype=np.int32), np.int32(n_nodes - 1)),
        np.append(np.asarray(heads, dtype=np.int32), np.int32(n_nodes - 1)),
        np.append(np.asarray(caps, dtype=np.int64), np.int64(0)))
    return solver


def infinity_for(finite_caps: np.ndarray) -> int:
    """A capacity larger than any finite cut of a network with these finite arcs."""
    return int(finite_caps.sum()) + 1 if len(finite_caps) else 1


def max_flow(n_nodes: int, tails: np.ndarray, heads: np.ndarray, caps: np.ndarray, source: int, sink: int,
             want_source_side: bool = False) -> tuple[int, list[int] | None]:
    """Value of a maximum ``source``-``sink`` flow and, if asked, the source side of a minimum cut."""
    STATS.calls += 1
    caps = np.asarray(caps)
    total = int(caps.sum()) if len(caps) else 0
    if total >= _INT64_SAFE or caps.dtype == object:
        return _max_flow_exact(n_nodes, tails, heads, caps, source, sink, want_source_side)
    solver = build_solver(n_nodes, tails, heads, caps)
    status = solver.solve(int(source), int(sink))
    if status != solver.OPTIMAL:
        raise ScheduleError(f"max-flow solver failed with status {status}")
    side = solver.get_source_side_min_cut() if want_source_side else None
    return int(solver.optimal_flow()), side


def _max_flow_exact(n_nodes, tails, heads, caps, source, sink, want_source_side):
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(range(n_nodes))
    for t, h, c in zip(tails, heads, caps):
        t, h, c = int(t), int(h), int(c)
        if g.has_edge(t, h):
            g[t][h]["capacity"] += c
        else:
            g.add_edge(t, h, capacity=c)
    value, (reach, _) = nx.minimum_cut(g, int(source), int(sink))
    return int(value), (sorted(reach) if want_source_side else None)


def flows_to_sinks(n_nodes: int, tails: np.ndarray, heads: np.ndarray, caps: np.ndarray, source: int, sinks,
                   stop_below: int | None = None) -> list[tuple[int, int]]:
    """Max-flow values from ``source`` to each sink, as (sink, value) pairs, on one network built
    once and re-solved per sink; stops after the first value below ``stop_below``."""
    out = []
    caps = np.asarray(caps)
    total = int(caps.sum()) if len(caps) else 0
    if total >= _INT64_SAFE or caps.dtype == object:
        for v in sinks:
            STATS.calls += 1
            val, _ = _max_flow_exact(n_nodes, tails, heads, caps, source, v, False)
            out.append((v, val))
            if stop_below is not None and val < stop_below:
                break
        return out
    solver = build_solver(n_nodes, tails, heads, caps)
    for v in sinks:
        STATS.calls += 1
        status = solver.solve(int(source), int(v))
        if status != solver.OPTIMAL:
            raise ScheduleError(f"max-flow solver failed with status {status}")
        val = int(solver.optimal_flow())
        out.append((v, val))
        if stop_below is not None and val < stop_below:
            break
    return out


def min_flow_over_sinks(n_nodes: int, tails: np.ndarray, heads: np.ndarray, caps: np.ndarray, source: int,
                        sinks, want_source_side: bool = False, stop_below: int | None = None
                        ) -> tuple[int, int, list[int] | None]:
    """The smallest ``source``-``v`` max-flow over ``v`` in ``sinks``: (value, v, source side of its cut).

    With ``stop_below``, returns as soon as some sink's flow is below it."""
    results = flows_to_sinks(n_nodes, tails, heads, caps, source, sinks, stop_below=stop_below)
    v, value = min(results, key=lambda r: r[1])
    side = None
    if want_source_side:
        _, side = max_flow(n_nodes, tails, heads, caps, source, v, want_source_side=True)
    return value, v, side
