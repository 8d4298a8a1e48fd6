"""Objects in flight as a broadcast: one 64 MiB object from rank 0, read by readers that arrive when they
arrive (collcomm.api put/get, Hoplite-style chains) against "wait for all, then broadcast", "send to
each reader in turn", the pipelined optimum and Ray's object store.

Commands (root for the emulated parts):

    python3 bench/objects_broadcast.py                                  # all parts, 3 iterations
    python3 bench/objects_broadcast.py --parts A-loopback --iters 3
    sudo python3 bench/objects_broadcast.py --parts A-star,B --iters 3

Parts (each one job, every method in the same processes, interleaved per iteration):

A-loopback  8 ranks, plain ``collcomm run -n 8`` (no emulation, no topology file).
A-star      8 ranks in the emulated fabric bench/topologies/star8.json (``collcomm emulate up ... --scale
            1GB/s=200Mbit --prefix obba``: 200 Mbit/s = 25 MB/s of goodput per link), COLLCOMM_TOPOLOGY=star8.
            Per iteration, rank 0 draws 7 arrival offsets uniform over --spread (1 s) and shares them (and the
            CRC32 of the data) with cc.broadcast; a common start is 0.5 s ahead. Then, each from its own start:
            - objects:  rank 0 cc.put's at start; reader r sleeps to start+offset_r and cc.get's.
            - wait-all-then-broadcast: every reader sleeps to its arrival, then cc.barrier() (so no byte moves
              before the last arrival), then cc.broadcast(root=0) with the planner's choice (the default);
              then the same again with the ring plan (runtime().algorithm = "ring": root's part goes down the
              ring, a pipelined chain), an extra baseline, labelled wait-all-broadcast-ring.
            - send-in-turn: rank 0 cc.send's 64 MiB to each reader in order of arrival (not before it
              arrived); reader r sleeps to its arrival and cc.recv's.
            Metric for all three: last reader done - last reader arrival (measured arrival times, one clock:
            every rank is on this machine); also the mean of each reader's (done - own arrival).
            Bound: objects' metric <= 1.3 x one transfer time, T = 64 MiB pairwise in the same run: the
            median of a single cc.get (object put and complete before the start) and of a single
            cc.send/recv from rank 0 to rank 1; the check uses the smaller (stricter) and the get's.
B           4 ranks in bench/topologies/star4.json at 200 Mbit/s (prefix obbb): rank 0 cc.put's 64 MiB
            (complete), the 3 readers cc.get at one common start; time = start to last reader done. Against
            the pipelined optimum = T_single + (readers - 1) x (wire.MAX_CHUNK at the measured rate) (target
            <= 1.2x), cc.broadcast of the same buffer in the same job (default plan, and the ring plan), and Ray 2.60
            (bench/ray_star_peer.ray_broadcast on the same fabric, after the collcomm job ended).

Every received copy is checked (CRC32 against rank 0's). Results: bench/results/objects_broadcast.json
(parts run earlier are kept, a part run again replaced), plot bench/objects_broadcast.png.
Each job runs under ``collcomm run`` as a subprocess bounded by --job-timeout; a job that overruns is
SIGTERMed (the launcher forwards it), then its remaining processes are SIGKILLed by pid; emulated fabrics
are always brought down in a ``finally``.
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
import tempfile
import time
from pathlib import Path

from bounded_job import run_bounded

HERE = Path(__file__).resolve().parent
PARTS = ("A-loopback", "A-star", "B")
SCALE = "1GB/s=200Mbit"
LINK_BYTES_PER_S = 25e6  # goodput of one emulated link at SCALE (bandwidth 1 in the topology files)
PREFIX = {"A-star": "obba", "B": "obbb"}
TOPOLOGY = {"A-star": HERE / "topologies" / "star8.json", "B": HERE / "topologies" / "star4.json"}
RANKS = {"A-loopback": 8, "A-star": 8, "B": 4}
LEAD_S = 0.5  # a common start this far ahead of rank 0's clock when it is shared
A_METHODS = ("objects", "wait-all-broadcast", "wait-all-broadcast-ring", "send-in-turn")
B_METHODS = ("objects", "broadcast", "broadcast-ring")


# =========================================================================== inside the job
def rank_main() -> int:
    import zlib

    import numpy as np

    import collcomm as cc
    from collcomm.api import runtime

    cfg = json.loads(os.environ["OBB_CONFIG"])
    nbytes, iters, tmo, seed = cfg["nbytes"], cfg["iters"], cfg["timeout"], cfg["seed"]
    out_dir = Path(cfg["out_dir"])
    cc.init(timeout=tmo)
    rank, n = cc.rank(), cc.world_size()
    default_algorithm = runtime().algorithm
    records: list[dict] = []
    meta: dict = {"rank": rank, "world": n, "collcomm": cc.__file__, "iterations": []}
    recvbuf = np.empty(nbytes, np.uint8)

    def save() -> None:
        tmp = out_dir / f"rank{rank}.json.tmp"
        tmp.write_text(json.dumps({"meta": meta, "records": records}))
        tmp.replace(out_dir / f"rank{rank}.json")

    def share(values, length: int) -> np.ndarray:
        v = np.zeros(length, np.float64)
        if rank == 0:
            v[:] = values
        cc.broadcast(v, root=0)
        return v

    def sleep_until(t: float) -> None:
        d = t - time.time()
        if d > 0:
            time.sleep(d)

    def crc(a) -> int:
        return zlib.crc32(memoryview(a).cast("B"))

    def rec(phase: str, it: int, start: float, arrive: float, done: float, ok: bool | None, **extra) -> None:
        records.append({"phase": phase, "it": it, "rank": rank, "start": start, "arrive": arrive, "done": done,
                        "ok": ok, **extra})

    def make_data(it: int):
        rng = np.random.default_rng(seed + it)
        return np.frombuffer(rng.bytes(nbytes), np.uint8).copy()

    # -- warm-up: the object layer, its connections, p2p and collective connections (small sizes)
    warm = np.arange(1 << 20, dtype=np.uint8)
    if rank == 0:
        cc.put("obb-warm", warm)
    cc.barrier()
    if rank != 0:
        assert np.array_equal(cc.get("obb-warm", timeout=tmo), warm), "warm-up get: wrong bytes"
    cc.barrier()
    if rank == 0:
        cc.delete("obb-warm")
        for r in range(1, n):
            cc.send(warm, r)
    else:
        w = np.empty_like(warm)
        cc.recv(w, 0)
    cc.broadcast(warm.copy(), root=0)
    cc.barrier()

    for it in range(iters):
        data = make_data(it) if rank == 0 else None
        data_crc = crc(data) if rank == 0 else 0
        # ---------------------------------------------------------- one transfer: a pairwise get
        key = f"obb-single-{it}"
        if rank == 0:
            cc.put(key, data)  # complete before the start
        v = share([time.time() + LEAD_S, data_crc], 2)
        start, want = v[0], int(v[1])
        if rank == 1:
            sleep_until(start)
            t_a = time.time()
            a = cc.get(key, timeout=tmo)
            t_d = time.time()
            rec("single-get", it, start, t_a, t_d, crc(a) == want)
            del a
        cc.barrier()
        if rank == 0:
            cc.delete(key)
        cc.barrier()
        # ---------------------------------------------------------- one transfer: a pairwise send
        recvbuf.fill(0)
        start = share([time.time() + LEAD_S], 1)[0]
        if rank == 0:
            sleep_until(start)
            t_a = time.time()
            cc.send(data, 1)
            rec("single-send-sender", it, start, t_a, time.time(), None)
        elif rank == 1:
            sleep_until(start)
            t_a = time.time()
            cc.recv(recvbuf, 0)
            t_d = time.time()
            rec("single-send", it, start, t_a, t_d, crc(recvbuf) == want)
        cc.barrier()

        if cfg["part"].startswith("A"):
            # ------------------------------------------------------ arrivals over --spread seconds
            if rank == 0:
                offs = np.random.default_rng(10_000 + seed + it).uniform(0.0, cfg["spread"], n - 1)
            else:
                offs = np.zeros(n - 1)
            v = share([time.time() + LEAD_S, data_crc, *offs], 2 + n - 1)
            start, want = v[0], int(v[1])
            off = [0.0] + [float(x) for x in v[2:]]
            if rank == 0:
                meta["iterations"].append({"it": it, "offsets": off, "crc": want})
            # objects: rank 0 puts at start, reader r gets at start + off[r]
            key = f"obb-a-{it}"
            if rank == 0:
                sleep_until(start)
                t_a = time.time()
                cc.put(key, data)
                rec("objects-put", it, start, t_a, time.time(), None)
            else:
                sleep_until(start + off[rank])
                t_a = time.time()
                a = cc.get(key, timeout=tmo)
                t_d = time.time()
                rec("objects", it, start, t_a, t_d, crc(a) == want, planned=start + off[rank])
                del a
            cc.barrier()
            if rank == 0:
                cc.delete(key)
            cc.barrier()
            # wait for all, then broadcast (the same offsets from a new start): the planner's choice
            # (the default), then the ring plan (root's part down the ring: a pipelined chain)
            for phase, algorithm in (("wait-all-broadcast", None), ("wait-all-broadcast-ring", "ring")):
                recvbuf.fill(0)
                runtime().algorithm = algorithm
                start = share([time.time() + LEAD_S], 1)[0]
                sleep_until(start + off[rank])
                t_a = time.time()
                cc.barrier()
                t_b = time.time()
                cc.broadcast(data if rank == 0 else recvbuf, root=0)
                t_d = time.time()
                runtime().algorithm = default_algorithm
                rec(phase, it, start, t_a, t_d, None if rank == 0 else crc(recvbuf) == want,
                    released=t_b, planned=start + off[rank])
                cc.barrier()
            # send to each reader in turn, in order of arrival
            recvbuf.fill(0)
            start = share([time.time() + LEAD_S], 1)[0]
            if rank == 0:
                for r in sorted(range(1, n), key=lambda r: off[r]):
                    sleep_until(start + off[r])
                    t_a = time.time()
                    cc.send(data, r)
                    rec("send-in-turn-sender", it, start, t_a, time.time(), None, to=r)
            else:
                sleep_until(start + off[rank])
                t_a = time.time()
                cc.recv(recvbuf, 0)
                t_d = time.time()
                rec("send-in-turn", it, start, t_a, t_d, crc(recvbuf) == want, planned=start + off[rank])
            cc.barrier()
        else:
            # ------------------------------------------------------ B: every reader present at once
            key = f"obb-b-{it}"
            if rank == 0:
                cc.put(key, data)  # complete before the start, as Ray's object is sealed before its reads
                meta["iterations"].append({"it": it, "crc": data_crc})
            start = share([time.time() + LEAD_S], 1)[0]
            if rank != 0:
                sleep_until(start)
                t_a = time.time()
                a = cc.get(key, timeout=tmo)
                t_d = time.time()
                rec("objects", it, start, t_a, t_d, crc(a) == want)
                del a
            cc.barrier()
            if rank == 0:
                cc.delete(key)
            cc.barrier()
            for phase, algorithm in (("broadcast", None), ("broadcast-ring", "ring")):
                recvbuf.fill(0)
                runtime().algorithm = algorithm
                start = share([time.time() + LEAD_S], 1)[0]
                sleep_until(start)
                t_a = time.time()
                cc.broadcast(data if rank == 0 else recvbuf, root=0)
                t_d = time.time()
                runtime().algorithm = default_algorithm
                rec(phase, it, start, t_a, t_d, None if rank == 0 else crc(recvbuf) == want)
                cc.barrier()
        save()
    cc.barrier()
    save()
    cc.shutdown()
    return 0


# =========================================================================== the driver
def _collcomm(args: list[str], env: dict, timeout: float = 120) -> str:
    res = subprocess.run([sys.executable, "-m", "collcomm.cli"] + args, env=env, capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"collcomm {' '.join(args)} failed ({res.returncode}): {(res.stderr or res.stdout)[-2000:]}")
    return res.stdout.strip()


def run_job(part: str, iters: int, nbytes: int, spread: float, job_timeout: float, op_timeout: float,
            workdir: Path) -> dict:
    n = RANKS[part]
    out_dir = workdir / part
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"part": part, "nbytes": nbytes, "iters": iters, "spread": spread, "timeout": op_timeout,
           "seed": 20240607, "out_dir": str(out_dir)}
    env = dict(os.environ, OBB_CONFIG=json.dumps(cfg), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "collcomm.cli", "run", "-n", str(n), "--timeout", str(op_timeout)]
    if part in TOPOLOGY:
        topo = str(TOPOLOGY[part])
        cmd += ["--emulate", topo, "--scale", SCALE, "--prefix", PREFIX[part], "--topology", topo]
        env["COLLCOMM_TOPOLOGY"] = topo
    cmd += [sys.executable, str(Path(__file__).resolve()), "--rank"]
    log = workdir / f"{part}.log"
    print(f"== {part}: {' '.join(cmd[1:])}", flush=True)
    code, seconds = run_bounded(cmd, env, job_timeout, log)
    text = log.read_text(errors="replace")
    ranks = {}
    for r in range(n):
        f = out_dir / f"rank{r}.json"
        if f.exists():
            ranks[r] = json.loads(f.read_text())
    return {"code": code, "job_s": seconds, "log_tail": text[-4000:], "ranks": ranks,
            "command": "collcomm " + " ".join(cmd[3:]).replace(sys.executable, "python"), "config": cfg}


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def analyse(part: str, job: dict) -> dict:
    recs = [r for rk in job["ranks"].values() for r in rk["records"]]
    iters = sorted({r["it"] for r in recs})
    bad = [{k: r[k] for k in ("phase", "it", "rank")} for r in recs if r["ok"] is False]

    def one(phase: str, it: int) -> list[dict]:
        return sorted((r for r in recs if r["phase"] == phase and r["it"] == it), key=lambda r: r["rank"])

    t_get = [r["done"] - r["start"] for it in iters for r in one("single-get", it)]
    t_send = [r["done"] - r["start"] for it in iters for r in one("single-send", it)]
    out = {"iterations_done": len(iters), "wrong_bytes": bad,
           "transfer_time_s": {"get": t_get, "send": t_send, "get_median": _med(t_get), "send_median": _med(t_send)}}
    tg, ts = _med(t_get), _med(t_send)
    T = min(x for x in (tg, ts) if x is not None) if (tg or ts) else None
    out["T_s"] = T
    out["T_rule"] = "min(median single get, median single send), 64 MiB rank 0 -> rank 1"
    if T:
        out["link_rate_MBps_from_T"] = job["config"]["nbytes"] / T / 1e6
    per_iter = []
    if part.startswith("A"):
        methods = A_METHODS
        for it in iters:
            row = {"it": it}
            for m in methods:
                rs = [r for r in one(m, it) if r["rank"] != 0]
                if len(rs) < RANKS[part] - 1:
                    continue
                last_arrival = max(r["arrive"] for r in rs)
                last_done = max(r["done"] for r in rs)
                row[m] = {"last_done_minus_last_arrival_s": last_done - last_arrival,
                          "mean_reader_latency_s": statistics.mean(r["done"] - r["arrive"] for r in rs),
                          "first_arrival_to_last_done_s": last_done - min(r["arrive"] for r in rs),
                          "arrival_lateness_max_s": max((r["arrive"] - r["planned"]) for r in rs if "planned" in r),
                          "readers": [{"rank": r["rank"], "arrive": r["arrive"] - r["start"],
                                       "done": r["done"] - r["start"]} for r in rs]}
                if m.startswith("wait-all-broadcast"):
                    row[m]["barrier_release_after_last_arrival_s"] = max(r["released"] for r in rs) - last_arrival
            per_iter.append(row)
        summary = {}
        for m in methods:
            vals = [row[m]["last_done_minus_last_arrival_s"] for row in per_iter if m in row]
            lat = [row[m]["mean_reader_latency_s"] for row in per_iter if m in row]
            summary[m] = {"last_done_minus_last_arrival_median_s": _med(vals),
                          "mean_reader_latency_median_s": _med(lat),
                          "per_iteration_s": vals}
            if T and _med(vals) is not None:
                summary[m]["over_T"] = _med(vals) / T
        obj = summary["objects"]["last_done_minus_last_arrival_median_s"]
        if obj is not None and T:
            summary["bound"] = {
                "rule": "last reader done <= last arrival + 1.3 x T",
                "T_s": T, "limit_s": 1.3 * T, "measured_s": obj, "ratio_to_T": obj / T, "pass": obj <= 1.3 * T,
                "with_T_get": None if not tg else {"limit_s": 1.3 * tg, "pass": obj <= 1.3 * tg, "ratio": obj / tg},
                "with_T_send": None if not ts else {"limit_s": 1.3 * ts, "pass": obj <= 1.3 * ts, "ratio": obj / ts},
                "per_iteration_pass": [v <= 1.3 * T for v in summary["objects"]["per_iteration_s"]]}
            for m in A_METHODS[1:]:
                b = summary[m]["last_done_minus_last_arrival_median_s"]
                if b:
                    summary[m]["objects_speedup"] = b / obj
        out["summary"] = summary
    else:
        for it in iters:
            row = {"it": it}
            for m in B_METHODS:
                rs = [r for r in one(m, it) if r["rank"] != 0]
                if len(rs) == RANKS[part] - 1:
                    row[m] = {"last_done_s": max(r["done"] - r["start"] for r in rs),
                              "per_reader_s": [r["done"] - r["start"] for r in rs]}
            per_iter.append(row)
        summary = {}
        for m in B_METHODS:
            summary[f"{m}_per_iteration_s"] = [row[m]["last_done_s"] for row in per_iter if m in row]
            summary[f"{m}_median_s"] = _med(summary[f"{m}_per_iteration_s"])
        obj, bc, bcr = summary["objects_median_s"], summary["broadcast_median_s"], summary["broadcast-ring_median_s"]
        if T:
            from collcomm.objects.wire import MAX_CHUNK

            nbytes = job["config"]["nbytes"]
            fill = (RANKS[part] - 2) * MAX_CHUNK / (nbytes / T)
            opt = T + fill
            summary["optimum"] = {"rule": "T_single + (readers - 1) x MAX_CHUNK / (nbytes / T_single)",
                                  "T_single_s": T, "fill_s": fill, "optimum_s": opt,
                                  "nominal_s": nbytes / LINK_BYTES_PER_S + fill}
            if obj:
                summary["objects_over_optimum"] = obj / opt
                summary["objects_over_optimum_pass_1.2"] = obj / opt <= 1.2
                summary["objects_over_nominal_optimum"] = obj / summary["optimum"]["nominal_s"]
            if bc:
                summary["broadcast_over_optimum"] = bc / opt
            if bcr:
                summary["broadcast-ring_over_optimum"] = bcr / opt
        out["summary"] = summary
    out["per_iteration"] = per_iter
    out["ranks_reported"] = sorted(job["ranks"])
    return out


def run_part(part: str, args, workdir: Path) -> dict:
    env = dict(os.environ)
    t0 = time.monotonic()
    result: dict = {"part": part, "ranks": RANKS[part], "nbytes": args.nbytes, "iters": args.iters,
                    "loadavg_before": os.getloadavg()}
    fabric_up = False
    try:
        if part in TOPOLOGY:
            result.update({"topology": str(TOPOLOGY[part].relative_to(HERE.parent)), "scale": SCALE,
                           "prefix": PREFIX[part]})
            up_cmd = ["emulate", "up", str(TOPOLOGY[part]), "--scale", SCALE, "--prefix", PREFIX[part]]
            result["fabric_command"] = "collcomm " + " ".join(up_cmd)
            fabric_up = True
            print(_collcomm(up_cmd, env), flush=True)
        if part.startswith("A"):
            result["spread_s"] = args.spread
        job = run_job(part, args.iters, args.nbytes, args.spread, args.job_timeout, args.op_timeout, workdir)
        result.update({"job_command": job["command"], "job_exit": job["code"], "job_s": round(job["job_s"], 2)})
        if job["code"] != 0:
            result["job_log_tail"] = job["log_tail"]
            print(f"!! {part}: job exit {job['code']}\n{job['log_tail']}", flush=True)
        if job["ranks"]:
            result.update(analyse(part, job))
            result["collcomm_module"] = next(iter(job["ranks"].values()))["meta"]["collcomm"]
        if part == "B":
            result["ray"] = ray_peer(args)
    except Exception as e:  # noqa: BLE001 - record and go on to the next part
        result["error"] = f"{type(e).__name__}: {e}"
        print(f"!! {part}: {result['error']}", flush=True)
    finally:
        if fabric_up:
            try:
                print(_collcomm(["emulate", "down", "--prefix", PREFIX[part]], env), flush=True)
            except Exception as e:  # noqa: BLE001
                result["teardown_error"] = str(e)
                print(f"!! teardown of {PREFIX[part]}: {e}", flush=True)
        result["wall_s"] = round(time.monotonic() - t0, 2)
        result["loadavg_after"] = os.getloadavg()  # this machine is shared: other sessions' tests run too
    return result


def ray_peer(args) -> dict:
    """Ray's object store on the same (still up) fabric, after the collcomm job ended.
    HOOK: bench/ray_star_peer.py (another helper's) provides ray_broadcast(prefix, nbytes, iters, timeout)."""
    if args.no_ray:
        return {"skipped": "--no-ray"}
    if not (HERE / "ray_star_peer.py").exists():
        return {"skipped": "HOOK: bench/ray_star_peer.py not present; ray_broadcast(prefix, nbytes, iters, timeout) "
                           "would be called here on the same fabric"}
    sys.path.insert(0, str(HERE))
    try:
        from ray_star_peer import ray_broadcast
    finally:
        sys.path.remove(str(HERE))
    t0 = time.monotonic()
    try:
        r = ray_broadcast(PREFIX["B"], args.nbytes, args.iters, args.ray_timeout)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}", "wall_s": round(time.monotonic() - t0, 2)}
    r["wall_s"] = round(time.monotonic() - t0, 2)
    return r


