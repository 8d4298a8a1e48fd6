"""Refused connections and calls cannot flood the logs (issue 20, item 4).

Any process that reaches a rank's listeners or the coordinator can knock without the job token.
Each refusal is counted per source and summarized (collcomm.refusals): the first from a source is
written at once, the rest as one line per source and interval. Shown here on the summarizer
alone (a fake clock: intervals, quiet sources, ever new addresses, many threads), on a real
transport, object server and coordinator stormed in this process, and on a 2-rank job whose
listeners and coordinator another process storms while the ranks run allreduces: a handful of
lines, every refusal accounted for, every result exact.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from collcomm.refusals import MAX_LINE, MAX_REASONS, MAX_SOURCES, OTHERS, RefusalLog
from collcomm.transport import frames
from collcomm.transport.tcp.connections import MAX_HANDSHAKES
from collcomm.transport.tcp.sockets import split_address

HERE = Path(__file__).resolve().parent
LOGGER = "collcomm.test.refusals"
SUMMARY = re.compile(r"refused (\d+) more (\w+) from (.+) in the last (\d+) s: (.+)$")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def messages(caplog, name: str = LOGGER, needle: str = "") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name and needle in r.getMessage()]


def accounted(lines: list[str]) -> int:
    """How many refusals ``lines`` tell of: one per line written at once, N per summary."""
    return sum(int(m.group(1)) if (m := SUMMARY.search(line)) else 1 for line in lines)


def summarizer(clock, **kwargs) -> RefusalLog:
    return RefusalLog(logging.getLogger(LOGGER), "connections", "rank 1: ", clock=clock, **kwargs)


# ------------------------------------------------------------------------------------ the summarizer
def test_one_source_writes_its_first_refusal_at_once_then_one_line_per_interval(caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    clock = Clock()
    log = summarizer(clock)
    for i in range(1000):  # over 150 s
        log.refused("127.0.0.1", "wrong token" if i % 10 == 0 else "bad handshake",
                    f"rank 1: refused a connection from 127.0.0.1:{40000 + i}: refusal {i}")
        clock.now += 0.15
    lines = messages(caplog)
    assert lines[0] == "rank 1: refused a connection from 127.0.0.1:40000: refusal 0"
    assert len(lines) == 3, lines  # at once, then at 60 s and 120 s
    for line in lines[1:]:
        m = SUMMARY.search(line)
        assert m and m.group(2, 3, 4) == ("connections", "127.0.0.1", "60"), line
        assert re.fullmatch(r"bad handshake \(\d+\), wrong token \(\d+\)", m.group(5)), line
        assert line.startswith("rank 1: refused ")
    log.flush()
    lines = messages(caplog)
    assert len(lines) == 4 and SUMMARY.search(lines[3]).group(4) == "30", lines  # what was left, at close
    assert accounted(lines) == 1000
    assert log.tracked == 0
    log.flush()  # nothing left: nothing written
    assert len(messages(caplog)) == 4


def test_a_source_quiet_for_an_interval_is_forgotten_and_its_next_refusal_written_at_once(caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    clock = Clock()
    log = summarizer(clock)
    log.refused("10.0.0.5", "wrong token", "first")
    clock.now += 61
    log.refused("10.0.0.5", "wrong token", "second")
    assert messages(caplog) == ["first", "second"] and log.tracked == 1
    log.flush()
    assert messages(caplog) == ["first", "second"]  # nothing was only counted


def test_sources_beyond_the_bound_are_counted_together(caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    clock = Clock()
    log = summarizer(clock)
    n = 10_000
    for i in range(n):  # one refusal each from 10,000 addresses (any 127.x.y.z reaches loopback)
        log.refused(f"127.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "bad handshake", f"from address {i}")
    assert log.tracked == MAX_SOURCES + 1
    lines = messages(caplog)
    assert len(lines) == MAX_SOURCES + 1, lines
    assert lines[-1].startswith(f"from address {MAX_SOURCES} (more than {MAX_SOURCES} sources refused"), lines
    log.flush()
    last = messages(caplog)[-1]
    assert SUMMARY.search(last).group(1, 3) == (str(n - MAX_SOURCES - 1), OTHERS), last
    assert accounted(messages(caplog)) == n


def test_an_attacker_with_ever_new_addresses_gets_a_bounded_number_of_lines_per_interval(caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    clock = Clock()
    log = summarizer(clock)
    start, written = clock.now, []
    for i in range(60_000):  # 100 a second for 10 minutes, each from a new address
        before = len(caplog.records)
        log.refused(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "bad handshake", f"from address {i}")
        written += [clock.now] * (len(caplog.records) - before)
        clock.now += 0.01
    log.flush()
    per_minute = [sum(1 for t in written if start + 60 * m <= t < start + 60 * (m + 1)) for m in range(10)]
    assert max(per_minute) <= 2 * (MAX_SOURCES + 1), per_minute
    assert log.tracked == 0 and accounted(messages(caplog)) == 60_000


def test_reasons_per_source_are_bounded_and_still_add_up(caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    log = summarizer(Clock())
    for i in range(101):
        log.refused("127.0.0.1", f"reason {i % 50}", "first")
    log.flush()
    first, summary = messages(caplog)
    why = SUMMARY.search(summary).group(5).split(", ")
    assert len(why) == MAX_REASONS + 1 and any(w.startswith("other reasons (") for w in why), why
    assert accounted([first, summary]) == 101


def test_a_first_line_is_one_line_of_bounded_length(caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    log = summarizer(Clock())
    log.refused("127.0.0.1", "bad handshake", "refused:\n" + "x" * 10_000)
    (line,) = messages(caplog)
    assert "\n" not in line and len(line) == MAX_LINE and line.startswith("refused: xxx")


@pytest.mark.timeout(60)
def test_counts_stay_exact_when_many_threads_refuse_at_once(caplog):
    """8 threads refuse 2,000 each from 4 sources with 5 ms intervals (summaries written while
    others count): after the flush the lines account for every refusal exactly once."""
    caplog.set_level(logging.WARNING, LOGGER)
    log = RefusalLog(logging.getLogger(LOGGER), "calls", interval=0.005)
    go = threading.Barrier(8)

    def knock(t: int) -> None:
        go.wait()
        for i in range(2000):
            log.refused(f"10.0.0.{(t + i) % 4}", "wrong token", "first")

    threads = [threading.Thread(target=knock, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    log.flush()
    lines = messages(caplog)
    assert any(SUMMARY.search(line) for line in lines)
    assert accounted(lines) == 16_000


# ------------------------------------------------------------------------------------ storms
def _drain(sock: socket.socket) -> None:
    """Read until the listener closes the connection (it counted the refusal before)."""
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass


def _random_bytes(sock, rank) -> int:
    sock.sendall(b"\x00" + os.urandom(frames.HELLO_SIZE + 23))  # never the handshake's magic
    return 1


def _wrong_token(sock, rank) -> int:  # a well-formed hello and a guessed proof
    sock.sendall(frames.new_hello(0, rank, 0, 0).pack() + os.urandom(frames.MAC_SIZE))
    return 1


def _wrong_rank(sock, rank) -> int:
    sock.sendall(frames.new_hello(0, rank + 5, 0, 0).pack())
    return 1


def _connect_close(sock, rank) -> int:  # what a liveness probe does: not logged
    return 0


def _half_a_hello(sock, rank) -> int:  # closed without a word: not logged
    sock.sendall(os.urandom(10))
    return 0


KNOCKS = (_random_bytes, _wrong_token, _wrong_rank, _connect_close, _half_a_hello)


def _open(address: str, unix: bool) -> socket.socket:
    host, port, local = split_address(address)
    if unix and local:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect("\0" + local)
    else:
        sock = socket.create_connection((host, port))
    sock.settimeout(20)
    return sock


def storm(address: str, rank: int, n: int, idle: int = MAX_HANDSHAKES + 6) -> int:
    """``n`` bad connections to the listeners at ``address`` (TCP and the Unix socket in turn) of
    every kind a process without the token can make, then ``idle`` connections at once that say
    nothing (timed out, or cut off beyond MAX_HANDSHAKES). Returns how many the rank must count
    (one closed without a word is not logged)."""
    counted = 0
    for i in range(n):
        sock = _open(address, unix=bool(i % 2))
        knock = KNOCKS[(i // 2) % len(KNOCKS)]
        try:
            counted += knock(sock, rank)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the listener refused it before all was said
            pass
        try:
            _drain(sock)
        finally:
            sock.close()
    silent = [_open(address, unix=False) for _ in range(idle)]
    for sock in silent:
        _drain(sock)
        sock.close()
    return counted + idle


def storm_coordinator(address: str, n: int) -> int:
    """``n`` calls to the coordinator at ``address``, half with a wrong token, half with none;
    returns how many were refused."""
    import grpc

    from collcomm.coordinator import CoordinatorClient
    from collcomm.coordinator import coordinator_pb2 as pb
    from collcomm.coordinator import coordinator_pb2_grpc as pb_grpc
    from collcomm.errors import AuthenticationError

    refused = 0
    with CoordinatorClient(address, "not-the-token", timeout=10, tls=False) as wrong, \
            grpc.insecure_channel(address) as channel:
        bare = pb_grpc.CoordinatorStub(channel)
        for i in range(n):
            try:
                if i % 2:
                    wrong.ping()
                else:
                    bare.Ping(pb.PingRequest(), timeout=10)
            except AuthenticationError:
                refused += 1
            except grpc.RpcError as e:
                refused += e.code() == grpc.StatusCode.UNAUTHENTICATED
    return refused


@pytest.mark.timeout(120)
def test_a_thousand_refused_connections_to_a_transport_write_a_few_lines(caplog):
    """1,000 bad connections to rank 1's TCP and Unix listeners and 70 idle ones: one line per
    source at once, one more per source at close, every refusal accounted for; rank 0 still links
    to rank 1 and its frame arrives whole."""
    from linkpair import Box, links, transports

    caplog.set_level(logging.INFO, "collcomm")
    a, b = transports()
    try:
        expected = storm(b.address, 1, 1000)
        during = messages(caplog, "collcomm.transport", "rank 1: refused")
        assert len(during) == 2, during  # 127.0.0.1, and this user on the Unix socket
        assert any(line.startswith("rank 1: refused a connection from 127.0.0.1:") for line in during), during
        assert any(f"from a local process of uid {os.getuid()} (pid {os.getpid()})" in line for line in during)
        la, lb = links(a, b)
        box, payload = Box(1000), os.urandom(1000)
        b.mailbox(5).register(0, box)
        la.send(frames.data_header(5, 0, 0, 0, 0, 0, payload), memoryview(payload))
        assert box.arrived.wait(10) and box.error is None and bytes(box.buf) == payload
    finally:
        a.close()
        b.close()
    lines = messages(caplog, "collcomm.transport", "rank 1: refused")
    assert len(lines) == 4, lines
    assert accounted(lines) == expected, lines
    why = " ".join(SUMMARY.search(line).group(5) for line in lines if SUMMARY.search(line))
    for reason in ("bad handshake", "wrong token", "too many handshakes", "handshake timed out"):
        assert reason in why, why
    assert not messages(caplog, "collcomm.transport", "rank 0: refused")


@pytest.mark.timeout(120)
def test_a_thousand_refused_connections_to_an_object_server_write_a_few_lines(caplog):
    from collcomm.objects.server import ObjectServer
    from collcomm.objects.store import ObjectStore

    caplog.set_level(logging.DEBUG, "collcomm")
    server = ObjectServer(1, b"tok", ObjectStore(1 << 20))
    try:
        expected = storm(server.address, 1, 1000, idle=0)
        assert len(messages(caplog, "collcomm.objects", "refused")) == 2
    finally:
        server.close()
    lines = messages(caplog, "collcomm.objects", "refused")
    assert len(lines) == 4 and accounted(lines) == expected, lines
    assert all(line.startswith("rank 1: object server refused ") for line in lines), lines


@pytest.mark.timeout(120)
def test_a_thousand_refused_coordinator_calls_write_two_lines(caplog):
    from collcomm.coordinator import CoordinatorClient, CoordinatorServer

    caplog.set_level(logging.INFO, "collcomm.coordinator")
    with CoordinatorServer("the-job-token-0123") as server:
        assert storm_coordinator(server.address, 1000) == 1000
        with CoordinatorClient(server.address, "the-job-token-0123", timeout=10) as honest:
            assert honest.ping().registered == 0
        during = messages(caplog, "collcomm.coordinator", "refused")
        assert len(during) == 1 and during[0].startswith("refused a call from ipv"), during
        assert "wrong or missing job token" in during[0]
    lines = messages(caplog, "collcomm.coordinator", "refused")
    assert len(lines) == 2 and accounted(lines) == 1000, lines
    m = SUMMARY.search(lines[1])
    assert m.group(2, 3) == ("calls", "127.0.0.1") and "wrong token (" in m.group(5) and "no token (" in m.group(5)


def test_a_grpc_peer_is_counted_by_its_address_without_the_port():
    from collcomm.coordinator.server import caller_address

    assert caller_address("ipv4:127.0.0.1:51234") == "127.0.0.1"
    assert caller_address("ipv6:[::1]:51234") == "::1"
    assert caller_address("unix:/tmp/socket") == "unix:/tmp/socket"


# ------------------------------------------------------------------------------------ a real job
JOB = """
import logging, os
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(levelname)s %(message)s")
shared = Path(shared)
rt = cc.api.runtime()
(shared / f"address.{rank}.tmp").write_text(rt.transport.address)
(shared / f"address.{rank}.tmp").replace(shared / f"address.{rank}")
if rank == 0:
    (shared / "coordinator").write_text(os.environ["COLLCOMM_COORDINATOR"])
