"""Asynchronous parameter server on objects (first k of 8 gradients) against a lockstep allreduce loop:
model updates per second, same model, same simulated compute, same 9 processes.

Commands:

    python3 bench/objects_param_server.py          # label "default": 4 MiB model, 20 ms compute, 40 steps x 3
    python3 bench/objects_param_server.py --label compute-bound --base-ms 200 --steps 20 --rounds 2

Each label's results are kept in the JSON (a label run again is replaced); the plot has one row per label.

One job of 9 ranks on loopback (``collcomm run -n 9``): rank 0 is the server, ranks 1..8 the workers.
The model is a float32 vector of --model-bytes (4 MiB). "Compute" is simulated with time.sleep (so the two
cores stay free for the communication): worker i at step s sleeps base x d(i, s) with d drawn from
numpy's default_rng([seed, scenario, round, i, s]); the same draws serve every mode of a round.
Scenarios: ``lognormal`` (d = lognormal(0, --sigma): median --base-ms, skewed tail) and ``straggler``
(d = lognormal(0, 0.1) and worker 8 --straggler-factor (3x) slower). The gradient of worker i at step s is
a deterministic function of (i, s) only: g = ((j + 31 i) mod 251) + (s mod 64) over the element index j
(integers, exact in float32), so every sum can be checked bit for bit; it does not depend on the weights.

Modes (per scenario and round, rotated so drift hits each alike; a world barrier before each):

lockstep   the 8 workers (cc.new_group([1..8])) loop N steps: sleep d(i, s), make g, cc.allreduce(g) in
           place, check the sum (every --verify-every steps), w -= lr * g / 8. updates/s = N / (time from
           a group barrier to the end of the last step on worker 1).
async k    (k = 6 and k = 8 of 8) the server puts w/0, then for s = 0..N-1: keys = [g/s/1 .. g/s/8],
           used = cc.reduce_objects(keys, sum/s, num_required=k), checks the sum against the gradients of
           the returned keys (NumPy, every --verify-every steps), w = w - lr * sum / k, cc.put(w/s+1)
           (copy=False; a fresh array per step), deletes sum/s and the weights --lag steps back.
           Worker i, having put its gradient for step t (or at the start, t = -1): target = t + 1;
           while w/(target+1) exists (cc.object_info), target += 1 (skip to the newest weights: a
           straggler whose gradient for t came too late does not compute on stale weights); stop once
           target = N; cc.get(w/target) (waits until the server puts it; ObjectDeleted = fell more than
           --lag steps behind: target += 1 and again); sleeps d(i, target); cc.put(g/target/i, copy=False);
           deletes its own older gradients (their reductions are complete, since w/target exists).
           On verify steps the server also puts crc/s (inline, CRC32 of w/s) and the worker checks the
           weights it got against it. updates/s = N / (time from the world barrier to the put of w/N).
           Liveness: while the server waits on step s, w/(s+1) does not exist, so every worker that
           finishes picks w/s and puts a gradient for s: k of 8 always arrive.

Also reported: per-step latency (server: w/s published to w/s+1 published, and the reduce_objects
part; lockstep: the step and its allreduce part), gradients used/late/skipped steps, and a
zero-communication model of each mode from the same draws (a worker picks the newest published weights;
the server publishes at the k-th arrival) to show what communication costs. After each mode every rank
deletes what it owns and reports its object store's bytes (expected 0 at the end).

Results: bench/results/objects_param_server.json, plot bench/objects_param_server.png. The job runs as
a subprocess bounded by --job-timeout (SIGTERM to the launcher, then SIGKILL of its process tree by pid);
every collcomm call inside has --op-timeout.
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
WORKERS = 8
SCENARIOS = ("lognormal", "straggler")


def modes_of(ks: list[int]) -> list[str]:
    return ["lockstep"] + [f"async-k{k}" for k in ks]


def draw(cfg: dict, scenario: int, rnd: int, i: int, s: int) -> float:
    """Seconds of simulated compute of worker i (1..8) at step s."""
    import numpy as np

    name = cfg["scenarios"][scenario]
    rng = np.random.default_rng([cfg["seed"], scenario, rnd, i, s])
    if name == "lognormal":
        d = rng.lognormal(0.0, cfg["sigma"])
    else:  # straggler
        d = rng.lognormal(0.0, 0.1) * (cfg["straggler_factor"] if i == WORKERS else 1.0)
    return cfg["base_ms"] / 1000.0 * d


# =========================================================================== inside the job
def rank_main() -> int:
    import zlib

    import numpy as np

    import collcomm as cc
    from collcomm.errors import ObjectDeleted, ObjectLost

    cfg = json.loads(os.environ["OPS_CONFIG"])
    out_dir = Path(cfg["out_dir"])
    tmo, N, lag, V, lr = cfg["op_timeout"], cfg["steps"], cfg["lag"], cfg["verify_every"], cfg["lr"]
    n_el = cfg["model_bytes"] // 4
    cc.init(timeout=tmo)
    rank, world = cc.rank(), cc.world_size()
    assert world == WORKERS + 1, f"needs {WORKERS + 1} ranks, got {world}"
    meta = {"rank": rank, "collcomm": cc.__file__, "pid": os.getpid()}
    runs: list[dict] = []

    def save() -> None:
        tmp = out_dir / f"rank{rank}.json.tmp"
        tmp.write_text(json.dumps({"meta": meta, "runs": runs}))
        tmp.replace(out_dir / f"rank{rank}.json")

    idx = np.arange(n_el, dtype=np.int64)

    def base(i: int) -> np.ndarray:
        return ((idx + 31 * i) % 251).astype(np.float32)

    def c(s: int) -> np.float32:
        return np.float32(s % 64)

    w0 = (np.arange(n_el, dtype=np.float32) % 1000) / np.float32(1000)
    store_used = lambda: cc.api._objects().stats()["used"]  # noqa: E731

    if rank == 0:
        bases = {i: base(i) for i in range(1, WORKERS + 1)}
        g8 = None
    else:
        mine = base(rank)
        sum_base = sum((base(i) for i in range(1, WORKERS + 1)), np.zeros(n_el, np.float32))
        g8 = cc.new_group(list(range(1, WORKERS + 1)), timeout=tmo)

    # -- warm-up: object layer connections (a put read by everyone, a small reduce), collectives
    warm = np.full(n_el, 1.0, np.float32)
    if rank == 0:
        cc.put("warm/w", warm)
    else:
        assert np.array_equal(cc.get("warm/w", timeout=tmo), warm)
        cc.put(f"warm/g/{rank}", np.full(n_el, float(rank), np.float32))
        x = np.ones(n_el, np.float32)
        cc.allreduce(x, group=g8, timeout=tmo)
        assert np.all(x == WORKERS)
    if rank == 0:
        used = cc.reduce_objects([f"warm/g/{i}" for i in range(1, WORKERS + 1)], "warm/sum", timeout=tmo)
        assert len(used) == WORKERS
        assert np.all(cc.get("warm/sum", timeout=tmo) == sum(range(1, WORKERS + 1)))
    cc.barrier(timeout=tmo)
    if rank == 0:
        for key in ["warm/w", "warm/sum"]:
            cc.delete(key, timeout=tmo)
    else:
        cc.delete(f"warm/g/{rank}", timeout=tmo)
    cc.barrier(timeout=tmo)
    meta["store_used_after_warmup"] = store_used()
    save()

    # ------------------------------------------------------------------ lockstep
    def lockstep(sc: int, rnd: int) -> dict:
        if rank == 0:
            cc.barrier(timeout=tmo)  # the world barrier before the mode (workers enter theirs below)
            return {}
        w = w0.copy()
        g = np.empty(n_el, np.float32)
        steps = []
        cc.barrier(timeout=tmo)
        cc.barrier(group=g8, timeout=tmo)
        t_start = time.time()
        for s in range(N):
            t0 = time.time()
            time.sleep(draw(cfg, sc, rnd, rank, s))
            np.add(mine, c(s), out=g)
            t1 = time.time()
            cc.allreduce(g, group=g8, timeout=tmo)
            t2 = time.time()
            ok = None
            if s % V == 0:
                ok = bool(np.array_equal(g, sum_base + np.float32(WORKERS) * c(s)))
                if not ok:
                    raise AssertionError(f"lockstep step {s}: allreduce sum differs from the expected one")
            w -= np.float32(lr / WORKERS) * g
            steps.append({"s": s, "start": t0, "computed": t1, "reduced": t2, "end": time.time(), "ok": ok})
        return {"t_start": t_start, "t_end": time.time(), "steps": steps, "crc_w": zlib.crc32(w.tobytes())}

    # ------------------------------------------------------------------ async, the server
    def server(prefix: str, k: int) -> dict:
        w = w0.copy()
        steps = []
        cc.barrier(timeout=tmo)
        t_start = time.time()
        cc.put(f"{prefix}crc/0", np.array([zlib.crc32(w.tobytes())], np.uint32), timeout=tmo)
        cc.put(f"{prefix}w/0", w, copy=False, timeout=tmo)
        published = [time.time()]
        verified = 0
        for s in range(N):
            t0 = time.time()
            used = cc.reduce_objects([f"{prefix}g/{s}/{i}" for i in range(1, WORKERS + 1)], f"{prefix}sum/{s}",
                                     op="sum", num_required=k, timeout=tmo)
            t1 = time.time()
            total = cc.get(f"{prefix}sum/{s}", timeout=tmo)
            ok = None
            if s % V == 0:
                who = [int(key.rsplit("/", 1)[1]) for key in used]
                expect = sum((bases[i] for i in who), np.zeros(n_el, np.float32)) + np.float32(len(who)) * c(s)
                ok = len(used) == k and len(set(used)) == k and bool(np.array_equal(total, expect))
                if not ok:
                    bad = int(np.flatnonzero(total != expect)[0]) if total.shape == expect.shape else -1
                    raise AssertionError(f"{prefix} step {s}: reduce_objects returned {used}; the sum differs "
                                         f"from theirs (first bad element {bad})")
                verified += 1
            w = w - np.float32(lr / k) * total  # a fresh array: the one put before stays as it was
            del total
            if (s + 1) % V == 0:
                cc.put(f"{prefix}crc/{s + 1}", np.array([zlib.crc32(w.tobytes())], np.uint32), timeout=tmo)
            cc.put(f"{prefix}w/{s + 1}", w, copy=False, timeout=tmo)
            t2 = time.time()
            published.append(t2)
            cc.delete(f"{prefix}sum/{s}", timeout=tmo)
            old = s + 1 - lag
            if old >= 0:
                cc.delete(f"{prefix}w/{old}", timeout=tmo)
                if old % V == 0:
                    cc.delete(f"{prefix}crc/{old}", timeout=tmo)
            steps.append({"s": s, "reduce_start": t0, "reduced": t1, "published": t2, "end": time.time(),
                          "used": [int(key.rsplit("/", 1)[1]) for key in used], "ok": ok})
        t_end = published[-1]
        cc.barrier(timeout=tmo)  # every worker is done reading and putting
        for j in range(max(0, N + 1 - lag), N + 1):
            cc.delete(f"{prefix}w/{j}", timeout=tmo)
            if j % V == 0:
                cc.delete(f"{prefix}crc/{j}", timeout=tmo)
        cc.barrier(timeout=tmo)
        return {"t_start": t_start, "t_end": t_end, "published": published, "steps": steps,
                "verified_steps": verified, "crc_w": zlib.crc32(w.tobytes()), "store_used_end": store_used()}

    # ------------------------------------------------------------------ async, a worker
    def exists(key: str) -> bool:
        try:
            cc.object_info(key, timeout=tmo)
            return True
        except ObjectDeleted:  # never put, or deleted already (then get of an older one fails too)
            return False

    def worker(prefix: str, k: int, sc: int, rnd: int) -> dict:
        cc.barrier(timeout=tmo)
        t, mine_keys, steps = -1, [], []
        deleted_under_get, crc_checked, probes = 0, 0, 0
        while True:
            t_look = time.time()
            target = t + 1
            while target < N:
                probes += 1
                if not exists(f"{prefix}w/{target + 1}"):
                    break
                target += 1
            if target >= N:
                break
            t_probed = time.time()
            try:
                wt = cc.get(f"{prefix}w/{target}", timeout=tmo)
            except (ObjectDeleted, ObjectLost):
                deleted_under_get += 1  # fell more than --lag steps behind: look further on
                t = target
                continue
            t_got = time.time()
            if target % V == 0:
                try:
                    want = int(cc.get(f"{prefix}crc/{target}", timeout=tmo)[0])
                except ObjectDeleted:
                    want = None
                if want is not None:
                    if zlib.crc32(wt) != want:
                        raise AssertionError(f"{prefix} worker {rank}: w/{target} has the wrong bytes (CRC32)")
                    crc_checked += 1
            del wt
            t_checked = time.time()
            time.sleep(draw(cfg, sc, rnd, rank, target))
            g = mine + c(target)
            t_computed = time.time()
            key = f"{prefix}g/{target}/{rank}"
            cc.put(key, g, copy=False, timeout=tmo)
            t_put = time.time()
            for old in mine_keys:  # w/target exists, so the reductions of our older gradients are complete
                cc.delete(old, timeout=tmo)
            mine_keys = [key]
            steps.append({"s": target, "look": t_look, "look2": t_probed, "got": t_got, "checked": t_checked, "computed": t_computed,
                          "put": t_put, "deleted": time.time(), "skipped": target - t - 1})
            t = target
        cc.barrier(timeout=tmo)  # the server has finished every reduction
        for key in mine_keys:
            cc.delete(key, timeout=tmo)
        cc.barrier(timeout=tmo)
        return {"steps": steps, "deleted_under_get": deleted_under_get, "crc_checked": crc_checked,
                "probes": probes, "store_used_end": store_used()}

    # ------------------------------------------------------------------ the schedule
    modes = modes_of(cfg["ks"])
    for sc, name in enumerate(cfg["scenarios"]):
        for rnd in range(cfg["rounds"]):
            order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]
            for mode in order:
                prefix = f"{name}/r{rnd}/{mode}/"
                if mode == "lockstep":
                    res = lockstep(sc, rnd)
                else:
                    k = int(mode.split("k")[1])
                    res = server(prefix, k) if rank == 0 else worker(prefix, k, sc, rnd)
                res.update({"scenario": name, "round": rnd, "mode": mode})
                runs.append(res)
                save()
    cc.barrier(timeout=tmo)
    meta["store_used_final"] = store_used()
    save()
    cc.shutdown()
    return 0


# =========================================================================== models without communication
def model_lockstep(cfg: dict, sc: int, rnd: int) -> float:
    """Updates/s if the allreduce took no time: each step lasts its slowest worker's compute."""
    total = sum(max(draw(cfg, sc, rnd, i, s) for i in range(1, WORKERS + 1)) for s in range(cfg["steps"]))
    return cfg["steps"] / total


