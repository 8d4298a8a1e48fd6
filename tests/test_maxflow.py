"""The compiled max-flow wrapper against NetworkX, including its exact big-integer path."""

import networkx as nx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from collcomm.schedules.maxflow import flows_to_sinks, max_flow, min_flow_over_sinks


@st.composite
def networks(draw):
    n = draw(st.integers(2, 8))
    m = draw(st.integers(0, 20))
    tails = draw(st.lists(st.integers(0, n - 1), min_size=m, max_size=m))
    heads = draw(st.lists(st.integers(0, n - 1), min_size=m, max_size=m))
    caps = draw(st.lists(st.integers(0, 50), min_size=m, max_size=m))
    return n, np.array(tails, dtype=np.int64), np.array(heads, dtype=np.int64), np.array(caps, dtype=np.int64)


def reference(n, tails, heads, caps, s, t):
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    for a, b, c in zip(tails.tolist(), heads.tolist(), caps.tolist()):
        if g.has_edge(a, b):
            g[a][b]["capacity"] += c
        else:
            g.add_edge(a, b, capacity=c)
    return nx.maximum_flow_value(g, s, t)


@settings(max_examples=200, deadline=None)
@given(networks())
def test_values_match_networkx(net):
    n, tails, heads, caps = net
    for t in range(1, n):
        want = reference(n, tails, heads, caps, 0, t)
        value, side = max_flow(n, tails, heads, caps, 0, t, want_source_side=True)
        assert value == want
        # the returned source side is a minimum cut: its capacity equals the flow
        inside = set(side)
        assert 0 in inside and t not in inside
        assert sum(c for a, b, c in zip(tails, heads, caps) if a in inside and b not in inside) == want
        # the exact (Python integer) path agrees
        exact, _ = max_flow(n, tails, heads, caps.astype(object), 0, t)
        assert exact == want
    results = flows_to_sinks(n, tails, heads, caps, 0, range(1, n))
    assert [v for v, _ in results] == list(range(1, n))
    assert all(val == reference(n, tails, heads, caps, 0, v) for v, val in results)
    low, v, _ = min_flow_over_sinks(n, tails, heads, caps, 0, range(1, n))
    assert low == min(val for _, val in results)


def test_huge_capacities_use_exact_integers():
    big = 1 << 70
    value, _ = max_flow(3, np.array([0, 1]), np.array([1, 2]), np.array([big, big + 5], dtype=object), 0, 2)
    assert value == big
