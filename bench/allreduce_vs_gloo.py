"""Allreduce busbw of collcomm against torch.distributed's gloo, same machine, same run.

    python bench/allreduce_vs_gloo.py                 # 2 and 4 ranks, 1 KB .. 256 MB
    python bench/allreduce_vs_gloo.py --ranks 2 --max-bytes 64M --plot bench/allreduce_vs_gloo.png

For each world size the two libraries run alternately (gloo, then collcomm, per
size) in separate processes on loopback: float32 sum, in place, a warm-up, then the
median of timed iterations; time is the slowest rank's. busbw = algbw * 2(n-1)/n
(nccl-tests). Peak memory per rank (VmHWM) is reported against the buffer size.
Writes bench/results/allreduce_vs_gloo.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def sizes_between(lo: int, hi: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 4
    return out


def iterations(nbytes: int) -> int:
    return 200 if nbytes <= 64 << 10 else 40 if nbytes <= 4 << 20 else 8 if nbytes <= 64 << 20 else 5


def peak_rss_kb() -> int:
    """VmHWM: this process's peak resident set (ru_maxrss would include the parent's, kept across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, sizes: list[int], results) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = []
    for nbytes in sizes:
        x = torch.zeros(nbytes // 4, dtype=torch.float32)
        for _ in range(2):
            dist.all_reduce(x)
        times = []
        for _ in range(iterations(nbytes)):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    results.put((rank, out, peak_rss_kb()))
    dist.destroy_process_group()


def _collcomm_worker(rank: int, world: int, coordinator: str, token: str, sizes: list[int], results,
                     algorithm: str | None) -> None:
    import numpy as np

    import collcomm as cc

    cc.init(rank, world, coordinator, token, algorithm=algorithm)
    out = []
    for nbytes in sizes:
        x = np.zeros(nbytes // 4, dtype=np.float32)
        for _ in range(2):
            cc.allreduce(x)
        times = []
        for _ in range(iterations(nbytes)):
            cc.barrier()
            t0 = time.perf_counter()
            cc.allreduce(x)
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    results.put((rank, out, peak_rss_kb()))
    cc.shutdown()


def run_job(kind: str, world: int, sizes: list[int], algorithm: str | None = None) -> tuple[list[float], int]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    server = None
    if kind == "gloo":
        port = free_port()
        procs = [ctx.Process(target=_gloo_worker, args=(r, world, port, sizes, results)) for r in range(world)]
    else:
        from collcomm.coordinator.server import CoordinatorServer

        token = os.urandom(16).hex()
        server = CoordinatorServer(token)
        address = server.start()
        procs = [ctx.Process(target=_collcomm_worker, args=(r, world, address, token, sizes, results, algorithm))
                 for r in range(world)]
    for p in procs:
        p.start()
    got = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    if server is not None:
        server.stop(0)
    per_size = [max(g[1][i] for g in got) for i in range(len(sizes))]
    peak_kb = max(g[2] for g in got)
    return per_size, peak_kb


def busbw(nbytes: int, seconds: float, world: int) -> float:
    return nbytes / seconds * 2 * (world - 1) / world / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4", help="world sizes, comma-separated")
    ap.add_argument("--min-bytes", default="1K")
    ap.add_argument("--max-bytes", default="256M")
    ap.add_argument("--algorithm", help="force one collcomm algorithm (default: the planner)")
    ap.add_argument("--plot", default=str(HERE / "allreduce_vs_gloo.png"))
    args = ap.parse_args()
    sizes = sizes_between(parse_size(args.min_bytes), parse_size(args.max_bytes))
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "command": "python " + " ".join(sys.argv), "runs": []}
    for world in [int(w) for w in args.ranks.split(",")]:
        rows = []
        for nbytes in sizes:  # alternate the libraries size by size so drift hits both alike
            g, g_peak = run_job("gloo", world, [nbytes])
            c, c_peak = run_job("collcomm", world, [nbytes], args.algorithm)
            rows.append({"bytes": nbytes, "gloo_s": g[0], "collcomm_s": c[0],
                         "gloo_busbw": busbw(nbytes, g[0], world), "collcomm_busbw": busbw(nbytes, c[0], world),
                         "ratio": g[0] / c[0], "gloo_peak_mb": g_peak / 1024, "collcomm_peak_mb": c_peak / 1024})
            r = rows[-1]
            print(f"n={world} {nbytes:>11} B  gloo {r['gloo_s'] * 1e6:10.1f} us {r['gloo_busbw']:6.2f} GB/s   "
                  f"collcomm {r['collcomm_s'] * 1e6:10.1f} us {r['collcomm_busbw']:6.2f} GB/s   "
                  f"speed-up {r['ratio']:5.2f}   peak MB gloo {r['gloo_peak_mb']:.0f} collcomm "
                  f"{r['collcomm_peak_mb']:.0f}", flush=True)
        report["runs"].append({"world": world, "rows": rows})
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "allreduce_vs_gloo.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, Path(args.plot))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["runs"]), figsize=(6 * len(report["runs"]), 4.2), squeeze=False)
    for ax, run in zip(axes[0], report["runs"]):
        xs = [r["bytes"] for r in run["rows"]]
        ax.plot(xs, [r["gloo_busbw"] for r in run["rows"]], "s-", label="gloo (torch 2.13)")
        ax.plot(xs, [r["collcomm_busbw"] for r in run["rows"]], "o-", label="collcomm")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes")
        ax.set_ylabel("allreduce busbw (GB/s)")
        ax.set_title(f"{run['world']} ranks, loopback")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
