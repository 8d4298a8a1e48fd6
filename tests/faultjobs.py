"""Jobs of real rank processes driven step by step, for the fault tests.

The test process runs the coordinator (in-process) and starts every rank as its own
Python process (``python tests/faultjobs.py``) with its ``COLLCOMM_*`` environment. A
rank reads one JSON command per line on stdin, runs it, and answers with one JSON line
on stdout; the test decides what each rank does next, so it can stop, kill or fuzz one
rank at a known point while the others are inside a collective::

    with Job(3, timeout=4.0) as job:
        job.call_all({"cmd": "run", "kind": "allreduce", "count": 1000})   # every rank, one op
        job.ranks[1].kill(signal.SIGKILL)

Answers carry ``time.monotonic()`` stamps (``t0`` when the call started, ``t1`` when it
returned or raised). CLOCK_MONOTONIC is one clock for every process of the machine, so a
survivor's error time can be measured from the moment another process was signalled.

Every wait here is bounded: a rank that does not answer in time fails the test with its
stderr, and leaving the ``with`` block kills whatever is still running (by pid).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


class RankDied(AssertionError):
    """A rank process ended (or stopped answering) when the test expected an answer."""


# ============================================================================ test side
class RankProcess:
    """One rank: a process, its command pipe and the answers it printed."""

    def __init__(self, rank: int, env: dict):
        self.rank = rank
        self.proc = subprocess.Popen([sys.executable, str(HERE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=str(REPO))
        self.pid = self.proc.pid
        self.answers: queue.Queue = queue.Queue()
        self._ids = iter(range(1, 1 << 62))
        self._expect = 0  # the id of the last command sent: older answers (of calls given up on) are skipped
        self.later: dict[int, dict] = {}  # answers of earlier commands that arrived meanwhile (async exec)
        self.stderr_tail: deque[str] = deque(maxlen=25)
        self._out = threading.Thread(target=self._read_stdout, daemon=True)
        self._err = threading.Thread(target=self._read_stderr, daemon=True)
        self._out.start()
        self._err.start()

    def _read_stdout(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").strip()
            try:
                self.answers.put(json.loads(line))
            except ValueError:
                self.stderr_tail.append(f"(stdout) {line}")
        self.answers.put(None)  # end of output: the process is gone

    def _read_stderr(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            self.stderr_tail.append(raw.decode(errors="replace").rstrip())

    def send(self, command: dict) -> int:
        """Send ``command``; its id (``answer_to`` waits for the answer of an earlier one)."""
        self._expect = next(self._ids)
        try:
            self.proc.stdin.write((json.dumps(dict(command, id=self._expect)) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as e:
            raise RankDied(f"rank {self.rank} is gone (cannot send {command.get('cmd')}): {e}\n{self.story()}")
        return self._expect

    def answer_to(self, command_id: int, timeout: float) -> dict:
        """The answer to the command ``command_id`` (an async exec sent before others)."""
        deadline = time.monotonic() + timeout
        while command_id not in self.later:
            try:
                got = self.answers.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise RankDied(f"rank {self.rank} did not answer command {command_id} within {timeout:g} s\n"
                               f"{self.story()}") from None
            if got is None:
                self.answers.put(None)
                raise RankDied(f"rank {self.rank} exited before answering command {command_id}\n{self.story()}")
            self.later[got.get("id")] = got
        return self.later.pop(command_id)

    def answer(self, timeout: float) -> dict:
        """The answer to the last command (or an event it announced), within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self.answers.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise RankDied(f"rank {self.rank} did not answer within {timeout:g} s\n{self.story()}") from None
            if got is None:
                self.answers.put(None)
                self.proc.wait(timeout=5)
                raise RankDied(f"rank {self.rank} exited with {self.proc.returncode} before answering\n"
                               f"{self.story()}")
            if got.get("id", self._expect) == self._expect:
                return got
            self.later[got.get("id")] = got  # an async exec's answer: kept for answer_to

    def call(self, command: dict, timeout: float) -> dict:
        self.send(command)
        return self.answer(timeout)

    def signal(self, signum: int) -> float:
        """Send ``signum``; return the monotonic time just before it was sent."""
        t = time.monotonic()
        os.kill(self.pid, signum)
        return t

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RankDied(f"rank {self.rank} still runs {timeout:g} s after it should have ended\n"
                           f"{self.story()}") from None

    def story(self) -> str:
        return f"--- rank {self.rank} (pid {self.pid}) stderr:\n" + "\n".join(self.stderr_tail)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # works on a SIGSTOPped process too
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


