"""The Ray peer: one object from one node read by every other node, through Ray's own object store,
one Ray node per network namespace of an emulated fabric.

    sudo .venv/bin/python bench/ray_star_peer.py                  # star4 at 200 Mbit/s, 64 MiB, 3 iterations
    sudo .venv/bin/python bench/ray_star_peer.py --iters 5 --prefix rayst

Run alone (``__main__``) it builds the fabric itself (``collcomm emulate up
bench/topologies/star4.json --scale 1GB/s=200Mbit``), runs :func:`ray_broadcast`, prints one JSON
object and removes the fabric in a ``finally``. :func:`ray_broadcast` alone takes a fabric that is
already up under ``prefix`` (its state file, /run/collcomm-emulate/<prefix>.json, names the
namespaces and each node's fabric address).

What it does: a Ray cluster on the fabric (:class:`collcomm.integrations.ray.cluster.RayCluster`:
``ray start --head`` in rank 0's namespace, ``--node-ip-address`` its fabric address,
``--num-cpus 1``, ``ray start --address`` in every other rank's namespace, each with its own
``--temp-dir``, the namespaces sharing one file system); a driver in rank 0's namespace
creates one reader actor pinned to each other node (NodeAffinitySchedulingStrategy, hard), waits
until all are ready, then per iteration ``ray.put``s a fresh random array on node 0 and has every
reader ``ray.get`` it at once. Time = from the submission of the reads (readers idle and ready)
until the last reader's ``ray.get`` returned (Ray returns only a whole, sealed object); every
reader then checks the CRC32 of what it got against the driver's.

Teardown (RayCluster's) kills the processes inside the fabric's compute namespaces (``ip netns
pids``), not ``ray stop``: ``ray stop`` matches Ray's processes by name over the whole machine,
whatever namespace or session they belong to, so it would also stop any other Ray on this machine
(``ray_stop=True`` runs it anyway, before the scoped kill).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TOPOLOGY = HERE / "topologies" / "star4.json"
DEFAULT_SCALE = "1GB/s=200Mbit"
DEFAULT_PREFIX = "rayst"
RESULT_MARK = "RAY_STAR_RESULT "
OBJECT_STORE_BYTES = 512 * 2**20   # per node; the default (30% of RAM per node) is far too much for 4+ nodes


class RayPeerError(RuntimeError):
    """The Ray driver could not run or finish (a node never joined, a read timed out, bad contents)."""


def _ray_stop(cluster) -> None:
    """``ray stop --force`` in every namespace: machine-wide, it stops any other Ray here too (opt-in)."""
    from collcomm.integrations.ray.cluster import RayCommandTimeout, ray_bin

    for node in range(len(cluster.namespaces)):
        try:
            cluster.run([ray_bin(), "stop", "--force"], node=node, timeout=30)
        except RayCommandTimeout:
            pass


def ray_broadcast(prefix: str, nbytes: int = 64 << 20, iters: int = 3, timeout: float = 300, *,
                  object_store_bytes: int = OBJECT_STORE_BYTES, ray_stop: bool = False,
                  keep_logs: bool = False) -> dict:
    """One ``nbytes`` object put on rank 0, read by every other rank at once, ``iters`` times.

    Needs root and a fabric up under ``prefix`` that nothing else is using: every process inside its
    compute namespaces is killed before the cluster starts and after it ends
    (:class:`collcomm.integrations.ray.cluster.RayCluster`). Returns ``{"seconds": [per iteration],
    "median", "ray_version", ...}`` (extra keys: cluster start and driver times, readers, per-reader
    times). The Ray cluster is always torn down, also on error or interrupt (its logs are kept in
    /tmp/ray-<prefix> after an error); ``timeout`` bounds the cluster's start and the driver together
    (teardown adds at most ~10 s). Raises RayClusterError if the cluster does not start, RayPeerError
    if the driver fails."""
    if nbytes < 1 or iters < 1:
        raise ValueError("nbytes and iters must be positive")
    from collcomm.integrations.ray.cluster import RayCluster, RayCommandTimeout  # imports Ray's integration: not in the driver

    t_begin = time.monotonic()
    deadline = t_begin + timeout
    cluster = RayCluster(prefix, object_store_bytes=object_store_bytes, timeout=min(timeout, max(60.0, timeout / 2)),
                         keep_logs=keep_logs)
    t_up = time.monotonic() - t_begin
    with cluster:
        try:
            spec = {"gcs": cluster.gcs_address, "self": cluster.addresses[0], "readers": cluster.addresses[1:],
                    "nbytes": nbytes, "iters": iters, "timeout": max(10.0, deadline - time.monotonic() - 5)}
            t_driver = time.monotonic()
            try:
                res = cluster.run([sys.executable, str(Path(__file__).resolve()), "--driver", json.dumps(spec)],
                                  node=0, timeout=max(5.0, deadline - time.monotonic()))
            except RayCommandTimeout as e:
                raise RayPeerError(f"the Ray driver did not finish within {timeout:.0f} s; its output: "
                                   f"{e.output[-1500:]}") from None
            lines = [l for l in res.stdout.splitlines() if l.startswith(RESULT_MARK)]
            if res.returncode != 0 or not lines:
                raise RayPeerError(f"the Ray driver failed (exit {res.returncode}): {res.stderr.strip()[-1500:]}")
            result = json.loads(lines[-1][len(RESULT_MARK):])
            result.update({"prefix": prefix, "nodes": len(cluster.namespaces), "nbytes": nbytes,
                           "head_start_s": round(t_up + cluster.timings["head_start_s"], 2),
                           "cluster_start_s": round(t_up + cluster.timings["cluster_start_s"], 2),
                           "driver_s": round(time.monotonic() - t_driver, 2),
                           "median": statistics.median(result["seconds"])})
            return result
        finally:
            if ray_stop:
                _ray_stop(cluster)


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
