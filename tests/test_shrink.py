"""Shrinking a group after a failure: the survivors go on at a new epoch, with exact results.

* a rank SIGKILLed in the middle of an allreduce loop: every survivor raises PeerFailure within
  twice the timeout, ``cc.shrink()`` re-forms the world without it (quickly: its process is gone),
  and allreduce / allgather on the shrunk world give the NumPy reference exactly;
* with ``COLLCOMM_AUTO_SHRINK=1`` the failed call still raises, and the next call already runs on
  the shrunk world;
* a rank SIGSTOPped: the survivors time out, shrink without it (it does not rejoin within the
  shrink's timeout, so it is declared failed); woken up (SIGCONT) it gets EvictedError — from a
  collective and from ``shrink`` — in bounded time, and the survivors are not disturbed.

The rank processes are tests/faultjobs.py's; times are CLOCK_MONOTONIC across processes.
"""

from __future__ import annotations

import signal
import time

import pytest

from faultjobs import Job, RankDied, raised

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")


def run(kind: str, count: int = 1000, **kw) -> dict:
    return {"cmd": "run", "kind": kind, "count": count, **kw}


def describe(answers, ranks) -> str:
    return "\n".join(f"  rank {r}: " + (f"{a.get('error')}(rank={a.get('rank')}): {a.get('msg')}" if a.get("error")
                                         else f"ok correct={a.get('correct')} {a.get('members', '')}")
                     + f"  [{a['t1'] - a['t0']:.3f} s]" for r, a in zip(ranks, answers))


def expect_correct(job: Job, answers, ranks, what: str) -> None:
    for r, a in zip(ranks, answers):
        assert a.get("ok") and a.get("correct"), f"{what}: rank {r}\n{describe(answers, ranks)}\n{job.story()}"


def kill_mid_loop(job: Job, victim: int, count: int) -> tuple[dict, list[dict], list[int]]:
    """Every rank loops over allreduce; the victim SIGKILLs itself inside its second one."""
    for r in range(job.n):
        job.ranks[r].send(run("allreduce", count, iters=200, **({"kill_at": 1} if r == victim else {})))
    killing = job.ranks[victim].answer(60)
    assert killing.get("event") == "killing", f"the victim answered {killing} instead of dying"
    assert job.ranks[victim].wait_exit(10) == -signal.SIGKILL
    survivors = [r for r in range(job.n) if r != victim]
    answers = []
    for r in survivors:
        try:
            answers.append(job.ranks[r].answer(max(killing["t"] + 3 * job.timeout - time.monotonic(), 0.1)))
        except RankDied as e:
            pytest.fail(f"rank {r} still inside its allreduce {3 * job.timeout:g} s after the kill\n{e}")
    report = describe(answers, survivors)
    for r, a in zip(survivors, answers):
        assert raised(a, "PeerFailure"), f"rank {r}: expected PeerFailure\n{report}"
        assert a.get("correct_before"), f"rank {r}: a wrong result before the failure\n{report}"
        assert a["t1"] - killing["t"] < 2 * job.timeout, f"rank {r} took too long\n{report}"
    return killing, answers, survivors


@pytest.mark.timeout(90)
def test_killed_rank_survivors_shrink_and_get_exact_results():
    timeout, n, victim = 3.0, 4, 2
    count = 1 << 20  # 4 MB in 64 KB chunks: the allreduce lasts long enough to be killed inside it
    with Job(n, timeout=timeout, chunk_bytes=1 << 16) as job:
        expect_correct(job, job.call_all(run("allreduce", count)), range(n), "before the fault")
        killing, _, survivors = kill_mid_loop(job, victim, count)
        t = time.monotonic()
        shrunk = job.call_all({"cmd": "shrink"}, ranks=survivors, timeout=4 * timeout)
        report = describe(shrunk, survivors)
        for r, a in zip(survivors, shrunk):
            assert a.get("ok"), f"rank {r}: shrink failed\n{report}\n{job.story()}"
            assert a["members"] == survivors, report
        assert len({(a["group_id"], a["epoch"]) for a in shrunk}) == 1, f"one new group and epoch:\n{report}"
        # The victim's process is gone (its listener refuses): no need to wait out the timeout.
        assert time.monotonic() - t < timeout, f"shrink took {time.monotonic() - t:.2f} s\n{report}"
        for kind in ("allreduce", "allgather", "reduce_scatter", "broadcast"):
            for count_ in (1, 1000, 300_001):
                expect_correct(job, job.call_all(run(kind, count_), ranks=survivors, timeout=4 * timeout),
                               survivors, f"{kind} of {count_} on the shrunk world")


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
def test_stopped_rank_is_evicted_and_refused_when_it_wakes_up():
    timeout, n, victim = 2.0, 4, 3
    with Job(n, timeout=timeout) as job:
        expect_correct(job, job.call_all(run("allreduce", 1 << 18, iters=2)), range(n), "before the fault")
        job.ranks[victim].signal(signal.SIGSTOP)
        survivors = [r for r in range(n) if r != victim]
        failed = job.call_all(run("allreduce", 1 << 18), ranks=survivors, timeout=4 * timeout)
        assert all(raised(a, "CollectiveError") for a in failed), describe(failed, survivors)
        t = time.monotonic()
        shrunk = job.call_all({"cmd": "shrink", "timeout": timeout}, ranks=survivors, timeout=4 * timeout)
        report = describe(shrunk, survivors)
        assert all(a.get("ok") and a["members"] == survivors for a in shrunk), f"{report}\n{job.story()}"
        assert time.monotonic() - t < 3 * timeout, report
        expect_correct(job, job.call_all(run("allreduce", 1 << 18), ranks=survivors, timeout=4 * timeout),
                       survivors, "allreduce on the shrunk world")
        woken_at = job.ranks[victim].signal(signal.SIGCONT)
        try:
            woken = job.ranks[victim].call(run("allreduce", 1 << 18), timeout=3 * timeout)
        except RankDied as e:
            pytest.fail(f"the woken rank's allreduce was still blocked {3 * timeout:g} s later\n{e}")
        assert raised(woken, "EvictedError"), f"the woken rank must be told it was evicted: " \
                                              f"{describe([woken], [victim])}\n{job.story()}"
        assert woken["t1"] - woken_at <= 2 * timeout, describe([woken], [victim])
        again = job.ranks[victim].call({"cmd": "shrink", "timeout": timeout}, timeout=3 * timeout)
        assert raised(again, "EvictedError"), describe([again], [victim])
        # The survivors were not disturbed by the late rank's old-epoch traffic.
        for kind in ("allreduce", "allgather"):
            expect_correct(job, job.call_all(run(kind, 1 << 16, iters=3), ranks=survivors, timeout=4 * timeout),
                           survivors, f"{kind} after the evicted rank woke up")


@pytest.mark.timeout(90)
def test_rank_stopped_mid_loop_wakes_up_evicted_inside_its_collective():
    """SIGSTOP while every rank loops over allreduce (the victim is most likely inside one): the
    survivors fail and shrink; SIGCONT: the victim's pending allreduce raises EvictedError in
    bounded time instead of completing or hanging, and the survivors go on exactly."""
    timeout, n, victim = 2.0, 4, 1
    with Job(n, timeout=timeout, chunk_bytes=1 << 16) as job:
        # Connections first: a SIGSTOP in the middle of a handshake is the transport's own case
        # (its client handshake waits up to HANDSHAKE_TIMEOUT, 10 s, whatever the operation's timeout).
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
