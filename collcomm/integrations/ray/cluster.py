"""A Ray cluster on an emulated fabric: one Ray node per compute namespace, so that Ray's own
traffic (object transfers, task submission) crosses the fabric's shaped links.

Library: :class:`RayCluster` takes a fabric that is already up under a prefix (``collcomm emulate
up T.json --prefix P``: its state file names the namespaces and each rank's fabric address)::

    with RayCluster("rayst", timeout=120) as cluster:            # up() on enter, down() on exit
        res = cluster.run([sys.executable, "driver.py"], node=0, timeout=300)

Command (needs root)::

    python -m collcomm.integrations.ray.cluster up T.json [--scale 1GB/s=200Mbit] [--prefix P] [--num-cpus 1]
    python -m collcomm.integrations.ray.cluster run [--prefix P] [--node N] -- CMD...
    python -m collcomm.integrations.ray.cluster down [--prefix P]

``up`` builds the fabric (``collcomm emulate up``) and the cluster, prints the GCS address and a
JSON line (prefix, namespaces, addresses) and returns with both running; ``run`` runs CMD inside
node N's namespace with ``RAY_ADDRESS`` set; ``down`` removes both, also when only part is up.

Each node gets its own ``--temp-dir`` (/tmp/ray-<prefix>/n<i>): the namespaces share one file
system, and Ray keeps its sockets and session files there. The cluster uses Ray's token
authentication with a token of its own (/tmp/ray-<prefix>/auth_token), passed to every process
it starts, whatever ~/.ray holds. Teardown kills the processes inside the
fabric's compute namespaces (``ip netns pids``), never ``ray stop``: ``ray stop`` matches Ray's
processes by name over the whole machine and would also stop any other Ray running here. The
cluster therefore owns its namespaces: whatever runs in them is killed before the start and at
the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import IO, Sequence

GCS_PORT = 6379
OBJECT_STORE_BYTES = 512 * 2**20   # per node; Ray's default (30% of RAM per node) is far too much for 4+ nodes
DEFAULT_TIMEOUT = 120.0            # bounds up(): every `ray start` and the wait until all nodes are alive
DEFAULT_PREFIX = "ccray"
DEFAULT_SCALE = "1GB/s=200Mbit"
TAIL_CHARS = 1500
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "python -m collcomm.integrations.ray.cluster"


class RayClusterError(RuntimeError):
    """The Ray cluster could not start, a command in it failed to run, or the fabric is not there (one line)."""


class RayCommandTimeout(RayClusterError):
    """A command inside a namespace ran past its timeout and was killed; ``output`` is the tail of what it wrote."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


def _one_line(text: str, limit: int = TAIL_CHARS) -> str:
    """The end of ``text`` on one line (errors quote the tail of a command's output)."""
    return " ".join(str(text).split())[-limit:] or "(no output)"


def _named(argv: Sequence[str], ns: str, node: int | None = None) -> str:
    """A command as error messages name it: its start on one line, and where it ran."""
    where = f"node {node} (namespace {ns})" if node is not None else f"namespace {ns}"
    return f"`{' '.join(' '.join(argv).split())[:80]}` on {where}"


# --------------------------------------------------------------------------- the fabric
def fabric(prefix: str) -> tuple[list[str], list[str]]:
    """(namespace, fabric address) of every rank of the fabric that is up under ``prefix``."""
    from collcomm.emulation import EmulationError, check_prefix, current, state_file

    try:
        check_prefix(prefix)
    except EmulationError as e:
        raise RayClusterError(str(e)) from None
    p = current(prefix)
    if p is None:
        raise RayClusterError(f"no emulated fabric is up under prefix {prefix!r} (state file {state_file(prefix)}); "
                              f"build one with `collcomm emulate up T.json --prefix {prefix}`")
    if p.num_ranks < 2:
        raise RayClusterError(f"fabric {p.name!r} has {p.num_ranks} compute node(s); a Ray cluster on it needs 2")
    return p.namespaces[:p.num_ranks], p.addresses[:p.num_ranks]


def namespace_pids(ns: str) -> list[int]:
    """The processes inside network namespace ``ns``, this one left out (it may run inside it)."""
    try:
        res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return []
    return [int(x) for x in res.stdout.split() if x.isdigit() and int(x) != os.getpid()]


def _alive(pid: int) -> bool:
    """Running, not a zombie: a killed daemon whose parent died too stays a zombie until init reaps it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _poll(condition, seconds: float, step: float = 0.05) -> bool:
    """True as soon as ``condition()`` holds, False if it still does not after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True


