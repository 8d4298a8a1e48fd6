"""Fault injection on the wire (collcomm.faults.inject) and what the transport does about it.

* the ``COLLCOMM_FAULTS`` grammar (pure);
* corrupted payloads: the receiver discards them and asks again (NACK); the sender resends from
  the same source; results stay exact (compared with NumPy) over many operations, and the
  retransmission counters show it happened;
* delay and throttle: slower, exact;
* a killed peer is not reconnected to;
* frames between two transports in one process (corruption, cuts, lost frames): they arrive whole,
  acknowledged, with telemetry; a lost frame is found by the retransmission timer (PROBE/ECHO) and
  sent again; a link that loses everything fails with LinkFailure.

The scenarios against rank processes that are also about a time bound or a recovery (a link that
corrupts everything, connections cut mid-allreduce, random and total frame loss, killed and
stopped ranks) are in tests/test_fault_matrix.py, for both transports side by side.
"""

from __future__ import annotations

import random
import signal
import time

import numpy as np
import pytest

import linkpair
from faultjobs import Job, raised

from collcomm.faults import inject
from collcomm.faults.inject import FaultPlan, parse
from collcomm.transport import frames
from collcomm.transport.frames import ACK, ECHO, NACK, PROBE, ProtocolError


# ============================================================================ grammar (pure)
def test_grammar_parses_every_kind_and_the_seed():
    plan = parse("corrupt:0->1:p=0.01;drop:*->2:p=0.001;delay:1->0:ms=20;throttle:0->1:bps=1e6;"
                 "reset:0->1:after=4M;seed=7")
    assert plan.seed == 7
    kinds = [(r.kind, r.src, r.dst) for r in plan.rules]
    assert kinds == [("corrupt", 0, 1), ("drop", None, 2), ("delay", 1, 0), ("throttle", 0, 1), ("reset", 0, 1)]
    corrupt, drop, delay, throttle, reset = plan.rules
    assert corrupt.p == 0.01 and drop.p == 0.001 and delay.ms == 20 and throttle.bps == 1e6
    assert reset.after == 4 << 20
    assert parse("reset:*->*:after=1500").rules[0].after == 1500
    assert parse("reset:*->*:after=2k").rules[0].after == 2048
    assert parse("corrupt:3->*").rules[0].p == 1.0
    assert parse("corrupt:0->1:p=0.5:seed=3:count=2").rules[0].count == 2
    assert not parse("") and not parse(" ; ")


@pytest.mark.parametrize("text, names", [
    ("explode:0->1", "explode"),
    ("corrupt:01", "corrupt:01"),
    ("corrupt:a->1", "'a'"),
    ("corrupt:0->1:p=2", "p=2"),
    ("corrupt:0->1:q=0.1", "q=0.1"),
    ("corrupt:0->1:p=abc", "p=abc"),
    ("delay:0->1", "delay"),
    ("throttle:0->1:bps=0", "throttle"),
    ("reset:0->1:after=4X", "4X"),
    ("seed=x", "seed=x"),
    ("drop:0->1:p=0.1:p=0.2", "given twice"),
])
def test_grammar_errors_are_one_line_and_name_the_bad_part(text, names):
    with pytest.raises(ValueError) as info:
        parse("delay:1->0:ms=1;" + text)
    message = str(info.value)
    assert "\n" not in message and names in message and message.startswith("COLLCOMM_FAULTS")


def test_plan_from_environment_and_configure(monkeypatch):
    monkeypatch.delenv(inject.ENV, raising=False)
    inject.configure(None)
    assert inject.active_plan() is None
    monkeypatch.setenv(inject.ENV, "drop:0->1:p=0.5")
    assert inject.active_plan().rules[0].kind == "drop"
    try:
        plan = inject.configure("delay:*->*:ms=1")
        assert inject.active_plan() is plan and plan.rules[0].kind == "delay"
    finally:
        inject.configure(None)
    monkeypatch.setenv(inject.ENV, "nonsense")
    with pytest.raises(ValueError):
        inject.active_plan()


def test_link_faults_choose_links_and_corrupt_a_copy():
    plan = parse("corrupt:0->1;reset:*->2:after=100;seed=1")
    assert plan.for_link(1, 0) is None
    f = plan.for_link(0, 1)
    assert f.before_data(10) == "corrupt"
    src = bytes(range(64))
    bad = f.corrupted(memoryview(src))
    assert src == bytes(range(64)) and sum(a != b for a, b in zip(src, bad)) == 1
    r = plan.for_link(5, 2)
    assert r.cut_after(64) is None and r.cut_after(64) == 36 and r.cut_after(64) is None  # once per link
    counted = parse("drop:0->1:count=2").for_link(0, 1)
    assert [counted.before_data(1) for _ in range(4)] == ["drop", "drop", None, None]


def test_seeded_choices_replay():
    def draws(seed):
        f = parse(f"corrupt:0->1:p=0.3;seed={seed}").for_link(0, 1)
        return [f.before_data(100) for _ in range(200)]
    assert draws(4) == draws(4) and draws(4) != draws(5)


