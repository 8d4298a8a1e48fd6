"""The Ray peer: one object from one node read by every other node, through Ray's own object store,
one Ray node per network namespace of an emulated fabric.

    sudo .venv/bin/python bench/ray_star_peer.py                  # star4 at 200 Mbit/s, 64 MiB, 3 iterations
    sudo .venv/bin/python bench/ray_star_peer.py --iters 5 --prefix rayst

Run alone (``__main__``) it builds the fabric itself (``collcomm emulate up
bench/topologies/star4.json --scale 1GB/s=200Mbit``), runs :func:`ray_broadcast`, prints one JSON
object and removes the fabric in a ``finally``. :func:`ray_broadcast` alone takes a fabric that is
already up under ``prefix`` (its state file, /run/collcomm-emulate/<prefix>.json, names the
namespaces and each node's fabric address).

What it does: ``ray start --head`` in rank 0's namespace (``--node-ip-address`` its fabric
address, ``--num-cpus 1``), ``ray start --address`` in every other rank's namespace, each with
its own ``--temp-dir`` (the namespaces share one file system); a driver in rank 0's namespace
creates one reader actor pinned to each other node (NodeAffinitySchedulingStrategy, hard), waits
until all are ready, then per iteration ``ray.put``s a fresh random array on node 0 and has every
reader ``ray.get`` it at once. Time = from the submission of the reads (readers idle and ready)
until the last reader's ``ray.get`` returned (Ray returns only a whole, sealed object); every
reader then checks the CRC32 of what it got against the driver's.

Teardown kills the processes inside the fabric's compute namespaces (``ip netns pids``), not
``ray stop``: ``ray stop`` matches Ray's processes by name over the whole machine, whatever
namespace or session they belong to, so it would also stop any other Ray on this machine
(``ray_stop=True`` runs it anyway, after the scoped kill).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TOPOLOGY = HERE / "topologies" / "star4.json"
DEFAULT_SCALE = "1GB/s=200Mbit"
DEFAULT_PREFIX = "rayst"
GCS_PORT = 6379
RESULT_MARK = "RAY_STAR_RESULT "
OBJECT_STORE_BYTES = 512 * 2**20   # per node; the default (30% of RAM per node) is far too much for 4+ nodes


class RayPeerError(RuntimeError):
    """The Ray peer could not run or finish (cluster did not start, a read timed out, bad contents)."""


# --------------------------------------------------------------------------- the fabric
def _fabric(prefix: str) -> tuple[list[str], list[str]]:
    """(namespace, fabric address) of every rank of the fabric that is up under ``prefix``."""
    from collcomm.emulation import check_prefix, current, state_file

    check_prefix(prefix)
    p = current(prefix)
    if p is None:
        raise RayPeerError(f"no emulated fabric is up under prefix {prefix!r} (state file {state_file(prefix)}); "
                           f"build one with `collcomm emulate up T.json --prefix {prefix}`")
    if p.num_ranks < 2:
        raise RayPeerError(f"fabric {p.name!r} has {p.num_ranks} compute node(s); a broadcast needs at least 2")
    return p.namespaces[:p.num_ranks], p.addresses[:p.num_ranks]


def _ns_pids(ns: str) -> list[int]:
    try:
        res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return []
    return [int(x) for x in res.stdout.split() if x.isdigit() and int(x) != os.getpid()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_namespaces(namespaces: list[str], grace: float = 2.0) -> int:
    """SIGTERM every process inside ``namespaces``, SIGKILL what is left after ``grace`` s; the number that
    survived. (Some of Ray's processes outlive SIGTERM by seconds; the results are in by then.)"""
    found = sorted({pid for ns in namespaces for pid in _ns_pids(ns)})
    pids = found
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.05)
        pids = [pid for pid in pids if _alive(pid)]
        if not pids:
            break
    # Killed daemons whose parent died too are zombies until init reaps them: give it a moment,
    # so that `pgrep -f ray` right after a run finds nothing.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in found):
        time.sleep(0.05)
    return len(pids)


# --------------------------------------------------------------------------- the cluster
def _ray_bin() -> str:
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise RayPeerError("the `ray` command is not installed next to this Python (pip install 'ray==2.60.0')")
    return found


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
                "PYTHONUNBUFFERED": "1"})
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def _start_args(addr: str, temp_dir: Path, object_store_bytes: int) -> list[str]:
    return ["--node-ip-address", addr, "--num-cpus", "1", "--num-gpus", "0",
            "--object-store-memory", str(object_store_bytes), "--temp-dir", str(temp_dir),
            "--disable-usage-stats"]


