"""The topology model, its JSON format and validation, presets and symmetry."""

import json
from fractions import Fraction

import numpy as np
import pytest

from collcomm.errors import TopologyError
from collcomm.topology import Link, Node, Topology, dumps, loads, make_preset, symmetry_group
from collcomm.topology import presets as P
from collcomm.topology.symmetry import verify_automorphism

SMALL_PRESETS = [
    P.star(8), P.ring(8), P.ring(8, bidirectional=False), P.torus2d(4, 4), P.hypercube(3), P.fully_connected(4),
    P.leaf_spine(4, 4, 2, 1, 2), P.two_clusters(), P.dgx_a100(1), P.dgx_a100(2), P.dgx_h100(2), P.mi250(1),
    P.mi250(2),
]


def doc(nodes, links, **extra):
    return json.dumps({"format": "collcomm.topology/1", "name": "t", "nodes": nodes, "links": links, **extra})


def two_ranks(**link):
    return doc([{"id": "a", "kind": "compute"}, {"id": "b", "kind": "compute"}],
               [{"src": "a", "dst": "b", "bandwidth": 1, **link}])


@pytest.mark.parametrize("topo", SMALL_PRESETS, ids=lambda t: t.name)
def test_json_round_trip_keeps_everything(topo):
    back = loads(dumps(topo))
    assert back == topo
    assert back.capacity == topo.capacity
    assert back.compute == topo.compute
    assert back.latency_us == topo.latency_us
    assert [n.host for n in back.nodes] == [n.host for n in topo.nodes]
    assert len(back.automorphisms) == len(topo.automorphisms)


def test_bandwidths_are_exact():
    t = loads(doc([{"id": "a"}, {"id": "b"}, {"id": "c"}],
                  [{"src": "a", "dst": "b", "bandwidth": "25/2"}, {"src": "b", "dst": "c", "bandwidth": 0.1},
                   {"src": "c", "dst": "a", "bandwidth": "12.5"}]))
    assert t.capacity[("a", "b")] == Fraction(25, 2)
    assert t.capacity[("b", "c")] == Fraction(1, 10)
    assert t.capacity[("a", "c")] == Fraction(25, 2)
    assert isinstance(t.capacity[("b", "c")], Fraction)


def test_parallel_links_add_up_and_one_way_links_have_one_direction():
    t = Topology("p", [Node("a"), Node("b")],
                 [Link("a", "b", Fraction(1)), Link("a", "b", Fraction(2)), Link("b", "a", Fraction(5), duplex=False)])
    assert t.capacity[("a", "b")] == 3
    assert t.capacity[("b", "a")] == 8