def test_control_frames_carry_no_payload():
    for kind in (ACK, NACK, PROBE, ECHO):
        raw = frames.Header(kind, 1, 0, 3, 2, 1).pack()
        assert frames.unpack_header(raw).kind == kind
        with pytest.raises(ProtocolError):
            frames.unpack_header(frames.Header(kind, 1, 0, 3, length=8).pack())


# ============================================================================ against rank processes
def run(kind: str, count: int, **kw) -> dict:
    return {"cmd": "run", "kind": kind, "count": count, **kw}


def story(answers) -> str:
    return "\n".join(f"  rank {r}: {a}" for r, a in enumerate(answers))


def expect_exact(job: Job, answers, what: str) -> None:
    for r, a in enumerate(answers):
        assert a.get("ok") and a.get("correct"), f"{what}: rank {r} wrong or failed\n{story(answers)}\n{job.story()}"


def telemetry(job: Job) -> list[dict]:
    answers = job.call_all({"cmd": "telemetry"})
    assert all(a.get("ok") for a in answers), answers
    return answers


def corruption_loop(p: float, seed: int, n: int, ops: int) -> tuple[int, int]:
    """``ops`` operations (allreduce, allgather, reduce_scatter; assorted sizes and dtypes) with
    corrupted frames on every link; every result exact. Returns (operations, retransmits)."""
    rng = random.Random(seed)
    env = {"COLLCOMM_FAULTS": f"corrupt:*->*:p={p};seed={seed}"}
    done = 0
    with Job(n, timeout=10.0, chunk_bytes=4096, env=env) as job:
        while done < ops:
            kind = rng.choice(["allreduce", "allreduce", "allgather", "reduce_scatter"])
            count = rng.choice([1, 5, 100, 1000, 3000, 9000])
            dtype = rng.choice(["float32", "int32", "float64"])
            iters = min(10, ops - done)
            answers = job.call_all(run(kind, count, dtype=dtype, iters=iters), timeout=60)
            expect_exact(job, answers, f"{kind} of {count} {dtype} with corrupt p={p} seed={seed}")
            done += iters
        retransmits = sum(a["retransmits"] for a in telemetry(job))
        checksum_errors = sum(a["errors"].get("checksum", 0) for a in telemetry(job))
    assert retransmits == checksum_errors, (retransmits, checksum_errors)
    return done, retransmits


@pytest.mark.timeout(120)
def test_corrupted_frames_are_retransmitted_never_reduced_over_1000_operations():
    """1,000 operations across three jobs with different seeds and corruption rates: no wrong result,
    and corrupted frames were seen and sent again."""
    total = 0
    for p, seed, n, ops in [(0.02, 11, 3, 340), (0.05, 12, 4, 330), (0.1, 13, 3, 330)]:
        done, retransmits = corruption_loop(p, seed, n, ops)
        assert retransmits > 0, f"p={p}: no frame was corrupted in {done} operations"
        total += done
    assert total >= 1000


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", range(5))
def test_corruption_long_loop(seed):
    done, retransmits = corruption_loop(0.05, 100 + seed, 4, 2000)
    assert retransmits > 0


@pytest.mark.timeout(60)
def test_delay_and_throttle_results_exact():
    env = {"COLLCOMM_FAULTS": "delay:1->0:ms=5;throttle:0->1:bps=4e7;delay:*->2:ms=1"}
    with Job(3, timeout=20.0, chunk_bytes=1 << 16, env=env) as job:
        for kind, count in [("allreduce", 1 << 20), ("allgather", 100_000), ("reduce_scatter", 50_000),
                            ("allreduce", 7)]:
            expect_exact(job, job.call_all(run(kind, count, iters=2), timeout=40), f"{kind} throttled")


@pytest.mark.timeout(60)
def test_killed_peer_is_not_reconnected_to():
    """A dead peer refuses the reconnection: PeerFailure within the timeout, as without reconnection."""
    timeout = 4.0
    with Job(3, timeout=timeout) as job:
        expect_exact(job, job.call_all(run("allreduce", 1000)), "before")
        killed = job.ranks[0].signal(signal.SIGKILL)
        job.ranks[0].wait_exit(10)
        answers = job.call_all(run("allreduce", 1000), ranks=[1, 2], timeout=4 * timeout)
        for a in answers:
            assert raised(a, "PeerFailure") and a["rank"] == 0, answers
            assert a["t1"] - killed < timeout, answers


# ============================================================================ two transports in one process
def _pair(plan: str | None, auth_frames: bool = False):
    a, b = linkpair.transports(parse(plan) if plan else FaultPlan(), auth_frames)
    return (a, b) + linkpair.links(a, b)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plan", [None, "corrupt:0->1:p=0.3;seed=3", "reset:0->1:after=1M",
                                  "reset:0->1:after=2M;corrupt:0->1:p=0.1;throttle:0->1:bps=2e8",
                                  "drop:0->1:p=0.3;seed=3", "drop:0->1:p=0.2;corrupt:0->1:p=0.2;seed=4"])