class Job:
    """``n`` rank processes and the coordinator they register with.

    ``timeout`` is every rank's default timeout (passed to ``init``); with ``env_timeout``
    it goes through ``COLLCOMM_TIMEOUT`` instead and ``init()`` gets none. ``start=False``
    leaves ``init`` to the test (``job.call_all({"cmd": "init"})``).
    """

    def __init__(self, n: int, timeout: float = 4.0, *, chunk_bytes: int | None = None, env: dict | None = None,
                 env_timeout: bool = False, start: bool = True, token: str | None = None):
        from collcomm.coordinator.server import CoordinatorServer

        self.n, self.timeout = n, timeout
        self.token = token or secrets.token_hex(16)
        self.server = CoordinatorServer(self.token, host="127.0.0.1", port=0)
        self.coordinator = self.server.start()
        self.ranks: list[RankProcess] = []
        self.addresses: list[str] = []
        self.envs: list[dict] = []
        self.retired: list[RankProcess] = []  # processes that restart() replaced
        base = {k: v for k, v in os.environ.items() if not k.startswith("COLLCOMM_")
                and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        base.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
        if env_timeout:
            base["COLLCOMM_TIMEOUT"] = str(timeout)
        base.update(env or {})
        self._init = {"cmd": "init", "timeout": None if env_timeout else timeout, "chunk_bytes": chunk_bytes}
        try:
            for r in range(n):
                env_r = dict(base, COLLCOMM_RANK=str(r), COLLCOMM_WORLD_SIZE=str(n),
                             COLLCOMM_COORDINATOR=self.coordinator, COLLCOMM_TOKEN=self.token)
                self.envs.append(env_r)
                self.ranks.append(RankProcess(r, env_r))
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    def start(self, timeout: float = 60.0) -> list[dict]:
        answers = self.call_all(self._init, timeout=timeout)
        for a in answers:
            assert a.get("ok"), f"init failed: {a}"
        self.addresses = [a["address"] for a in answers]
        return answers

    def call_all(self, command: dict | list[dict], ranks=None, timeout: float = 30.0) -> list[dict]:
        """Send a command to each rank (one command for all, or one per rank), then collect the answers."""
        ranks = list(range(self.n)) if ranks is None else list(ranks)
        commands = command if isinstance(command, list) else [command] * len(ranks)
        for r, c in zip(ranks, commands):
            self.ranks[r].send(c)
        deadline = time.monotonic() + timeout
        return [self.ranks[r].answer(max(deadline - time.monotonic(), 0.01)) for r in ranks]

    def restart(self, rank: int, timeout: float = 60.0) -> dict:
        """A new process for ``rank`` (its old one ended: killed), with the same environment (same
        coordinator and token); it runs ``init`` and its answer is returned."""
        old = self.ranks[rank]
        assert old.proc.poll() is not None, f"rank {rank}'s process (pid {old.pid}) still runs"
        self.retired.append(old)
        self.ranks[rank] = RankProcess(rank, self.envs[rank])
        return self.ranks[rank].call(self._init, timeout=timeout)

    def story(self) -> str:
        return "\n".join(r.story() for r in self.ranks)

    def close(self) -> None:
        for r in self.ranks + self.retired:
            r.stop()
        self.server.stop(0)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()



def raised(answer: dict, kind: str) -> bool:
    """True when the rank's call raised ``kind`` (the class or one of its bases, by name)."""
    return kind in answer.get("mro", ())


def describe(answers, ranks=None) -> str:
    """One line per answer: the error it raised (and the rank it named) or its correctness, and its time."""
    ranks = range(len(answers)) if ranks is None else ranks
    return "\n".join(f"  rank {r}: " + (f"{a.get('error')}(rank={a.get('rank')}): {a.get('msg')}" if a.get("error")
                                         else f"ok correct={a.get('correct')} {a.get('members', '')}")
                     + f"  [{a['t1'] - a['t0']:.3f} s]" for r, a in zip(ranks, answers))


def kill_mid_loop(job: "Job", victim: int, count: int) -> tuple[dict, list[dict], list[int]]:
    """Every rank loops over allreduce; the victim SIGKILLs itself inside its second one. Checks that
    every survivor raised PeerFailure naming the victim within twice the timeout, with only exact
    results before; returns (the victim's last words, the survivors' answers, the survivors)."""
    import pytest

    for r in range(job.n):
        job.ranks[r].send({"cmd": "run", "kind": "allreduce", "count": count, "iters": 200,
                           **({"kill_at": 1} if r == victim else {})})
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
        assert a.get("rank") == victim, f"rank {r} named rank {a.get('rank')}, not {victim}\n{report}"
        assert a.get("correct_before"), f"rank {r}: a wrong result before the failure\n{report}"
        assert a["t1"] - killing["t"] < 2 * job.timeout, f"rank {r} took too long\n{report}"
    return killing, answers, survivors


def free_port_pair() -> int:
    """A port p such that p and p + 1 were both free a moment ago (torchrun: store, collcomm: p + 1)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            if p >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
                return p
    raise RuntimeError("no free pair of ports")


# ---------------------------------------------------------------------------- raw wire access
def listeners(address: str) -> dict[str, object]:
    """Where a rank listens, from the address it registered ("host:port", optionally followed by
    "#@name" for its abstract Unix socket): {"tcp": (host, port), "unix": "\\0name"}."""
    tcp, _, local = address.partition("#@")
    host, _, port = tcp.rpartition(":")
    out: dict[str, object] = {"tcp": (host, int(port))}
    if local:
        out["unix"] = "\0" + local
    return out


def connect(address: str, listener: str = "tcp", timeout: float = 5.0) -> socket.socket:
    """A raw connection to one of a rank's listeners."""
    where = listeners(address)[listener]
    if listener == "tcp":
        return socket.create_connection(where, timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(where)
    return sock


def client_handshake(address: str, token: str, client: int, server: int, group: int, epoch: int,
                     timeout: float = 5.0, listener: str = "tcp") -> socket.socket:
    """Open a connection to a rank's data port and authenticate as rank ``client`` for ``group``
    (what TcpTransport does), computed here from the wire format; the socket is ready for frames."""
    from collcomm.transport import frames

    sock = connect(address, listener, timeout)
    raw_hello = frames.new_hello(client, server, group, epoch).pack()
    sock.sendall(raw_hello)
    challenge = recv_exactly(sock, frames.CHALLENGE_SIZE)
    nonce, server_mac = challenge[:16], challenge[16:]
    assert frames.mac_ok(frames.mac(token.encode(), b"S", raw_hello, nonce), server_mac), \
        "the rank did not prove knowledge of the token"
    sock.sendall(frames.mac(token.encode(), b"C", raw_hello, nonce))
    assert recv_exactly(sock, 1) == frames.ACCEPTED
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            raise ConnectionResetError(f"closed after {len(out)} of {n} bytes")
        out += part
    return bytes(out)


def raw_header(kind: int, group: int, epoch: int, op: int, *, tree: int = 0, chunk: int = 0, desc: int = 0,
               length: int = 0, checksum: int = 0, flags: int = 0, version: int | None = None,
               magic: bytes | None = None, crc: int | None = None) -> bytes:
    """A 64-byte frame header with any field set to anything (a valid crc unless ``crc`` is given)."""
    import struct
    import zlib

    from collcomm.transport import frames

    body = struct.pack("<4sBBHIIQIIQQQ", magic or frames.MAGIC, frames.VERSION if version is None else version,
                       kind, flags, group, epoch, op, tree, chunk, desc, length, checksum)
    assert len(body) == 56
    return body + struct.pack("<I", zlib.crc32(body) if crc is None else crc) + b"\0" * 4


# ============================================================================ rank side
def _inputs(np, kind: str, count: int, dtype: str, me: int, members: list[int], root: int):
    """The buffers of one call and the result a correct run leaves (``None``: nothing to check)."""
    base = (np.arange(count) % 13 + 1).astype(dtype)
    size = len(members)
    total = sum(m + 1 for m in members)
    mine = base * (members[me] + 1)
    if kind == "allreduce":
        return (mine.copy(),), base * total
    if kind == "broadcast":
        return (mine.copy(),), base * (members[root] + 1)
    if kind == "reduce":
        return (mine.copy(),), base * total if me == root else mine.copy()
    if kind == "allgather":
        out = np.zeros(count * size, dtype)
        return (out, mine.copy()), np.concatenate([base * (m + 1) for m in members])
    if kind == "reduce_scatter":
        full = np.concatenate([base * (i + 1) for i in range(size)]) * (members[me] + 1)
        return (np.zeros(count, dtype), full), base * (me + 1) * total
    if kind == "barrier":
        return (), None
    if kind == "send":
        return (np.arange(count).astype(dtype),), None
    if kind == "recv":
        return (np.zeros(count, dtype),), np.arange(count).astype(dtype)
    raise ValueError(f"unknown kind {kind}")


def _call_one(cc, kind: str, bufs, cmd: dict, group, timeout):
    op = cmd.get("op", "sum")
    root = cmd.get("root", 0)
    kw = {"timeout": timeout} if timeout is not None else {}
    if kind in ("send", "recv"):
        fn = cc.send if kind == "send" else cc.recv
        return fn(bufs[0], cmd["peer"], tag=cmd.get("tag", 0), **kw)
    kw["group"] = group
    if cmd.get("async"):
        kw["async_op"] = True
    if kind == "allreduce":
        work = cc.allreduce(bufs[0], op, **kw)
    elif kind == "broadcast":
        work = cc.broadcast(bufs[0], root, **kw)
    elif kind == "reduce":
        work = cc.reduce(bufs[0], root, op, **kw)
    elif kind == "allgather":
        work = cc.allgather(bufs[0], bufs[1], **kw)
    elif kind == "reduce_scatter":
        work = cc.reduce_scatter(bufs[0], bufs[1], op, **kw)
    elif kind == "barrier":
        work = cc.barrier(**kw)
    else:
        raise ValueError(kind)
    if cmd.get("async"):
        wait = cmd.get("wait_timeout")
        work.wait(timeout=wait)
    return None


def _killer(np, emit, state: dict, at: int) -> None:
    """Kill this process once its main thread is inside iteration ``at`` (or later) of a loop and
    data from a peer has landed in the buffer: the collective is under way on this rank."""
    import signal as sig

    while True:
        i = state.get("inside")
        if i is not None and i >= at:
            arr, initial, idx = state["buf"], state["initial"], state["idx"]
            if not np.array_equal(arr[idx], initial):
                break
        time.sleep(0.0005)
    emit({"event": "killing", "t": time.monotonic(), "iter": state["inside"]})
    os.kill(os.getpid(), sig.SIGKILL)


def _rank_main() -> int:
    import faulthandler
    import traceback

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test may ask for every thread's stack

    import numpy as np

    import collcomm as cc

    lock = threading.Lock()
    out = sys.stdout

    groups: dict[str, object] = {}
    members: dict[str | None, list[int]] = {}
    scope: dict = {}  # what "exec" commands keep between calls

    def fail(e: BaseException, **facts) -> dict:
        return {"ok": False, "error": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                "rank": getattr(e, "rank", None), "msg": str(e),
                "trace": "" if isinstance(e, cc.CollectiveError) else traceback.format_exc(), **facts}

    for line in sys.stdin:
        cmd = json.loads(line)
        what = cmd["cmd"]
        out_id = cmd.get("id")

        def emit(obj: dict, _id=out_id) -> None:  # every answer names the command it answers
            with lock:
                out.write(json.dumps(dict(obj, id=_id)) + "\n")
                out.flush()

        t0 = time.monotonic()
        try:
            if what == "init":
                kw = {}
                if cmd.get("timeout") is not None:
                    kw["timeout"] = cmd["timeout"]
                if cmd.get("chunk_bytes"):
                    kw["chunk_bytes"] = cmd["chunk_bytes"]
                cc.init(**kw)
                rt = cc.api.runtime()
                members[None] = list(range(cc.world_size()))
                emit({"ok": True, "rank": cc.rank(), "pid": os.getpid(), "address": rt.transport.address,
                      "timeout": rt.timeout, "rejoining": rt.rejoining, "t0": t0, "t1": time.monotonic()})
            elif what == "group":
                kw = {} if cmd.get("timeout") is None else {"timeout": cmd["timeout"]}
                g = cc.new_group(cmd["ranks"], cmd["name"], **kw)
                groups[cmd["name"]] = g
                members[cmd["name"]] = list(cmd["ranks"])
                emit({"ok": True, "t0": t0, "t1": time.monotonic()})
            elif what == "run":
                kind = cmd["kind"]
                gname = cmd.get("group")
                group = groups[gname] if gname else None
                ranks = list(cc.api._group(group).members)  # a shrunk group: its survivors
                me = ranks.index(cc.rank())
                count, dtype = cmd.get("count", 1000), cmd.get("dtype", "float32")
                timeout = cmd.get("timeout")
                state: dict = {"inside": None}
                if cmd.get("kill_at") is not None:
                    threading.Thread(target=_killer, args=(np, emit, state, cmd["kill_at"]),
                                     daemon=True).start()
                correct, i = True, 0
                if cmd.get("delay"):  # this rank reaches the call later than the others (skew)
                    time.sleep(cmd["delay"])
                try:
                    for i in range(cmd.get("iters", 1)):
                        bufs, expected = _inputs(np, kind, count, dtype, me, ranks, cmd.get("root", 0))
                        if bufs:  # what the killer watches: the buffer the collective writes into
                            idx = np.arange(0, bufs[0].size, max(1, bufs[0].size // 2048))
                            state.update(buf=bufs[0], initial=bufs[0][idx].copy(), idx=idx)
                        if cmd.get("report_at") == i:  # the test waits for this to act mid-loop
                            emit({"event": "looping", "iter": i, "t": time.monotonic()})
                        t0 = time.monotonic()
                        state["inside"] = i
                        _call_one(cc, kind, bufs, cmd, group, timeout)
                        state["inside"] = None
                        if expected is not None and not np.array_equal(bufs[0], expected):
                            correct = False
                    emit({"ok": True, "correct": correct, "iters": i + 1, "t0": t0, "t1": time.monotonic()})
                except Exception as e:  # noqa: BLE001 - reported to the test
                    emit(fail(e, t0=t0, t1=time.monotonic(), iter=i, correct_before=correct))
            elif what in ("shrink", "grow"):  # re-form a group (None: the world) without its failed
                # members, or with the restarted ranks admitted
                gname = cmd.get("group")
                kw = {} if cmd.get("timeout") is None else {"timeout": cmd["timeout"]}
                g = getattr(cc, what)(groups[gname] if gname else None, **kw)
                if gname:
                    groups[gname] = g
                members[gname] = list(g.members)
                emit({"ok": True, "members": list(g.members), "epoch": g.epoch, "group_id": g.id, "t0": t0,
                      "t1": time.monotonic()})
            elif what == "telemetry":  # this rank's link counters, summed (fault-injection tests)
                snap = cc.api.runtime().transport.telemetry.snapshot()
                errors: dict = {}
                for l in snap["links"]:
                    for k, v in l["errors"].items():
                        errors[k] = errors.get(k, 0) + v
                emit({"ok": True, "retransmits": sum(l["retransmits"] for l in snap["links"]), "errors": errors,
                      "bytes": sum(l["bytes"] for l in snap["links"]), "t0": t0, "t1": time.monotonic()})
            elif what == "exec":  # Python text run with cc, np, time, os and `scope` (kept between calls);
                # its `result` is answered; "async": run in a thread, answered when it ends
                def run_code(code=cmd["code"], emit=emit, t0=t0):
                    local = {"cc": cc, "np": np, "time": time, "os": os, "scope": scope, "result": None}
                    try:
                        exec(code, local)
                        emit({"ok": True, "result": local["result"], "t0": t0, "t1": time.monotonic()})
                    except Exception as e:  # noqa: BLE001 - reported to the test
                        emit(fail(e, t0=t0, t1=time.monotonic()))

                if cmd.get("async"):
                    threading.Thread(target=run_code, daemon=True, name="faultjobs-exec").start()
                else:
                    run_code()
            elif what == "shutdown":
                cc.shutdown()
                emit({"ok": True, "t0": t0, "t1": time.monotonic()})
            elif what == "exit":
                emit({"ok": True})
                return 0
            else:
                raise ValueError(f"unknown command {what}")
        except Exception as e:  # noqa: BLE001 - reported to the test
            emit(fail(e, t0=t0, t1=time.monotonic()))
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main())
