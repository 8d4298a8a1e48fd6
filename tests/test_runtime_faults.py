"""Faults at the OS level and on the wire, against real rank processes (tests/faultjobs.py).

What a rank must survive, and the bound on the time it takes to say so (ARCHITECTURE.md,
notes/faults.md, Gloo's rule: an error no later than about twice the timeout, and, for a
hung peer, no earlier than half of it):

* a rank SIGKILLed in the middle of an allreduce: every survivor raises PeerFailure naming
  it, within the timeout, and never returns partial data as a success;
* a rank killed between two collectives: the survivors' next collective raises PeerFailure;
* a SIGSTOPped rank woken up (SIGCONT) before the others re-formed the group fails its own next
  call in bounded time (the bounds on the others' CollectiveTimeout, and a stopped rank evicted by
  a shrink, are scenarios of tests/test_fault_matrix.py);
* ranks that disagree on size, dtype, reduction, collective or root: MismatchError on every
  rank, quickly, and the group works again afterwards;
* every blocking call ends at its timeout (per call ``timeout=``, ``init(timeout=)``,
  ``COLLCOMM_TIMEOUT``, ``Work.wait``) with CollectiveTimeout;
* garbage at a rank's data port (before and after a correct handshake: random bytes,
  truncated or forged handshakes, a wrong token, bad magic/version/crc, a 2**63 length,
  wrong group or epoch, unknown kind): refused with a typed error, never a crash or a hang,
  and the rank's next collectives with the others complete correctly.

Times are measured with CLOCK_MONOTONIC across processes: from the moment the test sent the
signal (or the victim announced it killed itself) to the moment the survivor's call raised.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import struct
import time

import numpy as np
import pytest

from faultjobs import Job, RankDied, client_handshake, connect, raised, raw_header, recv_exactly

from collcomm.transport import frames
from collcomm.transport.frames import ABORT, DATA
from collcomm.transport.interface import P2P_BASE
from collcomm.transport.tcp import MAX_HANDSHAKES

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")


def describe(answers, ranks=None) -> str:
    ranks = range(len(answers)) if ranks is None else ranks
    return "\n".join(f"  rank {r}: " + (f"{a.get('error')}(rank={a.get('rank')}): {a.get('msg')}" if a.get("error")
                                         else f"ok correct={a.get('correct')}")
                     + f"  [{a['t1'] - a['t0']:.3f} s]" for r, a in zip(ranks, answers))


def allreduce(count=1000, **kw) -> dict:
    return {"cmd": "run", "kind": "allreduce", "count": count, **kw}


def check_correct(job: Job, answers, what: str, ranks=None) -> None:
    ranks = list(range(len(answers))) if ranks is None else list(ranks)
    for r, a in zip(ranks, answers):
        assert a.get("ok") and a.get("correct"), f"{what}: rank {r} did not complete correctly\n" \
                                                 f"{describe(answers, ranks)}\n{job.story()}"


# ============================================================================ a rank killed
@pytest.mark.timeout(60)
@pytest.mark.parametrize("algorithm", [None, "ring"], ids=["planner-choice", "ring"])
def test_rank_killed_mid_allreduce_every_survivor_raises_peer_failure_naming_it(algorithm):
    """The victim SIGKILLs itself from a thread once it is inside an allreduce and a peer's data
    has landed in its buffer. With a ring, rank 0 is not a neighbour of the victim (rank 2): it
    must still name rank 2, not the neighbour that told it."""
    timeout, n, victim = 5.0, 4, 2
    env = {"COLLCOMM_ALGORITHM": algorithm} if algorithm else None
    count = 1 << 21  # 8 MB in 64 KB chunks: the operation lasts long enough to be killed inside it
    with Job(n, timeout=timeout, chunk_bytes=1 << 16, env=env) as job:
        check_correct(job, job.call_all(allreduce(count)), "the allreduce before the fault")
        for r in range(n):
            job.ranks[r].send(allreduce(count, iters=200, **({"kill_at": 1} if r == victim else {})))
        killing = job.ranks[victim].answer(60)
        assert killing.get("event") == "killing", f"the victim answered {killing} instead of dying"
        assert job.ranks[victim].wait_exit(10) == -signal.SIGKILL
        survivors = [r for r in range(n) if r != victim]
        answers = []
        for r in survivors:
            try:
                answers.append(job.ranks[r].answer(max(killing["t"] + 3 * timeout - time.monotonic(), 0.1)))
            except RankDied as e:
                pytest.fail(f"rank {r} was still inside its allreduce {3 * timeout:g} s after rank {victim} was "
                            f"killed (timeout {timeout} s); the others: {describe(answers, survivors)}\n{e}")
        report = describe(answers, survivors)
        for r, a in zip(survivors, answers):
            assert not a.get("ok"), f"rank {r} finished 200 allreduces with a dead rank\n{report}"
            assert a.get("correct_before"), f"rank {r} got a wrong result before the failure\n{report}"
            assert a["iter"] in (killing["iter"], killing["iter"] + 1), report
            assert raised(a, "PeerFailure"), f"rank {r} raised {a['error']}, not PeerFailure\n{report}"
            elapsed = a["t1"] - killing["t"]
            assert elapsed < timeout, f"rank {r} took {elapsed:.2f} s (timeout {timeout} s)\n{report}"
        named = {r: a["rank"] for r, a in zip(survivors, answers)}
        assert all(v == victim for v in named.values()), \
            f"every survivor must name the killed rank {victim}; they named {named}\n{report}"


@pytest.mark.timeout(60)
def test_rank_killed_between_collectives_next_collective_raises_peer_failure():
    """Killed while idle (the test kills it by pid): the survivors' next allreduce cannot connect
    to it; they must raise PeerFailure naming it, within twice the timeout."""
    timeout, n, victim = 3.0, 3, 1
    with Job(n, timeout=timeout) as job:
        check_correct(job, job.call_all(allreduce(100_000, iters=2)), "the allreduces before the fault")
        killed_at = job.ranks[victim].signal(signal.SIGKILL)
        job.ranks[victim].wait_exit(10)
        survivors = [r for r in range(n) if r != victim]
        answers = job.call_all(allreduce(100_000), ranks=survivors, timeout=4 * timeout)
        report = describe(answers, survivors)
        for r, a in zip(survivors, answers):
            assert raised(a, "PeerFailure"), f"rank {r}: expected PeerFailure\n{report}"
            assert a["rank"] == victim, f"rank {r} named rank {a['rank']}, not {victim}\n{report}"
            assert a["t1"] - killed_at < 2 * timeout, f"rank {r} took too long\n{report}"


# ============================================================================ a rank stopped
@pytest.mark.timeout(60)
def test_stopped_rank_woken_up_fails_its_next_call_in_bounded_time():
    """After the others timed out, SIGCONT: the woken rank's next allreduce must raise (never
    succeed against ranks that gave up on it, never block past about twice its timeout); the
    others go on without it in a new group."""
    timeout, n, victim = 2.0, 4, 3
    with Job(n, timeout=timeout) as job:
        check_correct(job, job.call_all(allreduce(1 << 18, iters=2)), "the allreduces before the fault")
        job.ranks[victim].signal(signal.SIGSTOP)
        survivors = [r for r in range(n) if r != victim]
        answers = job.call_all(allreduce(1 << 18), ranks=survivors, timeout=4 * timeout)
        assert all(a.get("error") for a in answers), describe(answers, survivors)
        woken_at = job.ranks[victim].signal(signal.SIGCONT)
        try:
            woken = job.ranks[victim].call(allreduce(1 << 18), timeout=2.5 * timeout)
        except RankDied as e:
            pytest.fail(f"the woken rank's allreduce (timeout {timeout} s) was still blocked "
                        f"{2.5 * timeout:g} s later\n{e}")
        assert woken.get("error") and raised(woken, "CollectiveError"), \
            f"the woken rank's allreduce must fail: {describe([woken], [victim])}"
        assert woken["t1"] - woken_at <= 2 * timeout, describe([woken], [victim])
        job.call_all({"cmd": "group", "ranks": survivors, "name": "survivors"}, ranks=survivors)
        check_correct(job, job.call_all(allreduce(1 << 18, group="survivors"), ranks=survivors),
                      "the survivors' allreduce without the woken rank", survivors)


# ============================================================================ mismatches
MISMATCHES = {
    # name: (what the odd rank calls, what the other ranks call, the odd rank)
    "size": ({"kind": "allreduce", "count": 1001}, {"kind": "allreduce", "count": 1000}, 1),
    "size-large-last-rank": ({"kind": "allreduce", "count": (1 << 20) + 1}, {"kind": "allreduce", "count": 1 << 20},
                             2),
    "dtype": ({"kind": "allreduce", "count": 1000, "dtype": "int32"}, {"kind": "allreduce", "count": 1000}, 1),
    "dtype-same-bytes": ({"kind": "allreduce", "count": 2000, "dtype": "float32"},
                         {"kind": "allreduce", "count": 1000, "dtype": "float64"}, 2),
    "op-large": ({"kind": "allreduce", "count": 1 << 21, "op": "max"}, {"kind": "allreduce", "count": 1 << 21}, 1),
    "collective": ({"kind": "broadcast", "count": 1000}, {"kind": "allreduce", "count": 1000}, 1),
    "collective-ag-rs": ({"kind": "reduce_scatter", "count": 1000}, {"kind": "allgather", "count": 1000}, 2),
    "broadcast-size": ({"kind": "broadcast", "count": 1001}, {"kind": "broadcast", "count": 1000}, 2),
    "broadcast-root": ({"kind": "broadcast", "count": 1000, "root": 1},
                       {"kind": "broadcast", "count": 1000, "root": 0}, 1),
    "reduce-root": ({"kind": "reduce", "count": 1000, "root": 2}, {"kind": "reduce", "count": 1000, "root": 0}, 2),
}


def expect_mismatch_everywhere(answers, case: str, timeout: float) -> None:
    report = describe(answers)
    for r, a in enumerate(answers):
        assert raised(a, "MismatchError"), \
            f"{case}: rank {r} {'returned' if a.get('ok') else 'raised ' + str(a.get('error'))}, " \
            f"expected MismatchError on every rank\n{report}"
        assert a["t1"] - a["t0"] < timeout, f"{case}: rank {r} took {a['t1'] - a['t0']:.2f} s\n{report}"


@pytest.mark.timeout(40)
@pytest.mark.parametrize("case", list(MISMATCHES))
def test_ranks_that_disagree_all_raise_mismatch_error(case):
    """After a collective they agree on, one rank calls something else than the others: every rank
    raises MismatchError within the timeout, never a timeout, a PeerFailure or a result. For a
    rooted collective that includes the root, which only sends: it must learn of the disagreement
    before it returns (ARCHITECTURE.md: a failure is raised on every member of the group)."""
    other, same, odd = MISMATCHES[case]
    with Job(3, timeout=3.0, chunk_bytes=1 << 16) as job:  # large buffers: many frames per operation
        check_correct(job, job.call_all(allreduce(10_000)), "the allreduce before the mismatch")
        calls = [dict(other if r == odd else same, cmd="run") for r in range(job.n)]
        expect_mismatch_everywhere(job.call_all(calls, timeout=3 * job.timeout), case, job.timeout)


@pytest.mark.timeout(40)
def test_mismatch_in_the_first_collective_of_a_job():
    """The same while the connections are still being set up (the first collective of the job)."""
    with Job(3, timeout=3.0) as job:
        other, same, odd = MISMATCHES["size"]
        calls = [dict(other if r == odd else same, cmd="run") for r in range(job.n)]
        expect_mismatch_everywhere(job.call_all(calls, timeout=3 * job.timeout), "first collective", job.timeout)


@pytest.mark.timeout(40)
def test_a_mismatch_never_blocks_a_rank_past_its_timeout():
    """Two ranks, 16 MB in 64 KB frames, sizes off by one element: rank 0 refuses rank 1's first
    frame and drops the connection while rank 1 is still sending the rest of its frames. Both must
    raise MismatchError at once; rank 1 (the one that waits to be connected) must not wait for a new
    connection per frame it still had to send."""
    timeout = 2.0
    with Job(2, timeout=timeout, chunk_bytes=1 << 16) as job:
        check_correct(job, job.call_all(allreduce(1000)), "the allreduce before the mismatch")
        job.ranks[0].send(allreduce((1 << 22) + 1))
        job.ranks[1].send(allreduce(1 << 22))
        answers = []
        for r in range(2):
            try:
                answers.append(job.ranks[r].answer(3 * timeout))
            except RankDied:
                pytest.fail(f"rank {r}'s mismatched allreduce (timeout {timeout} s) was still blocked "
                            f"{3 * timeout:g} s later; the others: {describe(answers)}")
        expect_mismatch_everywhere(answers, "2 ranks, many frames", timeout)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("case", ["op-large"])
def test_group_works_again_after_a_mismatch(case):
    """A mismatch is the callers' mistake, not a broken fabric: once every rank has raised, the
    next collective that they agree on completes correctly on every rank."""
    timeout, n = 3.0, 3
    other, same, odd = MISMATCHES[case]
    with Job(n, timeout=timeout) as job:
        answers = job.call_all([dict(other if r == odd else same, cmd="run") for r in range(n)],
                               timeout=4 * timeout)
        assert all(a.get("error") for a in answers), describe(answers)
        for attempt in range(2):
            after = job.call_all(allreduce(1 << 20), timeout=3 * timeout)
            check_correct(job, after, f"allreduce #{attempt + 1} after the {case} mismatch (mismatch: "
                                      f"{[a.get('error') for a in answers]})")


@pytest.mark.timeout(30)
def test_point_to_point_size_mismatch_raises_on_the_receiver_and_the_pair_goes_on():
    """recv of 17 elements from a send of 16: the receiver raises MismatchError at once and its
    buffer is not reported as received; the sender does not hang; the next matching pair works."""
    timeout = 3.0
    with Job(2, timeout=timeout) as job:
        for count in (16, 100_000):
            answers = job.call_all([{"cmd": "run", "kind": "send", "peer": 1, "tag": 5, "count": count},
                                    {"cmd": "run", "kind": "recv", "peer": 0, "tag": 5, "count": count + 1}],
                                   timeout=4 * timeout)
            report = describe(answers)
            assert raised(answers[1], "MismatchError"), report
            assert answers[1]["t1"] - answers[1]["t0"] < timeout, report
            assert answers[0].get("ok") or raised(answers[0], "CollectiveError"), report
            assert answers[0]["t1"] - answers[0]["t0"] <= 2 * timeout, report
            answers = job.call_all([{"cmd": "run", "kind": "send", "peer": 1, "tag": 5, "count": count},
                                    {"cmd": "run", "kind": "recv", "peer": 0, "tag": 5, "count": count}],
                                   timeout=4 * timeout)
            check_correct(job, answers, "the matching send/recv after the mismatch")


# ============================================================================ every call has a timeout
def bounded(a: dict, timeout: float, what: str) -> None:
    took = a["t1"] - a["t0"]
    assert raised(a, "CollectiveTimeout"), f"{what}: expected CollectiveTimeout, got " \
                                           f"{a.get('error') or 'success'}: {a.get('msg')} after {took:.2f} s"
    assert timeout / 2 <= took <= 2 * timeout, f"{what}: CollectiveTimeout after {took:.2f} s, timeout {timeout} s"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("alone", [0, pytest.param(1, marks=pytest.mark.slow)],  # the mirror case: slow (CI time)
                         ids=["lower-rank-waits", "higher-rank-waits"])
def test_collcomm_timeout_bounds_a_collective_whose_peer_never_comes(alone):
    """COLLCOMM_TIMEOUT (init() without timeout) is every call's default: a rank whose peer never
    enters the collective raises CollectiveTimeout at that timeout, whichever rank of the pair it is
    (the lower rank connects, the higher one waits to be connected: the peer is alive, so it is a
    timeout, not a PeerFailure). The per-call timeout= overrides it."""
    timeout = 2.0
    with Job(2, timeout=timeout, env_timeout=True) as job:
        rank = job.ranks[alone]
        bounded(rank.call(allreduce(1000), timeout=4 * timeout), timeout, f"rank {alone}'s lone allreduce")
        bounded(rank.call({"cmd": "run", "kind": "barrier"}, timeout=4 * timeout), timeout,
                f"rank {alone}'s lone barrier")
        bounded(rank.call(allreduce(1000, timeout=1.0), timeout=4 * timeout), 1.0,
                f"rank {alone}'s lone allreduce(timeout=1)")


@pytest.mark.timeout(60)
def test_every_blocking_call_ends_at_its_timeout():
    """init (a world that never fills), new_group (a member that never joins), recv (no sender),
    send (no receiver, a payload larger than the socket buffers), an async allreduce's Work.wait:
    each ends with CollectiveTimeout between half and twice its timeout."""
    timeout = 1.5
    with Job(3, timeout=timeout, start=False) as job:
        lone = job.ranks[0].call({"cmd": "init", "timeout": timeout}, timeout=4 * timeout)
        bounded(lone, timeout, "init while rank 1 and 2 never register")
    with Job(2, timeout=timeout, env_timeout=True) as job:
        r0 = job.ranks[0]
        bounded(r0.call({"cmd": "group", "ranks": [0, 1], "name": "pair", "timeout": 1.0}, timeout=4 * timeout),
                1.0, "new_group(timeout=1) while rank 1 never joins")
        bounded(r0.call({"cmd": "group", "ranks": [0, 1], "name": "pair2"}, timeout=4 * timeout), timeout,
                "new_group while rank 1 never joins")
        bounded(r0.call({"cmd": "run", "kind": "recv", "peer": 1, "tag": 3, "count": 10}, timeout=4 * timeout),
                timeout, "recv from rank 1 that never sends")
        bounded(r0.call({"cmd": "run", "kind": "send", "peer": 1, "tag": 4, "count": 8 << 20},
                        timeout=4 * timeout), timeout, "send of 32 MB to rank 1 that never receives")
        bounded(r0.call(allreduce(1000, **{"async": True, "wait_timeout": 1.0}), timeout=4 * timeout), 1.0,
                "Work.wait(timeout=1) of an async allreduce (call timeout 1.5 s)")
        bounded(job.ranks[1].call({"cmd": "run", "kind": "recv", "peer": 0, "tag": 6, "count": 10},
                                  timeout=4 * timeout), timeout, "rank 1's recv from rank 0 that never sends")


# ============================================================================ garbage at the data port
def closed_by_peer(sock: socket.socket, timeout: float) -> bytes:
    """What the rank sends before closing the connection (b"" if nothing); fails if it keeps it open."""
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            part = sock.recv(4096)
            if not part:
                return got
            got += part
    except ConnectionResetError:
        return got
    except socket.timeout:
        pytest.fail(f"the rank kept a bad connection open for {timeout} s (got {got!r})")


def hello(client: int, server: int, group: int, epoch: int, magic=frames.HANDSHAKE_MAGIC,
          version=frames.VERSION) -> bytes:
    return struct.pack("<4sB3xIIII16s", magic, version, client, server, group, epoch, os.urandom(16))


PRE_HANDSHAKE = {
    "random-bytes": lambda job, v: os.urandom(4096),
    "random-bytes-short": lambda job, v: os.urandom(frames.HELLO_SIZE),
    "http-request": lambda job, v: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64,
    "hello-bad-magic": lambda job, v: hello(0, v, 0, 0, magic=b"XXXX"),
    "hello-bad-version": lambda job, v: hello(0, v, 0, 0, version=99),
    "hello-to-another-rank": lambda job, v: hello(0, v + 7, 0, 0),
}


@pytest.fixture(scope="module")
def port_job():
    """Three ranks whose rank 2 the tests attack; its next collectives must still work."""
    with Job(3, timeout=3.0) as job:
        yield job


_names = itertools.count()


def still_works(job: Job, victim: int = 2) -> None:
    """The victim's next collectives complete correctly: on the world (kept connections) and on a
    new group with another rank (a fresh handshake through the attacked listener)."""
    check_correct(job, job.call_all(allreduce(10_000), timeout=4 * job.timeout), "world allreduce after the attack")
    other = [r for r in range(job.n) if r != victim][-1]
    pair = sorted([other, victim])
    name = f"pair-{next(_names)}"
    answers = job.call_all({"cmd": "group", "ranks": pair, "name": name}, ranks=pair, timeout=4 * job.timeout)
    assert all(a.get("ok") for a in answers), f"new_group after the attack: {answers}\n{job.story()}"
    check_correct(job, job.call_all(allreduce(10_000, group=name), ranks=pair, timeout=4 * job.timeout),
                  "allreduce on a new group after the attack", pair)


LISTENERS = ["tcp", "unix"]  # a rank's TCP port and its abstract Unix socket (same machine)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("case", list(PRE_HANDSHAKE))
def test_garbage_before_the_handshake_is_refused_and_the_rank_keeps_serving(port_job, case, listener):
    victim = 2
    with connect(port_job.addresses[victim], listener) as s:
        try:
            s.sendall(PRE_HANDSHAKE[case](port_job, victim))
        except OSError:
            pass  # refused mid-send
        got = closed_by_peer(s, timeout=15.0)
        assert got == b"", f"{case}: the rank answered {got!r} to a bad handshake"
    still_works(port_job, victim)


@pytest.mark.timeout(40)
def test_connections_without_the_token_are_refused_and_the_job_goes_on(port_job):
    """A peer that knows the wire format but not the token: its handshake is refused (no ACCEPTED,
    connection closed), a TcpTransport with the wrong token gets AuthenticationError, and so does a
    coordinator client; the job's collectives go on."""
    from collcomm.coordinator.client import CoordinatorClient
    from collcomm.errors import AuthenticationError
    from collcomm.transport.tcp import TcpTransport

    job, victim = port_job, 2
    wrong = b"not-the-job-token"
    with connect(job.addresses[victim]) as s:  # a client proving the wrong token
        raw = frames.new_hello(0, victim, 0, 0).pack()
        s.sendall(raw)
        challenge = recv_exactly(s, frames.CHALLENGE_SIZE)
        nonce = challenge[:16]
        assert not frames.mac_ok(frames.mac(wrong, b"S", raw, nonce), challenge[16:])
        s.sendall(frames.mac(wrong, b"C", raw, nonce))
        assert closed_by_peer(s, timeout=10.0) == b"", "the rank accepted a client without the token"
    with connect(job.addresses[victim], "unix") as s:  # a client that answers the challenge with noise
        s.sendall(frames.new_hello(0, victim, P2P_BASE + 999, 0).pack())
        recv_exactly(s, frames.CHALLENGE_SIZE)
        s.sendall(os.urandom(frames.MAC_SIZE))
        assert closed_by_peer(s, timeout=10.0) == b""
    impostor = TcpTransport(0, "wrong-token", host="127.0.0.1")
    try:
        impostor.set_peers({victim: job.addresses[victim]})
        with pytest.raises(AuthenticationError):
            impostor.link(victim, P2P_BASE + 998, 0, 3.0)
    finally:
        impostor.close()
    client = CoordinatorClient(job.coordinator, "wrong-token", timeout=3.0)
    try:
        with pytest.raises(AuthenticationError):
            client.kv_get("abort/0/0/0", timeout=1.0)
    finally:
        client.close()
    still_works(job, victim)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("held,listener", [("nothing", "tcp"), ("partial-hello", "unix")])
