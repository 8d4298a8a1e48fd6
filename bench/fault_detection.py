"""Fault detection and rerouting on the emulated two-box fabric: detection latency and throughput.

    sudo python3 bench/fault_detection.py                  # default: 5 runs per fault, the curve, PNG + JSON
    sudo python3 bench/fault_detection.py --runs 2 --faults throttle

The fabric bench/topologies/two_box.json is built with `collcomm emulate` (a network namespace
per node, tc tbf per link direction at the scaled rate). One job of 8 ranks runs an allreduce
loop (exact results checked on every rank after every operation) with the link monitor on
(every operation is a round). Rank 0 injects the fault itself, through the same API as
`collcomm emulate fault`, right before a known operation:

* ``throttle``: box0.gpu0 -> net shaped to 10% of its planned rate;
* ``down``: the link box0.gpu0 <-> net drops every packet both ways (a black hole).

For each run: detection latency in operations and seconds from the fault to the flag (the
first monitor decision that marks a rank pair crossing the link not healthy) and to the plan
switch (the first operation run on the new plan), and the algbw after the switch against the
model optimum of the fabric without that link (ForestColl's exact cut bound, computed with the
project's evaluator on the reduced topology, at the emulated rates). One longer run draws the
throughput over time around a throttle: before, during, after the reroute, and after
``--up`` with the link's return after its probation. algbw of operation i = buffer bytes /
(the time the last rank finished i - the time the last rank finished i-1). Writes
bench/results/fault_detection.json and bench/fault_detection.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TWO_BOX = HERE / "topologies" / "two_box.json"
LINK = ("box0.gpu0", "net")
PREFIX = "ccfd"


# --------------------------------------------------------------------------- inside the job
def rank_main() -> int:
    import numpy as np

    import collcomm as cc
    from collcomm.api import runtime
    from collcomm import emulation as emu

    cfg = json.loads(os.environ["FD_CONFIG"])
    cc.init(timeout=cfg.get("timeout", 60.0))
    rt = runtime()
    me, n = cc.rank(), cc.world_size()
    count = cfg["bytes"] // 4
    x0 = (np.arange(count) % 11).astype(np.float32)
    want = x0 * n + np.float32(sum(range(n)))
    events = {int(e["op"]): e for e in cfg.get("events", [])}
    fabric = emu.current(cfg["prefix"]) if me == 0 and events else None
    g = rt.world
    mon_seconds = [0.0]
    if rt.monitor_every > 0:
        from collcomm.runtime.monitor import GroupMonitor

        g.monitor = GroupMonitor(g, rt.monitor_every)
        inner = g.monitor.before_operation

        def timed(seq, inner=inner):  # the monitor's own time per operation (reports, decision, switch)
            t = time.monotonic()
            try:
                inner(seq)
            finally:
                mon_seconds[0] = time.monotonic() - t

        g.monitor.before_operation = timed
    records = []
    x = np.empty_like(x0)
    for i in range(cfg["ops"]):
        ev = events.get(i)
        fault_t = None
        if ev is not None and me == 0:
            emu.fault(fabric, ev["a"], ev["b"], ev["mode"], ev.get("percent"))
            fault_t = time.monotonic()
        np.add(x0, me, out=x)
        t0 = time.monotonic()
        err = err_peer = None
        try:
            cc.allreduce(x)
        except cc.CollectiveError as e:
            err = f"{type(e).__name__}: {e}"
            err_peer = getattr(e, "rank", None)  # the peer a PeerFailure or LinkFailure names
        t1 = time.monotonic()
        mon = rt.world.monitor
        rec = {"i": i, "t0": t0, "t1": t1, "ok": err is None and bool(np.array_equal(x, want)), "error": err,
               "error_peer": err_peer,
               "plan_epoch": mon.plan_epoch if mon is not None else 0, "monitor_seconds": mon_seconds[0],
               "chunk_bytes": g.chunk_bytes}
        if fault_t is not None:
            rec["fault_t"] = fault_t
            rec["fault"] = ev
        if me == 0 and mon is not None:
            rec["flagged"] = sorted([list(v.link), v.state] for v in mon.verdicts.values() if v.state != "healthy")
            rec["evidence"] = {f"{v.link[0]}->{v.link[1]}": {k: v.evidence.get(k) for k in
                                                             ("rate", "peer_ratio", "own_ratio", "sigma", "low_run")}
                               for v in mon.verdicts.values() if v.link in ((0, 4), (4, 0))}
        records.append(rec)
    mon = rt.world.monitor
    out = {"rank": me, "records": records, "changes": mon.changes if mon is not None else []}
    Path(cfg["out"], f"rank{me}.json").write_text(json.dumps(out))
    cc.shutdown()
    return 0


# --------------------------------------------------------------------------- the driver
def scaled_optimum(topo, scale: str, collective: str = "allreduce") -> float:
    """ForestColl's exact cut bound of ``topo`` at the emulated rates, bytes/s."""
    from collcomm.schedules import evaluate, generate
    from collcomm import emulation as emulate

    s = generate(topo, collective, "forestcoll")
    bw = evaluate.algbw(s, topo)
    return float(Fraction(bw) * emulate.parse_scale(scale) / 8)