rounds = wrong = 0
while True:
    stop = np.array([float((shared / "stop").exists())])
    cc.allreduce(stop)  # both ranks stop after the same round
    if stop[0] > 0 or rounds >= 100_000:
        break
    for size in (1000, 200_000):
        x = (np.arange(size, dtype=np.float64) % 97) * (rank + 1) + rounds
        cc.allreduce(x)
        want = (np.arange(size, dtype=np.float64) % 97) * 3 + 2 * rounds
        wrong += not np.array_equal(x, want)
    rounds += 1
report({"rounds": rounds, "wrong": wrong})
"""

SITE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(name)s %(levelname)s %(message)s")
"""


@pytest.mark.timeout(240)
def test_a_job_stormed_by_a_process_without_the_token_logs_a_few_lines_and_stays_exact(tmp_path):
    """A 2-rank job runs allreduces (checked against NumPy) while another process, which has no
    token, makes 1,000 bad connections to each rank's listeners (TCP and Unix) and 1,000 calls to
    the coordinator: each rank writes at most four lines about them (two sources, at once and at
    close), the coordinator two, the lines account for every refusal, and every result is exact."""
    import multiproc

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)  # the launcher's (coordinator's) log too
    shared = tmp_path / "shared"
    shared.mkdir()
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    result: dict = {}
    job = threading.Thread(target=lambda: result.setdefault("job", multiproc.run(
        2, JOB, kwargs={"shared": str(shared)}, timeout=200, collective_timeout=60,
        env={"PYTHONPATH": pythonpath})))
    job.start()
    try:
        deadline = time.monotonic() + 60
        while not all((shared / f).exists() for f in ("address.0", "address.1", "coordinator")):
            assert time.monotonic() < deadline and job.is_alive(), "the job never published its addresses"
            time.sleep(0.1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("COLLCOMM_")}  # no token here
        stormer = subprocess.run([sys.executable, __file__, str(shared)], env=env, cwd=HERE, capture_output=True,
                                 text=True, timeout=150)
        assert stormer.returncode == 0, stormer.stderr[-3000:]
    finally:
        (shared / "stop").touch()
        job.join(220)
    expected = [int(n) for n in stormer.stdout.split()]
    values = result["job"].values()
    assert all(v["wrong"] == 0 and v["rounds"] > 0 for v in values), values
    for rank in (0, 1):
        lines = [line for line in result["job"].ranks[rank].output
                 if line.startswith("LOG collcomm") and "refused" in line]
        assert len(lines) <= 4, lines
        assert accounted(lines) == expected[rank], (expected, lines)
    coordinator = [line for line in result["job"].stderr.splitlines()
                   if line.startswith("LOG collcomm.coordinator") and "refused" in line]
    assert len(coordinator) <= 2 and accounted(coordinator) == expected[2], coordinator


def _storm_the_job(shared: Path) -> None:
    """The other process: storm both ranks' listeners and the coordinator; print what each must count."""
    counted = [storm((shared / f"address.{r}").read_text(), r, 1000) for r in (0, 1)]
    counted.append(storm_coordinator((shared / "coordinator").read_text(), 1000))
    print(*counted)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _storm_the_job(Path(sys.argv[1]))
