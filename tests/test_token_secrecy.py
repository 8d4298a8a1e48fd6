"""The job token never shows: not in any process's argv (``ps``), not in a log line, not in an
error message. Real jobs run with every collcomm logger at DEBUG (a ``sitecustomize`` on
PYTHONPATH configures logging in every Python process they start) while a thread reads every
process's ``/proc/<pid>/cmdline``; then the token is looked for in everything captured:

* a normal ``collcomm run -n 2`` job, in which an intruder with a wrong token knocks at the
  coordinator and at a rank's data listener (both refuse it, and log it);
* a ``collcomm run`` job that fails because a rank has the wrong token (AuthenticationError);
* ``collcomm status`` against a running ``collcomm coordinator --token-file`` (token from the file,
  from COLLCOMM_TOKEN, and a wrong one), and ``--token`` on the command line (refused);
* ``collcomm coordinator`` generating its own token (only the path of its file is printed).

The control test plants a token in a process's argv and in a DEBUG log line and checks that the
same harness finds both.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SITECUSTOMIZE = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
logging.getLogger("collcomm").setLevel(logging.DEBUG)
"""


def distinctive(what: str) -> str:
    return f"{what}-{secrets.token_hex(12)}"


class CommandLines:
    """Every process's command line, read from /proc by a thread until ``stop()``; ``seen`` holds
    each distinct one (NUL-separated bytes, as the kernel shows them to ``ps``)."""

    def __init__(self, planted: str | None = None):
        self.seen: set[bytes] = set()
        self.scans = 0
        self.found = threading.Event()  # set once a command line holds ``planted``
        self._planted = planted.encode() if planted else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                            line = f.read()
                    except OSError:  # gone meanwhile, or a kernel thread
                        continue
                    if line and line not in self.seen:
                        self.seen.add(line)
                        if self._planted and self._planted in line:
                            self.found.set()
            self.scans += 1
            if self._stop.wait(0.01):  # sampling, not waiting for anything
                return

    def stop(self) -> "CommandLines":
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive() and self.scans > 0
        return self

    def holding(self, needle: str) -> list[str]:
        return [line.replace(b"\0", b" ").decode(errors="replace") for line in self.seen if needle.encode() in line]


