"""The coordinator over a real network (127.0.0.1): a real server, clients in threads and in
separate processes. Ordering is enforced with the server's own condition (``wait_until``) and
with events, never with sleeps."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from collcomm.coordinator import (CoordinatorClient, CoordinatorError, CoordinatorServer,
                                  CoordinatorUnavailable, GroupInfo, PeerTable)
from collcomm.coordinator import coordinator_pb2 as pb
from collcomm.coordinator import coordinator_pb2_grpc as pb_grpc
from collcomm.errors import (AuthenticationError, CollectiveError, CollectiveTimeout, MismatchError,
                             PeerFailure)

TOKEN = "test-token-5f2c9a"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def server():
    with CoordinatorServer(TOKEN) as srv:
        yield srv


def connect(server: CoordinatorServer, timeout: float = 15.0, token: str = TOKEN) -> CoordinatorClient:
    return CoordinatorClient(server.address, token, timeout=timeout)


class Call(threading.Thread):
    """Run ``fn`` in a thread; ``outcome()`` is its result or the exception it raised."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__(daemon=True)
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self.result = self.error = None
        self.elapsed = None
        self.start()

    def run(self):
        started = time.monotonic()
        try:
            self.result = self._fn(*self._args, **self._kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            self.error = err
        self.elapsed = time.monotonic() - started

    def outcome(self, timeout: float = 20.0):
        self.join(timeout)
        assert not self.is_alive(), "the call did not return"
        return self.error if self.error is not None else self.result


# A worker in a separate process: runs one scenario, prints one JSON line.
WORKER = r"""
import json, os, sys
from collcomm.coordinator import CoordinatorClient
from collcomm.errors import CollectiveError
args = json.loads(sys.argv[1])
client = CoordinatorClient(args["address"], os.environ["COLLCOMM_TOKEN"], timeout=args.get("timeout", 20.0))
op = args["op"]
try:
    if op == "register":
        table = client.register(args["rank"], args["world_size"], args["listen"])
        out = {"peers": [p.address for p in table.peers], "pids": [p.pid for p in table.peers],
               "epoch": table.epoch}
    elif op == "echo":
        client.kv_set(args["ready"], b"1")
        value = client.kv_get(args["key"])
        client.kv_set(args["reply"], value[::-1])
        out = {"got": value.decode()}
    elif op == "count":
        for _ in range(args["n"]):
            client.kv_add(args["key"], 1)
        out = {"done": args["n"]}
    elif op == "report":
        outcome = client.report_failure(args["group_id"], args["rank"], args["reporter"], args["reason"])
        out = {"newly_dead": outcome.newly_dead, "bumped": [list(b) for b in outcome.bumped]}
except CollectiveError as err:
    out = {"error": type(err).__name__, "message": str(err)}
finally:
    client.close()
print(json.dumps(out))
"""


def spawn(server: CoordinatorServer, **args) -> subprocess.Popen:
    args = {"address": server.address, **args}  # the token goes by environment, never argv
    env = {**os.environ, "COLLCOMM_TOKEN": TOKEN}
    env.pop("COLLCOMM_TLS_CA", None)
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 20.0) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def register_world(server: CoordinatorServer, world_size: int) -> PeerTable:
    calls = [Call(connect(server).register, r, world_size, f"127.0.0.1:{20000 + r}")
             for r in range(world_size)]
    tables = [c.outcome() for c in calls]
    assert all(isinstance(t, PeerTable) for t in tables), tables
    return tables[0]