def optima(scale: str) -> dict:
    from collcomm.faults.decisions import reroute
    from collcomm.topology import jsonio

    topo = jsonio.load(TWO_BOX)
    a, b = LINK
    return {"healthy": scaled_optimum(topo, scale),
            "without_direction": scaled_optimum(reroute(topo, {(a, b): Fraction(0)}), scale),
            "without_link": scaled_optimum(reroute(topo, {(a, b): Fraction(0), (b, a): Fraction(0)}), scale)}


def run_job(*, ops: int, nbytes: int, events: list[dict], scale: str, chunk: int, every: int = 1,
            timeout: float = 60.0, prefix: str = PREFIX, extra_env: dict | None = None,
            topology: Path | str = TWO_BOX) -> dict:
    """One allreduce loop of ``ops`` operations on the emulated fabric of ``topology`` (built and
    torn down here, under ``prefix``), one rank per compute node; ``events``: ``{"op", "a", "b",
    "mode", "percent"}``, faults (:func:`collcomm.emulation.fault`) that rank 0 injects right
    before operation ``op``. Returns :func:`analyse` of the ranks' records."""
    from collcomm.launcher import run as launch
    from collcomm import emulation as emu
    from collcomm.topology import jsonio

    topology = Path(topology)
    topo = jsonio.load(topology)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"ops": ops, "bytes": nbytes, "events": events, "prefix": prefix, "out": tmp, "timeout": timeout}
        env = {"FD_CONFIG": json.dumps(cfg), "COLLCOMM_MONITOR_EVERY": str(every), "OMP_NUM_THREADS": "1",
               **({"COLLCOMM_CHUNK_BYTES": str(chunk)} if chunk else {}), **(extra_env or {})}
        emu.up(emu.plan(topo, prefix, scale))
        try:
            t = time.monotonic()
            code = launch(topo.num_ranks, [sys.executable, str(Path(__file__).resolve()), "--rank"], env=env,
                          emulate=str(topology), scale=scale, prefix=prefix, timeout=timeout * 4 + ops * 5)
            wall = time.monotonic() - t
        finally:
            emu.down(prefix)
        if code != 0:
            raise RuntimeError(f"the job failed with exit code {code}")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(topo.num_ranks)]
    return analyse(ranks, nbytes, wall)