def model_async(cfg: dict, sc: int, rnd: int, k: int) -> float:
    """Updates/s if gets, puts and reductions took no time (see the module docstring for the protocol)."""
    pub = [0.0]
    ready = {i: 0.0 for i in range(1, WORKERS + 1)}
    for s in range(cfg["steps"]):
        finish = {i: max(ready[i], pub[s]) + draw(cfg, sc, rnd, i, s) for i in ready}
        nxt = sorted(finish.values())[k - 1]
        for i in ready:
            if ready[i] < nxt:  # it is free before w/s+1 exists, so it computes step s
                ready[i] = finish[i]
        pub.append(nxt)
    return cfg["steps"] / pub[-1]


# =========================================================================== the driver
def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def dist_ms(xs: list[float]) -> dict:
    return {"n": len(xs), "mean": 1e3 * statistics.fmean(xs) if xs else None, "p50": 1e3 * pct(xs, 0.5),
            "p90": 1e3 * pct(xs, 0.9), "p99": 1e3 * pct(xs, 0.99), "max": 1e3 * max(xs) if xs else None}


def analyse(cfg: dict, ranks: dict) -> dict:
    """Per scenario, round and mode: updates/s, latency distributions, protocol counters."""
    by = {}
    for r, doc in ranks.items():
        for run in doc["runs"]:
            by.setdefault((run["scenario"], run["round"], run["mode"]), {})[r] = run
    rows = []
    for (name, rnd, mode), per in sorted(by.items()):
        sc = cfg["scenarios"].index(name)
        row = {"scenario": name, "round": rnd, "mode": mode}
        if mode == "lockstep":
            w1 = per.get(1)
            if not w1:
                continue
            st = w1["steps"]
            row["seconds"] = w1["t_end"] - w1["t_start"]
            row["updates_per_s"] = cfg["steps"] / row["seconds"]
            row["step_ms"] = dist_ms([x["end"] - x["start"] for x in st])
            row["allreduce_ms"] = dist_ms([x["reduced"] - x["computed"] for x in st])
            row["verified_steps"] = sum(1 for x in st if x["ok"])
            row["model_updates_per_s"] = model_lockstep(cfg, sc, rnd)
            row["slowest_compute_ms"] = dist_ms([max(draw(cfg, sc, rnd, i, s) for i in range(1, WORKERS + 1))
                                                 for s in range(cfg["steps"])])
            row["final_weights_crc_same_on_all_workers"] = len({p["crc_w"] for p in per.values() if "crc_w" in p}) == 1
        else:
            k = int(mode.split("k")[1])
            srv = per.get(0)
            if not srv:
                continue
            pub = srv["published"]
            row["seconds"] = srv["t_end"] - srv["t_start"]
            row["updates_per_s"] = cfg["steps"] / row["seconds"]
            row["step_ms"] = dist_ms([b - a for a, b in zip(pub, pub[1:])])
            row["reduce_objects_ms"] = dist_ms([x["reduced"] - x["reduce_start"] for x in srv["steps"]])
            row["update_and_put_ms"] = dist_ms([x["published"] - x["reduced"] for x in srv["steps"]])
            row["verified_steps"] = srv["verified_steps"]
            row["model_updates_per_s"] = model_async(cfg, sc, rnd, k)
            wk = {i: per[i] for i in range(1, WORKERS + 1) if i in per}
            workers = list(wk.values())
            puts = sum(len(w["steps"]) for w in workers)
            used = sum(len(x["used"]) for x in srv["steps"])
            row["gradients_put"] = puts
            row["gradients_used"] = used
            row["gradients_late"] = puts - used
            row["weights_skipped"] = sum(x["skipped"] for w in workers for x in w["steps"])
            row["deleted_under_get"] = sum(w["deleted_under_get"] for w in workers)
            row["weights_crc_checked"] = sum(w["crc_checked"] for w in workers)
            use_count = {i: 0 for i in range(1, WORKERS + 1)}
            for x in srv["steps"]:
                for i in x["used"]:
                    use_count[i] += 1
            row["used_per_worker"] = use_count
            row["get_ms"] = dist_ms([x["got"] - x["look"] for w in workers for x in w["steps"]])
            # the critical path of step s: w/s published -> k-th gradient of s put (a get of w/s + compute)
            # -> reduce_objects returns -> w/s+1 published (get of the sum, check, update, put)
            puts: dict[int, list[float]] = {}
            for w in workers:
                for x in w["steps"]:
                    puts.setdefault(x["s"], []).append(x["put"])
            to_kth, tail = [], []
            for x in srv["steps"]:
                p = sorted(puts.get(x["s"], []))
                if len(p) >= k:
                    to_kth.append(p[k - 1] - pub[x["s"]])
                    tail.append(x["reduced"] - p[k - 1])
            row["published_to_kth_put_ms"] = dist_ms(to_kth)
            row["kth_put_to_reduced_ms"] = dist_ms(tail)
            # a get's transfer: from when it could start (probed, and w/target existed) to its return
            row["get_transfer_ms"] = dist_ms([x["got"] - max(x["look2"], pub[x["s"]]) for w in workers
                                              for x in w["steps"]])
            row["worker_put_ms"] = dist_ms([x["put"] - x["computed"] for w in workers for x in w["steps"]])
            row["worker_crc_check_ms"] = dist_ms([x["checked"] - x["got"] for w in workers for x in w["steps"]
                                                  if x["s"] % cfg["verify_every"] == 0])
            row["worker_look_ms"] = dist_ms([x["look2"] - x["look"] for w in workers for x in w["steps"]
                                             if "look2" in x])
            row["compute_ms"] = dist_ms([draw(cfg, sc, rnd, i, x["s"]) for i, w in wk.items() for x in w["steps"]])
            row["store_bytes_after"] = {r: p.get("store_used_end") for r, p in per.items()}
            row["updates_over_time"] = [round(t - srv["t_start"], 4) for t in pub]
        if mode == "lockstep":
            row["updates_over_time"] = [0.0] + [round(x["end"] - per[1]["t_start"], 4) for x in per[1]["steps"]]
        rows.append(row)
    summary = {}
    for name in cfg["scenarios"]:
        s = {}
        for mode in modes_of(cfg["ks"]):
            xs = [r["updates_per_s"] for r in rows if r["scenario"] == name and r["mode"] == mode]
            ms = [r["model_updates_per_s"] for r in rows if r["scenario"] == name and r["mode"] == mode]
            if xs:
                s[mode] = {"updates_per_s_median": statistics.median(xs), "per_round": xs,
                           "model_updates_per_s_median": statistics.median(ms)}
        if "lockstep" in s:
            for mode in s:
                s[mode]["ratio_to_lockstep"] = s[mode]["updates_per_s_median"] / s["lockstep"]["updates_per_s_median"]
        summary[name] = s
    return {"rows": rows, "summary": summary}