@pytest.fixture
def env(tmp_path):
    """An environment for the job's processes: collcomm's loggers at DEBUG, no COLLCOMM_* of ours."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)

    def make(**extra) -> dict:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("COLLCOMM_", "TORCHELASTIC_"))
                and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        path = os.pathsep.join(p for p in (str(site), base.get("PYTHONPATH")) if p)
        return {**base, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "COLLCOMM_TRANSPORT": "tcp", **extra}

    return make


def collcomm(*args) -> list[str]:
    return [sys.executable, "-m", "collcomm.cli", *map(str, args)]


def run(argv, env, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def shown(*outputs) -> str:
    return "\n".join(o for o in outputs if o)


def assert_hidden(secret: str, text: str, lines: CommandLines) -> None:
    assert secret not in text, f"the token shows in the output:\n{text}"
    assert not lines.holding(secret), f"the token shows in argv: {lines.holding(secret)}"


# ------------------------------------------------------------------------------------ control
@pytest.mark.timeout(60)
def test_the_harness_finds_a_token_planted_in_argv_and_in_a_debug_log_line(env):
    planted = distinctive("planted")
    lines = CommandLines(planted)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import logging, sys
        logging.getLogger("collcomm.test").debug("the token is %s", sys.argv[1])
        sys.stdin.read()  # live until the test closes stdin: the scanner must see this argv
    """), planted], env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert lines.found.wait(30), "the scanner never saw the planted argv"
        out, err = proc.communicate("", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        lines.stop()
    assert lines.holding(planted) and f"collcomm.test DEBUG the token is {planted}" in err, err
    with pytest.raises(AssertionError, match="in argv"):
        assert_hidden(planted, out, lines)
    with pytest.raises(AssertionError, match="in the output"):
        assert_hidden(planted, err, lines)


# ------------------------------------------------------------------------------------ jobs
JOB = """
    import os, socket, sys
    from pathlib import Path
    import numpy as np
    import collcomm as cc
    from collcomm.coordinator import CoordinatorClient

    Path(sys.argv[1], "token." + os.environ["COLLCOMM_RANK"]).write_text(os.environ["COLLCOMM_TOKEN"])
    intruder = os.environ["INTRUDER_TOKEN"]
    if sys.argv[2] == "fail" and os.environ["COLLCOMM_RANK"] == "1":
        os.environ["COLLCOMM_TOKEN"] = intruder  # this rank will not get in
    cc.init(timeout=20)
    rt = cc.api.runtime()
    x = np.ones(1000, np.float32)
    cc.allreduce(x)
    print(f"rank {cc.rank()}: sum {x[0]:g}; {rt.client!r}; {rt.client.tls}", flush=True)
    try:
        CoordinatorClient(os.environ["COLLCOMM_COORDINATOR"], intruder, timeout=5).ping()
    except cc.AuthenticationError as e:
        print(f"coordinator refused the intruder: {e!r}", flush=True)
    if cc.rank() == 0:  # knock at rank 1's data listener with the wrong token
        from collcomm.transport.tcp.handshake import client_handshake
        host, _, port = rt.peer_addresses[1].partition("#")[0].rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            try:
                client_handshake(sock, intruder.encode(), 0, 1, 0, 0)
            except cc.AuthenticationError as e:
                print(f"rank 1 refused the intruder: {e!r}", flush=True)
    cc.barrier()
    cc.shutdown()
"""


def run_job(tmp_path: Path, env, mode: str, intruder: str):
    prog = tmp_path / "job.py"
    prog.write_text(textwrap.dedent(JOB))
    lines = CommandLines()
    try:
        job = run(collcomm("run", "-n", 2, sys.executable, prog, tmp_path, mode), env(INTRUDER_TOKEN=intruder))
    finally:
        lines.stop()
    tokens = {(tmp_path / f"token.{r}").read_text() for r in range(2)}
    assert len(tokens) == 1, "the ranks of one job share one token"
    assert lines.holding(str(prog)), "the scanner never saw the ranks"
    return job, tokens.pop(), lines


@pytest.mark.timeout(90)
def test_a_collcomm_run_job_shows_its_token_nowhere(tmp_path, env):
    intruder = distinctive("intruder")
    job, token, lines = run_job(tmp_path, env, "ok", intruder)
    text = shown(job.stdout, job.stderr)
    assert job.returncode == 0, text
    for r in range(2):
        assert f"[rank {r}] rank {r}: sum 2; CoordinatorClient(" in text, text
        assert f"[rank {r}] coordinator refused the intruder: AuthenticationError(" in text, text
    assert "[rank 0] rank 1 refused the intruder: AuthenticationError(" in text, text
    assert "refused a call from" in text and "wrong or missing job token" in text, text  # the coordinator's log
    for secret in (token, intruder):
        assert_hidden(secret, text, lines)


@pytest.mark.timeout(90)
def test_a_job_that_fails_on_a_wrong_token_shows_neither_token(tmp_path, env):
    intruder = distinctive("intruder")
    job, token, lines = run_job(tmp_path, env, "fail", intruder)
    text = shown(job.stdout, job.stderr)
    assert job.returncode == 1, text
    last = job.stderr.strip().splitlines()[-1]
    assert last.startswith("collcomm run: rank 1 failed with exit code 1: collcomm.errors.AuthenticationError: "
                           "coordinator at "), text
    for secret in (token, intruder):
        assert_hidden(secret, text, lines)


# ------------------------------------------------------------------------------------ coordinator
class Coordinator:
    """``collcomm coordinator`` on a free port; ``address`` once it listens."""

    def __init__(self, args, env):
        self.proc = subprocess.Popen(collcomm("coordinator", "--host", "127.0.0.1", "--port", 0, *args), env=env,
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.first = self.proc.stdout.readline()  # the coordinator prints it at once, or exits
        assert self.first.startswith("collcomm coordinator listening on "), self.first + self.proc.stderr.read()
        self.address = self.first.split()[-1]

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, err
        return shown(self.first, out, err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


@pytest.mark.timeout(90)
def test_status_takes_the_token_from_a_file_or_the_environment_never_argv(tmp_path, env, capsys, monkeypatch):
    import json

    from collcomm.cli import main
    from collcomm.coordinator import CoordinatorClient

    token, intruder = distinctive("token"), distinctive("intruder")
    token_file = tmp_path / "job.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    lines = CommandLines()
    coord = Coordinator(["--token-file", token_file], env())
    try:
        with CoordinatorClient(coord.address, token, timeout=10) as client:
            client.kv_set("monitor/latest", json.dumps({"group": 0, "group_name": "world", "round": 3}).encode())
        by_file = run(collcomm("status", "--coordinator", coord.address, "--token-file", token_file), env())
        wrong = run(collcomm("status", "--coordinator", coord.address), env(COLLCOMM_TOKEN=intruder))
        monkeypatch.setenv("COLLCOMM_TOKEN", token)  # in this process (quicker): the token from the environment
        capsys.readouterr()
        assert main(["status", "--coordinator", coord.address]) == 0
        by_env = capsys.readouterr()
        coordinator_output = coord.stop()
    finally:
        coord.kill()
        lines.stop()
    assert by_file.returncode == 0, by_file.stderr
    for out in (by_file.stdout, by_env.out):
        assert "group 0 (world" in out and "round 3" in out, out
    assert wrong.returncode == 2 and wrong.stderr.startswith("collcomm: error: coordinator at "), wrong.stderr
    assert "refused the job token" in wrong.stderr and wrong.stderr.count("\n") == 1, wrong.stderr
    text = shown(by_file.stdout, by_file.stderr, by_env.out, by_env.err, wrong.stdout, wrong.stderr,
                 coordinator_output)
    assert "wrong or missing job token" in coordinator_output, coordinator_output  # the refusal was logged
    for secret in (token, intruder):
        assert_hidden(secret, text, lines)
    # A token given on the command line is refused, and the refusal does not repeat it.
    monkeypatch.delenv("COLLCOMM_TOKEN")
    for command in ("status", "coordinator"):
        assert main([command, "--token", intruder]) == 2
        err = capsys.readouterr().err
        assert "use --token-file PATH" in err and "COLLCOMM_TOKEN" in err and intruder not in err, err


@pytest.mark.timeout(60)
def test_a_coordinator_that_generates_its_token_prints_only_its_file(tmp_path, env):
    from collcomm.coordinator import CoordinatorClient

    lines = CommandLines()
    coord = Coordinator([], env(XDG_RUNTIME_DIR=str(tmp_path)))
    try:
        second = coord.proc.stdout.readline()
        path = Path(second.split()[4])
        assert second.startswith(f"job token written to {tmp_path}/collcomm-coordinator-"), second
        assert path.stat().st_mode & 0o777 == 0o600
        token = path.read_text().strip()
        with CoordinatorClient(coord.address, token, timeout=10) as client:
            assert client.ping().registered == 0
        output = coord.stop()
    finally:
        coord.kill()
        lines.stop()
    assert_hidden(token, shown(output, second), lines)
    assert not path.exists()
