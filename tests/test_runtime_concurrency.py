"""Collectives at the same time, as real processes over TCP (`collcomm run`, tests/multiproc.py).

- Overlapping groups ([0, 1, 2], [3, 1, 2], the world and a second group of all ranks)
  each driven by its own thread in every member, so ranks 1 and 2 run four groups'
  collectives at once.
- Asynchronous operations on overlapping groups issued in opposite orders on two ranks:
  completes only if each group makes progress on its own.
- Asynchronous operations interleaved with blocking ones: they run in issue order (a
  chain of different reductions on one buffer), a blocking call returns only after the
  asynchronous calls issued before it, hundreds may be in flight.
- 1,000 back-to-back small allreduces (blocking, then asynchronous) after a warm-up:
  file descriptors and threads unchanged, resident memory grows by less than 4 MB.
- Bounded time: a job that hangs is stopped at its timeout with every rank's stacks and no
  rank left running; a rank that raises fails the job with its traceback first.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest

import multiproc

import collcomm as cc


# ---------------------------------------------------------------------------- inside the ranks
def group_value(group_id: int, k: int, group_rank: int, count: int) -> np.ndarray:
    """Round k's input of one member: distinct per group, round, member and element."""
    return np.arange(count, dtype=np.int64) * 3 + 1000 * k + 10 * group_rank + group_id


def drive_group(group, group_id: int, rounds: int, count: int, failures: list, spans: list) -> None:
    """``rounds`` of allreduce / broadcast / allgather / reduce_scatter / reduce on ``group``, checked exactly."""
    size, me = group.size, group.rank
    try:
        for k in range(rounds):
            start = time.monotonic()
            everyone = [group_value(group_id, k, r, count) for r in range(size)]
            x = everyone[me].copy()
            cc.allreduce(x, group=group)
            if not np.array_equal(x, sum(everyone)):
                failures.append(f"group {group_id} round {k}: allreduce wrong")
            root = k % size
            y = everyone[me].astype(np.float64)
            cc.broadcast(y, root=root, group=group)
            if not np.array_equal(y, everyone[root]):
                failures.append(f"group {group_id} round {k}: broadcast from {root} wrong")
            out = np.zeros(size * count, np.int64)
            cc.allgather(out, everyone[me], group=group)
            if not np.array_equal(out, np.concatenate(everyone)):
                failures.append(f"group {group_id} round {k}: allgather wrong")
            part = count // size
            mine = np.zeros(part, np.int64)
            cc.reduce_scatter(mine, everyone[me][:part * size], op="max", group=group)
            if not np.array_equal(mine, np.maximum.reduce(everyone)[me * part:(me + 1) * part]):
                failures.append(f"group {group_id} round {k}: reduce_scatter wrong")
            z = everyone[me].copy()
            cc.reduce(z, root=(k + 1) % size, op="min", group=group)
            want = np.minimum.reduce(everyone) if me == (k + 1) % size else everyone[me]
            if not np.array_equal(z, want):
                failures.append(f"group {group_id} round {k}: reduce wrong")
            spans.append((group_id, start, time.monotonic()))
    except Exception as e:  # noqa: BLE001 - reported to the test with the group it happened in
        failures.append(f"group {group_id}: {type(e).__name__}: {e}")