def report(res: dict) -> None:
    for name, s in res["summary"].items():
        print(f"\n== {name}")
        for mode, v in s.items():
            print(f"  {mode:10s} {v['updates_per_s_median']:7.2f} updates/s (rounds: "
                  f"{', '.join(f'{x:.2f}' for x in v['per_round'])})  x{v.get('ratio_to_lockstep', float('nan')):.2f} "
                  f"vs lockstep   [no-communication model {v['model_updates_per_s_median']:.2f}/s]")
    print()
    for r in res["rows"]:
        extra = ""
        if r["mode"] == "lockstep":
            extra = f"allreduce p50 {r['allreduce_ms']['p50']:.1f} ms p90 {r['allreduce_ms']['p90']:.1f}"
        else:
            extra = (f"path p50: w/s -> k-th put {r['published_to_kth_put_ms']['p50']:.1f} ms (get transfer "
                     f"{r['get_transfer_ms']['p50']:.1f}, compute {r['compute_ms']['p50']:.1f}), -> reduced "
                     f"{r['kth_put_to_reduced_ms']['p50']:.1f}, -> w/s+1 {r['update_and_put_ms']['p50']:.1f}; "
                     f"grads put {r['gradients_put']} used {r['gradients_used']} late {r['gradients_late']}; "
                     f"weights skipped {r['weights_skipped']}; deleted under get {r['deleted_under_get']}")
        print(f"  {r['scenario']:9s} r{r['round']} {r['mode']:10s} {r['updates_per_s']:6.2f}/s  step p50 "
              f"{r['step_ms']['p50']:6.1f} p90 {r['step_ms']['p90']:6.1f} p99 {r['step_ms']['p99']:6.1f} max "
              f"{r['step_ms']['max']:6.1f} ms; verified {r['verified_steps']}; {extra}")