@pytest.mark.parametrize("text, needle", [
    (two_ranks(bandwidth=0), "link 0 (a -> b): bandwidth must be positive"),
    (two_ranks(bandwidth=-3), "link 0 (a -> b): bandwidth must be positive"),
    (two_ranks(bandwidth="fast"), "link 0 (a -> b): bandwidth must be a number"),
    (two_ranks(bandwidth=True), "link 0 (a -> b): bandwidth must be a number"),
    (doc([{"id": "a"}, {"id": "b"}], [{"src": "a", "dst": "zz", "bandwidth": 1}]), "unknown node 'zz'"),
    (doc([{"id": "a"}, {"id": "a"}], []), "node 1: duplicate id 'a'"),
    (doc([{"id": "s", "kind": "switch"}], []), "no compute node"),
    (doc([{"id": "a", "kind": "gpu"}], []), "kind must be 'compute' or 'switch'"),
    (doc([{"id": "a"}, {"id": "b"}], [{"src": "a", "dst": "b", "bandwidth": 1, "duplex": False}]), "cannot reach"),
    (doc([{"id": "a"}, {"id": "b"}, {"id": "c"}], [{"src": "a", "dst": "b", "bandwidth": 1}]),
     "cannot reach compute node 'c'"),
    (doc([{"id": "a"}], [{"src": "a", "dst": "a", "bandwidth": 1}]), "cannot connect 'a' to itself"),
    (doc([{"id": "a"}], [{"src": "a", "bandwidth": 1}]), "link 0: missing 'dst'"),
    (two_ranks(latency_us=-1), "latency_us must be a finite number >= 0"),
    ("{not json", "not valid JSON"),
    (json.dumps({"format": "other/9"}), "topology format must be"),
    (json.dumps([1, 2]), "must hold a JSON object"),
    (doc([{"id": "a"}, {"id": "b"}], [{"src": "a", "dst": "b", "bandwidth": 1}], automorphisms=[{"a": "q"}]),
     "automorphism 0: unknown node 'q'"),
])
def test_bad_input_is_rejected_with_a_message_naming_it(text, needle):
    with pytest.raises(TopologyError) as err:
        loads(text)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_a_wrong_automorphism_hint_is_rejected():
    t = P.two_clusters()
    with pytest.raises(TopologyError, match="maps to"):
        verify_automorphism(t, {"a0": "a1", "a1": "a0"})  # a0 carries the inter-cluster link, a1 does not
    assert verify_automorphism(t, {"a1": "a2", "a2": "a1"}) == {"a1": "a2", "a2": "a1"}


def test_dgx_a100_structure():
    t = P.dgx_a100(2)
    assert t.num_ranks == 16
    assert all(t.ingress(g) == 325 and t.egress(g) == 325 for g in t.compute)
    assert t.capacity[("box0.gpu0", "box0.nvswitch")] == 300
    assert ("box1.nic3", "ib1") in t.capacity and ("box1.nic3", "ib0") not in t.capacity
    assert P.dgx_a100(1).switches == ("box0.nvswitch",)


def test_mi250_structure():
    t = P.mi250(2)
    assert t.num_ranks == 32
    for g in t.compute:
        assert t.egress(g) == 7 * 50 + 16
    links = {tuple(sorted((l.src, l.dst))): l.bandwidth for l in t.links if "ib" not in (l.src, l.dst)}
    assert sorted(set(links.values())) == [50, 100, 200]


def test_leaf_spine_oversubscription():
    t = P.leaf_spine(leaves=2, hosts_per_leaf=4, spines=2, host_bandwidth=10, oversubscription=2)
    up = sum(bw for (u, v), bw in t.capacity.items() if u == "leaf0.switch" and v.startswith("spine"))
    down = sum(bw for (u, v), bw in t.capacity.items() if v == "leaf0.switch" and u.startswith("leaf0.h"))
    assert down / up == 2


def test_unknown_preset_or_parameter():
    with pytest.raises(TopologyError, match="unknown preset 'nope'"):
        make_preset("nope")
    with pytest.raises(TopologyError, match="has no parameter 'boxes'"):
        make_preset("star", boxes=2)
    with pytest.raises(TopologyError, match="boxes must be an integer >= 1"):
        make_preset("dgx-a100", boxes=0)


@pytest.mark.parametrize("topo", SMALL_PRESETS + [P.dgx_a100(16)], ids=lambda t: t.name)
def test_symmetry_group_is_made_of_automorphisms_acting_freely(topo):
    g = symmetry_group(topo)
    n = topo.num_ranks
    assert g.order * len(g.rank_representatives) == n
    cap = topo.capacity
    order = topo.order
    for perm in g.elements:
        if g.order > 1:
            moved = perm[:n] != np.arange(n)
            assert moved.all() or not moved.any()
        for (u, v), bw in cap.items():
            assert cap[(order[perm[topo.index[u]]], order[perm[topo.index[v]]])] == bw


def test_reversed_turns_every_edge_around():
    t = P.ring(5, bidirectional=False)
    r = t.reversed()
    assert set(r.capacity) == {(v, u) for (u, v) in t.capacity}
