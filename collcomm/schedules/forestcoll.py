"""ForestColl: bandwidth-optimal spanning-tree schedules for allgather, reduce-scatter
and allreduce on any fabric (Zhao et al., arXiv 2305.18461 / 2402.06787).

The pipeline, one module per step:

1. :mod:`~collcomm.schedules.optimum`: the exact optimum x* (Dinkelbach over
   max-flow/min-cut, rational arithmetic) and the integer budget: k trees per root,
   U·b_e tree slots per edge;
2. :mod:`~collcomm.schedules.splitting`: switches removed by edge splitting;
3. :mod:`~collcomm.schedules.packing`: k spanning out-trees per root packed into the
   logical slots;
4. here: every logical edge mapped back to the physical paths it stands for, trees
   with exact shares, and the result checked against the optimum by equality.

Reduce-scatter packs out-trees on the reversed fabric and turns them into in-trees
(correct for one-way and asymmetric links); allreduce is reduce-scatter followed by
allgather. A symmetry group of the fabric (identical boxes, rotations) is used where
it keeps the plan exactly optimal; if symmetric packing ever stalls the generator
falls back to the plain algorithm.
"""

from __future__ import annotations

import copy
import time
from fractions import Fraction

from collcomm.errors import ScheduleError, TopologyError
from collcomm.schedules import evaluate
from collcomm.schedules.ir import (ALLGATHER, ALLREDUCE, COLLECTIVES, REDUCE_SCATTER, Phase, Schedule, Tree,
                                   TreeEdge, merge_identical_trees, reverse_tree)
from collcomm.schedules.maxflow import STATS
from collcomm.schedules.forwarding import forwardable_capacity
from collcomm.schedules.optimum import IntFabric, Optimum, TreeBudget, allgather_optimum, fixed_k_budget, optimal_budget
from collcomm.schedules.packing import PackingStuck, TreeClass, pack_trees
from collcomm.schedules.splitting import LogicalGraph, take_slots, split_switches
from collcomm.topology.model import Topology
from collcomm.topology.symmetry import SymmetryGroup, subgroups, symmetry_group


def choose_budget(fab: IntFabric, opt: Optimum, group: SymmetryGroup, max_trees_per_root: int | None) -> TreeBudget:
    """The optimal budget, or with a cap on trees per root the best budget within it."""
    budget = optimal_budget(fab, opt, group)
    if max_trees_per_root is None or budget.k <= max_trees_per_root:
        return budget
    best = None
    for k in range(1, max_trees_per_root + 1):
        b = fixed_k_budget(fab, opt, k, group)
        if best is None or b.x > best.x:
            best = b
    return best


def _physical_trees(classes: list[TreeClass], lg: LogicalGraph, order: tuple[str, ...]) -> list[Tree]:
    """Expand logical edges into physical paths; a class whose copies take different paths
    becomes several trees whose shares add up to the class's."""
    bundles = {e: copy.copy(b) for e, b in lg.bundles.items()}
    ids: dict[tuple[int, ...], tuple[str, ...]] = {}  # physical paths as node ids, built once each

    def path_ids(path: tuple[int, ...]) -> tuple[str, ...]:
        got = ids.get(path)
        if got is None:
            got = ids[path] = tuple(order[p] for p in path)
        return got

    trees: list[Tree] = []
    for cls in classes:
        allocations = [(x, y, take_slots(bundles[(x, y)], cls.count)) for x, y in cls.edges]
        if all(len(alloc) == 1 for _, _, alloc in allocations):  # one physical tree
            edges = tuple(TreeEdge(order[x], order[y], path_ids(alloc[0][0])) for x, y, alloc in allocations)
            trees.append(Tree(order[cls.root], Fraction(cls.count, lg.k), edges))
            continue
        cuts = {0, cls.count}
        for _, _, alloc in allocations:
            acc = 0
            for _, amount in alloc:
                acc += amount
                cuts.add(acc)
        bounds = sorted(cuts)
        for lo, hi in zip(bounds, bounds[1:]):
            edges = []
            for x, y, alloc in allocations:
                acc = 0
                for path, amount in alloc:
                    if acc <= lo < acc + amount:
                        edges.append(TreeEdge(order[x], order[y], path_ids(path)))
                        break
                    acc += amount
            trees.append(Tree(order[cls.root], Fraction(hi - lo, lg.k), tuple(edges)))
    return merge_identical_trees(trees)


def _trivial_trees(topo: Topology) -> list[Tree]:
    return [Tree(c, Fraction(1), ()) for c in topo.compute]