def kill_namespaces(namespaces: Sequence[str], grace: float = 2.0) -> int:
    """SIGTERM every process inside ``namespaces``, SIGKILL what is left after ``grace`` s; returns how
    many survived SIGKILL too. SIGTERM first lets Ray's daemons flush their logs; some of them
    outlive SIGTERM by seconds, which is why the SIGKILL follows."""
    found = sorted({pid for ns in namespaces for pid in namespace_pids(ns)})
    pids = found
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        _signal_all(pids, sig)
        _poll(lambda: not any(_alive(pid) for pid in pids), wait)
        pids = [pid for pid in pids if _alive(pid)]
        if not pids:
            break
    # Zombies are gone once init reaps them: wait a little, so that `pgrep raylet` right after finds nothing.
    _poll(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in found), 3.0)
    return len(pids)


# --------------------------------------------------------------------------- processes in a namespace
def ray_bin() -> str:
    """The `ray` command of this Python's environment (the one whose Ray the driver imports)."""
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise RayClusterError("the `ray` command is not installed next to this Python (pip install 'collcomm[ray]')")
    return found


def ray_env(token_file: Path, gcs_address: str | None = None) -> dict[str, str]:
    """This process's environment for Ray: no inherited RAY_ADDRESS or auth settings (they would point
    `ray start` or a driver at some other cluster), usage stats off, this venv's bin first on PATH.

    Token authentication on, with the cluster's own token file: left to itself, Ray turns it on for
    the head only when ~/.ray/auth_token happens to exist (a local ``ray.init()`` writes one), and
    never for a joining node, which then cannot join. Multi-node clusters allowed explicitly: a
    caller that keeps its own local Ray on loopback sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which
    would make every `ray start --address` abort."""
    env = {k: v for k, v in os.environ.items() if k not in _RAY_CLUSTER_VARS}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1", "PYTHONUNBUFFERED": "1",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    if gcs_address:
        env["RAY_ADDRESS"] = gcs_address
    return env


_RAY_CLUSTER_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _write_token(path: Path) -> None:
    """A fresh random token (as `ray get-auth-token --generate` makes one), readable by root only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def _spawn(ns: str, argv: Sequence[str], env: dict[str, str], stdout: IO, stderr: IO | int) -> subprocess.Popen:
    """``argv`` inside namespace ``ns``, in a session of its own so that a timeout can kill its whole group.
    Output goes to files, never pipes: daemons that `ray start` leaves behind inherit the descriptors,
    and a pipe they hold open would never reach EOF."""
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=stdout, stderr=stderr,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _wait(proc: subprocess.Popen, what: str, timeout: float, tail) -> int:
    """``proc``'s exit status; past ``timeout`` s (or on Ctrl-C) its process group is killed, and a
    timeout raises RayCommandTimeout quoting ``tail()``, the end of its output."""
    try:
        return proc.wait(timeout=max(0.1, timeout))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out = tail()
        raise RayCommandTimeout(f"{what} did not finish within {timeout:.0f} s and was killed; "
                                f"its output ends: {_one_line(out, 400)}", out) from None
    except BaseException:
        _kill_group(proc)
        raise


def _read(f: IO[bytes] | Path) -> str:
    """All that ``f`` (a log file, or an open temporary file) holds, as text."""
    try:
        if isinstance(f, Path):
            return f.read_text(errors="replace")
        f.flush()
        f.seek(0)
        return f.read().decode(errors="replace")
    except (OSError, ValueError):
        return ""


def _read_tail(f: IO[bytes] | Path, n: int = TAIL_CHARS) -> str:
    return _read(f)[-n:].strip()


def run_in_namespace(ns: str, argv: Sequence[str], *, timeout: float, env: dict[str, str],
                     capture: bool = True, what: str | None = None) -> subprocess.CompletedProcess:
    """``argv`` inside namespace ``ns``, bounded by ``timeout``; its stdout and stderr as text (or passed
    through to ours, ``capture=False``). A nonzero exit is returned, not raised, as subprocess.run does."""
    what = what or _named(argv, ns)
    if not capture:
        proc = _spawn(ns, argv, env, None, None)
        return subprocess.CompletedProcess(list(argv), _wait(proc, what, timeout, lambda: ""))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = _spawn(ns, argv, env, out, err)
        rc = _wait(proc, what, timeout, lambda: (_read_tail(out) + "\n" + _read_tail(err)).strip())
        return subprocess.CompletedProcess(list(argv), rc, _read(out), _read(err))


# The wait until every node is alive, run inside rank 0's namespace (the GCS listens on its fabric
# address, which the root namespace cannot reach). It asks the GCS directly (no driver, no job);
# a Ray without that client falls back to a driver and ray.nodes().
_WAIT_ALIVE = r"""
import json, sys, time
gcs, want, deadline = sys.argv[1], set(json.loads(sys.argv[2])), time.monotonic() + float(sys.argv[3])
try:
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo
    client = GcsClient(address=gcs)
    def alive():
        infos = client.get_all_node_info(timeout=5).values()
        return {i.node_manager_address for i in infos if i.state == GcsNodeInfo.GcsNodeState.ALIVE}