@pytest.mark.parametrize("auth_frames", [False, True], ids=["checksums", "frame-macs"])
def test_link_frames_arrive_whole_with_telemetry(plan, auth_frames):
    """Frames from rank 0 to rank 1 (small and large) arrive exactly, their ``done`` runs once
    acknowledged, and the telemetry counts bytes, transfers, heartbeats, checksum errors (with
    frame MACs, MAC failures: the corruption happens after the frame was sealed),
    retransmissions, lost frames sent again and broken connections."""
    import threading

    from collcomm.transport.frames import DATA, Header

    a, b, la, lb = _pair(plan, auth_frames)
    try:
        box = b.mailbox(5)
        rng = np.random.default_rng(0)
        total = 0
        for i in range(40):
            n = 200_000 if i % 2 else 1000
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            r = linkpair.Box(n)
            box.register(i, r)
            acked = threading.Event()
            view = memoryview(data)
            la.send(Header(DATA, 5, 0, i, 0, 0, 0, n, frames.checksum(view)), view, acked.set)
            assert r.arrived.wait(10) and r.error is None, (i, r.error)
            assert acked.wait(10), f"frame {i} was not acknowledged"
            box.finish(i)
            assert bytes(r.buf) == data
            total += n
        sent = a.telemetry.link(0, 1)
        got = b.telemetry.link(0, 1)
        deadline = time.monotonic() + 5  # the sender thread counts a frame just after it left
        while sent.bytes < total and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got.bytes >= total and sent.bytes >= total
        # The large ones are timed: by the sender, or, read by reference out of its memory (same
        # machine, no faults, no MACs), by the receiver alone.
        assert got.transfers >= 20 and (sent.transfers >= 20 or lb.reference_reads == 20), (sent.transfers,
                                                                                           lb.reference_reads)
        assert lb.reference_reads == (20 if la.by_reference else 0)
        assert got.heartbeat_mono is not None and a.telemetry.link(1, 0).heartbeat_mono is not None  # ACKs
        if plan and "corrupt" in plan:
            kind = "mac" if auth_frames else "checksum"
            assert got.errors.get(kind, 0) > 0 and sent.retransmits >= got.errors[kind]
            assert set(got.errors) <= {kind, "eof", "reset"}, got.errors
        if plan and "reset" in plan:
            assert la.reconnects == 1 and lb.reconnects == 1
            assert sent.errors.get("reset", 0) == 1
        if plan and "drop" in plan:
            assert la.lost_resends > 0 and sent.retransmits >= la.lost_resends
        else:
            assert la.lost_resends == 0, "a frame that arrived was taken for lost"
    finally:
        a.close()
        b.close()


def _send_one(link, box, op: int, n: int):
    import threading

    from collcomm.transport.frames import DATA, Header

    data = np.random.default_rng(op).integers(0, 256, n, dtype=np.uint8).tobytes()
    r = linkpair.Box(n)
    acked = threading.Event()
    view = memoryview(data)
    link.send(Header(DATA, 5, 0, op, 0, 0, 0, n, frames.checksum(view)), view, acked.set)
    return data, r, acked


@pytest.mark.timeout(60)
def test_a_link_that_loses_every_frame_fails_both_ends_with_link_failure():
    """drop:0->1 (every DATA frame lost, the peer alive and answering): the frame is sent again each
    time the peer's ECHO shows it missing, then the operation fails at both ends with LinkFailure
    naming rank 1, in well under a second of retransmission timeouts (not at an operation timeout)."""
    from collcomm.errors import LinkFailure
    from collcomm.transport.tcp import MAX_LOST_RESENDS

    a, b, la, lb = _pair("drop:0->1")
    try:
        box = b.mailbox(5)
        t0 = time.monotonic()
        _, r, acked = _send_one(la, box, 0, 100_000)
        box.register(0, r)
        assert r.arrived.wait(10), "the receiver was never told"
        took = time.monotonic() - t0
        assert isinstance(r.error, LinkFailure) and r.error.rank == 1, r.error
        assert not acked.is_set()
        assert la.lost_resends == MAX_LOST_RESENDS
        assert took < 5.0, f"the lost frame was given up after {took:.2f} s"
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
def test_a_slow_receiver_is_not_taken_for_a_lossy_link():
    """The receiver starts the operation long after the frame was sent (its frames wait in the
    socket): many retransmission timeouts pass, the sender probes, yet nothing is taken for lost,
    nothing is sent again, nothing fails; the frame arrives once, whole, and is acknowledged."""
    a, b, la, lb = _pair(None)
    try:
        box = b.mailbox(5)
        data, r, acked = _send_one(la, box, 0, 100_000)
        late = time.monotonic() + 1.5  # > MAX_LOST_RESENDS timeouts of RTO_MIN at the backoff limit
        while time.monotonic() < late:
            assert not r.arrived.is_set() and not acked.is_set()
            time.sleep(0.05)
        box.register(0, r)
        assert r.arrived.wait(10) and r.error is None, r.error
        assert acked.wait(10)
        assert bytes(r.buf) == data
        assert la.lost_resends == 0 and a.telemetry.link(0, 1).retransmits == 0
        assert la._probe_seq >= 1, "the sender never probed for the unacknowledged frame"
    finally:
        a.close()
        b.close()
