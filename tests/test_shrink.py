"""Shrinking a group after a failure: the survivors go on at a new epoch, with exact results.

* with ``COLLCOMM_AUTO_SHRINK=1`` the failed call still raises, and the next call already runs on
  the shrunk world;
* a rank SIGSTOPped in the middle of an allreduce loop: the survivors fail and shrink without it;
  woken up (SIGCONT), its pending allreduce raises EvictedError in bounded time.

The basic cases — a rank SIGKILLed mid-allreduce (PeerFailure, shrink, exact results) and a rank
SIGSTOPped between collectives (CollectiveTimeout, shrink, EvictedError when it wakes up) — are
scenarios of tests/test_fault_matrix.py, over both transports.

The rank processes are tests/faultjobs.py's; times are CLOCK_MONOTONIC across processes.
"""

from __future__ import annotations

import signal
import time

import pytest

from faultjobs import Job, RankDied, describe, kill_mid_loop, raised

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")


def run(kind: str, count: int = 1000, **kw) -> dict:
    return {"cmd": "run", "kind": kind, "count": count, **kw}


def expect_correct(job: Job, answers, ranks, what: str) -> None:
    for r, a in zip(ranks, answers):
        assert a.get("ok") and a.get("correct"), f"{what}: rank {r}\n{describe(answers, ranks)}\n{job.story()}"


@pytest.mark.timeout(90)
def test_auto_shrink_failed_call_raises_and_next_call_runs_on_the_survivors():
    timeout, n, victim = 3.0, 4, 1
    count = 1 << 20
    with Job(n, timeout=timeout, chunk_bytes=1 << 16, env={"COLLCOMM_AUTO_SHRINK": "1"}) as job:
        expect_correct(job, job.call_all(run("allreduce", count)), range(n), "before the fault")
        _, _, survivors = kill_mid_loop(job, victim, count)
        for kind in ("allreduce", "allgather"):
            expect_correct(job, job.call_all(run(kind, 100_000, iters=3), ranks=survivors, timeout=4 * timeout),
                           survivors, f"{kind} on the automatically shrunk world")


@pytest.mark.timeout(90)
def test_rank_stopped_mid_loop_wakes_up_evicted_inside_its_collective():
    """SIGSTOP while every rank loops over allreduce (the victim is most likely inside one): the
    survivors fail and shrink; SIGCONT: the victim's pending allreduce raises EvictedError in
    bounded time instead of completing or hanging, and the survivors go on exactly."""
    timeout, n, victim = 2.0, 4, 1
    with Job(n, timeout=timeout, chunk_bytes=1 << 16) as job:
        # Connections first: a SIGSTOP in the middle of a handshake is the fault matrix's
        # "stopped-handshake" scenario.
        expect_correct(job, job.call_all(run("allreduce", 1 << 18)), range(n), "before the fault")
        for r in range(n):
            job.ranks[r].send(run("allreduce", 1 << 18, iters=100_000))
        time.sleep(0.5)
        job.ranks[victim].signal(signal.SIGSTOP)
        survivors = [r for r in range(n) if r != victim]
        failed = [job.ranks[r].answer(4 * timeout) for r in survivors]
        assert all(raised(a, "CollectiveError") for a in failed), describe(failed, survivors)
        shrunk = job.call_all({"cmd": "shrink", "timeout": timeout}, ranks=survivors, timeout=4 * timeout)
        assert all(a.get("ok") and a["members"] == survivors for a in shrunk), describe(shrunk, survivors)
        woken_at = job.ranks[victim].signal(signal.SIGCONT)
        try:
            woken = job.ranks[victim].answer(3 * timeout)
        except RankDied as e:
            pytest.fail(f"the woken rank's allreduce loop was still running {3 * timeout:g} s later\n{e}")
        assert raised(woken, "EvictedError"), describe([woken], [victim])
        assert woken["t1"] - woken_at <= 2 * timeout, describe([woken], [victim])
        expect_correct(job, job.call_all(run("allreduce", 1 << 18, iters=3), ranks=survivors, timeout=4 * timeout),
                       survivors, "allreduce on the shrunk world after the evicted rank woke up")


@pytest.mark.timeout(120)
def test_restarted_rank_rejoins_at_the_next_epoch():
    """A rank is SIGKILLed mid-allreduce; the survivors shrink and go on. A new process started
    with the dead rank's number (same coordinator and token) registers in its place, and it and
    the survivors call grow(): the world is formed again with all ranks, at a new group id and
    epoch, and every collective on it is exact on every rank, the newcomer included. Before the
    newcomer registered, grow() on the survivors changes nothing."""
    timeout, n, victim = 3.0, 4, 2
    count = 1 << 20
    with Job(n, timeout=timeout, chunk_bytes=1 << 16) as job:
        expect_correct(job, job.call_all(run("allreduce", count)), range(n), "before the fault")
        _, _, survivors = kill_mid_loop(job, victim, count)
        shrunk = job.call_all({"cmd": "shrink"}, ranks=survivors, timeout=4 * timeout)
        assert all(a.get("ok") and a["members"] == survivors for a in shrunk), describe(shrunk, survivors)
        same = job.call_all({"cmd": "grow"}, ranks=survivors, timeout=4 * timeout)
        assert [(a["group_id"], a["epoch"], a["members"]) for a in same] == \
               [(shrunk[0]["group_id"], shrunk[0]["epoch"], survivors)] * len(survivors), describe(same, survivors)
        expect_correct(job, job.call_all(run("allreduce", 1000), ranks=survivors, timeout=4 * timeout), survivors,
                       "allreduce on the shrunk world")

        newcomer = job.restart(victim)
        assert newcomer.get("ok") and newcomer["rejoining"], newcomer
        everyone = list(range(n))
        grown = job.call_all({"cmd": "grow", "timeout": 2 * timeout}, timeout=4 * timeout)
        report = describe(grown, everyone)
        for r, a in zip(everyone, grown):
            assert a.get("ok") and a["members"] == everyone, f"rank {r}: grow\n{report}\n{job.story()}"
        assert len({(a["group_id"], a["epoch"]) for a in grown}) == 1, f"one group and epoch:\n{report}"
        assert grown[0]["epoch"] > shrunk[0]["epoch"] and grown[0]["group_id"] != shrunk[0]["group_id"], report
        for kind in ("allreduce", "allgather", "reduce_scatter", "broadcast"):
            for c in (1, 300_001):
                expect_correct(job, job.call_all(run(kind, c), timeout=4 * timeout), everyone,
                               f"{kind} of {c} on the world with the restarted rank")
        expect_correct(job, job.call_all([{"cmd": "run", "kind": "send", "peer": victim, "count": 1000},
                                          {"cmd": "run", "kind": "recv", "peer": 0, "count": 1000}],
                                         ranks=[0, victim], timeout=4 * timeout), [0, victim],
                       "send/recv between a survivor and the restarted rank")