# --------------------------------------------------------------------------- report and plot
def report(doc: dict) -> None:
    for part, res in doc["parts"].items():
        print(f"\n### {part}  (wall {res.get('wall_s')} s, job {res.get('job_s')} s, exit {res.get('job_exit')})")
        if res.get("error"):
            print("  error:", res["error"])
        if "T_s" not in res:
            continue
        tt = res["transfer_time_s"]
        print(f"  one transfer: get median {tt['get_median']:.3f} s, send median {tt['send_median']:.3f} s; "
              f"T = {res['T_s']:.3f} s ({res.get('link_rate_MBps_from_T', 0):.1f} MB/s)")
        print(f"  wrong bytes: {res['wrong_bytes'] or 'none'}")
        s = res["summary"]
        if part.startswith("A"):
            for m in A_METHODS:
                x = s[m]
                if x["last_done_minus_last_arrival_median_s"] is None:
                    continue
                print(f"  {m:24} last done - last arrival {x['last_done_minus_last_arrival_median_s']:.3f} s "
                      f"({x.get('over_T', 0):.2f} T)  mean reader latency {x['mean_reader_latency_median_s']:.3f} s"
                      f"  per iter {[round(v, 3) for v in x['per_iteration_s']]}")
            if "bound" in s:
                b = s["bound"]
                print(f"  bound 1.3 T = {b['limit_s']:.3f} s: measured {b['measured_s']:.3f} s -> "
                      f"{'PASS' if b['pass'] else 'FAIL'} (per iteration {b['per_iteration_pass']})")
        else:
            o = s.get("optimum", {})
            print(f"  objects get (last reader) median {s['objects_median_s']:.3f} s, per iter "
                  f"{[round(v, 3) for v in s['objects_per_iteration_s']]}")
            print(f"  cc.broadcast median {s['broadcast_median_s']:.3f} s; with the ring plan "
                  f"{s['broadcast-ring_median_s']:.3f} s")
            if o:
                print(f"  optimum {o['optimum_s']:.3f} s (T {o['T_single_s']:.3f} + fill {o['fill_s']:.3f}); "
                      f"objects/optimum {s.get('objects_over_optimum', float('nan')):.3f} "
                      f"({'PASS' if s.get('objects_over_optimum_pass_1.2') else 'FAIL'} <= 1.2), "
                      f"broadcast/optimum {s.get('broadcast_over_optimum', float('nan')):.3f}, "
                      f"ring broadcast/optimum {s.get('broadcast-ring_over_optimum', float('nan')):.3f}")
            ray = res.get("ray", {})
            if "median" in ray:
                print(f"  Ray {ray.get('ray_version')}: median {ray['median']:.3f} s {ray['seconds']}; "
                      f"Ray / collcomm get = {ray['median'] / s['objects_median_s']:.2f}x")
            else:
                print(f"  Ray: {ray}")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = doc["parts"]
    a_parts = [p for p in ("A-loopback", "A-star") if p in parts and parts[p].get("per_iteration")]
    ncols = len(a_parts) + (1 if "B" in parts and parts["B"].get("summary") else 0)
    if not ncols:
        return
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 5), squeeze=False)
    axes = axes[0]
    colours = {"objects": "tab:blue", "wait-all-broadcast": "tab:orange", "wait-all-broadcast-ring": "tab:purple",
               "send-in-turn": "tab:red"}
    shift = {"objects": 0.0, "wait-all-broadcast": 0.2, "wait-all-broadcast-ring": 0.1, "send-in-turn": -0.15}
    for ax, part in zip(axes, a_parts):
        res = parts[part]
        rows = [r for r in res["per_iteration"] if "objects" in r]
        vals = [r["objects"]["last_done_minus_last_arrival_s"] for r in rows]
        row = rows[sorted(range(len(vals)), key=lambda i: vals[i])[len(vals) // 2]]  # the median iteration
        for m, c in colours.items():
            if m not in row:
                continue
            rd = sorted(row[m]["readers"], key=lambda x: x["arrive"])
            y = list(range(1, len(rd) + 1))
            ax.hlines([v + shift[m] for v in y],
                      [x["arrive"] for x in rd], [x["done"] for x in rd], colors=c, linewidth=2.5, label=m)
        rd = sorted(row["objects"]["readers"], key=lambda x: x["arrive"])
        last = max(x["arrive"] for x in rd)
        T = res["T_s"]
        ax.axvline(last + 1.3 * T, color="black", linestyle="--", linewidth=1, label="last arrival + 1.3 T")
        ax.set_xlabel("seconds from start (bar: reader's arrival to done)")
        ax.set_ylabel("reader, in order of arrival")
        ax.set_title(f"{part}: 64 MiB to 7 readers arriving over 1 s\n(iteration {row['it']}, T = {T:.3f} s)",
                     fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    if ncols > len(a_parts):
        ax = axes[-1]
        res = parts["B"]
        s = res["summary"]
        names = ["collcomm get", "cc.broadcast", "cc.broadcast\n(ring plan)"]
        vals = [s["objects_median_s"], s["broadcast_median_s"], s["broadcast-ring_median_s"]]
        if "median" in res.get("ray", {}):
            names.append(f"Ray {res['ray'].get('ray_version', '')}")
            vals.append(res["ray"]["median"])
        ax.bar(names, vals, color=["tab:blue", "tab:orange", "tab:purple", "tab:green"][:len(vals)])
        if "optimum" in s:
            ax.axhline(s["optimum"]["optimum_s"], color="black", linestyle="--", linewidth=1, label="pipelined optimum")
            ax.axhline(1.2 * s["optimum"]["optimum_s"], color="grey", linestyle=":", linewidth=1, label="1.2 x optimum")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f} s", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("seconds, start to last reader done (median)")
        ax.set_title("B: star4 at 200 Mbit/s, 64 MiB from node 0 to 3 readers at once", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    if "--rank" in sys.argv:
        return rank_main()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    ap.add_argument("--iters", type=int, default=3, help="iterations per method (medians reported)")
    ap.add_argument("--nbytes", type=int, default=64 << 20)
    ap.add_argument("--spread", type=float, default=1.0, help="A: arrivals uniform over this many seconds")
    ap.add_argument("--job-timeout", type=float, default=540, help="wall-clock bound of each collcomm job (s)")
    ap.add_argument("--op-timeout", type=float, default=120, help="COLLCOMM_TIMEOUT and get timeout in the job (s)")
    ap.add_argument("--ray-timeout", type=float, default=300, help="B: bound of the Ray peer (cluster start + reads)")
    ap.add_argument("--no-ray", action="store_true", help="B: skip the Ray peer")
    ap.add_argument("--out", default=str(HERE / "results" / "objects_broadcast.json"))
    ap.add_argument("--plot", default=str(HERE / "objects_broadcast.png"))
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    for p in parts:
        if p not in PARTS:
            ap.error(f"unknown part {p!r}; choose from {', '.join(PARTS)}")
    if any(p in TOPOLOGY for p in parts) and os.geteuid() != 0:
        ap.error("the emulated parts need root")
    import collcomm

    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"parts": {}}
    commit = subprocess.run(["git", "-C", str(Path(collcomm.__file__).resolve().parent.parent), "rev-parse", "HEAD"],
                            capture_output=True, text=True, timeout=30).stdout.strip()
    command = f"PYTHONPATH={os.environ.get('PYTHONPATH', '')} python bench/objects_broadcast.py " + " ".join(sys.argv[1:])
    print(f"collcomm from {collcomm.__file__} at {commit}", flush=True)
    with tempfile.TemporaryDirectory(prefix="obb-") as tmp:
        for p in parts:
            res = run_part(p, args, Path(tmp))
            res.update({"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
                        "command": command, "machine": f"{platform.machine()}, {os.cpu_count()} cores"})
            doc["parts"][p] = res
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(doc, indent=1))
    report({"parts": {p: doc["parts"][p] for p in parts}})
    try:
        plot(doc, Path(args.plot))
    except Exception as e:  # noqa: BLE001
        print(f"plot failed: {type(e).__name__}: {e}")
    return 0 if all(doc["parts"][p].get("job_exit") == 0 and not doc["parts"][p].get("error") for p in parts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