def analyse(ranks: list[dict], nbytes: int, wall: float) -> dict:
    n_ops = len(ranks[0]["records"])
    done = [max(r["records"][i]["t1"] for r in ranks) for i in range(n_ops)]
    start = min(r["records"][0]["t0"] for r in ranks)
    algbw = [nbytes / (done[i] - (done[i - 1] if i else start)) for i in range(n_ops)]
    # The collective alone: from the last rank entering it (after its monitor round) to the last
    # rank leaving it.
    entered = [max(r["records"][i]["t0"] + r["records"][i]["monitor_seconds"] for r in ranks) for i in range(n_ops)]
    coll_algbw = [nbytes / max(done[i] - entered[i], 1e-9) for i in range(n_ops)]
    r0 = ranks[0]["records"]
    wrong = {r["rank"]: [x["i"] for x in r["records"] if not x["ok"] and x["error"] is None] for r in ranks}
    seconds = {r["rank"]: [x["t1"] - x["t0"] for x in r["records"]] for r in ranks}
    errors = {r["rank"]: [[x["i"], x["error"]] for x in r["records"] if x["error"]] for r in ranks}
    error_peers = {r["rank"]: [[x["i"], x.get("error_peer")] for x in r["records"] if x["error"]] for r in ranks}
    changes = ranks[0]["changes"]
    same_changes = all([c["at"] for c in r["changes"]] == [c["at"] for c in changes] for r in ranks)
    faults = [(x["i"], x["fault_t"], x["fault"]) for x in r0 if "fault_t" in x]
    return {"ops": n_ops, "bytes": nbytes, "wall_seconds": wall, "algbw": algbw, "collective_algbw": coll_algbw, "done": [d - start for d in done],
            "wrong": {k: v for k, v in wrong.items() if v}, "errors": {k: v for k, v in errors.items() if v},
            "error_peers": {k: v for k, v in error_peers.items() if v},
            "changes": changes, "same_changes_on_every_rank": same_changes,
            "faults": [{"op": i, "t": t - start, **f} for i, t, f in faults],
            "flagged": [x.get("flagged", []) for x in r0], "evidence": [x.get("evidence", {}) for x in r0],
            "t0_rank0": [x["t0"] - start for x in r0], "seconds": seconds,
            "plan_epochs": {r["rank"]: [x["plan_epoch"] for x in r["records"]] for r in ranks},
            "chunk_bytes": [x.get("chunk_bytes") for x in r0],
            "same_chunks_on_every_rank": all([x.get("chunk_bytes") for x in r["records"]] ==
                                             [x.get("chunk_bytes") for x in r0] for r in ranks),
            "monitor_seconds": {"rank0": [x["monitor_seconds"] for x in r0],
                                "others_max": [max(r["records"][i]["monitor_seconds"] for r in ranks[1:])
                                               for i in range(n_ops)]}}


def detection(res: dict, fault_index: int = 0) -> dict:
    """Operations and seconds from a fault to the flag and to the plan switch."""
    f = res["faults"][fault_index]
    op, t = f["op"], f["t"]
    flag_op = next((i for i in range(op + 1, res["ops"]) if res["flagged"][i]), None)
    change = next((c for c in res["changes"] if c["at"] > op), None)
    out = {"fault_op": op, "flag_op": flag_op, "switch_op": None if change is None else change["at"],
           "flag_ops": None if flag_op is None else flag_op - op,
           "flag_seconds": None if flag_op is None else res["t0_rank0"][flag_op] - t,
           "switch_ops": None if change is None else change["at"] - op,
           "switch_seconds": None if change is None or change["at"] >= res["ops"] else
           res["t0_rank0"][change["at"]] - t,
           "faults_after": change["faults"] if change else None}
    return out


def summarize(values: list) -> dict:
    vals = [v for v in values if v is not None]
    return {"median": statistics.median(vals) if vals else None, "max": max(vals) if vals else None,
            "missed": len(values) - len(vals)}