def test_stalled_connections_do_not_lock_the_job_out(port_job, held, listener):
    """More idle or half-sent handshakes than the rank serves at once (a port scanner, a stuck
    client) are held open: the rank must still accept the job's own new connections within the
    collective timeout."""
    job, victim = port_job, 2
    socks = []
    try:
        for _ in range(MAX_HANDSHAKES + 8):
            s = connect(job.addresses[victim], listener)
            if held == "partial-hello":
                s.sendall(frames.new_hello(0, victim, 0, 0).pack()[:10])
            socks.append(s)
        still_works(job, victim)
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------- after a correct handshake
PAYLOAD = np.arange(16, dtype=np.float32).tobytes()
P2P_DESC = frames.describe("p2p", "float32")


def good_frame(group: int, epoch: int = 0, op: int = 0) -> bytes:
    return frames.Header(DATA, group, epoch, op, desc=P2P_DESC, length=len(PAYLOAD),
                         checksum=frames.checksum(PAYLOAD)).pack() + PAYLOAD


def data(group: int, **fields) -> bytes:
    fields.setdefault("desc", P2P_DESC)
    fields.setdefault("length", len(PAYLOAD))
    fields.setdefault("checksum", frames.checksum(PAYLOAD))
    return raw_header(DATA, group, 0, 0, **fields) + PAYLOAD


