"""The planner's choice for a broadcast or a reduce: only the root's trees run, so plans are
compared on those trees alone (checked against the exact link loads of the schedule IR)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from collcomm.schedules import evaluate
from collcomm.schedules.ir import ALLGATHER, REDUCE_SCATTER, Phase
from collcomm.schedules.planner import Planner
from collcomm.topology import presets


def _root_loads(schedule, topo, root: int) -> dict:
    phase = schedule.phases[0]
    alone = Phase(phase.collective, [t for t in phase.trees if t.root == topo.compute[root]])
    return evaluate.link_loads(alone)


@pytest.mark.parametrize("collective", [ALLGATHER, REDUCE_SCATTER])
@pytest.mark.parametrize("ranks", [4, 8])
def test_a_root_alone_on_a_star_crosses_every_link_once(collective, ranks):
    """On a star the allgather (and reduce-scatter) plan that is best for every rank at once
    sends one root's buffer over its own link n - 1 times; the choice for a single root crosses
    every link at most once: the pipelined optimum, the buffer over one link's bandwidth."""
    topo = presets.star(ranks)
    planner = Planner(topo)
    for root in (0, ranks - 1):
        chosen = planner.schedule(collective, 64 << 20, root=root)
        loads = _root_loads(chosen, topo, root)
        assert max(loads.values()) == 1, (chosen.algorithm, loads)
        everyone = planner.schedule(collective, (64 << 20) * ranks)
        worst_for_root = max(_root_loads(everyone, topo, root).values())
        if everyone.algorithm == "forestcoll":
            assert worst_for_root >= Fraction(ranks - 1, 1) / 2, worst_for_root  # why it loses alone


def test_the_rooted_choice_is_the_best_estimate_and_cached():
    topo = presets.star(6)
    planner = Planner(topo)
    for size in (1 << 10, 1 << 20, 64 << 20):
        chosen = planner.schedule(ALLGATHER, size, root=2)
        bucket = 1 << max(size, 1).bit_length()
        best = min(planner._rooted_seconds(s, 2, bucket) for s in planner.candidates(ALLGATHER))
        assert planner._rooted_seconds(chosen, 2, bucket) == best
        assert planner.schedule(ALLGATHER, size, root=2) is chosen


def test_a_root_outside_the_fabric_is_refused():
    with pytest.raises(ValueError, match="root 9"):
        Planner(presets.star(4)).schedule(ALLGATHER, 1 << 20, root=9)
