"""collcomm inside Ray against Ray's own paths, on one 4-node Ray cluster over the emulated 200 Mbit/s
star (bench/topologies/star4.json, ``--scale 1GB/s=200Mbit``: 25 MB/s of goodput per link).

Commands (root: the fabric is network namespaces)::

    python3 bench/ray_integration.py                          # parts 1,2,3, 3 iterations, then the plot
    python3 bench/ray_integration.py --parts 1 --iters 5
    python3 bench/ray_integration.py --peer-alone             # also run bench/ray_star_peer.py alone, after
    python3 bench/ray_integration.py --parts 2 --variant ring --env COLLCOMM_ALGORITHM=ring   # stored as part "2-ring"
    python3 bench/ray_integration.py --plot-only

Everything runs in ONE Ray cluster (``collcomm.integrations.ray.cluster.RayCluster``: one Ray node per
compute namespace, ``--num-cpus 1`` each) and one Ray job: a driver inside node 0's namespace creates one
actor per node (``num_cpus=0``, pinned with a hard NodeAffinitySchedulingStrategy; rank i = node i) and
runs every part's peers in the same actors, interleaved per iteration.

Part 1, broadcast of a 64 MiB NumPy object from the actor on node 0 to the actors on nodes 1-3:
  cc-objects      the producer ``ccray.put``s it and returns the handle; the readers ``h.get()`` at once;
  ray-objects     the producer ``ray.put``s it and returns ``[ref]``; the readers ``ray.get`` at once
                  (bench/ray_star_peer.py's path, with an actor as the producer);
  gloo-broadcast  ``ray.util.collective.broadcast`` in a group of the 4 actors, backend "gloo" (torch's
                  gloo; group formed before timing; receive buffers allocated and touched before timing);
  cc-broadcast    the same call with backend "collcomm" (an extra row).
  Time = from the driver's submission of the reads (broadcast calls) until the last reader has the whole
  array; every copy is checked (CRC32 against the producer's). Against the pipelined optimum (64 MiB at
  25 MB/s = 2.684 s) and the Ray object store.
Part 2, allreduce of 16 MiB float32 across the 4 actors: ``ray.util.collective.allreduce`` with backend
  "collcomm" and "gloo" (groups formed before timing). Each rank's input is small integers as float32
  (exact sums), every result is compared exactly with the known sum. Time = a barrier of the same group,
  then from the first rank's start to the last rank's end.
Part 3, a parameter server written the Ray way: the actor on node 0 is the server, the 3 others are
  workers; each worker step takes the current weights (16 MiB float32), "computes" for a worker-specific
  time (time.sleep, --compute, default 0.3/0.6/0.9 s), returns a gradient of the same size. The server
  applies the first gradient(s) to arrive (``ray.wait``), publishes new weights and restarts those workers
  on them; K updates (--updates). k = 1 (asynchronous SGD) and k = 2 (first 2 of 3, a sum).
  Version ray: weights by ``ray.put`` passed as an ObjectRef argument (Ray resolves it), gradients
  returned as values, ``ray.wait``/``ray.get`` on the tasks' refs.
  Version collcomm: the same loop with handles: the server ``ccray.put``s the weights and passes the
  handle, the worker ``h.get()``s them and returns ``ccray.put(gradient)``; k = 1: ``ray.wait`` then
  ``handle.get()``; k = 2: ``ccray.reduce(task_refs, num_required=2)``. Old versions and gradients are
  deleted once read. Every weights copy a worker gets and every gradient (sum) the server gets is checked.
  Time per update = (time of the K-th update - start) / K.

Machine-wide CPU use (/proc/stat, busy share of all cores) is recorded around every timed section.

Results: bench/ray_integration.json (parts run earlier are kept, a part run again replaced), plot
bench/ray_integration.png. Bounds: every ray.get in the driver and the actors has a timeout, the driver
runs under RayCluster.run's timeout (killed past it), the cluster is a context manager (torn down on every
exit path, by killing the processes inside its namespaces, never ``ray stop``), the fabric is brought down
in a ``finally``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ray_star_peer import _collcomm  # bench/ is this script's directory: `collcomm emulate ...`, checked

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOPOLOGY = HERE / "topologies" / "star4.json"
SCALE = "1GB/s=200Mbit"
LINK_BYTES_PER_S = 25e6           # 200 Mbit/s
RESULT_MARK = "RAY_INTEGRATION_RESULT "
OUT_JSON = HERE / "ray_integration.json"
OUT_PNG = HERE / "ray_integration.png"
OBJECT_STORE_BYTES = 768 * 2**20  # per node


# --------------------------------------------------------------------------- the driver (node 0's namespace)
def _cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def _cpu_busy(before: tuple[float, float]) -> float:
    b1, t1 = _cpu_times()
    return round((b1 - before[0]) / max(1.0, t1 - before[1]), 3)


def _driver(spec: dict) -> dict:
    import zlib

    import numpy as np
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    deadline = time.monotonic() + spec["timeout"]

    def left(cap: float = 300.0) -> float:
        return max(1.0, min(cap, deadline - time.monotonic()))

    ray.init(address=spec["gcs"], _node_ip_address=spec["self"], log_to_driver=spec.get("log_to_driver", False),
             logging_level="WARNING",
             runtime_env={"worker_process_setup_hook": "collcomm.integrations.ray.setup",
                          "env_vars": {"PYTHONPATH": str(REPO), "COLLCOMM_TIMEOUT": "120", **spec.get("env", {})}})
    import collcomm.integrations.ray as ccray

    try:
        want = [spec["self"], *spec["others"]]
        while True:
            alive = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
            if set(want) <= set(alive):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray nodes {sorted(set(want) - set(alive))} never joined")
            time.sleep(0.2)
        ccray.init()   # the job's coordinator actor is created here, from the driver on node 0
        T_CALL = 180.0  # bound of every blocking call inside the actors

        @ray.remote(num_cpus=0, max_concurrency=2)
        class Member:
            """One per node: producer/reader, collective member, server or worker."""

            def ready(self) -> str:
                import subprocess as sp

                import collcomm.integrations.ray  # noqa: F401 - the backend, also without the setup hook
                ip = ray.util.get_node_ip_address()
                # gloo binds the interface of the host name's address unless told: here, the fabric's.
                for line in sp.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout.splitlines():
                    f = line.split()
                    if f[3].split("/")[0] == ip:
                        os.environ["GLOO_SOCKET_IFNAME"] = f[1]
                return ip

            # ---------------- part 1
            def make(self, nbytes: int, seed: int) -> int:
                self.src = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
                return zlib.crc32(self.src)

            def cc_put(self):
                t = time.time()
                h = ccray.put(self.src, timeout=T_CALL)
                self.h = h
                return h, round(time.time() - t, 4)

            def cc_read(self, h) -> dict:
                t_start = time.time()
                a = h.get(timeout=T_CALL)
                t_have = time.time()
                return {"t_start": t_start, "t_have": t_have, "crc": zlib.crc32(a), "nbytes": a.nbytes}

            def cc_delete(self) -> bool:
                h, self.h = self.h, None
                return h.delete(timeout=T_CALL)

            def ray_put(self):
                t = time.time()
                self.ref = ray.put(self.src)
                return [self.ref], round(time.time() - t, 4)

            def ray_read(self, refs) -> dict:
                t_start = time.time()
                a = ray.get(refs[0], timeout=T_CALL)
                t_have = time.time()
                out = {"t_start": t_start, "t_have": t_have, "crc": zlib.crc32(a), "nbytes": a.nbytes}
                del a
                return out

            def ray_release(self) -> None:
                self.ref = None

            def col_init(self, world: int, rank: int, backend: str, name: str) -> int:
                from ray.util import collective as col

                col.init_collective_group(world, rank, backend=backend, group_name=name)
                return col.get_rank(name)

            def bcast_prep(self, nbytes: int, rank: int) -> None:
                if rank == 0:
                    self.buf = self.src.copy()
                else:
                    self.buf = np.empty(nbytes, dtype=np.uint8)
                    self.buf[:] = 1   # touch every page before timing

            def bcast(self, name: str) -> dict:
                from ray.util import collective as col

                t_start = time.time()
                col.broadcast(self.buf, src_rank=0, group_name=name)
                t_have = time.time()
                return {"t_start": t_start, "t_have": t_have, "crc": zlib.crc32(self.buf), "nbytes": self.buf.nbytes}

            # ---------------- part 2
            def ar_prep(self, n: int, rank: int, world: int, seed: int) -> None:
                def inp(r):
                    return np.random.default_rng(seed + r).integers(-1024, 1024, size=n).astype(np.float32)

                self.ar_in = inp(rank)
                self.ar_want = sum(inp(r) for r in range(world))   # exact: |sum| <= 4096
                self.ar_x = self.ar_in.copy()

            def allreduce(self, name: str) -> dict:
                from ray.util import collective as col

                np.copyto(self.ar_x, self.ar_in)
                col.barrier(group_name=name)
                t0 = time.time()
                col.allreduce(self.ar_x, group_name=name)
                t1 = time.time()
                return {"t0": t0, "t1": t1, "exact": bool(np.array_equal(self.ar_x, self.ar_want))}

            # ---------------- part 3: worker steps
            def ps_step_ray(self, w, version: int, crc: int, compute_s: float, rank: int, t_sub: float) -> np.ndarray:
                t_have = time.time()   # Ray resolved the weights argument before the call
                if zlib.crc32(w) != crc:
                    raise RuntimeError(f"worker {rank}: weights v{version} corrupt")
                time.sleep(compute_s)
                g = np.full(w.shape, rank, dtype=np.float32)
                self.log.append((version, round(t_have - t_sub, 4)))
                return g

            def ps_step_cc(self, h, version: int, crc: int, compute_s: float, rank: int, t_sub: float):
                t0 = time.time()
                w = h.get(timeout=T_CALL)
                t_have = time.time()
                if zlib.crc32(w) != crc:
                    raise RuntimeError(f"worker {rank}: weights v{version} corrupt")
                time.sleep(compute_s)
                g = np.full(w.shape, rank, dtype=np.float32)
                del w
                self.log.append((version, round(t_have - t_sub, 4), round(t_have - t0, 4)))
                return ccray.put(g, copy=False, timeout=T_CALL)

            def ps_log(self, reset: bool = False):
                out = getattr(self, "log", [])
                if reset:
                    self.log = []
                return out

            # ---------------- part 3: the server
            def ps_serve(self, workers, version: str, k: int, n: int, updates: int, compute: list[float]) -> dict:
                nw = len(workers)
                ranks = list(range(1, nw + 1))
                w = np.random.default_rng(7).integers(-100, 100, size=n).astype(np.float32)
                v = 0
                crc = zlib.crc32(w)
                pending = {}    # task ref -> (worker index, weights version it got)
                published = {}  # version -> [handle or ref, outstanding readers]
                t_start = time.time()
                stamps, used_log = [], []

                def publish():
                    if version == "ray":
                        published[v] = [ray.put(w), 0]
                    else:
                        published[v] = [ccray.put(w, timeout=T_CALL), 0]

                def start(i):
                    obj = published[v]
                    obj[1] += 1
                    method = workers[i].ps_step_ray if version == "ray" else workers[i].ps_step_cc
                    pending[method.remote(obj[0], v, crc, compute[i], ranks[i], time.time())] = (i, v)

                def finished(ver):
                    obj = published[ver]
                    obj[1] -= 1
                    if obj[1] == 0 and ver != v:
                        if version != "ray":
                            obj[0].delete(timeout=T_CALL)
                        del published[ver]

                publish()
                for i in range(nw):
                    start(i)
                for u in range(updates):
                    if version == "ray":
                        ready, _ = ray.wait(list(pending), num_returns=k, timeout=T_CALL)
                        if len(ready) < k:
                            raise RuntimeError(f"update {u}: only {len(ready)} gradients within {T_CALL} s")
                        grads = ray.get(ready, timeout=T_CALL)
                        total = grads[0] if k == 1 else np.sum(grads, axis=0)
                        used = ready
                        gh = None
                    elif k == 1:
                        ready, _ = ray.wait(list(pending), num_returns=1, timeout=T_CALL)
                        if not ready:
                            raise RuntimeError(f"update {u}: no gradient within {T_CALL} s")
                        gh = ray.get(ready[0], timeout=T_CALL)
                        total = gh.get(timeout=T_CALL)
                        used = ready
                        gh = [gh]
                    else:
                        red = ccray.reduce(list(pending), num_required=k, timeout=T_CALL)
                        total = red.get(timeout=T_CALL)
                        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                        by_key = {ray.get(r, timeout=T_CALL).key: r for r in done}
                        used = [by_key[key] for key in red.sources]
                        gh = [ray.get(r, timeout=T_CALL) for r in used] + [red]
                    expect = float(sum(ranks[pending[r][0]] for r in used))
                    if not bool((total == expect).all()):
                        raise RuntimeError(f"update {u}: gradient sum is not {expect}")
                    w += total
                    del total
                    if gh:
                        for h in gh:
                            h.delete(timeout=T_CALL)
                    who = [pending.pop(r) for r in used]
                    for _, ver in who:
                        finished(ver)
                    old = v
                    v = u + 1
                    crc = zlib.crc32(w)
                    publish()
                    if published.get(old, [None, 1])[1] == 0:   # nobody reads the old version any more
                        if version != "ray":
                            published[old][0].delete(timeout=T_CALL)
                        del published[old]
                    stamps.append(round(time.time() - t_start, 4))
                    used_log.append([ranks[i] for i, _ in who])
                    for i, _ in who:
                        start(i)
                # let the workers still computing finish, outside the timing, and clean up
                ray.wait(list(pending), num_returns=len(pending), timeout=T_CALL)
                if version != "ray":
                    for r in pending:
                        ray.get(r, timeout=T_CALL).delete(timeout=T_CALL)
                    for obj in published.values():
                        obj[0].delete(timeout=T_CALL)
                want = np.random.default_rng(7).integers(-100, 100, size=n).astype(np.float32) + \
                    float(sum(sum(x) for x in used_log))
                return {"seconds": stamps[-1], "per_update_s": round(stamps[-1] / updates, 4), "stamps": stamps,
                        "used": used_log, "weights_exact": bool(np.array_equal(w, want))}

        members = [Member.options(scheduling_strategy=NodeAffinitySchedulingStrategy(alive[ip], soft=False)).remote()
                   for ip in want]
        where = ray.get([m.ready.remote() for m in members], timeout=left(120))
        if where != want:
            raise RuntimeError(f"actors landed on {where}, wanted {want}")
        prod, readers = members[0], members[1:]
        world = len(members)
        out: dict = {"ray_version": ray.__version__, "nodes": want, "parts": {}}
        groups_needed = {"1": ("gloo", "collcomm"), "2": ("gloo", "collcomm")}
        backends = sorted({b for p in spec["parts"] for b in groups_needed.get(p, ())})
        for b in backends:
            t = time.time()
            ranks = ray.get([m.col_init.remote(world, r, b, f"g-{b}") for r, m in enumerate(members)], timeout=left(120))
            out.setdefault("group_init_s", {})[b] = round(time.time() - t, 2)
            if ranks != list(range(world)):
                raise RuntimeError(f"group g-{b}: ranks {ranks}")

        def timed_reads(method, arg, crc, nbytes):
            cpu = _cpu_times()
            t0 = time.time()
            got = ray.get([getattr(r, method).remote(arg) for r in readers], timeout=left(T_CALL + 30))
            busy = _cpu_busy(cpu)
            bad = [i + 1 for i, g in enumerate(got) if g["crc"] != crc or g["nbytes"] != nbytes]
            if bad:
                raise RuntimeError(f"{method}: nodes {bad} got wrong contents")
            return {"seconds": round(max(g["t_have"] for g in got) - t0, 4),
                    "per_reader_s": [round(g["t_have"] - t0, 4) for g in got],
                    "start_after_submit_s": [round(g["t_start"] - t0, 4) for g in got], "cpu_busy": busy}

        # ---------------- part 1
        if "1" in spec["parts"]:
            nbytes = spec["nbytes"]
            per = {m: [] for m in ("cc-objects", "ray-objects", "gloo-broadcast", "cc-broadcast")}
            for it in range(spec["iters"]):
                crc = ray.get(prod.make.remote(nbytes, 1000 + it), timeout=left())
                # (a) collcomm handles
                h, put_s = ray.get(prod.cc_put.remote(), timeout=left())
                r = timed_reads("cc_read", h, crc, nbytes)
                r["put_s"] = put_s
                per["cc-objects"].append(r)
                ray.get(prod.cc_delete.remote(), timeout=left())
                del h
                # (b) Ray's object store
                refs, put_s = ray.get(prod.ray_put.remote(), timeout=left())
                r = timed_reads("ray_read", refs, crc, nbytes)
                r["put_s"] = put_s
                per["ray-objects"].append(r)
                ray.get(prod.ray_release.remote(), timeout=left())
                del refs
                # (c, d) ray.util.collective broadcast, gloo and collcomm
                for m, b in (("gloo-broadcast", "gloo"), ("cc-broadcast", "collcomm")):
                    ray.get([x.bcast_prep.remote(nbytes, i) for i, x in enumerate(members)], timeout=left())
                    cpu = _cpu_times()
                    t0 = time.time()
                    got = ray.get([x.bcast.remote(f"g-{b}") for x in members], timeout=left(T_CALL + 30))
                    busy = _cpu_busy(cpu)
                    bad = [i for i, g in enumerate(got) if g["crc"] != crc]
                    if bad:
                        raise RuntimeError(f"{m}: ranks {bad} got wrong contents")
                    per[m].append({"seconds": round(max(g["t_have"] for g in got[1:]) - t0, 4),
                                   "per_reader_s": [round(g["t_have"] - t0, 4) for g in got[1:]],
                                   "start_after_submit_s": [round(g["t_start"] - t0, 4) for g in got],
                                   "cpu_busy": busy})
                print(f"part 1 iteration {it}: " + ", ".join(f"{m} {v[-1]['seconds']:.3f} s" for m, v in per.items()),
                      file=sys.stderr, flush=True)
            opt = nbytes / LINK_BYTES_PER_S
            summ = {m: {"median_s": statistics.median(x["seconds"] for x in v), "seconds": [x["seconds"] for x in v]}
                    for m, v in per.items()}
            ray_med = summ["ray-objects"]["median_s"]
            for m, s in summ.items():
                s["x_optimum"] = round(s["median_s"] / opt, 3)
                s["x_ray_objects"] = round(s["median_s"] / ray_med, 3)
            out["parts"]["1"] = {"nbytes": nbytes, "optimum_s": round(opt, 4), "target_s": round(1.2 * opt, 4),
                                 "summary": summ, "per_iteration": per}

        # ---------------- part 2
        if "2" in spec["parts"]:
            n = spec["ar_bytes"] // 4
            ray.get([x.ar_prep.remote(n, i, world, 500) for i, x in enumerate(members)], timeout=left())
            per = {"collcomm": [], "gloo": []}
            for it in range(spec["iters"]):
                for b in ("collcomm", "gloo"):
                    cpu = _cpu_times()
                    got = ray.get([x.allreduce.remote(f"g-{b}") for x in members], timeout=left(T_CALL + 30))
                    busy = _cpu_busy(cpu)
                    if not all(g["exact"] for g in got):
                        raise RuntimeError(f"allreduce {b}: ranks {[i for i, g in enumerate(got) if not g['exact']]} "
                                           "got a wrong sum")
                    t0 = min(g["t0"] for g in got)
                    per[b].append({"seconds": round(max(g["t1"] for g in got) - t0, 4),
                                   "per_rank_s": [round(g["t1"] - g["t0"], 4) for g in got],
                                   "start_skew_s": round(max(g["t0"] for g in got) - t0, 4), "cpu_busy": busy})
                print(f"part 2 iteration {it}: " + ", ".join(f"{b} {v[-1]['seconds']:.3f} s" for b, v in per.items()),
                      file=sys.stderr, flush=True)
            summ = {b: {"median_s": statistics.median(x["seconds"] for x in v), "seconds": [x["seconds"] for x in v]}
                    for b, v in per.items()}
            # ring reduce-scatter + allgather moves 2 (n-1)/n of the buffer through each node's link, each way
            opt = 2 * (world - 1) / world * spec["ar_bytes"] / LINK_BYTES_PER_S
            for s in summ.values():
                s["x_optimum"] = round(s["median_s"] / opt, 3)
            summ["gloo_over_collcomm"] = round(summ["gloo"]["median_s"] / summ["collcomm"]["median_s"], 3)
            out["parts"]["2"] = {"nbytes": spec["ar_bytes"], "dtype": "float32", "optimum_s": round(opt, 4),
                                 "summary": summ, "per_iteration": per}

        # ---------------- part 3
        if "3" in spec["parts"]:
            n = spec["ps_bytes"] // 4
            compute = spec["compute"]
            runs = []
            for it in range(spec["ps_rounds"]):
                for k in spec["ps_k"]:
                    for version in ("ray", "collcomm"):
                        ray.get([x.ps_log.remote(True) for x in readers], timeout=left())
                        cpu = _cpu_times()
                        res = ray.get(prod.ps_serve.remote(readers, version, k, n, spec["updates"], compute),
                                      timeout=left(spec["updates"] * 60 + 60))
                        res["cpu_busy"] = _cpu_busy(cpu)
                        logs = ray.get([x.ps_log.remote() for x in readers], timeout=left())
                        res["weights_fetch_s"] = {str(i + 1): [e[1] for e in lg] for i, lg in enumerate(logs)}
                        if not res["weights_exact"]:
                            raise RuntimeError(f"part 3 {version} k={k}: final weights wrong")
                        res.update({"version": version, "k": k, "round": it})
                        runs.append(res)
                        print(f"part 3 round {it} k={k} {version}: {res['per_update_s']:.3f} s/update "
                              f"(cpu {res['cpu_busy']:.2f})", file=sys.stderr, flush=True)
            summ = {}
            for k in spec["ps_k"]:
                row = {}
                for version in ("ray", "collcomm"):
                    row[version] = statistics.median(r["per_update_s"] for r in runs if r["k"] == k and r["version"] == version)
                row["ray_over_collcomm"] = round(row["ray"] / row["collcomm"], 3)
                summ[f"k={k}"] = row
            out["parts"]["3"] = {"weights_bytes": spec["ps_bytes"], "updates": spec["updates"], "compute_s": compute,
                                 "link_time_s": round(spec["ps_bytes"] / LINK_BYTES_PER_S, 4),
                                 "summary": summ, "runs": runs}
        return out
    finally:
        try:
            ccray.shutdown(stop_coordinator=True)
        except Exception:  # noqa: BLE001
            pass
        ray.shutdown()


# --------------------------------------------------------------------------- the harness (root namespace)
def run_cluster(args) -> dict:
    from collcomm.integrations.ray.cluster import RayCluster, RayCommandTimeout

    t0 = time.monotonic()
    spec = {"parts": args.parts, "iters": args.iters, "nbytes": args.nbytes, "ar_bytes": args.ar_bytes,
            "ps_bytes": args.ps_bytes, "updates": args.updates, "compute": args.compute, "ps_k": args.ps_k,
            "ps_rounds": args.ps_rounds, "timeout": args.timeout, "log_to_driver": args.log_to_driver,
            "env": dict(kv.split("=", 1) for kv in args.env)}
    with RayCluster(args.prefix, num_cpus=1, object_store_bytes=OBJECT_STORE_BYTES, timeout=120) as cluster:
        spec.update(gcs=cluster.gcs_address, self=cluster.addresses[0], others=cluster.addresses[1:])
        t_up = time.monotonic() - t0
        try:
            res = cluster.run([sys.executable, str(Path(__file__).resolve()), "--driver", json.dumps(spec)],
                              node=0, timeout=args.timeout + 30, env={"PYTHONPATH": str(REPO)})
        except RayCommandTimeout as e:
            raise RuntimeError(f"the driver did not finish within {args.timeout + 30:.0f} s; its output ends: "
                               f"{e.output[-2000:]}") from None
        sys.stderr.write(res.stderr[-6000:] if res.returncode else "".join(
            l + "\n" for l in res.stderr.splitlines() if l.startswith("part ")))
        lines = [l for l in res.stdout.splitlines() if l.startswith(RESULT_MARK)]
        if res.returncode != 0 or not lines:
            raise RuntimeError(f"the driver failed (exit {res.returncode}): {res.stderr.strip()[-3000:]}")
        out = json.loads(lines[-1][len(RESULT_MARK):])
        out["cluster_start_s"] = round(t_up, 2)
        return out


def peer_alone(iters: int, timeout: float) -> dict:
    """bench/ray_star_peer.py run alone by its own command (it builds its own fabric, prefix rayst)."""
    argv = [sys.executable, str(HERE / "ray_star_peer.py"), "--iters", str(iters)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if res.returncode != 0:
        raise RuntimeError(f"ray_star_peer.py failed (exit {res.returncode}): {res.stderr[-1500:]}")
    r = json.loads(res.stdout)
    return {"command": f"python3 bench/ray_star_peer.py --iters {iters}", "seconds": r["seconds"],
            "median_s": r["median"], "per_reader_s": [x["per_reader_s"] for x in r["iterations"]]}


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = doc.get("parts", {})
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    if "1" in parts:
        p = parts["1"]
        names = list(p["summary"])
        for j, m in enumerate(names):
            vals = p["summary"][m]["seconds"]
            ax.bar(j, p["summary"][m]["median_s"], color=["tab:blue", "tab:red", "tab:orange", "tab:cyan"][j % 4])
            ax.scatter([j] * len(vals), vals, color="black", s=10, zorder=3)
            ax.text(j, p["summary"][m]["median_s"], f"{p['summary'][m]['median_s']:.2f} s\n"
                    f"{p['summary'][m]['x_optimum']:.2f}x opt", ha="center", va="bottom", fontsize=8)
        ax.axhline(p["optimum_s"], color="black", linestyle="--", linewidth=1, label=f"optimum {p['optimum_s']:.2f} s")
        ax.axhline(p["target_s"], color="grey", linestyle=":", linewidth=1, label="target 1.2x optimum")
        if doc.get("peer_alone"):
            ax.axhline(doc["peer_alone"]["median_s"], color="tab:red", linestyle=":", linewidth=1,
                       label="ray_star_peer.py alone")
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel("seconds (last reader has all 64 MiB)")
        ax.set_title("1. 64 MiB from node 0 to 3 nodes, star4 200 Mbit/s", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[1]
    if "2" in parts:
        p = parts["2"]
        for j, b in enumerate(("collcomm", "gloo")):
            vals = p["summary"][b]["seconds"]
            ax.bar(j, p["summary"][b]["median_s"], color=["tab:blue", "tab:orange"][j])
            ax.scatter([j] * len(vals), vals, color="black", s=10, zorder=3)
            ax.text(j, p["summary"][b]["median_s"], f"{p['summary'][b]['median_s']:.2f} s", ha="center",
                    va="bottom", fontsize=8)
        ax.axhline(p["optimum_s"], color="black", linestyle="--", linewidth=1,
                   label=f"ring bound 2(n-1)/n x 16 MiB / link = {p['optimum_s']:.2f} s")
        ax.set_xticks([0, 1], ["backend collcomm", "backend gloo"])
        ax.set_ylabel("seconds")
        ax.set_title("2. ray.util.collective.allreduce, 16 MiB float32, 4 actors", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[2]
    if "3" in parts:
        p = parts["3"]
        ks = list(p["summary"])
        for j, k in enumerate(ks):
            for d, version, c in ((-0.2, "ray", "tab:red"), (0.2, "collcomm", "tab:blue")):
                v = p["summary"][k][version]
                ax.bar(j + d, v, width=0.4, color=c, label=version if j == 0 else None)
                ax.text(j + d, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(p["link_time_s"], color="black", linestyle="--", linewidth=1,
                   label=f"one {p['weights_bytes'] >> 20} MiB crossing = {p['link_time_s']:.2f} s")
        ax.set_xticks(range(len(ks)), [f"first {k[2:]} of 3" for k in ks])
        ax.set_ylabel("seconds per update")
        ax.set_title(f"3. parameter server, {p['weights_bytes'] >> 20} MiB weights, compute "
                     f"{'/'.join(str(c) for c in p['compute_s'])} s", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"collcomm.integrations.ray vs Ray {doc.get('ray_version', '')}: one 4-node Ray cluster on an "
                 f"emulated star (200 Mbit/s links), {doc.get('date', '')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--driver", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--parts", default="1,2,3", help="comma-separated subset of 1,2,3 (default all)")
    ap.add_argument("--iters", type=int, default=3, help="iterations of parts 1 and 2 (default 3)")
    ap.add_argument("--nbytes", type=int, default=64 << 20, help="part 1 object size (default 64 MiB)")
    ap.add_argument("--ar-bytes", type=int, default=16 << 20, help="part 2 buffer (default 16 MiB)")
    ap.add_argument("--ps-bytes", type=int, default=16 << 20, help="part 3 weights (default 16 MiB)")
    ap.add_argument("--updates", type=int, default=12, help="part 3 updates per run (default 12)")
    ap.add_argument("--compute", default="0.3,0.6,0.9", help="part 3 compute seconds of workers 1..3")
    ap.add_argument("--ps-k", default="1,2", help="part 3 gradients per update (default 1,2)")
    ap.add_argument("--ps-rounds", type=int, default=2, help="part 3 runs of each version and k (default 2)")
    ap.add_argument("--prefix", default="rayint")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for the driver (default 900)")
    ap.add_argument("--peer-alone", action="store_true", help="also run bench/ray_star_peer.py alone afterwards")
    ap.add_argument("--log-to-driver", action="store_true")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of the Ray workers (e.g. COLLCOMM_ALGORITHM=ring); use with --variant")
    ap.add_argument("--variant", default="", help="store the parts under '<part>-<variant>' (not plotted)")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)
    if args.driver:
        print(RESULT_MARK + json.dumps(_driver(json.loads(args.driver))), flush=True)
        return 0
    doc = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {"parts": {}}
    if args.plot_only:
        plot(doc, OUT_PNG)
        return 0
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not set(args.parts) <= {"1", "2", "3"}:
        ap.error("--parts takes 1, 2, 3")
    args.compute = [float(x) for x in args.compute.split(",")]
    args.ps_k = [int(x) for x in args.ps_k.split(",")]
    t0 = time.monotonic()
    load_before = os.getloadavg()
    command = "python3 bench/ray_integration.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        _collcomm(["emulate", "up", str(TOPOLOGY), "--scale", SCALE, "--prefix", args.prefix], timeout=120)
        res = run_cluster(args)
    finally:
        try:
            _collcomm(["emulate", "down", "--prefix", args.prefix], timeout=120)
        except Exception as e:  # noqa: BLE001
            print(f"ray_integration: fabric teardown: {e}", file=sys.stderr)
    parts = res.pop("parts")
    if args.variant:
        for p, v in parts.items():
            v.update({"command": command.strip(), "env": dict(kv.split("=", 1) for kv in args.env),
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat()})
            doc["parts"][f"{p}-{args.variant}"] = v
    else:
        doc["parts"].update(parts)
        doc.update(res)
    doc.update({} if args.variant else {"command": command.strip(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
                "topology": TOPOLOGY.name, "scale": SCALE, "wall_s": round(time.monotonic() - t0, 1),
                "loadavg_before_after": [list(load_before), list(os.getloadavg())]})
    if args.peer_alone:
        doc["peer_alone"] = peer_alone(args.iters, timeout=600)
        doc["peer_alone"]["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    OUT_JSON.write_text(json.dumps(doc, indent=1))
    plot(doc, OUT_PNG)
    print(json.dumps({p: v.get("summary") for p, v in doc["parts"].items()}, indent=1))
    if doc.get("peer_alone"):
        print(json.dumps({"peer_alone_median_s": doc["peer_alone"]["median_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
