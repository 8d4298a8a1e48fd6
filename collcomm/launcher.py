"""``collcomm run -n N [--topology T.json] [--emulate T.json] program args...``: a job on this
machine, like torchrun (also how ``collcomm topology --probe`` and ``collcomm-perf`` start ranks).

Starts an embedded coordinator, spawns the ranks with their ``COLLCOMM_*``
environment, prefixes every output line with its rank, forwards Ctrl-C / SIGTERM,
and when a rank fails reports it to the coordinator (so every survivor raises
PeerFailure naming it at once), gives the others a moment to report their own
errors, stops them, and exits with the failing rank's exit code and error. With
``--emulate`` each rank runs inside its namespace of an emulated fabric
(:mod:`collcomm.emulation`).

The job token is fresh for every job and reaches the ranks only through their environment
(``COLLCOMM_TOKEN``), never their argv; the launcher prints and logs nothing that holds it. The
embedded coordinator listens on this machine in plaintext, so the ranks (and the launcher's own
client) connect without TLS even when ``COLLCOMM_TLS_CA`` is set for other jobs.

Before anything starts, :func:`check_job` refuses a job that cannot run (:class:`JobRefused`, a
ValueError): a number of ranks outside 1..:data:`MAX_LOCAL_RANKS`, a timeout that is not a finite
number of seconds in (0, 1e9], no program or one that is not found, a topology file that does not
load or has another number of ranks.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

GRACE_SECONDS = 3.0
# Ranks of one job on this machine: each is a process with its own threads and sockets, so a
# mistyped -n (100000000) must be refused, not spawned until the machine gives out.
MAX_LOCAL_RANKS = 1024


class JobRefused(ValueError):
    """The launcher refuses a job before it starts anything; the message says why."""


class _Rank:
    def __init__(self, rank: int, proc: subprocess.Popen):
        self.rank = rank
        self.proc = proc
        self.tail: deque[str] = deque(maxlen=20)  # last stderr lines, for the failure report


def _pump(stream, out, prefix: str, keep: deque | None, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        if keep is not None:
            keep.append(line)
        with lock:
            out.write(f"{prefix}{line}\n")
            out.flush()
    stream.close()


# The embedded coordinator is plaintext on this machine: TLS settings meant for other jobs stay out.
_NOT_INHERITED = ("COLLCOMM_TLS_CA", "COLLCOMM_TLS_SERVER_NAME")


def rank_env(rank: int, world: int, coordinator: str, token: str, topology: str | None, timeout: float | None,
             base: dict | None = None) -> dict:
    """The environment of one rank of a launched job: ``base`` (default: this process's) with the
    job's COLLCOMM_* variables, the token among them, and without COLLCOMM_TLS_* settings."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _NOT_INHERITED}
    env.update({"COLLCOMM_RANK": str(rank), "COLLCOMM_WORLD_SIZE": str(world), "COLLCOMM_LOCAL_RANK": str(rank),
                "COLLCOMM_COORDINATOR": coordinator, "COLLCOMM_TOKEN": token, "PYTHONUNBUFFERED": "1"})
    if topology:
        env["COLLCOMM_TOPOLOGY"] = topology
    if timeout:
        env["COLLCOMM_TIMEOUT"] = str(timeout)
    return env


def run(nprocs: int, command: list[str], *, topology: str | None = None, timeout: float | None = None,
        stdout=None, stderr=None, wrap=None, env: dict | None = None, emulate: str | None = None,
        scale: str | None = None, prefix: str | None = None) -> int:
    """Run ``command`` as ``nprocs`` ranks; return the job's exit code.

    ``wrap(rank, argv) -> argv`` lets callers run each rank differently; ``env`` adds variables
    to every rank's environment. ``emulate=T.json`` runs each rank inside its namespace of the
    emulated fabric of that topology at ``scale`` under ``prefix`` (None: the defaults of
    :mod:`collcomm.emulation`), built now and removed afterwards, unless the same fabric is
    already up from ``collcomm emulate up``; its topology is then the planner's unless
    ``topology`` or ``COLLCOMM_TOPOLOGY`` says otherwise."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    topology = check_job(nprocs, command, topology=topology, timeout=timeout, emulate=emulate,
                         find_program=wrap is None)
    fabric, built = None, False
    if emulate:
        fabric, built = _fabric(emulate, nprocs, scale, prefix)
        if topology is None and not (env or {}).get("COLLCOMM_TOPOLOGY") and not os.environ.get("COLLCOMM_TOPOLOGY"):
            topology = str(Path(emulate).resolve())
    try:
        return _run_ranks(nprocs, command, topology, timeout, stdout, stderr, wrap, env, fabric)
    finally:
        if built:
            from collcomm import emulation as emu

            emu.down(fabric.prefix)


def check_job(nprocs: int, command: list[str], *, topology: str | None = None, timeout: float | None = None,
              emulate: str | None = None, find_program: bool = True) -> str | None:
    """Refuse a job that cannot run (:class:`JobRefused`, naming the argument; a bad topology file
    is a TopologyError), before anything starts; return ``topology`` as the ranks get it (an
    absolute path, "probe" or None). With ``find_program``, ``command[0]`` must be an executable
    file or a program on ``PATH``."""
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or not 1 <= nprocs <= MAX_LOCAL_RANKS:
        raise JobRefused(f"-n must be a number of ranks in 1..{MAX_LOCAL_RANKS}, got {nprocs!r}")
    if timeout is not None:
        from collcomm.runtime.arguments import MAX_TIMEOUT

        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
                math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
            raise JobRefused(f"--timeout must be a finite number of seconds in (0, {MAX_TIMEOUT:g}], got {timeout!r}")
    if not command:
        raise JobRefused("no program to run")
    if find_program and shutil.which(command[0]) is None:
        where = "is not an executable file" if os.sep in command[0] else "is not found on PATH"
        raise JobRefused(f"program {command[0]!r} {where}")
    if topology and topology != "probe":  # "probe": the ranks measure the fabric at init
        from collcomm.topology import jsonio

        topo = jsonio.load(topology)  # fail early, in the launcher, on a bad file
        if topo.num_ranks != nprocs:
            raise JobRefused(f"topology {topology} has {topo.num_ranks} ranks but -n is {nprocs}")
        topology = str(Path(topology).resolve())
    if emulate:
        from collcomm.topology import jsonio

        fabric = jsonio.load(emulate)
        if fabric.num_ranks != nprocs:
            raise JobRefused(f"emulated topology {emulate} has {fabric.num_ranks} ranks but -n is {nprocs}")
    return topology


def _fabric(path: str, nprocs: int, scale: str | None, prefix: str | None):
    """The emulated fabric of topology file ``path``: the one already up under the prefix (the same
    topology at the same scale, left up afterwards), or a new one (built=True: the caller removes it).
    JobRefused when it has another number of ranks or another fabric is up under the prefix."""
    from collcomm import emulation as emu
    from collcomm.topology import jsonio

    emu.require_root("--emulate")
    topo = jsonio.load(path)
    if topo.num_ranks != nprocs:
        raise JobRefused(f"emulated topology {path} has {topo.num_ranks} ranks but -n is {nprocs}")
    wanted = emu.plan(topo, prefix or emu.DEFAULT_PREFIX, scale or emu.DEFAULT_SCALE)
    existing = emu.current(wanted.prefix)
    if existing is not None:
        if not existing.same_fabric(wanted):
            raise JobRefused(f"another fabric ({existing.name}) is up under prefix {wanted.prefix!r}: run "
                             f"`collcomm emulate down --prefix {wanted.prefix}` or choose another --prefix")
        return existing, False
    return emu.up(wanted), True


def _run_ranks(nprocs, command, topology, timeout, stdout, stderr, wrap, extra_env, fabric) -> int:
    from collcomm.coordinator.client import CoordinatorClient
    from collcomm.coordinator.server import CoordinatorServer
    from collcomm.coordinator.tokens import generate

    token = generate()
    server = CoordinatorServer(token, host=fabric.mgmt_host if fabric else "127.0.0.1", port=0)
    address = server.start()
    client = CoordinatorClient(address, token, timeout=10.0, tls=False)
    lock = threading.Lock()
    ranks: list[_Rank] = []
    pumps: list[threading.Thread] = []
    interrupted = {"signal": None}
    verdict: str | None = None  # the line that names the failed rank

    def forward(signum, frame):
        interrupted["signal"] = signum
        for r in ranks:
            if r.proc.poll() is None:
                try:
                    r.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(nprocs):
            argv = wrap(i, list(command)) if wrap else list(command)
            env = rank_env(i, nprocs, address, token, topology, timeout)
            env.update(extra_env or {})
            if fabric is not None:
                from collcomm import emulation as emu

                env.update(emu.rank_environment(fabric, i))
                argv = emu.wrap_command(fabric, i, argv)
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **_rank_group())
            r = _Rank(i, proc)
            ranks.append(r)
            for stream, out, keep in ((proc.stdout, stdout, None), (proc.stderr, stderr, r.tail)):
                t = threading.Thread(target=_pump, args=(stream, out, f"[rank {i}] ", keep, lock), daemon=True)
                t.start()
                pumps.append(t)
        failed: _Rank | None = None
        failed_alone: list[_Rank] = []  # ranks that exited with an error before the launcher stopped any
        while True:
            running = [r for r in ranks if r.proc.poll() is None]
            if failed is None:
                bad = [r for r in ranks if r.proc.returncode not in (None, 0)]
                if bad:
                    failed = min(bad, key=_blame_order)
                    _report(client, failed)
                    deadline = time.monotonic() + GRACE_SECONDS
            if not running:
                break
            if failed is not None and time.monotonic() > deadline:
                failed_alone = [r for r in ranks if r.proc.returncode not in (None, 0)]
                _stop(running)
                break
            time.sleep(0.05)
        for r in ranks:
            r.proc.wait()
        for t in pumps:
            t.join(timeout=2.0)
        if failed is not None:
            # With every error line in, name the cause among the ranks that failed on their own: a
            # killed rank's survivors raise PeerFailure within milliseconds, often in the same
            # 50 ms tick, and the lowest of them is not the one to blame.
            failed = min(failed_alone or [r for r in ranks if r.proc.returncode not in (None, 0)], key=_blame_order)
        if interrupted["signal"] is not None:
            return 128 + interrupted["signal"]
        if failed is not None:
            code = failed.proc.returncode
            last = next((l for l in reversed(failed.tail) if l.strip()), "")
            what = f"signal {-code}" if code < 0 else f"exit code {code}"
            verdict = f"collcomm run: rank {failed.rank} failed with {what}" + (f": {last.strip()}" if last else "")
            return code if code > 0 else 128 - code
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _stop([r for r in ranks if r.proc.poll() is None])
        client.close()
        server.stop(0)
        # Shared-memory names a rank killed while forming a group left (the job's own names only).
        from collcomm.transport.shm.segment import job_tag, remove_job

        remove_job(job_tag(address, token))
        if verdict is not None:  # last, after whatever the coordinator logs as it stops
            with lock:
                stderr.write(verdict + "\n")
                stderr.flush()


def _blame_order(r: _Rank) -> tuple:
    """Which failed rank to name: one that died on its own (a signal, an exit status of its own)
    before one that exited 1 on an exception, and one whose last error line is not collcomm
    telling it that another rank failed (PeerFailure, CollectiveTimeout, LinkFailure,
    EvictedError) before one that is; then the lowest."""
    last = next((l for l in reversed(r.tail) if l.strip()), "")
    consequence = last.lstrip().startswith(("collcomm.errors.PeerFailure", "collcomm.errors.CollectiveTimeout",
                                             "collcomm.errors.LinkFailure", "collcomm.errors.EvictedError"))
    return r.proc.returncode == 1, consequence, r.rank


def _report(client, failed: _Rank) -> None:
    code = failed.proc.returncode
    reason = f"process exited with {'signal ' + str(-code) if code < 0 else 'code ' + str(code)}"
    try:
        client.report_failure(0, failed.rank, reason=reason, timeout=5.0)
    except Exception:  # the ranks still learn of it from their own connections
        pass


def _rank_group() -> dict:
    """How a rank is started: in a process group of its own (the launcher stops a rank and what it
    started with one killpg; a signal from the terminal reaches the launcher alone, which forwards
    it), but in the launcher's session. A session of its own would also be a scheduler autogroup of
    its own (Linux with CONFIG_SCHED_AUTOGROUP, on by default), and with more ranks than cores
    the kernel then shares the CPUs between the ranks' groups first, and within each between its
    threads: torch's gloo (a worker thread per rank) ran 10-25% slower that way, 4 ranks on 2 cores
    (bench/RESULTS.md, issue 16). A rank in a background process group that read the terminal
    would stop (SIGTTIN), so it gets no terminal for stdin (as in a session of its own, which has
    none). Python 3.10 has no ``process_group``: a session of its own there."""
    if sys.version_info < (3, 11):
        return {"start_new_session": True}
    stdin = subprocess.DEVNULL if _stdin_is_a_terminal() else None
    return {"process_group": 0, "stdin": stdin}


def _stdin_is_a_terminal() -> bool:
    try:
        return os.isatty(0)
    except OSError:
        return False


def _stop(running: list[_Rank]) -> None:
    for r in running:
        try:
            os.killpg(r.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 2.0
    for r in running:
        try:
            r.proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(r.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            r.proc.wait()
