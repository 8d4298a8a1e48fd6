"""The exact allgather optimum (cut bound) and the integer tree budget."""

from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings

from brute import brute_force_x_star
from collcomm.schedules.optimum import IntFabric, allgather_optimum, fixed_k_budget, optimal_budget
from collcomm.topology import presets as P
from collcomm.topology import symmetry_group
from strategies import fabrics

KNOWN_ALLGATHER_ALGBW = [
    (P.star(8, 1), Fraction(8, 7)),
    (P.ring(8, 1), Fraction(16, 7)),
    (P.two_clusters(4, 10, 1), Fraction(2)),
    (P.dgx_a100(1), Fraction(2400, 7)),
    (P.dgx_a100(2), Fraction(1040, 3)),
]


@pytest.mark.parametrize("topo, algbw", KNOWN_ALLGATHER_ALGBW, ids=lambda x: getattr(x, "name", str(x)))
def test_known_answers(topo, algbw):
    opt = allgather_optimum(topo)
    assert opt.algbw == algbw
    assert opt.x_star * topo.num_ranks == algbw
    # the cut certifies the optimum: its ratio is exactly x*
    inside = len(opt.cut & set(topo.compute))
    assert 0 < inside < topo.num_ranks
    assert topo.out_bandwidth(opt.cut) / inside == opt.x_star


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(fabrics(max_compute=5, max_switches=3, max_extra_links=10))
def test_optimum_equals_brute_force_over_all_cuts(topo):
    want = brute_force_x_star(topo)
    for use in (True, False):
        opt = allgather_optimum(topo, symmetry_group(topo, use=use))
        assert opt.x_star == want
        inside = len(opt.cut & set(topo.compute))
        assert topo.out_bandwidth(opt.cut) / inside == want
    assert allgather_optimum(topo.reversed()).x_star == brute_force_x_star(topo.reversed())


def test_one_rank_has_no_bound():
    from collcomm.topology import Node, Topology
    opt = allgather_optimum(Topology("one", [Node("a")], []))
    assert opt.x_star is None and opt.algbw is None


@pytest.mark.parametrize("topo, k", [(P.dgx_a100(2), 13), (P.mi250(2), 83), (P.ring(8), 2), (P.star(8), 1),
                                     (P.dgx_a100(128), 1)], ids=lambda x: getattr(x, "name", str(x)))
def test_optimal_budget_trees_per_root(topo, k):
    g = symmetry_group(topo)
    fab = IntFabric.of(topo)
    opt = allgather_optimum(topo, g, fab)
    b = optimal_budget(fab, opt, g)
    assert b.k == k and b.optimal
    # every edge holds an integral number of trees and finishes exactly at T*: slots/bw <= k/x*
    for slots, bw in zip(b.slots.tolist(), fab.bw.tolist()):
        assert Fraction(slots, bw) <= Fraction(b.k) / (opt.x_star * fab.scale)


def test_fixed_k_budget_dgx_a100_x2_one_tree_per_root():
    topo = P.dgx_a100(2)
    g = symmetry_group(topo)
    fab = IntFabric.of(topo)
    opt = allgather_optimum(topo, g, fab)
    b1 = fixed_k_budget(fab, opt, 1, g)
    assert b1.k == 1 and not b1.optimal
    assert b1.x * 16 == Fraction(2400, 7)  # 342.86 GB/s, as the ForestColl authors report
    assert fixed_k_budget(fab, opt, 13, g).x == opt.x_star
