"""An allreduce sweep: ``collcomm run -n 4 python -m collcomm.sweep [--min 1K --max 64M]``.

Every rank allreduces float32 buffers of growing size with the topology-aware
planner, checks the result against the exact sum, and rank 0 prints a table of
size, the algorithm the planner chose, time, algbw and busbw (nccl-tests' factor
2(n-1)/n). The README's first command runs it on 4 local ranks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import collcomm as cc


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().rstrip("B")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def human(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return str(n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collcomm.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--min", default="1K", help="smallest buffer in bytes (K, M, G suffixes)")
    ap.add_argument("--max", default="64M", help="largest buffer in bytes")
    ap.add_argument("--factor", type=int, default=4, help="size step factor")
    ap.add_argument("--iters", type=int, default=0, help="timed iterations per size (0: by size)")
    args = ap.parse_args(argv)
    cc.init()
    rank, n = cc.rank(), cc.world_size()
    from collcomm.api import runtime

    group = runtime().world
    if rank == 0:
        print(f"allreduce sweep: {n} ranks, float32 sum, fabric {group.planner.topo.name}")
        print(f"{'size':>8} {'count':>10}  {'algorithm':<17} {'time (us)':>10} {'algbw GB/s':>11} "
              f"{'busbw GB/s':>11}  check")
    size, lo, hi = parse_size(args.min), parse_size(args.min), parse_size(args.max)
    wrong = 0
    while size <= hi:
        count = max(size // 4, 1)
        x = np.empty(count, np.float32)
        iters = args.iters or (50 if size <= 1 << 20 else 10 if size <= 16 << 20 else 3)
        times = []
        for i in range(iters + 1):
            x[:] = rank + 1  # exact in float32 for these sums
            cc.barrier()
            t0 = time.perf_counter()
            cc.allreduce(x)
            if i:
                times.append(time.perf_counter() - t0)
        ok = bool(np.all(x == n * (n + 1) / 2))
        wrong += not ok
        t = statistics.median(times)
        algo = group.planner.schedule("allreduce", count * 4, runtime().algorithm).algorithm
        if rank == 0:
            algbw = count * 4 / t / 1e9
            print(f"{human(count * 4):>8} {count:>10}  {algo:<17} {t * 1e6:>10.1f} {algbw:>11.3f} "
                  f"{algbw * 2 * (n - 1) / n:>11.3f}  {'ok' if ok else 'WRONG'}", flush=True)
        size *= args.factor
    cc.shutdown()
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
