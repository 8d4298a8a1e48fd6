"""The MSCCL XML exporter, checked by running its programs in tests/msccl_sim.py.

Every program must compute exactly the collective (integer data, compared with NumPy),
in place and out of place, and without deadlock whether connections buffer without
bound, hold one message, or hold none; and it must satisfy the structural rules of the
MSCCL parser. The interpreter's own checks are tested against broken programs.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

import msccl_sim as sim
from collcomm.errors import ScheduleError
from collcomm.schedules import ir
from collcomm.schedules.export_msccl import LIMITS, to_msccl_xml
from collcomm.schedules.forestcoll import forestcoll
from collcomm.schedules.ir import ALLGATHER, ALLREDUCE, REDUCE_SCATTER, Phase, Schedule, Tree, TreeEdge
from collcomm.topology import presets

PRESETS = {
    "star4": lambda: presets.star(4),
    "ring6": lambda: presets.ring(6),
    "oneway-ring5": lambda: presets.ring(5, bidirectional=False),
    "two-clusters": lambda: presets.two_clusters(),
    "dgx-a100x1": lambda: presets.dgx_a100(1),
    "dgx-a100x2": lambda: presets.dgx_a100(2),
    "mi250x1": lambda: presets.mi250(1),
}
COLLECTIVES = (ALLGATHER, REDUCE_SCATTER, ALLREDUCE)
MODES = [(inplace, capacity) for inplace in (False, True) for capacity in (None, 1, 0)]


@functools.lru_cache(maxsize=None)
def exported(preset: str, collective: str, nchannels: int = 1) -> tuple[Schedule, str]:
    topo = PRESETS[preset]()
    schedule = forestcoll(topo, collective)
    return schedule, to_msccl_xml(schedule, topo, nchannels=nchannels)


def random_inputs(program: sim.Program, seed: int, per_chunk: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    size = program.gpus[0].i_chunks * per_chunk
    return [rng.integers(-1000, 1000, size=size, dtype=np.int64) for _ in range(program.ngpus)]


def expected(collective: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    n = len(inputs)
    if collective == ALLGATHER:
        return [np.concatenate(inputs)] * n
    total = np.sum(inputs, axis=0)
    if collective == ALLREDUCE:
        return [total] * n
    return list(total.reshape(n, -1))


def assert_computes(xml: str, collective: str, seed: int = 0, modes=MODES) -> sim.Program:
    program = sim.parse(xml)
    inputs = random_inputs(program, seed)
    want = expected(collective, inputs)
    for inplace, capacity in modes:
        got = sim.run(program, inputs, inplace=inplace, capacity=capacity, seed=seed)
        for rank, (g, w) in enumerate(zip(got, want)):
            assert np.array_equal(g, w), f"rank {rank} wrong (inplace={inplace}, capacity={capacity})"
    return program


def step_types(program: sim.Program) -> Counter:
    return Counter(st.type for g in program.gpus for tb in g.tbs for st in tb.steps)


def edge(a: str, b: str) -> TreeEdge:
    return TreeEdge(a, b, (a, b))


def hand_schedule(collective: str, ranks: list[str], trees: list[tuple[str, Fraction, list[tuple[str, str]]]],
                  ag_trees=None) -> Schedule:
    """A schedule from (root, share, edges); for allreduce ``trees`` are the reduce-scatter
    in-trees and ``ag_trees`` the allgather out-trees."""
    def phase(kind, spec):
        return Phase(kind, [Tree(r, Fraction(s), tuple(edge(a, b) for a, b in es)) for r, s, es in spec])
    if collective == ALLREDUCE:
        phases = [phase(REDUCE_SCATTER, trees), phase(ALLGATHER, ag_trees)]
    else:
        phases = [phase(collective, trees)]
    return Schedule(collective, "hand", "hand", list(ranks), phases)


# ---------------------------------------------------------------------------- ForestColl presets
@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("preset", PRESETS)
def test_forestcoll_program_computes_the_collective(preset, collective):
    _, xml = exported(preset, collective)
    assert_computes(xml, collective, seed=len(preset))


@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("preset", PRESETS)
def test_forestcoll_program_has_the_structure_msccl_requires(preset, collective):
    schedule, xml = exported(preset, collective)
    program = sim.parse(xml)  # every attribute the runtime's parser reads is present
    sim.validate(program)  # contiguous ids, a receive for every send, peers match steps, deps signal
    n = schedule.num_ranks
    base = math.lcm(*(t.share.denominator for p in schedule.phases for t in p.trees))
    assert program.attrs["coll"] == {ALLGATHER: "allgather", REDUCE_SCATTER: "reducescatter",
                                     ALLREDUCE: "allreduce"}[collective]
    assert program.ngpus == n and program.attrs["nchannels"] == "1" and program.attrs["proto"] == "Simple"
    assert program.nchunksperloop % n == 0 and (n * base) % program.nchunksperloop == 0
    assert len(xml.splitlines()) == 2 + sum(2 + sum(2 + len(tb.steps) for tb in g.tbs) for g in program.gpus)
    # Every chunk crosses each tree edge once: N-1 sends and receives per chunk and phase.
    sends = sum(st.cnt for g in program.gpus for tb in g.tbs for st in tb.steps if st.type in sim.SEND)
    recvs = sum(st.cnt for g in program.gpus for tb in g.tbs for st in tb.steps if st.type in sim.RECV)
    assert sends == recvs == len(schedule.phases) * (n - 1) * program.nchunksperloop
    for g in program.gpus:
        assert len(g.tbs) <= LIMITS["tbs_per_gpu"]
        for tb in g.tbs:
            assert len(tb.steps) <= LIMITS["steps_per_tb"]
            assert all(st.cnt <= LIMITS["count"] for st in tb.steps)
    assert not re.search(r"^\s*<\?", xml), "the MSCCL parser cannot read an XML declaration"


def test_fused_steps_on_a_one_way_ring():
    """On a one-way ring every tree is a path: interior GPUs forward with fused steps."""
    n = 5
    ag = sim.parse(exported("oneway-ring5", ALLGATHER)[1])
    assert step_types(ag) == Counter({"rcs": n * (n - 2), "r": n, "s": n, "cpy": n})
    rs = sim.parse(exported("oneway-ring5", REDUCE_SCATTER)[1])
    assert step_types(rs) == Counter({"rrs": n * (n - 2), "rrc": n, "s": n})
    assert all(len(g.tbs) == 1 for g in rs.gpus)  # receive from one neighbour, send to the other


def test_allreduce_waits_for_the_reduction_before_broadcasting():
    program = sim.parse(exported("dgx-a100x1", ALLREDUCE)[1])
    # 8 ranks on a switch: each root reduces from 7 children one after another, then broadcasts.
    assert step_types(program)["rrc"] == 8 * 7
    waits = [st for g in program.gpus for tb in g.tbs for st in tb.steps if st.depid >= 0]
    assert waits and all(g.tbs[st.depid].steps[st.deps].hasdep for g in program.gpus
                         for tb in g.tbs for st in tb.steps if st.depid >= 0)


@pytest.mark.parametrize("preset,collective", [("ring6", ALLREDUCE), ("two-clusters", ALLGATHER),
                                               ("mi250x1", REDUCE_SCATTER)])
def test_instances_on_several_channels(preset, collective):
    one = sim.parse(exported(preset, collective)[1])
    schedule, xml = exported(preset, collective, nchannels=2)
    program = assert_computes(xml, collective, seed=7)
    assert program.attrs["nchannels"] == "2"
    assert program.nchunksperloop == 2 * one.nchunksperloop
    assert {tb.chan for g in program.gpus for tb in g.tbs} == {0, 1}
    moves = lambda p: Counter({k: v for k, v in step_types(p).items() if k != "cpy"})  # noqa: E731
    assert moves(program) == Counter({k: 2 * v for k, v in moves(one).items()})


def test_export_is_deterministic():
    schedule, xml = exported("dgx-a100x2", ALLREDUCE)
    copy = ir.loads(ir.dumps(schedule))  # fresh objects, same plan
    assert to_msccl_xml(copy) == xml


# ---------------------------------------------------------------------------- hand-built schedules
RING3_ALLGATHER = """\
<algo name="ring3" proto="Simple" nchannels="1" nchunksperloop="3" ngpus="3" coll="allgather" inplace="1" \
outofplace="1" minBytes="0" maxBytes="1099511627776">
  <gpu id="0" i_chunks="1" o_chunks="3" s_chunks="0">
    <tb id="0" send="-1" recv="-1" chan="0">
      <step s="0" type="cpy" srcbuf="i" srcoff="0" dstbuf="o" dstoff="0" cnt="1" depid="-1" deps="-1" hasdep="0"/>
    </tb>
    <tb id="1" send="1" recv="2" chan="0">
      <step s="0" type="s" srcbuf="i" srcoff="0" dstbuf="i" dstoff="0" cnt="1" depid="-1" deps="-1" hasdep="0"/>
      <step s="1" type="r" srcbuf="o" srcoff="1" dstbuf="o" dstoff="1" cnt="1" depid="-1" deps="-1" hasdep="0"/>
      <step s="2" type="rcs" srcbuf="o" srcoff="2" dstbuf="o" dstoff="2" cnt="1" depid="-1" deps="-1" hasdep="0"/>
    </tb>
  </gpu>
  <gpu id="1" i_chunks="1" o_chunks="3" s_chunks="0">
    <tb id="0" send="-1" recv="-1" chan="0">
      <step s="0" type="cpy" srcbuf="i" srcoff="0" dstbuf="o" dstoff="1" cnt="1" depid="-1" deps="-1" hasdep="0"/>
    </tb>
    <tb id="1" send="2" recv="0" chan="0">
      <step s="0" type="rcs" srcbuf="o" srcoff="0" dstbuf="o" dstoff="0" cnt="1" depid="-1" deps="-1" hasdep="0"/>
      <step s="1" type="s" srcbuf="i" srcoff="0" dstbuf="i" dstoff="0" cnt="1" depid="-1" deps="-1" hasdep="0"/>
      <step s="2" type="r" srcbuf="o" srcoff="2" dstbuf="o" dstoff="2" cnt="1" depid="-1" deps="-1" hasdep="0"/>
    </tb>
  </gpu>
  <gpu id="2" i_chunks="1" o_chunks="3" s_chunks="0">
    <tb id="0" send="-1" recv="-1" chan="0">
      <step s="0" type="cpy" srcbuf="i" srcoff="0" dstbuf="o" dstoff="2" cnt="1" depid="-1" deps="-1" hasdep="0"/>
    </tb>
    <tb id="1" send="0" recv="1" chan="0">
      <step s="0" type="r" srcbuf="o" srcoff="0" dstbuf="o" dstoff="0" cnt="1" depid="-1" deps="-1" hasdep="0"/>
      <step s="1" type="rcs" srcbuf="o" srcoff="1" dstbuf="o" dstoff="1" cnt="1" depid="-1" deps="-1" hasdep="0"/>
      <step s="2" type="s" srcbuf="i" srcoff="0" dstbuf="i" dstoff="0" cnt="1" depid="-1" deps="-1" hasdep="0"/>
    </tb>
  </gpu>
