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
from collcomm.inputs import SizeError, integer_from_text, shown
from collcomm.inputs import parse_size as inputs_parse_size

MAX_BYTES = 1 << 40  # a float32 buffer per rank, allocated at once: well beyond any machine's memory
MAX_FACTOR = 1 << 20
MAX_ITERS = 1_000_000


def parse_size(text: str) -> int:
    """Bytes from ``1K``, ``64M``, ``1.5G`` (powers of 1024): collcomm's one size parser, at most
    1T; an argparse type (a bad size is a usage error naming the flag, exit status 2)."""
    try:
        size = inputs_parse_size(text, maximum=MAX_BYTES)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return size


def _count(low: int, high: int):
    def convert(text: str) -> int:
        try:
            value = integer_from_text(text, "the value", error=argparse.ArgumentTypeError, low=low, high=high)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {shown(text)}") from None
        return value

    return convert


def human(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return str(n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collcomm.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--min", type=parse_size, default="1K", help="smallest buffer in bytes (K, M, G suffixes)")
    ap.add_argument("--max", type=parse_size, default="64M", help="largest buffer in bytes")
    ap.add_argument("--factor", type=_count(2, MAX_FACTOR), default=4, help="size step factor (at least 2)")
    ap.add_argument("--iters", type=_count(0, MAX_ITERS), default=0, help="timed iterations per size (0: by size)")
    args = ap.parse_args(argv)  # before init: a bad flag costs no job
    if args.min > args.max:
        ap.error(f"--min {args.min} is more than --max {args.max}")
    cc.init()
    rank, n = cc.rank(), cc.world_size()
    from collcomm.api import runtime

    group = runtime().world
    if rank == 0:
        print(f"allreduce sweep: {n} ranks, float32 sum, fabric {group.planner.topo.name}")
        print(f"{'size':>8} {'count':>10}  {'algorithm':<17} {'time (us)':>10} {'algbw GB/s':>11} "
              f"{'busbw GB/s':>11}  check")
    size, hi = args.min, args.max
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
