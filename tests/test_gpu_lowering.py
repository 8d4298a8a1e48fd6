"""Schedules lowered to GPU steps (collcomm.runtime.gpu), checked on the CPU: every rank's lanes run
in a simulator with NCCL's matching and event semantics (tests/gpu_sim.py), in interleavings that
hypothesis chooses, and give NumPy's exact results; they move the same bytes between the same
ranks, phase by phase, as the TCP executor does (its Operations run over in-memory links here);
a broken program is reported as a deadlock; and the host issue order keeps events meaningful."""

from __future__ import annotations

import random
from collections import Counter, deque
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collcomm.errors import ScheduleError
from collcomm.runtime.executor import ExecutionPlan, Operation
from collcomm.runtime.gpu import lowering as L
from collcomm.runtime.gpu.lowering import GroupEnd, GroupStart, Record, Recv, Reduce, Send, Wait, lower, shards_for
from collcomm.runtime.gpu.streams import Group, issue, issue_order, lane_issues
from collcomm.schedules.ir import ALLGATHER, ALLREDUCE, REDUCE_SCATTER, Phase, Schedule, Tree, TreeEdge
from collcomm.schedules.planner import Planner
from collcomm.topology import presets as P
from gpu_sim import Deadlock, Mismatch, Simulator, lane_streams, serialized_stream
from strategies import fabrics

COLLECTIVES = (ALLGATHER, REDUCE_SCATTER, ALLREDUCE)
FABRICS = {"ring5": lambda: P.ring(5), "ring4-one-way": lambda: P.ring(4, bidirectional=False),
           "fully-connected4": lambda: P.fully_connected(4), "dgx-a100": lambda: P.dgx_a100(1),
           "leaf-spine": lambda: P.leaf_spine(2, 2, 2, 1, 2)}
ITEMSIZE = 8  # int64: sums are exact


@lru_cache(maxsize=None)
def planner(name: str) -> Planner:
    return Planner(FABRICS[name]())