def form_all(server: CoordinatorServer, name: str, members) -> GroupInfo:
    calls = [Call(connect(server).form_group, name, members, r) for r in members]
    infos = [c.outcome() for c in calls]
    assert all(isinstance(i, GroupInfo) for i in infos) and len(set(infos)) == 1, infos
    return infos[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Lines:
    """The stdout lines of ``proc``, read by a thread; ``next(timeout)`` waits for one."""

    def __init__(self, proc: subprocess.Popen):
        self._lines: queue.Queue[str | None] = queue.Queue()

        def pump():
            for line in proc.stdout:
                self._lines.put(line)
            self._lines.put(None)  # end of output

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float) -> str | None:
        """The next line; None at the end of the output."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout}s") from None

    def rest(self, timeout: float) -> str:
        """Everything up to the end of the output."""
        text = []
        while (line := self.next(timeout)) is not None:
            text.append(line)
        return "".join(text)


# ------------------------------------------------------------------------ registration
@pytest.mark.timeout(40)
def test_registration_rendezvous_with_ranks_arriving_at_different_times(server):
    rank0 = Call(connect(server).register, 0, 4, "127.0.0.1:30000")
    assert server.wait_until(lambda s: 0 in s.peers, 10)
    rank1 = spawn(server, op="register", rank=1, world_size=4, listen="127.0.0.1:30001")
    assert server.wait_until(lambda s: 1 in s.peers, 15)
    assert rank0.is_alive()  # the world is incomplete: nobody may return yet
    rank2 = Call(connect(server).register, 2, 4, "127.0.0.1:30002")
    assert server.wait_until(lambda s: 2 in s.peers, 10)
    assert rank0.is_alive() and rank2.is_alive()
    rank3 = spawn(server, op="register", rank=3, world_size=4, listen="127.0.0.1:30003")
    expected = [f"127.0.0.1:{30000 + r}" for r in range(4)]
    tables = [rank0.outcome(), rank2.outcome()]
    for table in tables:
        assert isinstance(table, PeerTable) and [p.address for p in table.peers] == expected
    for proc in (rank1, rank3):
        out = finish(proc)
        assert out["peers"] == expected and out["epoch"] == tables[0].epoch
    assert tables[0][0].pid == os.getpid() and tables[0].peers[0].hostname == socket.gethostname()


@pytest.mark.timeout(30)
def test_registration_times_out_naming_the_rank_that_never_came(server):
    timeout = 1.0
    calls = [Call(connect(server).register, r, 3, f"127.0.0.1:{31000 + r}", timeout=timeout)
             for r in (0, 1)]
    for call in calls:
        err = call.outcome()
        assert isinstance(err, CollectiveTimeout), err
        assert 0.5 * timeout <= call.elapsed <= 2 * timeout, call.elapsed
        assert "rank 2 " in str(err) and "world size 3" in str(err) and "\n" not in str(err)


@pytest.mark.timeout(30)
def test_world_size_disagreement_is_a_mismatch_naming_both_values(server):
    waiting = Call(connect(server).register, 0, 4, "127.0.0.1:31500", timeout=10)
    assert server.wait_until(lambda s: 0 in s.peers, 10)
    err = Call(connect(server).register, 1, 2, "127.0.0.1:31501").outcome()
    assert isinstance(err, MismatchError) and "2" in str(err) and "4" in str(err)
    connect(server).shutdown("test over")
    assert isinstance(waiting.outcome(), CoordinatorUnavailable)


@pytest.mark.timeout(40)
def test_a_rank_is_taken_by_another_process_only_after_it_was_reported_dead(server):
    rank0 = Call(connect(server).register, 0, 2, "127.0.0.1:32000")
    first = finish(spawn(server, op="register", rank=1, world_size=2, listen="127.0.0.1:32001"))
    assert isinstance(rank0.outcome(), PeerTable)
    taken = finish(spawn(server, op="register", rank=1, world_size=2, listen="127.0.0.1:32002"))
    assert taken["error"] == "CoordinatorError" and "already registered" in taken["message"]
    report = finish(spawn(server, op="report", group_id=0, rank=1, reporter=0, reason="exited"))
    assert report["newly_dead"] is True and report["bumped"][0][0] == 0
    again = finish(spawn(server, op="register", rank=1, world_size=2, listen="127.0.0.1:32003"))
    assert again["peers"][1] == "127.0.0.1:32003" and again["epoch"] > first["epoch"]
    assert again["pids"][1] != first["pids"][1]
    assert connect(server).group_status(0).dead == ()


@pytest.mark.timeout(30)
def test_waiters_for_the_world_fail_at_once_when_a_missing_rank_is_reported_dead(server):
    rank0 = Call(connect(server).register, 0, 3, "127.0.0.1:32500", timeout=20)
    assert server.wait_until(lambda s: 0 in s.peers, 10)
    connect(server).report_failure(0, 2, reason="process exited with code 1")  # the launcher
    err = rank0.outcome(10)
    assert isinstance(err, PeerFailure) and err.rank == 2 and "exited with code 1" in str(err)
    assert rank0.elapsed < 10


# ---------------------------------------------------------------------------- groups
@pytest.mark.timeout(40)
def test_overlapping_groups_form_concurrently_without_the_non_members(server):
    register_world(server, 5)  # rank 4 never takes part in any group below
    a = [Call(connect(server).form_group, "a", [0, 1, 2], r) for r in (0, 1, 2)]
    b2 = Call(connect(server).form_group, "b", [2, 3], 2)
    infos_a = [c.outcome() for c in a]
    assert len(set(infos_a)) == 1 and infos_a[0].members == (0, 1, 2)
    assert b2.is_alive()  # "b" waits for rank 3 only; "a" formed meanwhile
    b3 = Call(connect(server).form_group, "b", [2, 3], 3)
    c = [Call(connect(server).form_group, "c", [3, 1], r) for r in (3, 1)]
    info_b, info_c = b2.outcome(), c[0].outcome()
    assert b3.outcome() == info_b and c[1].outcome() == info_c
    assert info_b.members == (2, 3) and info_c.members == (3, 1)
    ids = {infos_a[0].group_id, info_b.group_id, info_c.group_id, 0}
    assert len(ids) == 4
    assert len({infos_a[0].epoch, info_b.epoch, info_c.epoch}) == 3
    again = form_all(server, "a", [0, 1, 2])  # a name may be formed again: a new group
    assert again.group_id not in ids and again.epoch > infos_a[0].epoch


@pytest.mark.timeout(30)
def test_member_list_mismatch_raises_on_every_caller(server):
    register_world(server, 3)
    rank0 = Call(connect(server).form_group, "g", [0, 1, 2], 0, timeout=15)
    assert server.wait_until(lambda s: "g" in s.forming, 10)
    err1 = Call(connect(server).form_group, "g", [0, 1], 1, timeout=15).outcome(5)
    err0 = rank0.outcome(5)  # told at once, not at its timeout
    err2 = Call(connect(server).form_group, "g", [0, 1, 2], 2, timeout=15).outcome(5)
    for err in (err0, err1, err2):
        assert isinstance(err, MismatchError), err
        assert "[0, 1, 2]" in str(err) and "[0, 1]" in str(err) and "'g'" in str(err)
    assert form_all(server, "g", [0, 1, 2]).members == (0, 1, 2)  # all call again: it forms


@pytest.mark.timeout(30)
def test_form_group_checks_the_caller_and_times_out_naming_the_missing_member(server):
    register_world(server, 3)
    client = connect(server)
    err = Call(client.form_group, "g", [0, 1], 2).outcome()
    assert isinstance(err, CoordinatorError) and "not in its member list" in str(err)
    call = Call(client.form_group, "g", [0, 1], 0, timeout=1.0)
    err = call.outcome()
    assert isinstance(err, CollectiveTimeout) and "missing rank 1" in str(err)
    assert 0.5 <= call.elapsed <= 2.0
    assert server.wait_until(lambda s: "g" not in s.forming, 5)  # the caller left the round


# --------------------------------------------------------------------------- failures
@pytest.mark.timeout(40)
def test_failure_report_bumps_epochs_and_every_survivor_learns_which_rank(server):
    register_world(server, 4)
    a = form_all(server, "a", [0, 1, 2])
    b = form_all(server, "b", [2, 3])
    c = form_all(server, "c", [0, 1])
    world = connect(server).group_status(0)
    pending = Call(connect(server).form_group, "d", [0, 2], 0, timeout=15)
    assert server.wait_until(lambda s: "d" in s.forming, 10)
    report = finish(spawn(server, op="report", group_id=a.group_id, rank=2, reporter=1,
                          reason="connection reset by peer"))
    assert report["newly_dead"] is True
    assert {g for g, _ in report["bumped"]} == {0, a.group_id, b.group_id}
    err = pending.outcome(5)
    assert isinstance(err, PeerFailure) and err.rank == 2 and "connection reset" in str(err)
    for rank in (0, 1, 3):  # each survivor polls the status of its groups
        client = connect(server)
        for before in (world, a, b):
            status = client.group_status(before.group_id)
            assert status.epoch > before.epoch and status.dead_ranks == (2,)
            assert status.dead[0].reason == "connection reset by peer" and status.dead[0].reporter == 1
        assert client.group_status(c.group_id).epoch == c.epoch
    again = connect(server).report_failure(0, 2, 3, "again")
    assert not again.newly_dead and again.bumped == ()
    err = Call(connect(server).form_group, "e", [2, 3], 3).outcome()
    assert isinstance(err, PeerFailure) and err.rank == 2
    err = Call(connect(server).group_status, 999).outcome()
    assert isinstance(err, CoordinatorError) and "999" in str(err)


# --------------------------------------------------------------------------------- KV
@pytest.mark.timeout(40)
def test_kv_set_get_wait_and_add_across_processes(server):
    client = connect(server)
    echo = spawn(server, op="echo", ready="echo/ready", key="echo/in", reply="echo/out")
    assert client.kv_get("echo/ready") == b"1"
    client.kv_set("echo/in", b"hello")
    assert client.kv_get("echo/out") == b"olleh"
    assert finish(echo) == {"got": "hello"}
    counters = [spawn(server, op="count", key="hits", n=40) for _ in range(3)]
    assert [finish(p) for p in counters] == [{"done": 40}] * 3
    assert client.kv_add("hits", 0) == 120 and client.kv_get("hits") == b"120"
    assert client.kv_delete("hits") is True and client.kv_delete("hits") is False
    err = Call(client.kv_get, "never", timeout=0).outcome(5)  # timeout 0: ask once
    assert isinstance(err, CollectiveTimeout) and "'never' is not set" in str(err)
    call = Call(client.kv_get, "never", timeout=1.0)
    err = call.outcome()
    assert isinstance(err, CollectiveTimeout) and "'never'" in str(err)
    assert 0.5 <= call.elapsed <= 2.0
    client.kv_set("blob", b"\x00\xff")
    err = Call(client.kv_add, "blob", 1).outcome()
    assert isinstance(err, CoordinatorError) and "not a decimal integer" in str(err)


# ------------------------------------------------------------------------------ token
@pytest.mark.timeout(30)
def test_wrong_or_missing_token_is_refused_and_the_server_keeps_serving(server):
    rank0 = Call(connect(server).register, 0, 2, "127.0.0.1:33000")
    assert server.wait_until(lambda s: 0 in s.peers, 10)
    intruder = connect(server, token="not-the-token")
    for call in (lambda: intruder.ping(), lambda: intruder.kv_set("k", b"x"),
                 lambda: intruder.register(1, 2, "127.0.0.1:33999", timeout=5)):
        err = Call(call).outcome()
        assert isinstance(err, AuthenticationError) and "\n" not in str(err), err
    with grpc.insecure_channel(server.address) as channel:  # no metadata at all
        with pytest.raises(grpc.RpcError) as raised:
            pb_grpc.CoordinatorStub(channel).Ping(pb.PingRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(ValueError):
        CoordinatorClient(server.address, "has space")
    honest = connect(server)
    assert honest.kv_delete("k") is False  # the refused kv_set never ran
    table = honest.register(1, 2, "127.0.0.1:33001")  # the refused register took nothing
    assert table[1].address == "127.0.0.1:33001" and isinstance(rank0.outcome(), PeerTable)


# ---------------------------------------------------------------- reaching, stopping
@pytest.mark.timeout(30)
def test_stop_wakes_every_waiter_with_an_error():
    server = CoordinatorServer(TOKEN)
    server.start()
    try:
        clients = [connect(server, timeout=60) for _ in range(3)]
        for client in clients:  # connected first: whether a call reaches the server before the
            client.ping()       # stop or after it, it must end in an error at once
        register = Call(clients[0].register, 0, 3, "127.0.0.1:34000")
        group = Call(clients[1].form_group, "g", [0, 1], 0)
        value = Call(clients[2].kv_get, "never")
        assert server.wait_until(lambda s: 0 in s.peers and "g" in s.forming, 10)
    finally:
        server.stop(grace=1.0)
    for call in (register, group, value):
        err = call.outcome(10)
        assert isinstance(err, CoordinatorUnavailable), err
        assert call.elapsed < 10
    err = Call(connect(server, timeout=1.0).ping).outcome()
    assert isinstance(err, CoordinatorUnavailable)


@pytest.mark.timeout(30)
def test_unreachable_coordinator_is_a_one_line_error_within_the_timeout():
    address = f"127.0.0.1:{free_port()}"
    call = Call(CoordinatorClient(address, TOKEN).ping, timeout=1.0)
    err = call.outcome()
    assert isinstance(err, CoordinatorUnavailable) and isinstance(err, CollectiveError)
    assert not isinstance(err, PeerFailure)
    assert str(err).startswith(f"cannot reach coordinator at {address}") and "\n" not in str(err)
    assert 0.5 <= call.elapsed <= 2.0


@pytest.mark.timeout(30)
def test_client_retries_while_the_coordinator_is_starting():
    port = free_port()
    client = CoordinatorClient(f"127.0.0.1:{port}", TOKEN, timeout=15)
    with pytest.raises(CoordinatorUnavailable):
        client.ping(timeout=0.3)  # nothing there yet: the channel is backing off
    pending = Call(client.kv_get, "late", timeout=15)
    with CoordinatorServer(TOKEN, port=port) as server:
        connect(server).kv_set("late", b"ok")
        assert pending.outcome() == b"ok"


@pytest.mark.timeout(30)
def test_second_server_on_the_same_port_is_refused(server):
    port = int(server.address.rpartition(":")[2])
    with pytest.raises(CollectiveError, match="cannot listen"):
        CoordinatorServer(TOKEN, port=port).start()
    assert connect(server).ping().world_size == 0


@pytest.mark.timeout(40)
def test_standalone_coordinator_writes_a_generated_token_to_a_private_file_and_prints_its_path():
    env = {k: v for k, v in os.environ.items() if k not in ("COLLCOMM_TOKEN", "COLLCOMM_TLS_CA")}
    proc = subprocess.Popen([sys.executable, "-m", "collcomm.coordinator", "--host", "127.0.0.1",
                             "--port", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(proc)
        first = lines.next(15)
        match = re.fullmatch(r"collcomm coordinator listening on (127\.0\.0\.1:(\d+))\n", first)
        assert match, first
        second = lines.next(5)
        path = Path(re.match(r"job token written to (\S+) \(mode 0600\)", second).group(1))
        assert path.name.startswith(f"collcomm-coordinator-{match.group(2)}-")
        assert path.stat().st_mode & 0o777 == 0o600
        token = path.read_text().strip()
        assert len(token) >= 32 and token not in first + second
        client = CoordinatorClient(match.group(1), token, timeout=10)
        assert client.ping().registered == 0
        client.shutdown("test over")
        assert proc.wait(timeout=15) == 0
        assert token not in lines.rest(10) + proc.stderr.read()
        assert not path.exists()  # a generated temporary token file goes with its coordinator
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()


@pytest.mark.timeout(30)
def test_token_files_are_read_only_when_closed_to_others_and_written_with_mode_0600(tmp_path):
    from collcomm.coordinator.tokens import TokenError, read_token_file, write_new_token_file

    path = write_new_token_file(TOKEN, tmp_path / "job.token")
    assert path.stat().st_mode & 0o777 == 0o600 and read_token_file(path) == TOKEN
    with pytest.raises(TokenError, match="already exists"):
        write_new_token_file(TOKEN, path)
    path.chmod(0o640)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    spaced.chmod(0o400)
    for bad, why in ((path, "is open to other users (mode 0640); run chmod 600"), (fifo, "not a regular file"),
                     (empty, "is empty"), (spaced, "does not hold a token"), (tmp_path / "none", "no such file")):
        with pytest.raises(TokenError) as raised:
            read_token_file(bad)  # a FIFO is refused at once, not waited on
        assert why in str(raised.value) and str(bad) in str(raised.value), raised.value
        assert "two" not in str(raised.value) and TOKEN not in str(raised.value)


@pytest.mark.timeout(30)
def test_reprs_and_refusals_never_show_the_token(server):
    client = connect(server)
    intruder = connect(server, token="not-the-token-4711")
    err = Call(intruder.ping).outcome()
    assert isinstance(err, AuthenticationError)
    for text in (repr(client), repr(server), str(err), repr(err)):
        assert TOKEN not in text and "not-the-token-4711" not in text, text
    assert server.address in repr(server) and server.address in repr(client)


@pytest.mark.timeout(30)
def test_standalone_coordinator_uses_the_environment_token_and_stops_on_sigterm():
    env = {**os.environ, "COLLCOMM_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "collcomm.coordinator", "--host", "127.0.0.1",
                             "--port", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(proc)
        address = lines.next(15).rsplit(" ", 1)[1].strip()
        assert CoordinatorClient(address, TOKEN, timeout=10).ping().world_size == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert TOKEN not in lines.rest(10)  # a token from the environment is never printed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()


# ------------------------------------------------------------------- generated code
@pytest.mark.timeout(30)
def test_generated_code_matches_the_proto():
    package = REPO / "collcomm" / "coordinator"
    rpcs = re.findall(r"^\s*rpc (\w+)\(", (package / "coordinator.proto").read_text(), re.M)
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]
    assert pb.DESCRIPTOR.package == "collcomm.coordinator.v1"
    assert rpcs == [m.name for m in service.methods]
    service_module = (package / "coordinator_pb2_grpc.py").read_text()
    assert "from collcomm.coordinator import coordinator_pb2" in service_module
    check = subprocess.run([sys.executable, "-m", "collcomm.coordinator.regenerate", "--check"],
                           cwd=REPO, capture_output=True, text=True, timeout=25)
    assert check.returncode == 0, check.stderr