def fault_runs(kind: str, runs: int, args, opt: dict) -> dict:
    a, b = LINK
    fault = args.fault_at
    ev = {"op": fault, "a": a, "b": b, "mode": "bandwidth" if kind == "throttle" else "down", "percent": 10}
    ops = args.ops if kind == "throttle" else args.ops - 6
    timeout = 60.0 if kind == "throttle" else args.down_timeout
    rows = []
    for run in range(runs):
        res = run_job(ops=ops, nbytes=args.bytes, events=[ev], scale=args.scale, chunk=args.chunk, timeout=timeout)
        d = detection(res)
        sw = d["switch_op"]
        pre = res["collective_algbw"][2:fault]
        post = res["collective_algbw"][sw + 1:] if sw is not None else []
        lpost = res["algbw"][sw + 1:] if sw is not None else []
        row = {**{k: v for k, v in d.items() if k != "faults_after"},
               "blamed": [[f["link"][0], f["link"][1], f["state"], f["fraction"]] for f in (d["faults_after"] or [])],
               "wrong": res["wrong"], "failed_ops": sorted({i for e in res["errors"].values() for i, _ in e}),
               "error_types": sorted({e.split(":", 1)[0] for errs in res["errors"].values() for _, e in errs}),
               "first_error": min((e for errs in res["errors"].values() for e in errs), default=None),
               "flagged": {i: f for i, f in enumerate(res["flagged"]) if f},
               "collective_algbw": res["collective_algbw"],
               "failed_op_seconds_max": max([res["seconds"][r][i] for r, errs in res["errors"].items() for i, _ in errs],
                                            default=None),
               "same_changes_on_every_rank": res["same_changes_on_every_rank"],
               "healthy_algbw": statistics.median(pre), "rerouted_algbw": statistics.median(post) if post else None,
               "rerouted_loop_algbw": statistics.median(lpost) if lpost else None,
               "monitor_ms_rank0_median": 1e3 * statistics.median(res["monitor_seconds"]["rank0"][1:]),
               "wall_seconds": res["wall_seconds"]}
        row["healthy_of_optimum"] = row["healthy_algbw"] / opt["healthy"]
        row["rerouted_of_optimum_without_link"] = None if not post else row["rerouted_algbw"] / opt["without_link"]
        row["rerouted_loop_of_optimum_without_link"] = None if not lpost else row["rerouted_loop_algbw"] / opt["without_link"]
        rows.append(row)
        print(f"{kind} run {run}: flag +{d['flag_ops']} ops / {d['flag_seconds'] or float('nan'):.2f} s, switch "
              f"+{d['switch_ops']} ops / {d['switch_seconds'] or float('nan'):.2f} s, healthy "
              f"{row['healthy_of_optimum']:.2f}, rerouted {row['rerouted_of_optimum_without_link'] or float('nan'):.2f} "
              f"of the optimum; failed ops {row['failed_ops']} {row['error_types']}; wrong {res['wrong']}", flush=True)
    summary = {k: summarize([r[k] for r in rows]) for k in ("flag_ops", "flag_seconds", "switch_ops", "switch_seconds",
                                                            "healthy_of_optimum", "rerouted_of_optimum_without_link",
                                                            "rerouted_loop_of_optimum_without_link")}
    return {"fault": ev, "ops": ops, "timeout": timeout, "runs": rows, "summary": summary}


def curve_run(args, opt: dict) -> dict:
    a, b = LINK
    events = [{"op": args.curve_fault, "a": a, "b": b, "mode": "bandwidth", "percent": 10},
              {"op": args.curve_up, "a": a, "b": b, "mode": "up"}]
    res = run_job(ops=args.curve_ops, nbytes=args.bytes, events=events, scale=args.scale, chunk=args.chunk)
    marks = {"fault": args.curve_fault, "up": args.curve_up}
    d = detection(res, 0)
    marks["flag"], marks["switch"] = d["flag_op"], d["switch_op"]
    back = next((c for c in res["changes"] if c["at"] >= args.curve_up and not any(
        f["link"] == [a, b] for f in c["faults"])), None)
    marks["restored"] = None if back is None else back["at"]
    return {"events": events, "marks": marks, "changes": res["changes"], "algbw": res["algbw"],
            "collective_algbw": res["collective_algbw"], "done": res["done"], "wrong": res["wrong"],
            "errors": res["errors"], "flagged": res["flagged"], "optima": opt}