def _phase(topo: Topology, kind: str, group: SymmetryGroup, max_trees_per_root: int | None,
           info: dict) -> tuple[Phase, Fraction | None]:
    fabric = topo if kind == ALLGATHER else topo.reversed()
    timings = {}
    t = time.perf_counter()
    bound = allgather_optimum(fabric, group)
    if topo.num_ranks == 1:
        return Phase(kind, _trivial_trees(topo)), None
    def exact_x(capacity):
        return allgather_optimum(fabric, group, IntFabric.of(fabric, capacity)).x_star or Fraction(0)

    forwarding = forwardable_capacity(fabric, exact_x)
    scaled = forwarding.scaled_switches
    fab = IntFabric.of(fabric, forwarding.capacity)
    opt = allgather_optimum(fabric, group, fab) if scaled else bound
    if not opt.x_star:
        raise TopologyError(f"{topo.name}: some rank can only be reached through switches that receive "
                            f"nothing to forward, so no {kind} plan exists")
    timings["optimum"] = time.perf_counter() - t
    t = time.perf_counter()
    budget = choose_budget(fab, opt, group, max_trees_per_root)
    timings["budget"] = time.perf_counter() - t
    t = time.perf_counter()
    # Symmetric splitting can fail to stay symmetric (an edge fixed by part of the group whose
    # slots do not divide evenly); then a subgroup usually can, and the trivial group always does.
    lg = None
    for g in [group] + (subgroups(group) if not group.trivial else []):
        lg = split_switches(fab, budget, g, strict=not g.trivial)
        if lg is not None:
            break
    timings["splitting"] = time.perf_counter() - t
    t = time.perf_counter()
    pack_group = g if lg.symmetric else symmetry_group(topo, use=False)
    try:
        classes, pstats = pack_trees(lg, pack_group)
    except PackingStuck:
        if pack_group.trivial:
            raise
        pack_group = symmetry_group(topo, use=False)
        classes, pstats = pack_trees(lg, pack_group)
    timings["packing"] = time.perf_counter() - t
    t = time.perf_counter()
    trees = _physical_trees(classes, lg, topo.order)
    if kind == REDUCE_SCATTER:
        trees = [reverse_tree(tr) for tr in trees]
    timings["mapping"] = time.perf_counter() - t
    info[kind] = {
        "cut_bound_algbw": str(bound.algbw),
        "optimum_algbw": str(opt.algbw),
        "optimum_cut": sorted(opt.cut),
        "scaled_switches": scaled,
        **({"forwarding_lp_algbw": forwarding.lp_x_star * topo.num_ranks} if forwarding.lp_x_star else {}),
        "optimal": budget.optimal and opt.algbw == bound.algbw,
        "trees_per_root": budget.k,
        "tree_classes": len(classes),
        "trees": len(trees),
        "max_depth": max(tr.depth() for tr in trees),
        "symmetry_order": pack_group.order,
        "seconds": {k: round(v, 4) for k, v in timings.items()},
        **lg.stats, **pstats,
    }
    return Phase(kind, trees), budget.x * topo.num_ranks


def forestcoll(topo: Topology, collective: str = ALLGATHER, max_trees_per_root: int | None = None,
               use_symmetry: bool = True) -> Schedule:
    """The ForestColl schedule of ``collective`` on ``topo``.

    ``max_trees_per_root`` caps k (fewer, larger trees); the schedule's ``info`` then
    reports the fraction of the optimum it keeps. Raises ScheduleError if the result
    does not reach its promised bandwidth exactly (an internal check).
    """
    if collective not in COLLECTIVES:
        raise ScheduleError(f"unknown collective {collective!r}; choose one of {', '.join(COLLECTIVES)}")
    if max_trees_per_root is not None and max_trees_per_root < 1:
        raise ScheduleError(f"max_trees_per_root must be >= 1, got {max_trees_per_root}")
    start = time.perf_counter()
    calls0 = STATS.calls
    group = symmetry_group(topo, use=use_symmetry)
    kinds = [REDUCE_SCATTER, ALLGATHER] if collective == ALLREDUCE else [collective]
    info: dict = {}
    phases, promised = [], []
    for kind in kinds:
        phase, bw = _phase(topo, kind, group, max_trees_per_root, info)
        phases.append(phase)
        promised.append(bw)
    schedule = Schedule(collective, "forestcoll", topo.name, list(topo.compute), phases)
    per_shard = [evaluate.phase_time_per_shard(phase, topo) for phase in phases]
    for phase, bw, time_per_shard in zip(phases, promised, per_shard):
        got = None if time_per_shard == 0 else Fraction(topo.num_ranks) / time_per_shard
        # The budget is a guarantee (and the optimum an upper bound): an optimal budget is met exactly.
        if bw is not None and got < bw:
            raise ScheduleError(f"internal: {phase.collective} plan reaches {got} GB/s, expected {bw}")
        if bw is not None:
            opt = Fraction(info[phase.collective]["optimum_algbw"])
            info[phase.collective]["achieved_algbw"] = str(got)
            info[phase.collective]["fraction_of_optimum"] = str(got / opt)
    total = sum(per_shard, Fraction(0))
    schedule.algbw = None if total == 0 else Fraction(topo.num_ranks) / total
    info["maxflow_calls"] = STATS.calls - calls0
    schedule.info = info
    schedule.generation_seconds = time.perf_counter() - start
    return schedule
