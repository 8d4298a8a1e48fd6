"""`collcomm run`, `collcomm coordinator` and torchrun, run as a user runs them (subprocesses).

* `collcomm run -n N program`: every rank gets its COLLCOMM_* environment, every output line
  carries its rank, the job exits 0 when every rank does;
* a rank that fails (exit code, signal) stops the job: the others raise PeerFailure at once
  (not at their timeout), ranks blocked elsewhere are stopped (SIGTERM, then SIGKILL), and the
  launcher exits with the failing rank's status and its last error line;
* Ctrl-C (SIGINT to the launcher's process group) reaches every rank, even inside a collective;
* `collcomm coordinator --host H --port P` serves a job whose ranks get their variables by hand
  (a token from the environment, or a generated one read from the file whose path it prints),
  and refuses a rank with the wrong token;
* `python -m torch.distributed.run --nproc-per-node 2 script.py`: init() from torchrun's variables.

Every job runs with a bounded wait; a job still running at its bound is killed by process group.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from faultjobs import free_port_pair

REPO = Path(__file__).resolve().parent.parent


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COLLCOMM_", "TORCHELASTIC_")) and k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}, **extra)
    return env


def collcomm_cmd() -> list[str]:
    return [sys.executable, "-m", "collcomm.cli"]


def script(tmp_path: Path, text: str, name: str = "job.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


class Proc:
    """A subprocess in its own process group, its output lines collected as they come."""

    def __init__(self, argv, env=None, cwd=None):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or clean_env(),
                                     cwd=cwd, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(s, out), daemon=True)
                         for s, out in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))]
        for t in self._threads:
            t.start()

    def _pump(self, stream, out: list) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            out.append(line)
            self.lines.put(line)

    def wait_line(self, pattern: str, timeout: float) -> re.Match:
        """The first line (stdout or stderr, from now on) that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s\n{self.story()}") from None
            m = re.search(pattern, line)
            if m:
                return m

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout} s\n{self.story()}") from None
        for t in self._threads:
            t.join(timeout=5)
        self.elapsed = time.monotonic() - self.started
        return rc

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def story(self) -> str:
        return "--- stdout:\n" + "\n".join(self.stdout[-40:]) + "\n--- stderr:\n" + "\n".join(self.stderr[-40:])


def run_job(argv, timeout: float, env=None, cwd=None) -> Proc:
    p = Proc(argv, env=env, cwd=cwd)
    try:
        p.wait(timeout)
    finally:
        if p.proc.poll() is None:
            p.kill()
    return p


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie has exited too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def rank_lines(lines: list[str], rank: int) -> list[str]:
    prefix = f"[rank {rank}] "
    return [l[len(prefix):] for l in lines if l.startswith(prefix)]


# ============================================================================ collcomm run
ENV_SCRIPT = """
    import json, os, sys
    import numpy as np
    import collcomm as cc

    cc.init()
    r, n = cc.rank(), cc.world_size()
    env = {k: os.environ.get(k) for k in ("COLLCOMM_RANK", "COLLCOMM_WORLD_SIZE", "COLLCOMM_LOCAL_RANK",
                                          "COLLCOMM_COORDINATOR", "COLLCOMM_TOKEN", "COLLCOMM_TIMEOUT",
                                          "COLLCOMM_TOPOLOGY", "COLLCOMM_TLS_CA", "USER_VARIABLE")}
    x = np.full(1000, r + 1, np.float32)
    cc.allreduce(x)
    env["sum"] = float(x[0])
    env["timeout"] = cc.api.runtime().timeout
    print("ENV " + json.dumps(env))
    for i in range(300):
        print(f"r={r} i={i}")
    print(f"to stderr from {r}", file=sys.stderr)
    sys.stdout.write(f"no newline from {r}")
    cc.shutdown()
"""