except (ImportError, AttributeError, TypeError):
    import ray
    ray.init(address=gcs, log_to_driver=False, logging_level="WARNING")
    def alive():
        return {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
seen, why = set(), ""
while True:
    try:
        seen = alive()
    except Exception as e:  # the GCS is not answering yet
        why = f" (last error: {e!r})"
    if want <= seen:
        print(json.dumps(sorted(seen)))
        sys.exit(0)
    if time.monotonic() > deadline:
        print(f"nodes {sorted(want - seen)} not alive (alive: {sorted(seen)}){why}", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.2)
"""


# --------------------------------------------------------------------------- the cluster
class RayCluster:
    """One Ray node per compute namespace of the fabric up under ``prefix``: the head (GCS on
    ``<rank 0's fabric address>:6379``) in rank 0's, a worker node in every other.

    ``num_cpus`` per node (Ray's default, every core of the machine per node, would oversubscribe
    it N times); ``timeout`` bounds :meth:`up`. Use as a context manager: ``__exit__`` always calls
    :meth:`down`, also on error or Ctrl-C; after an error the logs under :attr:`root` are kept."""

    def __init__(self, prefix: str, *, num_cpus: int = 1, object_store_bytes: int = OBJECT_STORE_BYTES,
                 timeout: float = DEFAULT_TIMEOUT, keep_logs: bool = False):
        if num_cpus < 1 or object_store_bytes < 1 or timeout <= 0:
            raise ValueError("num_cpus, object_store_bytes and timeout must be positive")
        self.prefix = prefix
        self.namespaces, self.addresses = fabric(prefix)
        self.gcs_address = f"{self.addresses[0]}:{GCS_PORT}"
        self.num_cpus, self.object_store_bytes, self.timeout = num_cpus, object_store_bytes, timeout
        self.keep_logs = keep_logs
        self.root = Path(f"/tmp/ray-{prefix}")
        self.token_file = self.root / "auth_token"
        self.timings: dict[str, float] = {}   # head_start_s, cluster_start_s: seconds from up()'s start

    def __enter__(self) -> "RayCluster":
        return self.up()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._down_after(exc)

    def _down_after(self, exc: BaseException | None) -> None:
        """down(), keeping the logs after an error (not after Ctrl-C) and saying where they are."""
        failed = exc is not None and not isinstance(exc, KeyboardInterrupt)
        left = self.down(keep_logs=self.keep_logs or failed)
        if left:
            warnings.warn(f"{left} process(es) in the namespaces of {self.prefix!r} survived SIGKILL", RuntimeWarning)
        if failed and self.root.exists() and hasattr(exc, "add_note"):   # add_note: Python 3.11+
            exc.add_note(f"Ray logs kept in {self.root}")

    # ------------------------------------------------------------------ up
    def up(self) -> "RayCluster":
        """Start the head, then every worker node at once, then wait until the GCS lists them all alive,
        within ``timeout`` s (plus up to 15 s for the check's own start). On any failure what was
        started is killed (its logs kept) before the error, a RayClusterError, is raised."""
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        ray = ray_bin()
        kill_namespaces(self.namespaces)   # what an earlier, killed run left (it would hold the GCS port)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, mode=0o700)
        try:
            _write_token(self.token_file)
            head = ["start", "--head", "--port", str(GCS_PORT), "--include-dashboard", "false"]
            self._start([(0, [ray, *head, *self._node_args(0)])], deadline)
            self.timings["head_start_s"] = round(time.monotonic() - t0, 2)
            join = ["start", "--address", self.gcs_address]
            self._start([(r, [ray, *join, *self._node_args(r)]) for r in range(1, len(self.namespaces))], deadline)
            self._wait_alive(deadline)
            self.timings["cluster_start_s"] = round(time.monotonic() - t0, 2)
        except BaseException as e:
            self._down_after(e)
            raise
        return self

    def _node_args(self, rank: int) -> list[str]:
        return ["--node-ip-address", self.addresses[rank], "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
                "--object-store-memory", str(self.object_store_bytes), "--temp-dir", str(self.root / f"n{rank}"),
                "--disable-usage-stats"]

    def _start(self, commands: list[tuple[int, list[str]]], deadline: float) -> None:
        """Run the ``ray start`` commands, one per node and all at once, each logging to start-n<rank>.log;
        raise if one fails or is still running at ``deadline``."""
        started = []
        env = ray_env(self.token_file)
        try:
            for rank, argv in commands:
                log = self.root / f"start-n{rank}.log"
                with open(log, "ab") as f:
                    started.append((rank, argv, log, _spawn(self.namespaces[rank], argv, env, f, subprocess.STDOUT)))
        except BaseException:
            for *_, proc in started:
                _kill_group(proc)
            raise
        for rank, argv, log, proc in started:
            what = _named(["ray", *argv[1:3]], self.namespaces[rank], rank)
            rc = _wait(proc, what, deadline - time.monotonic(), lambda log=log: _read_tail(log))
            if rc != 0:
                raise RayClusterError(f"{what} failed (exit {rc}): {_one_line(_read_tail(log), 600)}")

    def _wait_alive(self, deadline: float) -> None:
        left = max(1.0, deadline - time.monotonic())
        res = self.run([sys.executable, "-c", _WAIT_ALIVE, self.gcs_address, json.dumps(self.addresses),
                        str(left)], node=0, timeout=left + 15)
        if res.returncode != 0:
            raise RayClusterError(f"the Ray cluster under {self.prefix!r} did not come up in time: "
                                  f"{_one_line(res.stderr or res.stdout, 600)}")

    # ------------------------------------------------------------------ use
    def run(self, argv: Sequence[str], *, node: int = 0, timeout: float, env: dict[str, str] | None = None,
            capture: bool = True) -> subprocess.CompletedProcess:
        """``argv`` inside node ``node``'s namespace with RAY_ADDRESS set to the GCS address (so a plain
        ``ray.init()`` joins this cluster), bounded by ``timeout``: past it the command's process group
        is killed and RayCommandTimeout raised. Returns its exit status and output like subprocess.run.

        All nodes share one host name, and a driver that does not say which node it is on attaches to
        the head's raylet, wherever it runs; ``ray.init(_node_ip_address=os.environ["COLLCOMM_RAY_NODE_IP"])``
        attaches it to this node's."""
        if not 0 <= node < len(self.namespaces):
            raise RayClusterError(f"node {node} does not exist: the fabric under {self.prefix!r} has nodes "
                                  f"0..{len(self.namespaces) - 1}")
        full_env = ray_env(self.token_file, self.gcs_address)
        full_env["COLLCOMM_RAY_NODE_IP"] = self.addresses[node]
        full_env.update(env or {})
        return run_in_namespace(self.namespaces[node], argv, timeout=timeout, env=full_env, capture=capture,
                                what=_named(argv, self.namespaces[node], node))

    def is_running(self) -> bool:
        """Something runs in the head's namespace (the GCS does while the cluster is up)."""
        return bool(namespace_pids(self.namespaces[0]))

    # ------------------------------------------------------------------ down
    def down(self, *, keep_logs: bool | None = None) -> int:
        """Kill every process inside the compute namespaces (SIGTERM, then SIGKILL) and remove the temp dir
        (kept with ``keep_logs``, default the constructor's); idempotent. Returns how many processes
        survived SIGKILL (0 normally)."""
        left = kill_namespaces(self.namespaces)
        if not (self.keep_logs if keep_logs is None else keep_logs):
            shutil.rmtree(self.root, ignore_errors=True)
        return left


# --------------------------------------------------------------------------- the command
class _Usage(Exception):
    """Bad input on the command line: one line, exit 2."""


def _collcomm(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``collcomm ARGS`` (emulate up/down) with this Python; its output passed on to our stderr."""
    try:
        res = subprocess.run([sys.executable, "-m", "collcomm.cli", *args], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RayClusterError(f"`collcomm {' '.join(args)}` did not finish within {timeout:.0f} s") from None
    for text in (res.stdout, res.stderr):
        if text.strip():
            print(text.strip(), file=sys.stderr)
    return res


def _checked_prefix(prefix: str) -> str:
    from collcomm.emulation import EmulationError, check_prefix, require_root

    try:
        check_prefix(prefix)
        require_root(PROG)
    except EmulationError as e:
        raise _Usage(str(e)) from None
    return prefix


def _attach(prefix: str, **kwargs) -> RayCluster:
    """The cluster object for the fabric under ``prefix``; a missing fabric is bad input (exit 2)."""
    try:
        return RayCluster(prefix, **kwargs)
    except RayClusterError as e:
        raise _Usage(str(e)) from None


def cmd_up(args) -> int:
    """Fabric, then cluster; if the cluster fails, the fabric goes too (a failed `up` leaves nothing)."""
    prefix = _checked_prefix(args.prefix)
    if not Path(args.topology).is_file():
        raise _Usage(f"topology file {args.topology!r} does not exist")
    res = _collcomm(["emulate", "up", args.topology, "--scale", args.scale, "--prefix", prefix], timeout=120)
    if res.returncode != 0:
        return res.returncode
    try:
        cluster = _attach(prefix, num_cpus=args.num_cpus, timeout=args.timeout).up()
    except BaseException:
        _collcomm(["emulate", "down", "--prefix", prefix], timeout=120)
        raise
    print(cluster.gcs_address)
    print(json.dumps({"prefix": prefix, "gcs_address": cluster.gcs_address, "namespaces": cluster.namespaces,
                      "addresses": cluster.addresses, "start_s": cluster.timings.get("cluster_start_s")}))
    return EXIT_OK


def cmd_down(args) -> int:
    """Whatever exists under the prefix, found by name (no state file needed): a crashed `up` or a
    hand-built fabric goes as well. Ray's processes get SIGTERM first; `emulate down` only SIGKILLs."""
    from collcomm.emulation import leftovers

    prefix = _checked_prefix(args.prefix)
    left = leftovers(prefix)
    root = Path(f"/tmp/ray-{prefix}")
    if not (left["namespaces"] or left["links"] or left["state"] or root.exists()):
        print(f"nothing is up under prefix {prefix!r}: no Ray cluster, no fabric")
        return EXIT_OK
    survivors = kill_namespaces(left["namespaces"])
    shutil.rmtree(root, ignore_errors=True)
    res = _collcomm(["emulate", "down", "--prefix", prefix], timeout=120)
    print(f"stopped the Ray cluster under prefix {prefix!r} ({len(left['pids'])} process(es)) and removed its fabric")
    if survivors or res.returncode != 0:
        raise RayClusterError(f"teardown of {prefix!r} incomplete: {survivors} process(es) survived SIGKILL, "
                              f"`collcomm emulate down` exited {res.returncode}")
    return EXIT_OK


def cmd_run(args) -> int:
    """CMD's output passes straight through (not captured) and its exit status is ours."""
    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not argv:
        raise _Usage("run needs a command after --, e.g. `run -- python driver.py`")
    cluster = _attach(_checked_prefix(args.prefix))
    if not 0 <= args.node < len(cluster.namespaces):
        raise _Usage(f"--node {args.node}: the fabric under {args.prefix!r} has nodes 0..{len(cluster.namespaces) - 1}")
    if not cluster.is_running():
        raise _Usage(f"no Ray cluster is running under prefix {args.prefix!r}; start one with `{PROG} up T.json`")
    return cluster.run(argv, node=args.node, timeout=args.timeout, capture=False).returncode


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="A Ray cluster on an emulated fabric, one node per "
                                 "namespace (needs root).")
    sub = ap.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="build the fabric of T.json and start Ray on it; leaves both running")
    up.add_argument("topology", metavar="T.json", help="collcomm.topology/1 file")
    up.add_argument("--scale", default=DEFAULT_SCALE, metavar="BW=RATE", help=f"default {DEFAULT_SCALE}")
    up.add_argument("--num-cpus", type=_positive(int), default=1, help="Ray CPUs per node (default 1)")
    up.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT, help="seconds for Ray to start")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop the Ray cluster and remove the fabric (also when only part is up)")
    down.set_defaults(func=cmd_down)
    run = sub.add_parser("run", help="run CMD inside node N's namespace against the running cluster")
    run.add_argument("--node", type=int, default=0, metavar="N", help="rank whose namespace runs CMD (default 0)")
    run.add_argument("--timeout", type=_positive(float), default=3600.0, help="kill CMD after this many seconds")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    run.set_defaults(func=cmd_run)
    for p in (up, down, run):
        p.add_argument("--prefix", default=DEFAULT_PREFIX, metavar="NAME", help=f"default {DEFAULT_PREFIX}")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)   # bad arguments: argparse's message, exit 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except _Usage as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except RayClusterError as e:
        notes = "".join(f"; {n}" for n in getattr(e, "__notes__", ()))
        print(f"{PROG}: error: {_one_line(str(e) + notes)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
