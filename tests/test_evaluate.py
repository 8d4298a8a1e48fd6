"""The evaluator: exact algbw by hand, validation errors, and the alpha-beta estimate."""

from fractions import Fraction

import pytest

from collcomm.errors import ScheduleError
from collcomm.schedules import evaluate
from collcomm.schedules.forestcoll import forestcoll
from collcomm.schedules.ir import Phase, Schedule, Tree, TreeEdge
from collcomm.topology import presets as P


def star3_direct():
    """Each rank sends its shard straight to the other two through the switch."""
    topo = P.star(3, bandwidth=2)
    trees = []
    for r in topo.compute:
        edges = tuple(TreeEdge(r, o, (r, "switch", o)) for o in topo.compute if o != r)
        trees.append(Tree(r, Fraction(1), edges))
    return topo, Schedule("allgather", "direct", topo.name, list(topo.compute), [Phase("allgather", trees)])


def test_algbw_by_hand():
    topo, s = star3_direct()
    evaluate.validate(s, topo)
    loads = evaluate.link_loads(s.phases[0])
    # each uplink carries its rank's shard twice (one crossing per destination); each downlink two shards
    assert loads[("r0", "switch")] == 2 and loads[("switch", "r0")] == 2
    # algbw = N / max(load / bandwidth) = 3 / (2 / 2)
    assert evaluate.algbw(s, topo) == 3
    assert forestcoll(topo).algbw == 3  # and that is the optimum of a star of 3 at 2 GB/s


def test_shares_split_load():
    topo, s = star3_direct()
    half = [Tree(t.root, Fraction(1, 2), t.edges) for t in s.phases[0].trees]
    s2 = Schedule("allgather", "x", topo.name, list(topo.compute), [Phase("allgather", half + half)])
    assert evaluate.algbw(s2, topo) == 3
    assert evaluate.busbw_factor("allreduce", 4) == Fraction(3, 2)
    assert evaluate.busbw_factor("allgather", 4) == Fraction(3, 4)


@pytest.mark.parametrize("mutate, message", [
    (lambda t: [Tree(x.root, Fraction(1, 2), x.edges) for x in t], "sum to 1/2, expected 1"),
    (lambda t: [Tree(t[0].root, Fraction(1), t[0].edges[:1])] + t[1:], "needs 2 edges"),
    (lambda t: [Tree("r0", Fraction(1), (TreeEdge("r0", "r1", ("r0", "r1")), TreeEdge("r0", "r2", ("r0", "switch", "r2"))))] + t[1:],
     "r0 -> r1, which is not a link"),
    (lambda t: [Tree("r0", Fraction(1), (TreeEdge("r0", "r1", ("r0", "switch", "r1")), TreeEdge("r1", "r2", ("r1", "switch", "r2"))))] + t[1:]
     + [Tree("r0", Fraction(1), t[0].edges)], "sum to 2"),
    (lambda t: [Tree("r0", Fraction(1), (TreeEdge("r0", "r1", ("r0", "switch", "r1")), TreeEdge("r2", "r1", ("r2", "switch", "r1"))))] + t[1:],
     "has 2 incoming edges"),
    (lambda t: [Tree("nobody", Fraction(1), t[0].edges)] + t[1:], "not a compute node"),
    (lambda t: [Tree("r0", Fraction(0), t[0].edges)] + t[1:], "share must be positive"),
])
def test_validation_catches_bad_trees(mutate, message):
    topo, s = star3_direct()
    bad = Schedule("allgather", "x", topo.name, list(topo.compute), [Phase("allgather", mutate(s.phases[0].trees))])
    with pytest.raises(ScheduleError, match=message):
        evaluate.validate(bad, topo)


def test_validation_catches_wrong_phases_and_ranks():
    topo, s = star3_direct()
    with pytest.raises(ScheduleError, match="needs phases"):
        evaluate.validate(Schedule("allreduce", "x", topo.name, list(topo.compute), s.phases), topo)
    with pytest.raises(ScheduleError, match="do not match topology"):
        evaluate.validate(Schedule("allgather", "x", topo.name, ["a", "b", "c"], s.phases), topo)


def test_paths_through_compute_nodes_are_rejected():
    topo = P.ring(4)
    t = Tree("r0", Fraction(1), (TreeEdge("r0", "r2", ("r0", "r1", "r2")), TreeEdge("r0", "r1", ("r0", "r1")),
                                 TreeEdge("r0", "r3", ("r0", "r3"))))
    rest = forestcoll(topo).phases[0].trees
    s = Schedule("allgather", "x", topo.name, list(topo.compute),
                 [Phase("allgather", [t] + [x for x in rest if x.root != "r0"])])
    with pytest.raises(ScheduleError, match="not a switch"):
        evaluate.validate(s, topo)


def test_alpha_beta_estimate():
    topo = P.dgx_a100(2)
    s = forestcoll(topo, "allreduce")
    small = evaluate.estimate_seconds(s, topo, 1024)
    big = evaluate.estimate_seconds(s, topo, 1 << 30)
    huge = evaluate.estimate_seconds(s, topo, 1 << 34)
    assert 0 < small < big < huge
    # bandwidth-bound at large sizes: size / algbw plus a few percent of per-chunk overhead
    fluid = (1 << 34) / (float(s.algbw) * 1e9)
    assert fluid < huge < 1.1 * fluid
    # latency-bound at small sizes: at least one hop's latency per phase
    assert small > 2 * 5e-6
    # deeper trees cost more latency: a one-way ring of 8 vs the optimal trees of a fully connected 8
    ring = forestcoll(P.ring(8, bidirectional=False))
    full = forestcoll(P.fully_connected(8))
    assert evaluate.estimate_seconds(ring, P.ring(8, bidirectional=False), 8) > \
        evaluate.estimate_seconds(full, P.fully_connected(8), 8)