# name: (bytes sent after the handshake, what the receiving rank's recv must do)
#   "ok": receive the data; an error class name: raise it (fast); "refused": raise any CollectiveError
#   (fast) other than a timeout; "timeout": CollectiveTimeout at its timeout (the frame's operation
#   or the rest of the frame never comes, the connection stays open).
FRAMES = {
    "valid-frame": (lambda g: good_frame(g), "ok"),
    "random-bytes": (lambda g: os.urandom(4096), "refused"),
    "bad-magic": (lambda g: data(g, magic=b"XXXX"), "refused"),
    "bad-version": (lambda g: data(g, version=2), "refused"),
    "bad-header-crc": (lambda g: data(g, crc=0xDEADBEEF), "refused"),
    "oversize-2**63": (lambda g: raw_header(DATA, g, 0, 0, desc=P2P_DESC, length=2 ** 63), "refused"),
    "oversize-2**64-1": (lambda g: raw_header(DATA, g, 0, 0, desc=P2P_DESC, length=2 ** 64 - 1), "refused"),
    "oversize-abort": (lambda g: raw_header(ABORT, g, 0, 0, length=2 ** 63), "refused"),
    "length-2**31-1": (lambda g: raw_header(DATA, g, 0, 0, desc=P2P_DESC, length=2 ** 31 - 1), "MismatchError"),
    "wrong-group": (lambda g: data(g + 1), "refused"),
    "wrong-epoch": (lambda g: good_frame(g, epoch=7), "refused"),
    "unknown-kind": (lambda g: raw_header(9, g, 0, 0, desc=P2P_DESC, length=len(PAYLOAD)) + PAYLOAD, "refused"),
    "wrong-desc": (lambda g: data(g, desc=P2P_DESC ^ 1), "MismatchError"),
    "wrong-length": (lambda g: data(g, length=len(PAYLOAD) - 4)[:-4], "MismatchError"),
    # A payload that fails its checksum is discarded and asked for again (a NACK): from a sender
    # that never resends, the receive times out; resent whole, it is received.
    "bad-payload-checksum": (lambda g: data(g, checksum=frames.checksum(PAYLOAD) ^ 1), "timeout"),
    "bad-payload-then-resent": (lambda g: data(g, checksum=frames.checksum(PAYLOAD) ^ 1)[:-1] + b"\0" + data(g),
                                "ok"),
    "abort-frame": (lambda g: raw_header(ABORT, g, 0, 0, length=16) + b"mismatch|-1|nope", "MismatchError"),
    "abort-garbage": (lambda g: raw_header(ABORT, g, 0, 0, length=64) + os.urandom(64), "refused"),
    "header-then-close": (lambda g: good_frame(g)[:40], "refused-on-close"),
    "truncated-held": (lambda g: good_frame(g)[:40], "timeout"),
    "future-operation": (lambda g: good_frame(g, op=5), "timeout"),
}
_tags = itertools.count(100)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("case,listener", [(c, "tcp") for c in FRAMES] + [
    (c, "unix") for c in ("valid-frame", "random-bytes", "bad-header-crc", "oversize-2**63", "header-then-close")])
