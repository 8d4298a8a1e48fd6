"""The launching process: start the ranks (collcomm's launcher, or mpiexec for ``--compare mpi``),
read what rank 0 reports, print the table unprefixed, write the JSON and the plot.

Rank 0 appends one JSON object per line (``start``, ``row``, ``end``) to the file named by
``COLLCOMM_PERF_REPORT``; this process follows the file while the job runs and prints each row
as it arrives. The ranks themselves print nothing on success (anything they do print comes
out with the launcher's ``[rank N]`` prefix, like errors).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from collcomm.perf.options import PROG, Options, UsageError, check_world, uses_mpi
from collcomm.perf.report import Reporter

REPORT_ENV = "COLLCOMM_PERF_REPORT"
BUFFERS_PER_RANK = 5  # send, receive, expected, this rank's input, the flipped expected (each up to -e bytes)


def rank_defaults() -> dict[str, str]:
    """What every rank's environment gets unless this process's has it: OMP_NUM_THREADS=1, as
    torchrun gives each process of a multi-process job. Without it every rank's torch runs an
    OpenMP team as wide as the machine, so -np ranks start -np times as many threads as there are
    cores, and their spinning after each parallel region takes the cores from the ranks that are
    communicating: --compare gloo's out-of-place copy (torch's copy_) took 33 ms per 64 MB on 4 ranks
    and 2 cores instead of 6, and slowed the allreduce after it (bench/results/peers_harness.md)."""
    return {k: v for k, v in (("OMP_NUM_THREADS", "1"),) if k not in os.environ}


class FileEmitter:
    """Rank 0's side of the report file."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, event: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")


class Follower(threading.Thread):
    """Follows the report file and hands each complete line's event to ``handle``."""

    def __init__(self, path: Path, handle):
        super().__init__(name="collcomm-perf-report", daemon=True)
        self.path, self.handle = path, handle
        self._halt = threading.Event()
        self._offset = 0
        self._partial = b""
        self.error: BaseException | None = None

    def _poll(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self.handle(json.loads(line))

    def run(self) -> None:
        try:
            while not self._halt.wait(0.05):
                self._poll()
            self._poll()
        except BaseException as e:  # printing failed (a closed pipe): the main thread re-raises it
            self.error = e

    def finish(self) -> None:
        self._halt.set()
        self.join()
        if self.error is not None:
            raise self.error


def check_memory(opts: Options, nprocs: int) -> None:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = BUFFERS_PER_RANK * opts.maxbytes * nprocs
    if need > 0.8 * total:
        raise UsageError(f"-e {opts.maxbytes} bytes on {nprocs} ranks needs about {need / 1e9:.1f} GB of memory; "
                         f"this machine has {total / 1e9:.1f} GB; lower -e or -np")


def check_fabrics(opts: Options, nprocs: int) -> None:
    """--topology and --emulate files must load and have -np ranks."""
    from collcomm.errors import CollectiveError
    from collcomm.topology import jsonio

    for flag, path in (("--topology", opts.topology), ("--emulate", opts.emulate)):
        if not path or path == "probe":
            continue
        try:
            topo = jsonio.load(path)
        except (CollectiveError, ValueError, OSError) as e:
            raise UsageError(f"{flag} {path}: {e}") from None
        if topo.num_ranks != nprocs:
            raise UsageError(f"{flag} {path} has {topo.num_ranks} ranks but -np is {nprocs}")


def launch(opts: Options) -> int:
    """Start the ranks and print what rank 0 reports; returns the exit status. With ``--emulate``
    the ranks run in the emulated fabric that ``collcomm emulate up`` built under ``--prefix``
    (the same topology at the same scale; left up), or in one built now and removed afterwards:
    collcomm's launcher decides, as for ``collcomm run --emulate``."""
    from collcomm import launcher
    from collcomm.emulation import EmulationError

    nprocs = opts.nprocs or 1
    check_world(opts, nprocs)
    check_memory(opts, nprocs)
    check_fabrics(opts, nprocs)
    command = [sys.executable, "-m", "collcomm.perf", *opts.argv]
    with tempfile.TemporaryDirectory(prefix="collcomm-perf-") as tmp:
        report = Path(tmp) / "report.jsonl"
        report.touch()
        reporter = Reporter(opts)
        follower = Follower(report, reporter.handle)
        follower.start()
        try:
            if uses_mpi(opts.compare):
                code = _run_mpi(opts, nprocs, command, str(report))
            else:
                code = launcher.run(nprocs, command, topology=opts.topology, timeout=opts.timeout,
                                    env={**rank_defaults(), REPORT_ENV: str(report)}, emulate=opts.emulate,
                                    scale=opts.scale, prefix=opts.prefix)
        except (ValueError, EmulationError) as e:  # the launcher's checks: another fabric under --prefix, not root
            raise UsageError(str(e)) from None
        finally:
            follower.finish()
        if code != 0:
            reporter.abort()
            return code
        if not reporter.ended:
            reporter.abort()
            print(f"{PROG}: error: the ranks exited without finishing the sweep", file=sys.stderr)
            return 1
        return reporter.finish()


def _run_mpi(opts: Options, nprocs: int, command: list[str], report: str) -> int:
    """``--compare mpi`` or ``mpi-tcp``: the ranks must be MPI processes, so mpiexec starts them (with
    the flags :func:`collcomm.perf.mpi.mpiexec_command` gives); they join collcomm through a
    coordinator started here."""
    from collcomm.coordinator.server import CoordinatorServer
    from collcomm.perf.mpi import RANK_FROM_MPI, mpiexec_command

    library = next(lib for lib in opts.compare if lib.startswith("mpi"))
    argv, mpi_env = mpiexec_command(library, nprocs)
    token = secrets.token_hex(16)
    server = CoordinatorServer(token, host="127.0.0.1", port=0)
    address = server.start()
    env = dict(os.environ, **rank_defaults(), **mpi_env, COLLCOMM_COORDINATOR=address, COLLCOMM_TOKEN=token,
               COLLCOMM_WORLD_SIZE=str(nprocs), PYTHONUNBUFFERED="1", **{RANK_FROM_MPI: "1", REPORT_ENV: report})
    if opts.topology:
        env["COLLCOMM_TOPOLOGY"] = opts.topology
    if opts.timeout:
        env["COLLCOMM_TIMEOUT"] = str(opts.timeout)
    procs: list[subprocess.Popen] = []
    stopped: list[int] = []

    def forward(signum, frame):  # Ctrl-C, SIGTERM: to mpiexec, which stops its ranks (as collcomm's launcher)
        stopped.append(signum)
        for proc in procs:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        procs.append(subprocess.Popen([*argv, *command], env=env, stdin=subprocess.DEVNULL))
        code = procs[0].wait()
        return 128 + stopped[0] if stopped else code
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        server.stop(0)
        from collcomm.transport.shm.segment import job_tag, remove_job

        remove_job(job_tag(address, token))  # shared-memory names a killed rank left (the job's own)