def overlapping_groups_worker(rounds: int, count: int) -> dict:
    me = cc.rank()
    groups = {0: None}  # group id used in the values -> Group (None: the world)
    if me in (0, 1, 2):
        groups[1] = cc.new_group([0, 1, 2])
    if me in (1, 2, 3):
        groups[2] = cc.new_group([3, 1, 2])  # group rank 0 is world rank 3
    groups[3] = cc.new_group(range(cc.world_size()), name="world-again")  # the world's members, apart
    world = cc.api.runtime().world
    failures: list[str] = []
    spans: list[tuple] = []
    threads = [threading.Thread(target=drive_group, args=(g if g is not None else world, gid, rounds, count,
                                                          failures, spans)) for gid, g in groups.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    overlaps = sum(1 for a in spans for b in spans if a[0] < b[0] and a[1] < b[2] and b[1] < a[2])
    cc.barrier()
    return {"failures": failures, "rounds": len(spans), "overlaps": overlaps}


def opposite_order_worker(rounds: int) -> list[str]:
    """Ranks 1 and 2 are in both groups and issue their operations in opposite orders."""
    me = cc.rank()
    a = cc.new_group([0, 1, 2]) if me != 3 else None
    b = cc.new_group([1, 2, 3]) if me != 0 else None
    failures = []
    for k in range(rounds):
        kind = ("allreduce", "broadcast", "allgather")[k % 3]
        xa, xb = np.full(5000, me + k, np.int64), np.full(5000, 10 * me + k, np.int64)
        out_a, out_b = np.zeros(3 * 5000, np.int64), np.zeros(3 * 5000, np.int64)

        def op(x, out, group, async_op=False):
            if kind == "allreduce":
                return cc.allreduce(x, group=group, async_op=async_op)
            if kind == "broadcast":
                return cc.broadcast(x, root=2, group=group, async_op=async_op)
            return cc.allgather(out, x, group=group, async_op=async_op)

        if me == 0:
            op(xa, out_a, a)
        elif me == 3:
            op(xb, out_b, b)
        elif me == 1:
            work = op(xa, out_a, a, async_op=True)
            op(xb, out_b, b)  # rank 2 runs its part of this from b's worker thread
            work.wait(timeout=30)
        else:
            work = op(xb, out_b, b, async_op=True)
            op(xa, out_a, a)
            work.wait(timeout=30)
        checks = []
        if a is not None:
            members = [0, 1, 2]
            vals = [r + k for r in members]
            checks.append(("a", xa, out_a, vals))
        if b is not None:
            members = [1, 2, 3]
            vals = [10 * r + k for r in members]
            checks.append(("b", xb, out_b, vals))
        for name, x, out, vals in checks:
            if kind == "allreduce":
                ok = (x == sum(vals)).all()
            elif kind == "broadcast":
                ok = (x == vals[2]).all()
            else:
                ok = np.array_equal(out, np.repeat(vals, 5000))
            if not ok:
                failures.append(f"rank {me} round {k}: {kind} on group {name} wrong")
    cc.barrier()
    return failures


def async_interleaved_worker(many: int) -> list[str]:
    me, n = cc.rank(), cc.world_size()
    failures = []

    def expect(what, ok):
        if not ok:
            failures.append(f"rank {me}: {what}")

    # a chain of different reductions on one buffer: only issue order gives the expected value
    chain = ["sum", "prod", "sum", "min", "max", "sum", "prod"]
    x = np.full(7, me + 1, np.int64)
    works = [cc.allreduce(x, op=op, async_op=True) for op in chain]
    values = [r + 1 for r in range(n)]
    for op in chain:
        v = {"sum": sum(values), "prod": int(np.prod(values)), "min": min(values), "max": max(values)}[op]
        values = [v] * n
    for w in reversed(works):
        expect("wait() returns True", w.wait(timeout=30) is True)
    expect(f"chain {chain}: got {x[0]}, expected {values[0]}", (x == np.int64(values[0])).all())

    # different collectives in flight, then a blocking one: it returns after all of them
    x1 = np.full(1001, me + 1.0, np.float32)
    y2, out2 = np.full(333, me, np.int16), np.zeros(333 * n, np.int16)
    z3 = np.arange(513, dtype=np.float64) * (me + 1)
    in4, out4 = np.arange(n * 77, dtype=np.int32) + me, np.zeros(77, np.int32)
    x5 = np.full(129, me, np.uint8)
    x6 = np.full(3, me + 1, np.int64)
    works = [cc.allreduce(x1, op="max", async_op=True), cc.allgather(out2, y2, async_op=True),
             cc.broadcast(z3, root=n - 1, async_op=True), cc.reduce_scatter(out4, in4, async_op=True),
             cc.reduce(x5, root=0, op="sum", async_op=True)]
    cc.allreduce(x6)
    expect("a blocking allreduce returned before the asynchronous operations issued before it",
           all(w.is_completed() for w in works))
    for w in works:
        w.wait(timeout=30)
        expect("exception() of a completed operation", w.exception() is None)
    expect("allreduce max", (x1 == n).all())
    expect("allgather", np.array_equal(out2, np.repeat(np.arange(n, dtype=np.int16), 333)))
    expect("broadcast", np.array_equal(z3, np.arange(513, dtype=np.float64) * n))
    expect("reduce_scatter", np.array_equal(out4, n * (np.arange(77) + me * 77) + n * (n - 1) // 2))
    expect("reduce", (x5 == (n * (n - 1) // 2 if me == 0 else me)).all())
    expect("blocking allreduce", (x6 == n * (n + 1) // 2).all())

    # many in flight at once, on the world and on a group with the ranks in reverse order
    group = cc.new_group(list(reversed(range(n))))
    bufs = [np.full(16, me * 1000 + i, np.int64) for i in range(many)]
    works = []
    for i, buf in enumerate(bufs):
        if i % 2:
            works.append(cc.broadcast(buf, root=i % n, group=group, async_op=True))  # group rank i % n
        else:
            works.append(cc.allreduce(buf, async_op=True))
    rng = np.random.default_rng(me)
    for j in rng.permutation(len(works)):
        works[j].wait(timeout=60)
    for i, buf in enumerate(bufs):
        if i % 2:
            root_world = n - 1 - i % n
            want = root_world * 1000 + i
        else:
            want = 1000 * n * (n - 1) // 2 + n * i
        if not (buf == want).all():
            expect(f"operation {i} of {many} in flight: got {buf[0]}, expected {want}", False)
            break
    cc.barrier()
    return failures


def _usage() -> dict:
    gc.collect()
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
            "os_threads": int(status["Threads"]), "rss_kb": int(status["VmRSS"].split()[0])}


def no_growth_worker(iterations: int) -> dict:
    me, n = cc.rank(), cc.world_size()
    x = np.zeros(16, np.float32)
    want = n * (n + 1) / 2
    wrong = 0
    for i in range(200):  # warm-up: connections, plans, worker threads, allocator pools
        x[:] = me + 1
        if i % 2:
            cc.allreduce(x)
        else:
            cc.allreduce(x, async_op=True).wait(timeout=30)
        wrong += int(x[0] != want)
    snapshots = [_usage()]
    start = time.monotonic()
    for _ in range(iterations):
        x[:] = me + 1
        cc.allreduce(x)
        wrong += int(x[0] != want)
    blocking = time.monotonic() - start
    snapshots.append(_usage())
    for _ in range(iterations):
        x[:] = me + 1
        cc.allreduce(x, async_op=True).wait(timeout=30)
        wrong += int(x[0] != want)
    snapshots.append(_usage())
    cc.barrier()
    return {"wrong": wrong, "snapshots": snapshots, "seconds_blocking": round(blocking, 3)}


# ---------------------------------------------------------------------------- the tests
@pytest.mark.timeout(120)
def test_overlapping_groups_at_the_same_time():
    job = multiproc.run(4, overlapping_groups_worker, timeout=100, chunk_bytes=4096,
                        kwargs=dict(rounds=25, count=3001))
    reports = job.values()
    failures = [f for r in reports for f in r["failures"]]
    assert not failures, "\n".join(failures)
    assert [r["rounds"] for r in reports] == [75, 100, 100, 75]  # rounds of 3, 4, 4, 3 groups
    for rank in range(4):  # the premise: each rank's groups' collectives did run at the same time
        assert reports[rank]["overlaps"] > 0, reports[rank]


@pytest.mark.timeout(90)
def test_async_operations_on_overlapping_groups_in_opposite_orders():
    job = multiproc.run(4, opposite_order_worker, timeout=70, kwargs=dict(rounds=30), collective_timeout=30)
    failures = [f for r in job.values() for f in r]
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("n", [3, 4])
def test_async_operations_interleaved(n):
    job = multiproc.run(n, async_interleaved_worker, timeout=70, kwargs=dict(many=300))
    failures = [f for r in job.values() for f in r]
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(120)
def test_thousand_small_allreduces_leak_nothing():
    job = multiproc.run(4, no_growth_worker, timeout=100, kwargs=dict(iterations=1000))
    for rank, report in enumerate(job.values()):
        assert report["wrong"] == 0, f"rank {rank}: {report['wrong']} wrong results"
        before, after_blocking, after_async = report["snapshots"]
        for after, phase in ((after_blocking, "1000 allreduces"), (after_async, "1000 async allreduces")):
            assert after["fds"] == before["fds"], f"rank {rank}: file descriptors after {phase}: {before} -> {after}"
            assert after["threads"] == before["threads"], f"rank {rank}: threads after {phase}: {before} -> {after}"
            # OS threads include gRPC's own (its timer manager may start one under load): a little slack
            assert after["os_threads"] <= before["os_threads"] + 2, \
                f"rank {rank}: OS threads after {phase}: {before} -> {after}"
            assert after["rss_kb"] - before["rss_kb"] < 4096, f"rank {rank}: memory after {phase}: {before} -> {after}"


HANGS = """
import threading
if rank == 1:
    threading.Event().wait()  # never returns: the harness must stop the job
cc.barrier()
"""

RAISES = """
if warm_up:
    cc.barrier()  # connections open
if rank == 1:
    raise ValueError("rank 1 gives up")
cc.barrier()
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("warm_up", [True, False], ids=["after-warm-up", "before-connecting"])
def test_a_failing_rank_fails_the_job_and_the_survivor_names_it(warm_up):
    """The survivor's barrier raises PeerFailure naming rank 1 within the launcher's grace period, whether or
    not their connection was open when rank 1 left."""
    job = multiproc.run(2, RAISES, timeout=40, kwargs={"warm_up": warm_up})
    assert not job.timed_out and job.elapsed < 30
    with pytest.raises(multiproc.JobFailed) as failure:
        job.check()
    text = str(failure.value)
    assert "ValueError: rank 1 gives up" in text
    survivor = job.ranks[0]
    assert survivor.ok is False, f"rank 0 reported nothing before the launcher stopped it:\n{text}"
    assert "PeerFailure" in survivor.error and "rank 1" in survivor.error.splitlines()[-1], survivor.error
    assert text.index("--- rank 1 raised") < text.index("--- rank 0 raised"), text


@pytest.mark.timeout(60)
def test_a_hung_job_is_stopped_at_its_timeout():
    """The harness's own bound: stacks of every rank, then nothing of the job left running."""
    job = multiproc.run(2, HANGS, timeout=4, collective_timeout=120)
    assert job.timed_out and job.elapsed < 4 + 15
    with pytest.raises(multiproc.JobFailed, match="timed out"):
        job.check()
    assert any("threading.py" in line for line in job.ranks[1].output), "no stack dump from the hung rank"
    for r in job.ranks:
        assert r.pid is not None and not multiproc.alive(r.pid), f"rank {r.rank} (pid {r.pid}) still runs"
