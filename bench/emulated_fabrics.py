"""Schedules on real, shaped links: every algorithm and gloo over emulated fabrics.

    sudo python3 bench/emulated_fabrics.py                       # the three fabrics below
    sudo python3 bench/emulated_fabrics.py --fabrics two_box --iters 5

Each fabric of bench/topologies/ is built with `collcomm emulate` (a network namespace per
node, tc tbf on every veth at the scaled bandwidth) and one job of N ranks runs inside it.
In that job, per collective (allreduce, allgather), every collcomm algorithm (forestcoll,
ring with rank reordering, double binary tree, halving-doubling) and torch.distributed's
gloo run in turn in the same processes over the same links: a warm-up, then ``--iters``
timed operations (each after a barrier; time = the slowest rank's; the median is kept).
algbw = buffer bytes / time (allreduce) or output bytes / time (allgather), as nccl-tests.
The model optimum is ForestColl's exact cut bound at the emulated (scaled) bandwidths, so
"fraction" = measured algbw / optimum. Writes bench/results/emulated_fabrics.json and a PNG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALGORITHMS = ("forestcoll", "ring", "tree", "halving-doubling")
# fabric file, scale, buffer size: rates low enough that 2 cores are not the bottleneck.
FABRICS = {
    "two_box": ("two_box.json", "1GB/s=50Mbit", 64 << 20),
    "leaf_spine_2to1": ("leaf_spine_2to1.json", "1GB/s=100Mbit", 32 << 20),
    "oneway_ring": ("oneway_ring.json", "1GB/s=100Mbit", 32 << 20),
}


# --------------------------------------------------------------------------- inside the job
def rank_main() -> int:
    from datetime import timedelta

    import numpy as np
    import torch
    import torch.distributed as dist

    import collcomm as cc
    from collcomm.api import runtime

    nbytes, iters = int(os.environ["BENCH_BYTES"]), int(os.environ["BENCH_ITERS"])
    cc.init(timeout=600)
    rank, n = cc.rank(), cc.world_size()
    dist.init_process_group("gloo", rank=rank, world_size=n, timeout=timedelta(seconds=600))
    results = []

    def slowest(seconds: float) -> float:
        t = np.array([seconds])
        cc.allreduce(t, op="max")
        return float(t[0])

    def measure(run, check) -> float:
        times = []
        for i in range(iters + 1):
            cc.barrier()
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            check()
            if i:
                times.append(slowest(dt))
        return statistics.median(times)

    count = nbytes // 4
    algorithms = os.environ.get("BENCH_ALGORITHMS", ",".join(ALGORITHMS)).split(",")
    with_gloo = os.environ.get("BENCH_GLOO", "1") == "1"
    for collective in os.environ.get("BENCH_COLLECTIVES", "allreduce,allgather").split(","):
        if collective == "allreduce":
            x = np.empty(count, np.float32)
            want = np.float32(n * (n + 1) / 2)

            def fill():
                x[:] = rank + 1

            def run_cc():
                fill(); cc.allreduce(x)

            def check():
                assert np.all(x == want), "allreduce result wrong"

            tx = torch.empty(count, dtype=torch.float32)

            def run_gloo():
                tx.fill_(rank + 1); dist.all_reduce(tx)

            def check_gloo():
                assert bool((tx == float(want)).all()), "gloo allreduce result wrong"
        else:
            shard = count // n
            out = np.empty(shard * n, np.float32)
            mine = np.full(shard, rank, np.float32)
            want_ag = np.repeat(np.arange(n, dtype=np.float32), shard)

            def run_cc():
                cc.allgather(out, mine)

            def check():
                assert np.array_equal(out, want_ag), "allgather result wrong"

            tout = torch.empty(shard * n, dtype=torch.float32)
            tmine = torch.full((shard,), float(rank))

            def run_gloo():
                getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(tout, tmine)

            def check_gloo():
                assert np.array_equal(tout.numpy(), want_ag), "gloo allgather result wrong"
        size = count * 4 if collective == "allreduce" else (count // n) * n * 4
        for algorithm in algorithms:
            runtime().algorithm = algorithm
            t = measure(run_cc, check)
            results.append({"collective": collective, "library": "collcomm", "algorithm": algorithm,
                            "bytes": size, "seconds": t, "algbw": size / t})
            if rank == 0:
                print(f"{collective:10} {algorithm:17} {t * 1e3:10.1f} ms {size / t / 1e6:8.2f} MB/s", flush=True)
        if not with_gloo:
            continue
        t = measure(run_gloo, check_gloo)
        results.append({"collective": collective, "library": "gloo", "algorithm": "gloo",
                        "bytes": size, "seconds": t, "algbw": size / t})
        if rank == 0:
            print(f"{collective:10} {'gloo':17} {t * 1e3:10.1f} ms {size / t / 1e6:8.2f} MB/s", flush=True)
    if rank == 0:
        Path(os.environ["BENCH_OUT"]).write_text(json.dumps(results))
    dist.destroy_process_group()
    cc.shutdown()
    return 0


# --------------------------------------------------------------------------- the driver
def model(topo_path: Path, scale: str) -> dict:
    """Per collective and algorithm: the model algbw at the emulated rates, bytes/s (and the optimum)."""
    from collcomm.schedules import generate
    from collcomm import emulation as emulate
    from collcomm.topology import jsonio

    topo = jsonio.load(topo_path)
    bytes_per_gbps = emulate.parse_scale(scale) / 8  # bytes/s of goodput per GB/s of topology bandwidth
    out = {}
    for collective in ("allreduce", "allgather"):
        for algorithm in ALGORITHMS:
            try:
                bw = generate(topo, collective, algorithm).algbw
            except Exception:  # noqa: BLE001 - "no plan" on this fabric
                bw = None
            out[(collective, algorithm)] = None if bw is None else float(Fraction(bw) * bytes_per_gbps)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fabric(name: str, iters: int, chunk: str, size: int | None = None) -> dict:
    from collcomm.launcher import run as launch
    from collcomm.topology import jsonio

    file, scale, nbytes = FABRICS[name]
    nbytes = size or nbytes
    path = HERE / "topologies" / file
    topo = jsonio.load(path)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        env = {"BENCH_BYTES": str(nbytes), "BENCH_ITERS": str(iters), "BENCH_OUT": str(out),
               "MASTER_PORT": str(free_port()), "COLLCOMM_CHUNK_BYTES": chunk, "OMP_NUM_THREADS": "1"}
        print(f"== {name}: {topo.num_ranks} ranks, scale {scale}, {nbytes >> 20} MB", flush=True)
        code = launch(topo.num_ranks, [sys.executable, __file__, "--rank"], env=env, emulate=str(path),
                      scale=scale, prefix="ccbench")
        if code != 0:
            raise SystemExit(f"the job on {name} failed with exit code {code}")
        rows = json.loads(out.read_text())
    expected = model(path, scale)
    optimum = {c: expected[(c, "forestcoll")] for c in ("allreduce", "allgather")}
    for r in rows:
        r["model_algbw"] = expected.get((r["collective"], r["algorithm"]))
        r["optimum_algbw"] = optimum[r["collective"]]
        r["fraction_of_optimum"] = r["algbw"] / optimum[r["collective"]]
    return {"fabric": name, "topology": str(path.relative_to(HERE.parent)), "scale": scale, "bytes": nbytes,
            "ranks": topo.num_ranks, "rows": rows}


def probed_versus_true(name: str, iters: int, chunk: str) -> dict:
    """Probe the emulated fabric, then run ForestColl allreduce planned on the probed file and on
    the true file, alternately, in separate jobs over the same shaped links."""
    import subprocess

    from collcomm.launcher import run as launch
    from collcomm.topology import jsonio

    file, scale, nbytes = FABRICS[name]
    path = HERE / "topologies" / file
    topo = jsonio.load(path)
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / "probed.json"
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "collcomm.cli", "topology", "--probe", "--emulate", str(path),
                        "--scale", scale, "--prefix", "ccbench", "-o", str(probed)], check=True,
                       stdout=subprocess.DEVNULL)
        probe_seconds = time.monotonic() - t0
        saved = json.loads(probed.read_text())
        times = {"true": [], "probed": []}
        for _ in range(2):
            for which, planner_file in (("true", path), ("probed", probed)):
                out = Path(tmp) / f"times-{which}.json"
                env = {"BENCH_BYTES": str(nbytes), "BENCH_ITERS": str(iters), "BENCH_OUT": str(out),
                       "MASTER_PORT": str(free_port()), "COLLCOMM_CHUNK_BYTES": chunk, "OMP_NUM_THREADS": "1",
                       "BENCH_ALGORITHMS": "forestcoll", "BENCH_GLOO": "0", "BENCH_COLLECTIVES": "allreduce"}
                code = launch(topo.num_ranks, [sys.executable, __file__, "--rank"], env=env, emulate=str(path),
                              topology=str(planner_file), scale=scale, prefix="ccbench")
                if code != 0:
                    raise SystemExit(f"the {which}-topology job on {name} failed with exit code {code}")
                times[which].append(json.loads(out.read_text())[0]["seconds"])
    best = {k: min(v) for k, v in times.items()}
    return {"fabric": name, "bytes": nbytes, "probe_seconds": probe_seconds, "probed_topology": saved,
            "seconds": times, "probed_over_true_time": best["probed"] / best["true"]}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    libs = list(ALGORITHMS) + ["gloo"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, collective in zip(axes, ("allreduce", "allgather")):
        width = 0.8 / len(libs)
        for k, lib in enumerate(libs):
            ys = [next(r["fraction_of_optimum"] for r in run["rows"]
                       if r["collective"] == collective and r["algorithm"] == lib) for run in runs]
            ax.bar([i + k * width for i in range(len(runs))], ys, width, label=lib)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))], [r["fabric"] for r in runs])
        ax.set_title(f"{collective}: measured algbw / model optimum")
    axes[0].set_ylabel("fraction of the cut bound at the shaped rates")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    if "--rank" in sys.argv:
        return rank_main()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fabrics", default=",".join(FABRICS), help="comma-separated: " + ", ".join(FABRICS))
    ap.add_argument("--iters", type=int, default=3, help="timed operations per algorithm (median kept)")
    ap.add_argument("--chunk", default=str(256 << 10), help="COLLCOMM_CHUNK_BYTES for the shaped links")
    ap.add_argument("--bytes", help="buffer size for every fabric instead of its default (e.g. 1M for a smoke run)")
    ap.add_argument("--plot", default=str(HERE / "emulated_fabrics.png"))
    ap.add_argument("--probe", metavar="FABRIC", help="also probe this fabric and compare the plan built from the "
                                                        "probed topology with the plan built from the true file")
    args = ap.parse_args()
    names = [f for f in args.fabrics.split(",") if f]
    unknown = [f for f in names if f not in FABRICS]
    if unknown:
        ap.error(f"unknown fabric {unknown[0]!r}; choose from {', '.join(FABRICS)}")
    size = None
    if args.bytes:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(float(args.bytes[:-1]) * units[args.bytes[-1].upper()]) if args.bytes[-1].upper() in units \
            else int(args.bytes)
    results = HERE / "results" / "emulated_fabrics.json"
    command = "python3 bench/emulated_fabrics.py " + " ".join(sys.argv[1:])
    if names:
        runs = [run_fabric(name, args.iters, args.chunk, size) for name in names]
        doc = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "command": command, "runs": runs}
        (HERE / "results").mkdir(exist_ok=True)
        results.write_text(json.dumps(doc, indent=1))
    else:  # --fabrics "" --probe F: redo only the probe comparison, keep the fabric runs on file
        doc = json.loads(results.read_text())
        runs = doc["runs"]
        doc["probe_command"] = command
    for run in runs:
        print(f"\n{run['fabric']} ({run['ranks']} ranks, {run['scale']}, {run['bytes'] >> 20} MB)")
        print(f"{'collective':10} {'algorithm':17} {'algbw MB/s':>10} {'model MB/s':>10} {'of optimum':>10}")
        for r in run["rows"]:
            m = "-" if r["model_algbw"] is None else f"{r['model_algbw'] / 1e6:.2f}"
            print(f"{r['collective']:10} {r['algorithm']:17} {r['algbw'] / 1e6:10.2f} {m:>10} "
                  f"{r['fraction_of_optimum']:10.3f}")
    if names:
        plot(runs, Path(args.plot))
    if args.probe:
        doc["probe"] = probed_versus_true(args.probe, args.iters, args.chunk)
        p = doc["probe"]
        print(f"\nprobe of {p['fabric']}: {p['probe_seconds']:.1f} s; ForestColl allreduce planned on the probed "
              f"topology takes {p['probed_over_true_time']:.3f}x the time of the plan on the true file "
              f"(seconds: {p['seconds']})")
        results.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