@pytest.mark.timeout(60)
def test_run_gives_each_rank_its_environment_and_prefixes_every_line(tmp_path):
    import json

    from collcomm.topology import presets, save

    n = 3
    topo = tmp_path / "star3.json"
    save(presets.star(n), topo)
    prog = script(tmp_path, ENV_SCRIPT)
    exe = shutil.which("collcomm")
    cmd = [exe] if exe else collcomm_cmd()
    job = run_job(cmd + ["run", "-n", str(n), "--timeout", "7.5", "--topology", "star3.json", sys.executable,
                         str(prog)], timeout=45, cwd=tmp_path,
                  # TLS settings for other jobs do not reach the ranks of a local job (its coordinator is plaintext)
                  env=clean_env(USER_VARIABLE="kept", COLLCOMM_TLS_CA=str(tmp_path / "no-such-ca.pem")))
    assert job.proc.returncode == 0, job.story()
    envs = {}
    for line in job.stdout:
        m = re.fullmatch(r"\[rank (\d+)\] (.*)", line)
        assert m, f"a line without its rank prefix: {line!r}\n{job.story()}"
        rank, text = int(m.group(1)), m.group(2)
        if text.startswith("ENV "):
            envs[rank] = json.loads(text[4:])
        elif text.startswith("r="):
            assert re.fullmatch(rf"r={rank} i=\d+", text), f"rank {rank}'s line carries another's text: {line!r}"
        else:
            assert text == f"no newline from {rank}", line
    for r in range(n):
        assert rank_lines(job.stdout, r).count(f"no newline from {r}") == 1
        assert sum(1 for l in rank_lines(job.stdout, r) if l.startswith("r=")) == 300
        assert f"to stderr from {r}" in rank_lines(job.stderr, r), job.story()
    assert sorted(envs) == list(range(n)), job.story()
    tokens = {e["COLLCOMM_TOKEN"] for e in envs.values()}
    coordinators = {e["COLLCOMM_COORDINATOR"] for e in envs.values()}
    assert len(tokens) == 1 and len(next(iter(tokens))) >= 16, envs
    assert len(coordinators) == 1 and re.fullmatch(r"[\w.\[\]:]+:\d+", next(iter(coordinators))), envs
    for r, e in envs.items():
        assert (e["COLLCOMM_RANK"], e["COLLCOMM_WORLD_SIZE"], e["COLLCOMM_LOCAL_RANK"]) == (str(r), str(n), str(r))
        assert float(e["COLLCOMM_TIMEOUT"]) == 7.5 and e["timeout"] == 7.5
        assert Path(e["COLLCOMM_TOPOLOGY"]).is_absolute() and Path(e["COLLCOMM_TOPOLOGY"]) == topo.resolve()
        assert e["USER_VARIABLE"] == "kept" and e["COLLCOMM_TLS_CA"] is None
        assert e["sum"] == n * (n + 1) / 2