def _run_logged(ns: str, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    # Output to a file, never a pipe: the daemons `ray start` leaves behind inherit its descriptors,
    # and a pipe they hold open would never reach EOF.
    with open(log, "ab") as f:
        return subprocess.Popen(["ip", "netns", "exec", ns] + argv, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def _wait(procs: list[tuple[str, subprocess.Popen, Path]], deadline: float) -> None:
    for what, proc, log in procs:
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise RayPeerError(f"{what} did not finish in time; its output: {_tail(log)}") from None
        if rc != 0:
            raise RayPeerError(f"{what} failed (exit {rc}): {_tail(log)}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _tail(log: Path, n: int = 1500) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return text[-n:].strip() or "(no output)"


def ray_broadcast(prefix: str, nbytes: int = 64 << 20, iters: int = 3, timeout: float = 300, *,
                  object_store_bytes: int = OBJECT_STORE_BYTES, ray_stop: bool = False,
                  keep_logs: bool = False) -> dict:
    """One ``nbytes`` object put on rank 0, read by every other rank at once, ``iters`` times.

    Needs root and a fabric up under ``prefix`` that nothing else is using: every process inside its
    compute namespaces is killed before the cluster starts and after it ends. Returns
    ``{"seconds": [per iteration], "median", "ray_version", ...}`` (extra keys: cluster start and
    driver times, readers, per-reader times). The Ray cluster is always torn down, also on error or
    interrupt; ``timeout`` bounds the cluster's start and the driver together (teardown adds at most
    ~10 s)."""
    if nbytes < 1 or iters < 1:
        raise ValueError("nbytes and iters must be positive")
    namespaces, addresses = _fabric(prefix)
    t_begin = time.monotonic()
    deadline = t_begin + timeout
    ray = _ray_bin()
    env = _env()
    root = Path(f"/tmp/ray-{prefix}")
    _kill_namespaces(namespaces, grace=2.0)  # what a killed earlier run left
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ok = False
    try:
        head = addresses[0]
        start_deadline = min(deadline, time.monotonic() + max(60.0, timeout / 2))
        log0 = root / "start-n0.log"
        p = _run_logged(namespaces[0], [ray, "start", "--head", "--port", str(GCS_PORT), "--include-dashboard",
                                        "false"] + _start_args(head, root / "n0", object_store_bytes), log0, env)
        _wait([("ray start --head (rank 0)", p, log0)], start_deadline)
        t_head = time.monotonic() - t_begin
        workers = []
        for r in range(1, len(namespaces)):
            log = root / f"start-n{r}.log"
            argv = [ray, "start", "--address", f"{head}:{GCS_PORT}"] + _start_args(addresses[r], root / f"n{r}",
                                                                                  object_store_bytes)
            workers.append((f"ray start --address (rank {r})", _run_logged(namespaces[r], argv, log, env), log))
        _wait(workers, start_deadline)
        t_started = time.monotonic() - t_begin
        log_d = root / "driver.log"
        out_d = root / "driver.out"
        spec = {"gcs": f"{head}:{GCS_PORT}", "self": head, "readers": addresses[1:], "nbytes": nbytes,
                "iters": iters, "timeout": max(10.0, deadline - time.monotonic() - 5)}
        t_driver = time.monotonic()
        with open(out_d, "wb") as out, open(log_d, "wb") as err:
            drv = subprocess.Popen(["ip", "netns", "exec", namespaces[0], sys.executable, str(Path(__file__).resolve()),
                                    "--driver", json.dumps(spec)], stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            try:
                rc = drv.wait(timeout=max(5.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(drv)
                raise RayPeerError(f"the Ray driver did not finish within {timeout:.0f} s; its log: "
                                   f"{_tail(log_d)}") from None
        lines = [l for l in out_d.read_text(errors="replace").splitlines() if l.startswith(RESULT_MARK)]
        if rc != 0 or not lines:
            raise RayPeerError(f"the Ray driver failed (exit {rc}): {_tail(log_d)}")
        result = json.loads(lines[-1][len(RESULT_MARK):])
        result.update({"prefix": prefix, "nodes": len(namespaces), "nbytes": nbytes,
                       "head_start_s": round(t_head, 2), "cluster_start_s": round(t_started, 2),
                       "driver_s": round(time.monotonic() - t_driver, 2),
                       "median": statistics.median(result["seconds"])})
        ok = True
        return result
    finally:
        if ray_stop:
            for ns in namespaces:
                try:
                    subprocess.run(["ip", "netns", "exec", ns, ray, "stop", "--force"], env=env, timeout=30,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
                except subprocess.TimeoutExpired:
                    pass
        left = _kill_namespaces(namespaces)
        if left:
            print(f"ray_star_peer: {left} process(es) in {prefix} namespaces survived SIGKILL", file=sys.stderr)
        if ok and not keep_logs:
            shutil.rmtree(root, ignore_errors=True)
        elif not ok:
            print(f"ray_star_peer: Ray logs kept in {root}", file=sys.stderr)


# --------------------------------------------------------------------------- the driver (inside rank 0's namespace)
def _driver(spec: dict) -> dict:
    import zlib

    import numpy as np
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    deadline = time.monotonic() + spec["timeout"]

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    ray.init(address=spec["gcs"], _node_ip_address=spec["self"], log_to_driver=False, logging_level="WARNING")
    try:
        want = {spec["self"], *spec["readers"]}
        while True:
            alive = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
            if want <= set(alive):
                break
            if time.monotonic() > deadline:
                raise RayPeerError(f"Ray nodes {sorted(want - set(alive))} never joined (alive: {sorted(alive)})")
            time.sleep(0.2)

        @ray.remote(num_cpus=0)
        class Reader:
            def ready(self) -> str:
                return ray.util.get_node_ip_address()

            def read(self, refs: list) -> dict:
                t_start = time.time()
                arr = ray.get(refs[0])   # returns once the whole object is sealed in this node's store
                t_have = time.time()
                crc, n = zlib.crc32(memoryview(arr).cast("B")), arr.nbytes
                del arr
                return {"t_start": t_start, "t_have": t_have, "crc": crc, "nbytes": n}

        readers = [Reader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(alive[ip], soft=False)).remote()
                   for ip in spec["readers"]]
        where = ray.get([r.ready.remote() for r in readers], timeout=left())
        if where != spec["readers"]:
            raise RayPeerError(f"readers landed on {where}, wanted {spec['readers']}")
        seconds, detail = [], []
        for it in range(spec["iters"]):
            arr = np.random.default_rng(12345 + it).integers(0, 256, size=spec["nbytes"], dtype=np.uint8)
            crc = zlib.crc32(arr)
            ref = ray.put(arr)
            del arr
            t0 = time.time()
            got = ray.get([r.read.remote([ref]) for r in readers], timeout=left())
            bad = [ip for ip, g in zip(spec["readers"], got) if g["crc"] != crc or g["nbytes"] != spec["nbytes"]]
            if bad:
                raise RayPeerError(f"iteration {it}: readers {bad} got wrong contents")
            last = max(g["t_have"] for g in got)
            seconds.append(round(last - t0, 4))
            detail.append({"per_reader_s": [round(g["t_have"] - t0, 4) for g in got],
                           "start_spread_s": round(max(g["t_start"] for g in got) - min(g["t_start"] for g in got), 4)})
            del ref, got
        return {"seconds": seconds, "ray_version": ray.__version__, "readers": spec["readers"],
                "iterations": detail}
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- run alone
def _collcomm(args: list[str], timeout: float) -> None:
    res = subprocess.run([sys.executable, "-m", "collcomm.cli"] + args, capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RayPeerError(f"collcomm {' '.join(args)} failed (exit {res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()[-1500:]}")
    print(res.stdout.strip(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--driver", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--topology", default=str(DEFAULT_TOPOLOGY), metavar="T.json")
    ap.add_argument("--scale", default=DEFAULT_SCALE, metavar="BW=RATE")
    ap.add_argument("--prefix", default=DEFAULT_PREFIX, metavar="NAME")
    ap.add_argument("--nbytes", type=int, default=64 << 20)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--keep-logs", action="store_true", help="keep /tmp/ray-<prefix> after a successful run")
    args = ap.parse_args(argv)
    if args.driver:
        print(RESULT_MARK + json.dumps(_driver(json.loads(args.driver))), flush=True)
        return 0
    t0 = time.monotonic()
    try:
        _collcomm(["emulate", "up", args.topology, "--scale", args.scale, "--prefix", args.prefix], timeout=120)
        result = ray_broadcast(args.prefix, args.nbytes, args.iters, args.timeout, keep_logs=args.keep_logs)
    finally:
        try:
            _collcomm(["emulate", "down", "--prefix", args.prefix], timeout=120)
        except (RayPeerError, subprocess.TimeoutExpired) as e:
            print(f"ray_star_peer: fabric teardown: {e}", file=sys.stderr)
    result.update({"topology": Path(args.topology).name, "scale": args.scale,
                   "wall_s": round(time.monotonic() - t0, 2)})
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
