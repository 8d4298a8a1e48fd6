"""Allreduce (float32, sum) through torch.distributed's gloo alone: the reference that
``collcomm-perf --compare gloo`` must agree with (bench/peers_harness_check.py compares them).

    python bench/plain_gloo.py -np 4 --sizes 4K,1M,64M
    python bench/plain_gloo.py -np 2 --sizes 64M --iters 10 --json out.json

Nothing of collcomm is imported (not even through torch's backend autoload, turned off in the
ranks): N subprocesses of this script rendezvous through a torch FileStore in a temporary
directory and run gloo's process group, as a user's own script would. The ranks get
OMP_NUM_THREADS=1 unless it is set, as torchrun gives every process of a multi-process job.

The method is the harness's (collcomm/perf/sweep.py): per size and variant, ``--warmup``
untimed operations, a barrier, then ``--iters`` operations back to back, each timed on its own;
a rank's time is the median of its iterations, the job's the mean over the ranks
(``collcomm-perf -a 1``). Out-of-place is what a torch user writes for it (gloo's allreduce is
in place): ``recv.copy_(send)`` then ``all_reduce(recv)``; in-place is ``all_reduce(recv)``.
algbw = bytes / time, busbw = algbw * 2(n-1)/n (nccl-tests). Prints one line per size and, with
``--json``, writes {"library": "gloo", "ranks", "rows": [{"size", "out_of_place": {"time_us",
"bus_bw"}, "in_place": {...}}]}.

Needs torch (the project's ``torch`` extra); no other setup.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B")
    return int(float(text[:-1]) * _UNITS[text[-1]]) if text[-1] in _UNITS else int(text)


def default_iters(nbytes: int) -> int:
    """Enough iterations for a stable median, few enough that 256 MB on 4 ranks stays short. With
    more ranks than cores the time of small operations drifts in phases of tens of milliseconds
    (medians of 50 consecutive 1 MB operations on 4 ranks range 0.76 .. 1.35 ms within one run);
    hundreds of iterations span several phases."""
    return 1000 if nbytes <= 64 << 10 else 400 if nbytes <= 4 << 20 else 20 if nbytes <= 64 << 20 else 10


def timed(dist, op, iters: int, warmup: int) -> float:
    """The median of ``iters`` back-to-back operations, after ``warmup`` and a barrier."""
    for _ in range(warmup):
        op()
    dist.barrier()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rank_main(rank: int, world: int, store_path: str, sizes: list[int], iters: int | None, warmup: int) -> list:
    """This rank's median seconds per size: [[out-of-place, in-place], ...], the job's mean."""
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    out = []
    for nbytes in sizes:
        send = torch.zeros(nbytes // 4, dtype=torch.float32)
        recv = torch.zeros(nbytes // 4, dtype=torch.float32)
        n = iters or default_iters(nbytes)
        oop = timed(dist, lambda: (recv.copy_(send), dist.all_reduce(recv)), n, warmup)
        ip = timed(dist, lambda: dist.all_reduce(recv), n, warmup)
        mean = torch.tensor([oop, ip], dtype=torch.float64)
        dist.all_reduce(mean)
        out.append((mean / world).tolist())
    dist.barrier()
    dist.destroy_process_group()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-np", type=int, default=2, help="ranks (default 2)")
    ap.add_argument("--sizes", default="4K,1M,64M", help="bytes, comma-separated (K, M, G: powers of 1024)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default: by size, 1000 .. 10)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed iterations per size (default 5)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # a rank started by the launching process
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.rank is not None:
        times = rank_main(args.rank, args.np, args.store, sizes, args.iters, args.warmup)
        if args.rank == 0:
            with open(args.result, "w") as f:
                json.dump(times, f)
        return 0
    with tempfile.TemporaryDirectory(prefix="plain-gloo-") as tmp:
        store, result = os.path.join(tmp, "store"), os.path.join(tmp, "result.json")
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"  # else `import torch` imports collcomm (its torch.backends hook)
        procs = [subprocess.Popen([sys.executable, __file__, "-np", str(args.np), "--sizes", args.sizes,
                                   "--warmup", str(args.warmup), "--rank", str(r), "--store", store,
                                   "--result", result] + (["--iters", str(args.iters)] if args.iters else []),
                                  env=env)
                 for r in range(args.np)]
        codes = [p.wait(timeout=1800) for p in procs]
        if any(codes):
            print(f"plain_gloo: a rank failed (exit statuses {codes})", file=sys.stderr)
            return 1
        with open(result) as f:
            seconds = json.load(f)
    n = args.np
    rows = []
    for nbytes, (oop, ip) in zip(sizes, seconds):
        row = {"size": nbytes}
        for variant, sec in (("out_of_place", oop), ("in_place", ip)):
            row[variant] = {"time_us": sec * 1e6, "bus_bw": nbytes / sec / 1e9 * 2 * (n - 1) / n}
        rows.append(row)
        o, i = row["out_of_place"], row["in_place"]
        print(f"gloo n={n} {nbytes:>11} B  out-of-place {o['time_us']:12.1f} us {o['bus_bw']:7.3f} GB/s  "
              f"in-place {i['time_us']:12.1f} us {i['bus_bw']:7.3f} GB/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"library": "gloo", "ranks": n, "rows": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