def chunking(schedule, shards, chunks: int) -> int:
    """Elements per chunk such that the largest tree part is cut into ``chunks`` chunks."""
    biggest = max((pc.stop - pc.start for r in range(schedule.num_ranks)
                   for ph in ExecutionPlan(schedule, r, shards, 1 << 40).phases for pc in ph), default=1)
    return max(1, -(-biggest // chunks))


def rotated_lanes(schedule, lanes: int, rotate: int) -> dict:
    """assign_lanes with the second phase's lanes rotated: an allreduce's allgather trees then sit on
    other lanes than the reduce-scatter trees of their roots, and wait for them through events."""
    lanes = min(lanes, max(len(p.trees) for p in schedule.phases))
    return {(p, t): (lane + rotate * p) % lanes for (p, t), lane in L.assign_lanes(schedule, lanes).items()}


# ---------------------------------------------------------------------------- data
def inputs(collective: str, n: int, count: int, seed: int):
    """Each rank's work buffer before the operation, and what it must hold after."""
    rng = np.random.default_rng(seed)
    if collective == ALLGATHER:
        parts = [rng.integers(-1000, 1000, count, dtype=np.int64) for _ in range(n)]
        full = np.concatenate(parts)
        before = []
        for r in range(n):
            buf = np.full(n * count, -7777, dtype=np.int64)  # what arrives must overwrite this
            buf[r * count:(r + 1) * count] = parts[r]
            before.append(buf)
        return before, [(slice(None), full)] * n
    size = n * count if collective == REDUCE_SCATTER else count
    before = [rng.integers(-1000, 1000, size, dtype=np.int64) for _ in range(n)]
    total = np.sum(before, axis=0)
    if collective == REDUCE_SCATTER:
        return before, [(slice(r * count, (r + 1) * count), total[r * count:(r + 1) * count]) for r in range(n)]
    return before, [(slice(None), total)] * n


def check(outputs, expected) -> None:
    for r, (out, (where, want)) in enumerate(zip(outputs, expected)):
        assert np.array_equal(out[where], want), f"rank {r}: {out[where]} != {want}"


def simulate(lowering, before, rng, serialized=False) -> Simulator:
    streams = [serialized_stream(p) if serialized else lane_streams(p) for p in lowering.programs]
    sim = Simulator(streams, [b.copy() for b in before], lowering.chunk_elems)
    sim.run(rng)
    return sim


# ---------------------------------------------------------------------------- the TCP executor, in memory
class _Link:
    def payload_verified(self, n):  # no checksums: nothing is corrupted in memory
        return True

    def __init__(self, net, src, dst):
        self.net, self.src, self.dst = net, src, dst

    def send(self, header, payload, done):
        self.net.append((self.src, self.dst, header, bytes(payload), done))


def run_tcp(schedule: Schedule, shards, chunk_elems: int, before):
    """The TCP executor's Operations on every rank, frames carried in memory: the outputs and every
    frame as (phase, src, dst, bytes)."""
    n, net = schedule.num_ranks, deque()
    links = {(a, b): _Link(net, a, b) for a in range(n) for b in range(n) if a != b}
    work = [b.copy() for b in before]
    ops = [Operation(links=lambda peer, r=r: links[(r, peer)], member_of=lambda w: w, me=r, group=1, epoch=0,
                     op_seq=1, desc=0, describe="test", work=work[r],
                     plan=ExecutionPlan(schedule, r, shards, chunk_elems),
                     reducer=lambda t, x: np.add(t, x, out=t), chained=schedule.collective == ALLREDUCE,
                     max_chunk_bytes=chunk_elems * ITEMSIZE) for r in range(n)]
    for op in ops:
        op.start()
    frames = []
    while net:
        src, dst, header, payload, done = net.popleft()
        view = ops[dst].destination(header, src)
        view[:] = payload
        ops[dst].delivered(header, view, src)
        done()
        frames.append((header.tree >> 24, src, dst, header.length))
    assert all(op.done and op.error is None for op in ops)
    return work, frames


# ---------------------------------------------------------------------------- results and transfers
@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("fabric", list(FABRICS))
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(chunks=st.integers(1, 4), count=st.integers(1, 40), lanes=st.integers(1, 4), rotate=st.integers(0, 3),
       seed=st.integers(0, 2**32 - 1))
def test_every_planner_schedule_lowers_to_exact_results(fabric, collective, chunks, count, lanes, rotate, seed):
    rng = random.Random(seed)  # the interleaving: a seed keeps hypothesis's examples small
    for schedule in planner(fabric).candidates(collective):
        n = schedule.num_ranks
        shards = shards_for(collective, n, count * (n if collective == ALLREDUCE else 1))
        chunk_elems = chunking(schedule, shards, chunks)
        lowering = lower(schedule, shards, chunk_elems, lanes, rotated_lanes(schedule, lanes, rotate))
        before, expected = inputs(collective, n, count * n if collective == ALLREDUCE else count,
                                  rng.randrange(1 << 30))
        sim = simulate(lowering, before, rng)
        check(sim.output, expected)
        # the same transfers as the TCP executor, phase by phase, and its results too
        tcp_out, frames = run_tcp(schedule, shards, chunk_elems, before)
        check(tcp_out, expected)
        lowered = Counter(L.transfers(lowering, ITEMSIZE))
        assert lowered == Counter(frames), schedule.algorithm
        assert Counter((p, a, b, c * ITEMSIZE) for p, a, b, c in sim.moved) == lowered


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(topo=fabrics(max_compute=5, max_switches=2, max_extra_links=6), collective=st.sampled_from(COLLECTIVES),
       chunks=st.integers(1, 4), count=st.integers(1, 30), seed=st.integers(0, 2**32 - 1))
def test_random_fabrics_lower_to_exact_results(topo, collective, chunks, count, seed):
    rng = random.Random(seed)  # the interleaving: a seed keeps hypothesis's examples small
    for schedule in Planner(topo).candidates(collective):
        n = schedule.num_ranks
        total = count * n if collective == ALLREDUCE else count
        shards = shards_for(collective, n, total)
        lowering = lower(schedule, shards, chunking(schedule, shards, chunks), 3, rotated_lanes(schedule, 3, 1))
        before, expected = inputs(collective, n, total, rng.randrange(1 << 30))
        for serialized in (False, True):
            check(simulate(lowering, before, rng, serialized).output, expected)
        _, frames = run_tcp(schedule, shards, lowering.chunk_elems, before)
        assert Counter(L.transfers(lowering, ITEMSIZE)) == Counter(frames)


@pytest.mark.parametrize("fabric", ["dgx-a100", "ring5"])
@settings(max_examples=8, deadline=None)
@given(chunks=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_a_gpu_that_runs_one_kernel_at_a_time_does_not_deadlock(fabric, chunks, seed):
    """Every rank issues its lanes' groups in time-step order (streams.issue_order): run as one
    stream per rank, as a GPU too full to overlap kernels would, the allreduce still completes."""
    rng = random.Random(seed)  # the interleaving: a seed keeps hypothesis's examples small
    for schedule in planner(fabric).candidates(ALLREDUCE):
        n = schedule.num_ranks
        shards = shards_for(ALLREDUCE, n, 12 * n)
        lowering = lower(schedule, shards, chunking(schedule, shards, chunks), 4, rotated_lanes(schedule, 4, 1))
        before, expected = inputs(ALLREDUCE, n, 12 * n, 5)
        check(simulate(lowering, before, rng, serialized=True).output, expected)


def test_allreduce_lanes_wait_for_the_reduce_scatter_of_other_lanes():
    schedule = planner("dgx-a100").candidates(ALLREDUCE)[0]
    n = schedule.num_ranks
    aligned = lower(schedule, shards_for(ALLREDUCE, n, 64 * n), 16, lanes=4)
    assert all(p.events == 0 for p in aligned.programs)  # a root's trees of both phases share a lane
    lowering = lower(schedule, shards_for(ALLREDUCE, n, 64 * n), 16, 4, rotated_lanes(schedule, 4, 1))
    for prog in lowering.programs:
        records = [s.event for steps in prog.lanes for s in steps if isinstance(s, Record)]
        waits = [s.event for steps in prog.lanes for s in steps if isinstance(s, Wait)]
        assert sorted(records) == list(range(prog.events)) and prog.events > 0
        assert set(waits) == set(records)
        issue_order(prog)  # every record is issued before its waits
    assert sum(p.events for p in lowering.programs) > 0
    allgather_only = lower(planner("dgx-a100").candidates(ALLGATHER)[0], shards_for(ALLGATHER, n, 64), 16)
    assert all(p.events == 0 for p in allgather_only.programs)


def test_sends_and_receives_between_a_pair_in_one_step_share_a_group():
    """Two ranks exchange their shards at once: each rank's send and receive are one group."""
    schedule = planner("ring5").candidates(ALLGATHER)[0]
    lowering = lower(schedule, shards_for(ALLGATHER, 5, 3), 3)
    both = [(prog.rank, iss.step) for prog in lowering.programs for lane, steps in enumerate(prog.lanes)
            for iss in lane_issues(steps, lane) if isinstance(iss.item, Group)
            and {op.peer for op in iss.item.ops if isinstance(op, Send)} & {op.peer for op in iss.item.ops
                                                                            if isinstance(op, Recv)}]
    assert both  # a ring allgather sends to and receives from the same neighbour in one step


# ---------------------------------------------------------------------------- broken programs
def two_rank_allgather():
    trees = [Tree(a, 1, (TreeEdge(a, b, (a, b)),)) for a, b in (("a", "b"), ("b", "a"))]
    schedule = Schedule(ALLGATHER, "test", "pair", ["a", "b"], [Phase(ALLGATHER, trees)])
    lowering = lower(schedule, shards_for(ALLGATHER, 2, 4), 4, lanes=1)
    before, expected = inputs(ALLGATHER, 2, 4, 1)
    return lowering, before, expected


def run_programs(programs, before, chunk_elems=4, seed=0):
    sim = Simulator([[[(0, s) for s in steps]] for steps in programs], [b.copy() for b in before], chunk_elems)
    sim.run(random.Random(seed))
    return sim


def test_the_pair_exchange_runs_and_is_one_group_each():
    lowering, before, expected = two_rank_allgather()
    steps = [p.lanes[0] for p in lowering.programs]
    for lane in steps:  # one group: the send of its own shard and the receive of the other's
        assert [type(s).__name__ for s in lane[::3]] == ["GroupStart", "GroupEnd"]
        assert {type(s).__name__ for s in lane[1:3]} == {"Send", "Recv"}
    check(run_programs(steps, before).output, expected)


def test_a_send_and_a_receive_in_separate_groups_deadlock():
    lowering, before, _ = two_rank_allgather()
    split = []
    for prog in lowering.programs:
        start, *ops, end = prog.lanes[0]
        send, recv = sorted(ops, key=lambda op: not isinstance(op, Send))
        split.append([start, send, end, GroupStart(start.step + 1), recv, GroupEnd()])  # sends first, both ranks
    with pytest.raises(Deadlock, match=r"rank 0 stream 0.*send #0 to rank 1.*has no match"):
        run_programs(split, before)


def test_a_receive_without_a_send_is_a_deadlock():
    lowering, before, _ = two_rank_allgather()
    programs = [list(p.lanes[0]) for p in lowering.programs]
    programs[1] = [s for s in programs[1] if not isinstance(s, Send)]  # rank 1 never sends its shard
    with pytest.raises(Deadlock, match=r"rank 0 stream 0: group .* recv #0 from rank 1 .* has no match"):
        run_programs(programs, before)


def test_a_group_that_does_not_close_is_a_deadlock_and_refused_by_issue():
    lowering, before, _ = two_rank_allgather()
    programs = [list(p.lanes[0]) for p in lowering.programs]
    programs[0] = programs[0][:-1]  # no GroupEnd
    with pytest.raises(Deadlock, match="rank 0 stream 0 step 0: the group never closes"):
        run_programs(programs, before)
    with pytest.raises(ScheduleError, match="rank 0 lane 0: the group of time step 0 does not close"):
        lane_issues(programs[0], 0, 0)


def test_sizes_that_do_not_match_are_reported():
    lowering, before, _ = two_rank_allgather()
    programs = [list(p.lanes[0]) for p in lowering.programs]
    programs[0] = [Send(s.peer, s.phase, s.tree, s.chunk, s.offset, s.count - 1) if isinstance(s, Send) else s
                   for s in programs[0]]
    with pytest.raises(Mismatch, match="send #0 to rank 1"):
        run_programs(programs, before)


def test_malformed_lanes_are_refused_with_one_line():
    ok = Send(1, 0, 0, 0, 0, 4)
    cases = {"GroupEnd without a GroupStart": [GroupEnd()],
             "Send outside a group": [ok],
             "Reduce inside the group": [GroupStart(0), Reduce(0, 0, 0, 0, 4, 0), GroupEnd()],
             "a group opens inside": [GroupStart(0), GroupStart(1)],
             "group of time step 0 after time step 0": [GroupStart(0), GroupEnd(), GroupStart(0), GroupEnd()]}
    for message, steps in cases.items():
        with pytest.raises(ScheduleError, match=message):
            lane_issues(steps, 0, 0)
    with pytest.raises(ScheduleError, match="lanes must be an integer >= 1"):
        lower(planner("ring5").candidates(ALLGATHER)[0], shards_for(ALLGATHER, 5, 2), 1, lanes=0)
    with pytest.raises(ScheduleError, match="chunk_elems must be an integer >= 1"):
        lower(planner("ring5").candidates(ALLGATHER)[0], shards_for(ALLGATHER, 5, 2), 0)
    with pytest.raises(ScheduleError, match="lane_of must give every"):
        lower(planner("ring5").candidates(ALLGATHER)[0], shards_for(ALLGATHER, 5, 2), 1, lane_of={(0, 0): 0})
    with pytest.raises(ScheduleError, match="no GPU lowering for collective 'alltoall'"):
        shards_for("alltoall", 2, 2)


# ---------------------------------------------------------------------------- fake streams
class FakeEvent:
    def __init__(self, device):
        self.device, self.done = device, False


class FakeStream:
    """Records what is launched; the FakeDevice runs it with CUDA's event rules."""

    def __init__(self, device, lane):
        self.device, self.lane, self.queue = device, lane, deque()

    def enqueue(self, work):
        self.queue.append(("run", work))

    def record(self, event):
        self.queue.append(("record", event))
        event.done = False  # a record on the host re-arms the event

    def wait(self, event):
        # CUDA: the wait captures the event's latest record issued so far; none issued: a no-op
        self.queue.append(("wait", event if event in self.device.recorded_on_host() else None))


class FakeDevice:
    def __init__(self, lanes):
        self.streams = [FakeStream(self, i) for i in range(lanes)]
        self.ran: list = []

    def recorded_on_host(self):
        return {item for s in self.streams for kind, item in s.queue if kind == "record"} | \
            {item for kind, item in self.ran if kind == "record"}

    def run(self, pick):
        """Run every stream to its end; ``pick`` chooses among the streams that can go on."""
        while any(s.queue for s in self.streams):
            ready = [s for s in self.streams if s.queue and not (
                s.queue[0][0] == "wait" and s.queue[0][1] is not None and not s.queue[0][1].done)]
            s = pick(ready)
            kind, item = s.queue.popleft()
            if kind == "record":
                item.done = True
            self.ran.append((kind, item))


def producer_consumer_program():
    """Lane 1 reduces a chunk and records event 0; lane 0 waits for it and sends the chunk."""
    lane0 = (Wait(0), GroupStart(5), Send(1, 1, 0, 0, 0, 4), GroupEnd())
    lane1 = (GroupStart(1), Recv(1, 0, 1, 0, 0, 4, "scratch", 0), GroupEnd(), Reduce(0, 1, 0, 0, 4, 0), Record(0))
    return L.RankProgram(0, (lane0, lane1), (0, 1), 1, 4)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_an_event_wait_orders_a_send_after_the_reduction_it_needs(seed):
    rng = random.Random(seed)  # the interleaving: a seed keeps hypothesis's examples small
    prog = producer_consumer_program()
    device = FakeDevice(2)
    issue(prog, device.streams, lambda: FakeEvent(device))
    device.run(rng.choice)
    runs = [item for kind, item in device.ran if kind == "run"]
    reduce_at = next(i for i, x in enumerate(runs) if isinstance(x, Reduce))
    send_at = next(i for i, x in enumerate(runs) if isinstance(x, Group) and isinstance(x.ops[0], Send))
    assert reduce_at < send_at


def test_issuing_lane_by_lane_would_make_the_wait_a_no_op():
    """The fake device sees the mistake issue_order prevents: issued lane by lane, lane 0's wait
    comes before lane 1's record, waits for nothing, and the send may run before the reduction."""
    prog = producer_consumer_program()

    def sends_before_reduce(device):
        device.run(lambda ready: ready[0])  # lane 0 whenever it can go
        runs = [item for kind, item in device.ran if kind == "run"]
        return [isinstance(x, Group) and isinstance(x.ops[0], Send) for x in runs].index(True) < \
            [isinstance(x, Reduce) for x in runs].index(True)

    naive = FakeDevice(2)
    event = FakeEvent(naive)
    for lane, steps in enumerate(prog.lanes):  # lane 0 whole, then lane 1
        for iss in lane_issues(steps, lane, 0):
            stream = naive.streams[lane]
            if isinstance(iss.item, Record):
                stream.record(event)
            elif isinstance(iss.item, Wait):
                stream.wait(event)
            else:
                stream.enqueue(iss.item)
    assert naive.streams[0].queue[0] == ("wait", None)  # captured no record: a no-op
    assert sends_before_reduce(naive)
    ordered = FakeDevice(2)
    issue(prog, ordered.streams, lambda: FakeEvent(ordered))
    assert not sends_before_reduce(ordered)
    assert [type(i.item).__name__ for i in issue_order(prog)] == ["Group", "Reduce", "Record", "Wait", "Group"]


def test_a_wait_without_an_earlier_record_is_refused():
    lane0 = (Wait(0), GroupStart(0), Send(1, 0, 0, 0, 0, 4), GroupEnd())
    lane1 = (GroupStart(3), Recv(1, 0, 1, 0, 0, 4, "scratch", 0), GroupEnd(), Reduce(0, 1, 0, 0, 4, 0), Record(0))
    with pytest.raises(ScheduleError, match="rank 0 lane 0: waits at time step 0 for event 0"):
        issue_order(L.RankProgram(0, (lane0, lane1), (0, 1), 1, 4))
