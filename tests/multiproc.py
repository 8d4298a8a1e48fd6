"""A harness for multi-process tests: run a worker as N real ranks under `collcomm run`.

A test names a worker — a module-level function ``worker(**kwargs)`` in a test module,
or Python script text — and the harness starts ``python -m collcomm.cli run -n N`` with
this file as the program. Each rank imports the worker, calls ``collcomm.init()``,
runs it, calls ``collcomm.shutdown()`` and writes what the worker returned (JSON) or
the traceback it raised to a result file. Workers check their results against a
NumPy reference inside the rank and return facts (counts, failures, digests) for the
test to assert on::

    import collcomm as cc

    def worker(size):
        x = np.full(size, cc.rank() + 1.0)
        cc.allreduce(x)
        assert (x == sum(range(1, cc.world_size() + 1))).all()
        return x.size

    def test_allreduce():
        job = multiproc.run(4, worker, kwargs={"size": 10}, timeout=30)
        assert job.values() == [10] * 4

Every job ends in bounded time: the collectives run with ``COLLCOMM_TIMEOUT`` below the
job's ``timeout``; if the job still runs at its timeout the harness asks every rank for
its threads' stacks (faulthandler, SIGUSR1), stops the launcher (which stops its
ranks), kills by pid any rank still alive, and fails with each rank's output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
SPEC = "spec.json"


class JobFailed(AssertionError):
    """A job exited badly, timed out, or a rank raised; the message carries every rank's story."""


@dataclass
class RankResult:
    rank: int
    pid: int | None = None
    ok: bool | None = None          # None: the rank wrote no result (killed, or it never got there)
    value: Any = None
    error: str = ""                 # the traceback a failing rank raised
    finished_at: float = 0.0
    output: list[str] = field(default_factory=list)  # this rank's stdout and stderr lines


@dataclass
class Job:
    nprocs: int
    returncode: int | None          # None: killed at the timeout
    timed_out: bool
    elapsed: float
    stdout: str
    stderr: str
    ranks: list[RankResult]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and all(r.ok for r in self.ranks)

    def check(self) -> "Job":
        """Raise JobFailed with every rank's error and output unless all ranks succeeded."""
        if self.ok:
            return self
        lines = [f"job of {self.nprocs} ranks " + (
            f"timed out after {self.elapsed:.1f} s" if self.timed_out else
            f"exited with {self.returncode} after {self.elapsed:.1f} s")]
        failed = sorted((r for r in self.ranks if r.ok is False), key=lambda r: r.finished_at)
        for r in failed:  # the earliest failure first: usually the cause, the others its echo
            lines.append(f"--- rank {r.rank} raised:\n{r.error.rstrip()}")
        silent = [r.rank for r in self.ranks if r.ok is None]
        if silent:
            lines.append(f"--- ranks without a result: {silent}")
        for r in self.ranks:
            if r.ok is not True and r.output:
                lines.append(f"--- rank {r.rank} output (last 40 lines):\n" + "\n".join(r.output[-40:]))
        for r in self.ranks:
            if r.ok is None:  # died without reporting (a signal, an abort): its own last words
                mine = [l for l in self.stderr.splitlines() if l.startswith(f"[rank {r.rank}] ")]
                if mine:
                    lines.append(f"--- rank {r.rank} stderr (last 20 lines):\n" + "\n".join(mine[-20:]))
        launcher = [l for l in self.stderr.splitlines() if not l.startswith("[rank ")]
        if launcher:
            lines.append("--- launcher:\n" + "\n".join(launcher[-20:]))
        raise JobFailed("\n".join(lines))

    def values(self) -> list:
        """What each rank's worker returned, in rank order (after check())."""
        self.check()
        return [r.value for r in self.ranks]


def _target_name(target: Callable) -> str:
    module = target.__module__
    if module == "__main__":
        raise ValueError("the worker must live in an importable module, not __main__")
    if "<locals>" in target.__qualname__:
        raise ValueError(f"worker {target.__qualname__} must be defined at module level")
    return f"{module}:{target.__qualname__}"


def run(nprocs: int, target: Callable | str, *, kwargs: dict | None = None, timeout: float = 60.0,
        algorithm: str | None = None, topology=None, chunk_bytes: int | None = None,
        collective_timeout: float | None = None, init: bool = True, env: dict | None = None) -> Job:
    """Run ``target`` (a module-level function, or script text) as ``nprocs`` ranks; return the Job.

    ``algorithm`` sets COLLCOMM_ALGORITHM, ``topology`` (a Topology or a file path) goes to
    ``collcomm run --topology``, ``chunk_bytes`` sets COLLCOMM_CHUNK_BYTES; the collective
    timeout (COLLCOMM_TIMEOUT) defaults to half the job's. With ``init=False`` the worker
    calls ``collcomm.init()`` and ``shutdown()`` itself. Script text sees ``cc``, ``np``,
    ``rank``, ``world_size`` (when ``init``) and ``report(value)``; kwargs are its globals.
    """
    with tempfile.TemporaryDirectory(prefix="collcomm-mp-") as tmp:
        out = Path(tmp)
        spec: dict[str, Any] = {"kwargs": kwargs or {}, "init": init, "sys_path": [str(HERE)]}
        if callable(target):
            spec["target"] = _target_name(target)
        else:
            script = out / "worker_script.py"
            script.write_text(target)
            spec["script"] = str(script)
        (out / SPEC).write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "collcomm.cli", "run", "-n", str(nprocs)]
        if topology is not None:
            path = topology
            if not isinstance(topology, (str, os.PathLike)):
                from collcomm.topology import jsonio

                path = out / "topology.json"
                jsonio.save(topology, path)
            cmd += ["--topology", str(path)]
        cmd += ["--timeout", str(collective_timeout or max(timeout / 2, 1.0)),
                sys.executable, str(Path(__file__).resolve()), str(out)]
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("COLLCOMM_")}
        child_env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
        if algorithm:
            child_env["COLLCOMM_ALGORITHM"] = algorithm
        if chunk_bytes:
            child_env["COLLCOMM_CHUNK_BYTES"] = str(chunk_bytes)
        child_env.update(env or {})
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
                                cwd=tmp)
        timed_out = False
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            stdout, stderr = _stop(proc, out, nprocs)
        except BaseException:  # interrupted (Ctrl-C, pytest-timeout): leave no rank behind
            _stop(proc, out, nprocs)
            raise
        elapsed = time.monotonic() - start
        ranks = [_collect(out, r, stdout, stderr) for r in range(nprocs)]
        return Job(nprocs, None if timed_out else proc.returncode, timed_out, elapsed, stdout, stderr, ranks)