FAILING_RANK = """
    import os, signal, sys
    import numpy as np
    import collcomm as cc

    mode = sys.argv[1]
    cc.init()
    r = cc.rank()
    x = np.ones(1 << 18, np.float32)
    try:
        for i in range(100000):
            if r == 1 and i == 3:
                if mode == "exit":
                    print("rank 1: giving up on purpose (disk full)", file=sys.stderr, flush=True)
                    sys.exit(3)
                os.kill(os.getpid(), signal.SIGKILL)
            cc.allreduce(x)
            x[:] = 1
    except cc.CollectiveError as e:
        print(f"rank {r} caught {type(e).__name__} naming rank {getattr(e, 'rank', None)}", flush=True)
        raise
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["exit", "kill"])
def test_a_failing_rank_fails_the_job_at_once_with_its_status_and_error(tmp_path, mode):
    """Rank 1 exits with 3 (or is SIGKILLed) mid-job while the others are in allreduces with a 120 s
    timeout: they raise PeerFailure at once, the launcher exits with rank 1's status (3, or 128+9)
    and names rank 1 with its last error line, within seconds."""
    prog = script(tmp_path, FAILING_RANK)
    job = run_job(collcomm_cmd() + ["run", "-n", "3", "--timeout", "120", sys.executable, str(prog), mode],
                  timeout=45)
    expected = 3 if mode == "exit" else 128 + signal.SIGKILL
    assert job.proc.returncode == expected, job.story()
    assert job.elapsed < 20, f"the job took {job.elapsed:.1f} s to fail (rank timeout 120 s)\n{job.story()}"
    last = job.stderr[-1]
    if mode == "exit":
        assert last == "collcomm run: rank 1 failed with exit code 3: rank 1: giving up on purpose (disk full)", \
            job.story()
    else:
        assert last.startswith("collcomm run: rank 1 failed with signal 9"), job.story()
    for r in (0, 2):
        caught = [l for l in rank_lines(job.stdout, r) if "caught" in l]
        assert caught and caught[0].startswith(f"rank {r} caught PeerFailure"), job.story()


@pytest.mark.timeout(60)
def test_ranks_blocked_outside_collectives_are_stopped_when_one_fails(tmp_path):
    """Rank 1 fails; rank 0 sleeps outside any collective, rank 2 sleeps and ignores SIGTERM: the
    launcher stops both (SIGTERM, then SIGKILL) and exits with rank 1's status in bounded time."""
    prog = script(tmp_path, """
        import os, signal, sys, time
        import collcomm as cc

        cc.init()
        r = cc.rank()
        if r == 2:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"pid {os.getpid()}", flush=True)
        if r == 1:
            sys.exit(5)
        time.sleep(600)
    """)
    job = Proc(collcomm_cmd() + ["run", "-n", "3", sys.executable, str(prog)])
    try:
        pids = {}
        for _ in range(3):
            m = job.wait_line(r"^\[rank (\d)\] pid (\d+)$", timeout=30)
            pids[int(m.group(1))] = int(m.group(2))
        rc = job.wait(timeout=30)
    finally:
        if job.proc.poll() is None:
            job.kill()
    assert rc == 5, job.story()
    assert job.elapsed < 20, f"took {job.elapsed:.1f} s\n{job.story()}"
    assert all(gone(p) for p in pids.values()), f"ranks still alive: {pids}"
    assert job.stderr[-1].startswith("collcomm run: rank 1 failed with exit code 5"), job.story()


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 has no Popen(process_group=): a session per rank")
@pytest.mark.parametrize("stdin", ["terminal", "pipe"])
def test_each_rank_leads_a_process_group_in_the_launchers_session(tmp_path, stdin):
    """A rank leads a process group of its own (the launcher stops it and what it started with one
    killpg) in the launcher's session: a session of its own would be a scheduler autogroup of its
    own, which slowed ranks sharing cores. With a terminal for stdin a rank gets /dev/null (in a
    background process group, reading the terminal would stop it); a pipe is passed on."""
    import pty

    prog = script(tmp_path, """
        import os, sys
        print(f"ids {os.getpid()} {os.getpgid(0)} {os.getsid(0)} {os.getppid()} {os.readlink('/proc/self/fd/0')}",
              flush=True)
    """)
    if stdin == "terminal":
        leader, follower = pty.openpty()
        child_stdin = follower
    else:
        leader, follower = None, None
        child_stdin = subprocess.PIPE
    proc = subprocess.Popen(collcomm_cmd() + ["run", "-n", "2", sys.executable, str(prog)], stdin=child_stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for fd in (leader, follower):
            if fd is not None:
                os.close(fd)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    ids = [line.split(" ids ", 1)[1].split() for line in out.decode().splitlines() if " ids " in line]
    assert len(ids) == 2, out
    for pid, pgid, sid, parent, fd0 in ids:
        assert pgid == pid, ids                       # its own process group
        assert sid == str(proc.pid) != pid, ids       # the launcher's session (the test made it a leader)
        assert parent == str(proc.pid), ids
        assert (fd0 == "/dev/null") == (stdin == "terminal"), ids


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_reaches_every_rank_even_inside_a_collective(tmp_path, signum):
    """Ranks 0 and 1 wait in an allreduce that rank 2 never joins (default 300 s timeout); Ctrl-C
    (SIGINT to the launcher's process group, as a terminal sends it) interrupts all three and the
    launcher exits with 130. SIGTERM (a batch system stopping the job) is forwarded the same way:
    128 + 15."""
    prog = script(tmp_path, """
        import os, sys, time
        import numpy as np
        import collcomm as cc

        cc.init()
        r = cc.rank()
        try:
            if r == 2:
                print(f"ready {os.getpid()}", flush=True)
                time.sleep(600)
            else:
                x = np.ones(1000, np.float32)
                work = cc.allreduce(x, async_op=True)
                print(f"ready {os.getpid()}", flush=True)
                work.wait()
        except KeyboardInterrupt:
            print(f"rank {r} interrupted", flush=True)
            sys.exit(130)
    """)
    job = Proc(collcomm_cmd() + ["run", "-n", "3", sys.executable, str(prog)])
    try:
        pids = {}
        for _ in range(3):
            m = job.wait_line(r"^\[rank (\d)\] ready (\d+)$", timeout=30)
            pids[int(m.group(1))] = int(m.group(2))
        os.killpg(job.proc.pid, signum)
        sent = time.monotonic()
        rc = job.wait(timeout=20)
        took = time.monotonic() - sent
    finally:
        if job.proc.poll() is None:
            job.kill()
    assert rc == 128 + signum, job.story()
    assert took < 10, f"{took:.1f} s from the signal to the launcher's exit\n{job.story()}"
    if signum == signal.SIGINT:
        for r in range(3):
            assert f"rank {r} interrupted" in rank_lines(job.stdout, r), job.story()
    assert all(gone(p) for p in pids.values()), f"ranks still alive: {pids}"


@pytest.mark.timeout(30)
def test_run_refuses_bad_arguments_with_one_line(tmp_path):
    from collcomm.topology import presets, save

    save(presets.star(2), tmp_path / "star2.json")
    for args in (["run", "-n", "3", "--topology", str(tmp_path / "star2.json"), sys.executable, "-c", "pass"],
                 ["run", "-n", "2"],
                 ["run", "-n", "0", sys.executable, "-c", "pass"]):
        p = subprocess.run(collcomm_cmd() + args, capture_output=True, text=True, timeout=20, env=clean_env())
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr, p.stderr


# ============================================================================ the coordinator alone
RANK_SCRIPT = """
    import sys
    import numpy as np
    import collcomm as cc

    try:
        cc.init(timeout=20)
    except cc.CollectiveError as e:
        print(f"init refused: {type(e).__name__}: {e}", flush=True)
        sys.exit(4)
    x = np.full(100, cc.rank() + 1, np.float64)
    cc.allreduce(x)
    print(f"rank {cc.rank()} of {cc.world_size()} sum {x[0]:g}", flush=True)
    cc.shutdown()
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("token_from", ["environment", "generated"])
def test_standalone_coordinator_serves_ranks_started_by_hand(tmp_path, token_from):
    port = free_port_pair()
    env = clean_env(COLLCOMM_TOKEN="job-token-1234") if token_from == "environment" else clean_env()
    coord = Proc(collcomm_cmd() + ["coordinator", "--host", "127.0.0.1", "--port", str(port)], env=env)
    try:
        m = coord.wait_line(r"^collcomm coordinator listening on (\S+)$", timeout=20)
        assert m.group(1) == f"127.0.0.1:{port}"
        if token_from == "generated":  # in a new mode-0600 file; only its path is printed
            token_file = Path(coord.wait_line(r"^job token written to (\S+) \(mode 0600\)", timeout=5).group(1))
            assert token_file.stat().st_mode & 0o777 == 0o600
            token = token_file.read_text().strip()
        else:
            token = "job-token-1234"
        prog = script(tmp_path, RANK_SCRIPT)
        ranks = [Proc([sys.executable, str(prog)], env=clean_env(
            COLLCOMM_COORDINATOR=f"127.0.0.1:{port}", COLLCOMM_TOKEN=token, COLLCOMM_RANK=str(r),
            COLLCOMM_WORLD_SIZE="2")) for r in range(2)]
        intruder = Proc([sys.executable, str(prog)], env=clean_env(
            COLLCOMM_COORDINATOR=f"127.0.0.1:{port}", COLLCOMM_TOKEN="wrong-token", COLLCOMM_RANK="0",
            COLLCOMM_WORLD_SIZE="2"))
        try:
            assert intruder.wait(30) == 4, intruder.story()
            assert any(l.startswith("init refused: AuthenticationError") for l in intruder.stdout), intruder.story()
            for r, p in enumerate(ranks):
                assert p.wait(40) == 0, p.story()
                assert f"rank {r} of 2 sum 3" in p.stdout, p.story()
        finally:
            for p in ranks + [intruder]:
                if p.proc.poll() is None:
                    p.kill()
        coord.proc.send_signal(signal.SIGTERM)
        assert coord.wait(15) == 0, coord.story()
        assert token not in coord.story()
    finally:
        if coord.proc.poll() is None:
            coord.kill()


# ============================================================================ torchrun
@pytest.mark.timeout(120)
def test_init_from_torchrun_environment(tmp_path):
    """init() with no arguments under the real torchrun: RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT;
    rank 0 starts the coordinator on MASTER_PORT + 1."""
    pytest.importorskip("torch")
    port = free_port_pair()
    prog = script(tmp_path, """
        import os
        import numpy as np
        import collcomm as cc

        cc.init(timeout=30)
        assert cc.rank() == int(os.environ["RANK"]) and cc.world_size() == int(os.environ["WORLD_SIZE"])
        x = np.full(1000, cc.rank() + 1, np.float32)
        cc.allreduce(x)
        out = np.zeros(2 * 3, np.int64)
        cc.allgather(out, np.full(3, cc.rank(), np.int64))
        print(f"torchrun rank {cc.rank()} of {cc.world_size()} sum {x[0]:g} gathered {out.tolist()}", flush=True)
        cc.shutdown()
    """)
    job = run_job([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1", "--master-port", str(port), str(prog)], timeout=100)
    assert job.proc.returncode == 0, job.story()
    text = "\n".join(job.stdout)
    for r in range(2):
        assert f"torchrun rank {r} of 2 sum 3 gathered [0, 0, 0, 1, 1, 1]" in text, job.story()