def plot(curve: dict, path: Path, scale: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opt = curve["optima"]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ops = list(range(len(curve["algbw"])))
    ax.plot(ops, [x / 1e6 for x in curve["algbw"]], marker="o", markersize=3, label="algbw per operation (loop)")
    ax.plot(ops, [x / 1e6 for x in curve["collective_algbw"]], marker=".", markersize=2, linewidth=0.8,
            alpha=0.7, label="the collective alone (without the monitor's round)")
    ax.axhline(opt["healthy"] / 1e6, color="black", linestyle="--", linewidth=0.8, label="model optimum, healthy")
    ax.axhline(opt["without_link"] / 1e6, color="gray", linestyle=":", linewidth=1.0,
               label="model optimum without box0.gpu0-net")
    colors = {"fault": "red", "flag": "orange", "switch": "green", "up": "purple", "restored": "blue"}
    text = {"fault": "throttled to 10%", "flag": "flagged", "switch": "new plan", "up": "link up",
            "restored": "link back in the plan"}
    height = {"fault": 0.98, "flag": 0.91, "switch": 0.84, "up": 0.98, "restored": 0.91}
    top = ax.get_ylim()[1]
    for k, op in curve["marks"].items():
        if op is not None:
            ax.axvline(op - 0.5, color=colors[k], linewidth=1.0, alpha=0.8)
            ax.text(op - 0.4, top * height[k], text[k], color=colors[k], fontsize=8, va="top")
    ax.set_xlabel("operation (4 MB allreduce, 8 ranks, monitor round every operation)")
    ax.set_ylabel("algbw MB/s")
    ax.set_title(f"two_box.json emulated at {scale}: box0.gpu0 -> net throttled to 10%, then back up")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    if "--rank" in sys.argv:
        return rank_main()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per fault kind")
    ap.add_argument("--faults", default="throttle,down")
    ap.add_argument("--ops", type=int, default=20, help="operations per throttle run (down runs: 6 fewer)")
    ap.add_argument("--fault-at", type=int, default=8)
    ap.add_argument("--down-timeout", type=float, default=5.0, help="cc.init(timeout=...) of the down runs")
    ap.add_argument("--bytes", type=int, default=4 << 20)
    ap.add_argument("--scale", default="1GB/s=50Mbit")
    ap.add_argument("--chunk", type=int, default=0,
                    help="chunk bytes (COLLCOMM_CHUNK_BYTES); 0, the default: the monitor sizes them")
    ap.add_argument("--curve-ops", type=int, default=48)
    ap.add_argument("--curve-fault", type=int, default=8)
    ap.add_argument("--curve-up", type=int, default=16)
    ap.add_argument("--no-curve", action="store_true")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON on file")
    ap.add_argument("--plot", default=str(HERE / "fault_detection.png"))
    ap.add_argument("--out", default=str(HERE / "results" / "fault_detection.json"))
    args = ap.parse_args()
    if args.replot:
        doc = json.loads(Path(args.out).read_text())
        plot(doc["curve"], Path(args.plot), doc["scale"])
        return 0
    opt = optima(args.scale)
    doc = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "load_average": os.getloadavg(), "command": "python3 bench/fault_detection.py " + " ".join(sys.argv[1:]),
           "fabric": str(TWO_BOX.relative_to(REPO)), "scale": args.scale, "bytes": args.bytes, "chunk": args.chunk,
           "link": list(LINK), "optima_bytes_per_second": opt}
    kinds = [k for k in args.faults.split(",") if k]
    if not kinds and Path(args.out).exists():  # --faults "": redo the curve, keep the runs on file
        old = json.loads(Path(args.out).read_text())
        doc.update({k: old[k] for k in ("throttle", "down", "command", "load_average") if k in old},
                   curve_command=doc["command"])
    for kind in kinds:
        doc[kind] = fault_runs(kind, args.runs, args, opt)
    if not args.no_curve:
        doc["curve"] = curve_run(args, opt)
        plot(doc["curve"], Path(args.plot), args.scale)
        m = doc["curve"]["marks"]
        print(f"curve: marks {m}; plan changes at {[c['at'] for c in doc['curve']['changes']]}", flush=True)
    doc["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    for kind in ("throttle", "down"):
        if kind in doc:
            print(kind, json.dumps(doc[kind]["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