def _rank_pids(out: Path, nprocs: int) -> list[int]:
    pids = []
    for r in range(nprocs):
        try:
            pids.append(int((out / f"rank{r}.pid").read_text()))
        except (OSError, ValueError):
            pass
    return pids


def _ours(pid: int, out: Path) -> bool:
    """True when ``pid`` is still a rank of this job (guards against a reused pid)."""
    try:
        return str(out) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _stop(proc: subprocess.Popen, out: Path, nprocs: int) -> tuple[str, str]:
    """The job ran past its timeout: dump the ranks' stacks, stop the launcher, kill stragglers by pid."""
    pids = [p for p in _rank_pids(out, nprocs) if _ours(p, out)]
    for pid in pids:  # faulthandler prints every thread's stack to the rank's stderr
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    try:
        stdout, stderr = proc.communicate(timeout=2.0)
        return stdout, stderr
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to its ranks and stops them
    try:
        stdout, stderr = proc.communicate(timeout=5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    for pid in pids:
        if _ours(pid, out):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return stdout, stderr


def _collect(out: Path, rank: int, stdout: str, stderr: str) -> RankResult:
    prefix = f"[rank {rank}] "
    lines = [l[len(prefix):] for text in (stdout, stderr) for l in text.splitlines() if l.startswith(prefix)]
    result = RankResult(rank, output=lines)
    try:
        result.pid = int((out / f"rank{rank}.pid").read_text())
    except (OSError, ValueError):
        pass
    path = out / f"rank{rank}.json"
    if path.exists():
        data = json.loads(path.read_text())
        result.ok, result.value, result.error = data["ok"], data.get("value"), data.get("error", "")
        result.finished_at = data.get("finished_at", 0.0)
    return result


# ---------------------------------------------------------------------------- inside a rank
def _rank_main(out: Path) -> int:
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    rank = int(os.environ["COLLCOMM_RANK"])
    (out / f"rank{rank}.pid").write_text(str(os.getpid()))
    spec = json.loads((out / SPEC).read_text())
    for p in spec["sys_path"]:
        if p not in sys.path:
            sys.path.insert(0, p)
    reported: dict[str, Any] = {}

    def write(ok: bool, **fields) -> None:
        tmp = out / f"rank{rank}.json.tmp"
        tmp.write_text(json.dumps({"ok": ok, "finished_at": time.time()} | fields))
        tmp.replace(out / f"rank{rank}.json")

    import numpy as np

    import collcomm as cc

    value, error, failed_at = None, None, 0.0
    try:
        if spec["init"]:
            cc.init()
        try:
            value = _call(spec, cc, np, reported)
        except BaseException:  # note the failure before shutdown() makes the other ranks fail too
            error, failed_at = traceback.format_exc(), time.time()
        if spec["init"]:
            cc.shutdown()
    except BaseException:
        if error is None:
            error, failed_at = traceback.format_exc(), time.time()
    if error is not None:
        write(False, error=error, finished_at=failed_at)
        return 1
    write(True, value=value)
    return 0


def _call(spec: dict, cc, np, reported: dict):
    import importlib

    if "target" in spec:
        module, _, name = spec["target"].partition(":")
        fn = importlib.import_module(module)
        for part in name.split("."):
            fn = getattr(fn, part)
        return fn(**spec["kwargs"])
    source = Path(spec["script"]).read_text()
    scope = {"__name__": "__main__", "cc": cc, "np": np, "report": lambda v: reported.__setitem__("value", v),
             **spec["kwargs"]}
    if spec["init"]:
        scope.update(rank=cc.rank(), world_size=cc.world_size())
    exec(compile(source, spec["script"], "exec"), scope)
    return reported.get("value")


if __name__ == "__main__":
    code = _rank_main(Path(sys.argv[1]))
    if "torch" in sys.modules:
        # The rank's result is on disk and collcomm is shut down (its threads joined). About one
        # exit in fifty of a process that imported torch and grpc aborts in C++ static
        # destructors after the interpreter is gone ("terminate called without an active
        # exception", main thread, no Python frame): not collcomm's code, and not this test's
        # subject, so such ranks skip the C++ teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