def test_fuzzed_frames_after_a_correct_handshake(port_job, case, listener):
    """The test authenticates as rank 0 (it knows the token) for a point-to-point tag that only it
    uses, sends one frame, and rank 2 receives from rank 0 on that tag: the frame is refused with a
    typed error (fast) or delivered if valid; the rank does not crash or hang, and its collectives
    with the real rank 0 and rank 1 still complete correctly."""
    job, victim, timeout = port_job, 2, port_job.timeout
    build, expect = FRAMES[case]
    tag = next(_tags)
    group = P2P_BASE + tag
    sock = client_handshake(job.addresses[victim], job.token, client=0, server=victim, group=group, epoch=0,
                            listener=listener)
    try:
        job.ranks[victim].send({"cmd": "run", "kind": "recv", "peer": 0, "tag": tag, "count": 16})
        try:
            sock.sendall(build(group))
        except OSError:
            pass
        if expect == "refused-on-close":
            sock.close()
        a = job.ranks[victim].answer(4 * timeout)
    finally:
        sock.close()
    took = a["t1"] - a["t0"]
    outcome = f"{case}: recv {'returned' if a.get('ok') else 'raised ' + str(a.get('error'))}: {a.get('msg')} " \
              f"after {took:.3f} s"
    if expect == "ok":
        assert a.get("ok") and a.get("correct"), outcome
    elif expect == "timeout":
        assert raised(a, "CollectiveTimeout") and timeout / 2 <= took <= 2 * timeout, outcome
    else:
        assert not a.get("ok"), outcome
        assert raised(a, "CollectiveError") and not raised(a, "CollectiveTimeout"), outcome
        if expect not in ("refused", "refused-on-close"):
            assert raised(a, expect), outcome
        assert took < timeout / 2, outcome
    still_works(job, victim)
