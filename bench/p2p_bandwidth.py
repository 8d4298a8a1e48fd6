"""Point-to-point bandwidth between two ranks of one machine: collcomm's send/recv (payloads by
reference from P2P_REFERENCE_MIN_BYTES on, and inline with COLLCOMM_BY_REFERENCE=0) against
Open MPI's Send/Recv (mpi4py, its default shared-memory transport), in the same run.

    python bench/p2p_bandwidth.py                       # 1M, 16M, 64M, 256M; prints a table
    python bench/p2p_bandwidth.py --sizes 16M,64M --iters 20

Method (the same for every library): ping-pong, rank 0 sends a float32 buffer and rank 1 sends
it back; ``--warmup`` untimed round trips, then ``--iters`` timed ones; one-way time = the median
round trip / 2; bandwidth = bytes / one-way time. Each library runs as its own job: collcomm under
``collcomm run -n 2`` (once inline, once by reference), MPI under ``mpirun -n 2``. The worker is
this file (``--worker LIB``); it prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B")
    return int(float(text[:-1]) * _UNITS[text[-1]]) if text[-1] in _UNITS else int(text)


def worker(lib: str, sizes: list[int], iters: int, warmup: int) -> None:
    if lib == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        me = comm.Get_rank()

        def send(x, peer):
            comm.Send(x, dest=peer)

        def recv(x, peer):
            comm.Recv(x, source=peer)

        barrier = comm.Barrier
        finish = lambda: None  # noqa: E731
    else:
        import collcomm as cc

        cc.init()
        me = cc.rank()
        send, recv, barrier, finish = cc.send, cc.recv, cc.barrier, cc.shutdown
    for size in sizes:
        x = np.full(size // 4, me, np.float32)
        times = []
        for i in range(warmup + iters):
            barrier()
            t = time.perf_counter()
            if me == 0:
                send(x, 1)
                recv(x, 1)
            else:
                recv(x, 0)
                send(x, 0)
            times.append(time.perf_counter() - t)
        if me == 0:
            one_way = statistics.median(times[warmup:]) / 2
            print(json.dumps({"size": size, "us": one_way * 1e6, "GBps": size / one_way / 1e9}), flush=True)
    finish()


def run(lib: str, sizes: str, iters: int, warmup: int, env: dict) -> dict[int, dict]:
    me = [sys.executable, os.path.abspath(__file__), "--worker", lib, "--sizes", sizes, "--iters", str(iters),
          "--warmup", str(warmup)]
    if lib == "mpi":
        cmd = ["mpirun", "-n", "2", "--oversubscribe"] + me
        env = {**env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    else:
        cmd = [sys.executable, "-m", "collcomm.cli", "run", "-n", "2"] + me
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{lib} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    lines = [line.split("] ", 1)[-1] for line in out.stdout.splitlines()]  # (collcomm run: "[rank 0] ...")
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    return {r["size"]: r for r in rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1M,16M,64M,256M")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--worker", choices=("collcomm", "mpi"))
    a = p.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    if a.worker:
        worker(a.worker, sizes, a.iters, a.warmup)
        return 0
    runs = {"mpi": run("mpi", a.sizes, a.iters, a.warmup, {}),
            "collcomm inline": run("collcomm", a.sizes, a.iters, a.warmup, {"COLLCOMM_BY_REFERENCE": "0"}),
            "collcomm": run("collcomm", a.sizes, a.iters, a.warmup, {})}
    print(f"| size | {' | '.join(f'{k} GB/s' for k in runs)} | collcomm / mpi | collcomm / inline |")
    print("|---|" + "---|" * (len(runs) + 2))
    for s in sizes:
        v = {k: r[s]["GBps"] for k, r in runs.items()}
        print(f"| {s >> 20} MB | {' | '.join(f'{x:.2f}' for x in v.values())} | {v['collcomm'] / v['mpi']:.2f} | "
              f"{v['collcomm'] / v['collcomm inline']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