</algo>
"""
RING3 = [("a", 1, [("a", "b"), ("b", "c")]), ("b", 1, [("b", "c"), ("c", "a")]), ("c", 1, [("c", "a"), ("a", "b")])]


def test_tiny_ring_gives_the_known_program():
    schedule = hand_schedule(ALLGATHER, ["a", "b", "c"], RING3)
    xml = to_msccl_xml(schedule, name="ring3")
    assert xml == RING3_ALLGATHER
    assert_computes(xml, ALLGATHER)


def test_trees_with_the_same_logical_edges_are_merged():
    """Copies of a tree that differ only in their switch paths move as one range."""
    ranks = ["a", "b"]
    trees = [Tree("a", Fraction(1, 3), (TreeEdge("a", "b", ("a", "sw0", "b")),)),
             Tree("a", Fraction(2, 3), (TreeEdge("a", "b", ("a", "sw1", "b")),)),
             Tree("b", Fraction(1), (edge("b", "a"),))]
    program = sim.parse(to_msccl_xml(Schedule(ALLGATHER, "hand", "hand", ranks, [Phase(ALLGATHER, trees)])))
    assert program.nchunksperloop == 2 and step_types(program)["s"] == 2


def test_long_ranges_are_cut_and_spread_over_channels():
    """A tree of 4699 chunks takes 67 steps of at most 71 chunks; a threadblock holds 64 steps,
    so the pieces are spread over several channels."""
    ranks = ["a", "b", "c"]
    trees = [("a", Fraction(1, 4700), [("a", "b"), ("a", "c")]), ("a", Fraction(4699, 4700), [("a", "b"), ("b", "c")]),
             ("b", 1, [("b", "a"), ("b", "c")]), ("c", 1, [("c", "a"), ("c", "b")])]
    xml = to_msccl_xml(hand_schedule(ALLGATHER, ranks, trees))
    program = assert_computes(xml, ALLGATHER, modes=[(False, 0), (True, None)])
    assert program.nchunksperloop == 3 * 4700 and int(program.attrs["nchannels"]) > 1
    assert max(st.cnt for g in program.gpus for tb in g.tbs for st in tb.steps) == LIMITS["count"]


def test_many_trees_over_one_edge():
    """70 different paths from a, all starting a -> b: GPU a sends to b 70 times, more than one
    threadblock holds. Spread over channels it fits; with 32 copies there is no channel left."""
    ranks = [f"g{i}" for i in range(8)]
    paths = [("g0", "g1") + rest for rest in itertools.islice(itertools.permutations(ranks[2:]), 70)]
    trees = [("g0", Fraction(1, 70), list(zip(path, path[1:]))) for path in paths]
    trees += [(r, 1, [(r, x) for x in ranks if x != r]) for r in ranks[1:]]
    schedule = hand_schedule(ALLGATHER, ranks, trees)
    program = assert_computes(to_msccl_xml(schedule), ALLGATHER, modes=[(False, 0), (True, 1)])
    assert program.attrs["nchannels"] == "2"
    with pytest.raises(ScheduleError, match=r"needs \d+ steps even on 32 channels"):
        to_msccl_xml(schedule, nchannels=32)


def test_a_broadcast_waits_for_several_reductions_through_nops():
    """Root a's shard is reduced by three in-trees whose last steps sit in three threadblocks;
    its one out-tree broadcasts the whole shard, so each send waits for two other
    threadblocks: one dependency of its own and one nop before it."""
    ranks = ["a", "b", "c", "d"]
    rs = [("a", Fraction(1, 3), [(x, y) for x in "bcd" if x != y] + [(y, "a")]) for y in "bcd"]
    rs += [(r, 1, [(x, r) for x in ranks if x != r]) for r in "bcd"]
    ag = [(r, 1, [(r, x) for x in ranks if x != r]) for r in ranks]
    xml = to_msccl_xml(hand_schedule(ALLREDUCE, ranks, rs, ag))
    program = assert_computes(xml, ALLREDUCE)
    gpu_a = program.gpus[0]
    assert sum(st.type == "nop" for tb in gpu_a.tbs for st in tb.steps) == 3
    assert step_types(program)["nop"] == 3


def random_out_trees(ranks: list[str], rng: np.random.Generator) -> list[tuple[str, Fraction, list]]:
    """1-3 random spanning out-trees per root with random shares summing to 1 (twelfths, so
    that the chunk count stays small)."""
    trees = []
    for root in ranks:
        cuts = [0, *sorted(rng.choice(np.arange(1, 12), size=rng.integers(0, 3), replace=False)), 12]
        for lo, hi in zip(cuts, cuts[1:]):
            order = [root] + [str(r) for r in rng.permutation(ranks) if r != root]
            es = [(order[rng.integers(0, i)], order[i]) for i in range(1, len(order))]
            trees.append((root, Fraction(int(hi - lo), 12), es))
    return trees


@pytest.mark.parametrize("seed", range(9))
def test_random_trees(seed):
    """Arbitrary tree shapes (deep paths, wide fans, many trees per root) and shares."""
    rng = np.random.default_rng(seed)
    collective = COLLECTIVES[seed % 3]
    ranks = [f"g{i}" for i in range(int(rng.integers(2, 8)))]
    reverse = lambda spec: [(r, s, [(b, a) for a, b in es]) for r, s, es in spec]  # noqa: E731
    first = random_out_trees(ranks, rng)
    if collective == ALLGATHER:
        schedule = hand_schedule(ALLGATHER, ranks, first)
    elif collective == REDUCE_SCATTER:
        schedule = hand_schedule(REDUCE_SCATTER, ranks, reverse(first))
    else:
        schedule = hand_schedule(ALLREDUCE, ranks, reverse(first), random_out_trees(ranks, rng))
    xml = to_msccl_xml(schedule, nchannels=1 + seed % 2)
    sim.validate(sim.parse(xml))
    assert_computes(xml, collective, seed=seed)


# ---------------------------------------------------------------------------- what cannot be exported
def test_bad_requests_raise_schedule_errors():
    schedule, _ = exported("star4", ALLGATHER)
    for kwargs, message in [({"nchannels": 0}, "nchannels"), ({"nchannels": 33}, "nchannels"),
                            ({"nchannels": True}, "nchannels"), ({"proto": "LL256"}, "proto"),
                            ({"name": 'a"b'}, "name"), ({"name": "x" * 256}, "name")]:
        with pytest.raises(ScheduleError, match=message):
            to_msccl_xml(schedule, **kwargs)
    with pytest.raises(ScheduleError, match="at least 2 GPUs"):
        to_msccl_xml(hand_schedule(ALLGATHER, ["a"], [("a", 1, [])]))
    with pytest.raises(ScheduleError, match="does not match topology|do not match"):
        to_msccl_xml(schedule, presets.star(5))


@pytest.mark.parametrize("collective,trees,message", [
    (ALLGATHER, [("a", Fraction(1, 2), [("a", "b")]), ("b", 1, [("b", "a")])], "sum to 1/2"),
    (ALLGATHER, [("a", 1, [("b", "a")]), ("b", 1, [("b", "a")])], "does not span"),
    (REDUCE_SCATTER, [("a", 1, [("a", "b")]), ("b", 1, [("a", "b")])], "does not span"),
    (ALLGATHER, [("a", 1, [("a", "b"), ("a", "b")]), ("b", 1, [("b", "a")])], "two parents"),
    (ALLGATHER, [("a", 1, [("a", "z")]), ("b", 1, [("b", "a")])], "does not join two ranks"),
])
def test_malformed_schedules_raise(collective, trees, message):
    with pytest.raises(ScheduleError, match=message):
        to_msccl_xml(hand_schedule(collective, ["a", "b"], trees))


def test_too_many_chunks_for_msccl_offsets():
    trees = [("a", Fraction(1, 20000), [("a", "b"), ("b", "c")]),
             ("a", Fraction(19999, 20000), [("a", "b"), ("a", "c")]),
             ("b", 1, [("b", "a"), ("b", "c")]), ("c", 1, [("c", "a"), ("c", "b")])]
    with pytest.raises(ScheduleError, match="chunk offsets"):
        to_msccl_xml(hand_schedule(ALLGATHER, ["a", "b", "c"], trees))


def test_unsupported_collective():
    schedule = hand_schedule(ALLGATHER, ["a", "b"], [("a", 1, [("a", "b")]), ("b", 1, [("b", "a")])])
    schedule.collective = "broadcast"
    with pytest.raises(ScheduleError, match="broadcast"):
        to_msccl_xml(schedule)


# ---------------------------------------------------------------------------- the interpreter's own checks
def mutate(xml: str, gpu: int, tb: int, step: int | None, old: str, new: str) -> str:
    """Replace ``old`` by ``new`` in the <tb> line (step None) or a <step> line of the program,
    counting GPUs and threadblocks by position."""
    lines, g, t = xml.splitlines(keepends=True), -1, -1
    for i, line in enumerate(lines):
        if "<gpu " in line:
            g, t = g + 1, -1
        if "<tb " in line:
            t += 1
        wanted = "<tb " in line if step is None else f'<step s="{step}" ' in line
        if (g, t) == (gpu, tb) and wanted:
            assert old in line, (old, line)
            lines[i] = line.replace(old, new, 1)
            return "".join(lines)
    raise AssertionError(f"no line for gpu {gpu} tb {tb} step {step}")


def test_interpreter_detects_deadlock_without_buffering():
    """Both GPUs of a pair send first and receive second: fine if a connection holds a
    message, a deadlock if it holds none."""
    pair = to_msccl_xml(hand_schedule(ALLGATHER, ["a", "b"], [("a", 1, [("a", "b")]), ("b", 1, [("b", "a")])]))
    swapped = mutate(mutate(pair, 1, 1, 0, 'type="r" srcbuf="o" srcoff="0" dstbuf="o" dstoff="0"',
                            'type="s" srcbuf="i" srcoff="0" dstbuf="i" dstoff="0"'),
                     1, 1, 1, 'type="s" srcbuf="i" srcoff="0" dstbuf="i" dstoff="0"',
                     'type="r" srcbuf="o" srcoff="0" dstbuf="o" dstoff="0"')
    assert_computes(swapped, ALLGATHER, modes=[(False, None), (False, 1)])
    with pytest.raises(sim.Deadlock):
        assert_computes(swapped, ALLGATHER, modes=[(False, 0)])
    assert_computes(pair, ALLGATHER)


def test_interpreter_detects_a_dependency_cycle():
    xml = to_msccl_xml(hand_schedule(ALLGATHER, ["a", "b", "c"], RING3), name="ring3")
    # GPU 0's threadblock 1 waits for its copy, which waits for threadblock 1's last step.
    xml = mutate(xml, 0, 1, 0, 'depid="-1" deps="-1" hasdep="0"', 'depid="0" deps="0" hasdep="0"')
    xml = mutate(xml, 0, 0, 0, 'depid="-1" deps="-1" hasdep="0"', 'depid="1" deps="2" hasdep="1"')
    xml = mutate(xml, 0, 1, 2, 'hasdep="0"', 'hasdep="1"')
    with pytest.raises(sim.Deadlock, match="cannot go on"):
        sim.run(xml, random_inputs(sim.parse(xml), 0))


@pytest.mark.parametrize("gpu,tb,step,old,new,message", [
    (0, 1, None, 'id="1"', 'id="2"', "tb ids"),
    (0, 1, 1, 's="1"', 's="2"', "numbered"),
    (0, 1, 0, ' hasdep="0"', "", "'hasdep' is missing"),
    (1, 1, 0, 'cnt="1"', 'cnt="0"', "cnt 0"),
    (2, 1, 1, 'type="rcs"', 'type="r"', r"sends of \[1\] chunks, receives of \[1, 1\]"),
    (0, 0, None, 'send="-1"', 'send="1"', "send peer 1 does not match"),
    (0, 1, None, 'send="1"', 'send="2"', "receiver only"),
    (0, 0, 0, 'dstoff="0"', 'dstoff="3"', "outside buffer o"),
    (0, 1, 2, 'type="rcs"', 'type="rrx"', "unknown type"),
    (0, 1, 0, 'depid="-1" deps="-1"', 'depid="0" deps="0"', "does not signal"),
])
def test_validate_rejects_broken_programs(gpu, tb, step, old, new, message):
    broken = mutate(RING3_ALLGATHER, gpu, tb, step, old, new)
    with pytest.raises(sim.ProgramError, match=message):
        sim.validate(sim.parse(broken))


def test_a_count_mismatch_between_sender_and_receiver_is_caught():
    xml = to_msccl_xml(hand_schedule(ALLGATHER, ["a", "b"], [("a", Fraction(1, 2), [("a", "b")]),
                                                              ("a", Fraction(1, 2), [("a", "b")]),
                                                              ("b", 1, [("b", "a")])]))
    # The two trees of root a are one tree to MSCCL, so chunks are whole shards; make one a pair.
    xml = xml.replace('nchunksperloop="2"', 'nchunksperloop="4"').replace('i_chunks="1" o_chunks="2"',
                                                                        'i_chunks="2" o_chunks="4"')
    xml = mutate(xml, 0, 1, 0, 'cnt="1"', 'cnt="2"')
    with pytest.raises(sim.ProgramError, match=r"0 -> 1 on channel 0: sends of \[2\] chunks, receives of \[1\]"):
        sim.validate(sim.parse(xml))


def test_a_wrong_offset_gives_a_wrong_result():
    """The comparison with NumPy is what catches a program that runs but moves the wrong data."""
    broken = mutate(RING3_ALLGATHER, 2, 1, 0, 'dstoff="0"', 'dstoff="2"')
    sim.validate(sim.parse(broken))
    with pytest.raises(AssertionError, match="rank 2 wrong"):
        assert_computes(broken, ALLGATHER, modes=[(False, None)])