def plot(doc: dict, path: Path) -> None:
    """One row per label: updates/s bars (with the no-communication model), then updates over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(doc["runs"])
    cols = 1 + max(len(doc["runs"][lb]["results"]["summary"]) for lb in labels)
    fig, axes = plt.subplots(len(labels), cols, figsize=(5.2 * cols, 4.3 * len(labels)), squeeze=False)
    for row_axes, label in zip(axes, labels):
        run = doc["runs"][label]
        res, cfg = run["results"], run["config"]
        names = list(res["summary"])
        modes = modes_of(cfg["ks"])
        ax = row_axes[0]
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(names))]
            ys = [res["summary"][n].get(mode, {}).get("updates_per_s_median", 0) for n in names]
            ms = [res["summary"][n].get(mode, {}).get("model_updates_per_s_median", 0) for n in names]
            bars = ax.bar(xs, ys, width, label=mode)
            ax.scatter(xs, ms, marker="_", s=300, color="k", zorder=3,
                       label="no-communication model" if j == 0 else None)
            for b, y in zip(bars, ys):
                ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_ylabel("model updates / s (median of rounds)")
        ax.set_title(f"{label}: {cfg['model_bytes'] / 2**20:g} MiB model, median compute {cfg['base_ms']:g} ms",
                     fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        for ax in row_axes[1 + len(names):]:
            ax.axis("off")
        for ax, name in zip(row_axes[1:], names):
            for mode in modes:
                rows = [r for r in res["rows"] if r["scenario"] == name and r["mode"] == mode]
                for r in rows[:1]:
                    ts = r["updates_over_time"]
                    ax.step(ts, range(len(ts)), where="post", label=f"{mode} ({r['updates_per_s']:.1f}/s)")
            ax.set_xlabel("seconds since the mode's start (round 0)")
            ax.set_ylabel("updates published")
            what = f"sigma {cfg['sigma']:g}" if name == "lognormal" else f"worker 8 x{cfg['straggler_factor']:g}"
            ax.set_title(f"{label} / {name} ({what})", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("async parameter server on objects (reduce first k of 8, get weights) vs lockstep allreduce; "
                 "9 ranks, 2 cores, loopback; compute = sleep", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    if "--rank" in sys.argv:
        return rank_main()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="model updates per mode and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per scenario (modes rotated per round)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--ks", default="6,8", help="num_required values of the async modes")
    ap.add_argument("--model-bytes", type=int, default=4 << 20)
    ap.add_argument("--base-ms", type=float, default=20.0, help="median simulated compute per step")
    ap.add_argument("--sigma", type=float, default=0.5, help="lognormal: sigma of log(compute)")
    ap.add_argument("--straggler-factor", type=float, default=3.0, help="straggler: worker 8 this much slower")
    ap.add_argument("--lag", type=int, default=3, help="the server deletes w/s once w/s+lag is put")
    ap.add_argument("--verify-every", type=int, default=4, help="check sums and weights every this many steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--op-timeout", type=float, default=60, help="timeout of every collcomm call in the job (s)")
    ap.add_argument("--job-timeout", type=float, default=540, help="wall-clock bound of the job (s)")
    ap.add_argument("--label", default="default", help="results are kept per label; a label run again is replaced")
    ap.add_argument("--out", default=str(HERE / "results" / "objects_param_server.json"))
    ap.add_argument("--plot", default=str(HERE / "objects_param_server.png"))
    args = ap.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    ks = [int(k) for k in args.ks.split(",")]
    if any(not 1 <= k <= WORKERS for k in ks) or args.lag < 2 or args.model_bytes % 4 or args.steps < 1:
        ap.error("k in 1..8, --lag >= 2, --model-bytes a multiple of 4")
    if args.model_bytes <= 64 << 10:
        print("note: objects of at most 64 KiB live in the directory (a star), not on chains")
    import collcomm

    wall0 = time.monotonic()
    root = Path(collcomm.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=30).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
    print(f"collcomm from {collcomm.__file__} at {commit}{' (dirty)' if dirty else ''}", flush=True)
    command = f"PYTHONPATH={os.environ.get('PYTHONPATH', '')} python bench/objects_param_server.py " + \
        " ".join(sys.argv[1:])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ops-") as tmp:
        cfg = {"steps": args.steps, "rounds": args.rounds, "scenarios": scenarios, "ks": ks,
               "model_bytes": args.model_bytes, "base_ms": args.base_ms, "sigma": args.sigma,
               "straggler_factor": args.straggler_factor, "lag": args.lag, "verify_every": args.verify_every,
               "lr": args.lr, "seed": args.seed, "op_timeout": args.op_timeout, "out_dir": tmp}
        env = dict(os.environ, OPS_CONFIG=json.dumps(cfg), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "collcomm.cli", "run", "-n", str(WORKERS + 1), "--timeout",
               str(args.op_timeout), sys.executable, str(Path(__file__).resolve()), "--rank"]
        log = Path(tmp) / "job.log"
        print(f"== job: collcomm {' '.join(cmd[3:]).replace(sys.executable, 'python')}", flush=True)
        code, seconds = run_bounded(cmd, env, args.job_timeout, log, cwd=tmp)  # cwd: not /work/main
        text = log.read_text(errors="replace")
        ranks = {}
        for r in range(WORKERS + 1):
            f = Path(tmp) / f"rank{r}.json"
            if f.exists():
                ranks[r] = json.loads(f.read_text())
    files = {r: d["meta"]["collcomm"] for r, d in ranks.items()}
    expected = str(root / "collcomm" / "__init__.py")
    wrong = {r: f for r, f in files.items() if str(Path(f).resolve()) != expected}
    cfg.pop("out_dir")
    run = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command, "commit": commit,
           "dirty": bool(dirty), "machine": f"{platform.machine()}, {os.cpu_count()} cores, loopback",
           "collcomm_file": expected, "ranks_importing_another_collcomm": wrong, "config": cfg,
           "job_exit": code, "job_seconds": seconds, "loadavg_1_5_15_before": load_before,
           "loadavg_1_5_15_after": os.getloadavg(),
           "store_bytes_final": {r: d["meta"].get("store_used_final") for r, d in ranks.items()},
           "compute": "simulated with time.sleep (CPU left free for the communication)"}
    if code != 0:
        run["log_tail"] = text[-6000:]
        print(text[-6000:])
    run["results"] = analyse(cfg, ranks)
    run["wall_seconds"] = time.monotonic() - wall0
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.setdefault("runs", {})[args.label] = run
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    report(run["results"])
    print(f"\nload average before {load_before[0]:.2f}, after {run['loadavg_1_5_15_after'][0]:.2f} (1 min; other jobs "
          f"on the machine share its 2 cores)")
    print(f"job exit {code}, job {seconds:.1f} s, wall {run['wall_seconds']:.1f} s; store bytes at the end "
          f"{run['store_bytes_final']}; ranks importing another collcomm: {wrong or 'none'}")
    if run["results"]["rows"]:
        try:
            plot(doc, Path(args.plot))
        except Exception as e:  # noqa: BLE001
            print(f"plot failed: {type(e).__name__}: {e}")
    return 0 if code == 0 and not wrong else 1


if __name__ == "__main__":
    raise SystemExit(main())
