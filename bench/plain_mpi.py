"""Allreduce (float32, sum) through MPI alone (mpi4py): the reference that ``collcomm-perf
--compare mpi`` (and ``mpi-tcp``) must agree with (bench/peers_harness_check.py compares them).

    mpirun -n 4 python bench/plain_mpi.py --sizes 4K,1M,64M                    # MPI's default transport
    mpirun -n 4 --mca pml ob1 --mca btl tcp,self python bench/plain_mpi.py     # Open MPI over TCP

(as root Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more
ranks than cores --oversubscribe). Nothing of collcomm is imported. The method is the harness's
(collcomm/perf/sweep.py): per size and variant, ``--warmup`` untimed operations, a barrier,
then ``--iters`` operations back to back, each timed on its own; a rank's time is the median of
its iterations, the job's the mean over the ranks (``collcomm-perf -a 1``). Out-of-place is
``Allreduce(send, recv)``, in-place ``Allreduce(MPI.IN_PLACE, recv)``. algbw = bytes / time,
busbw = algbw * 2(n-1)/n (nccl-tests). Rank 0 prints one line per size and, with ``--json``,
writes {"library": "mpi", "ranks", "mpi": library version, "rows": [{"size", "out_of_place":
{"time_us", "bus_bw"}, "in_place": {...}}]}.

Setup (once per machine): ``apt-get install -y openmpi-bin libopenmpi-dev`` (the system Open
MPI), then ``pip install mpi4py`` (the project's ``mpi`` extra) into the same environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

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


def timed(comm, op, iters: int, warmup: int) -> float:
    """The median of ``iters`` back-to-back operations, after ``warmup`` and a barrier."""
    for _ in range(warmup):
        op()
    comm.Barrier()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4K,1M,64M", help="bytes, comma-separated (K, M, G: powers of 1024)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default: by size, 1000 .. 10)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed iterations per size and variant (default 5)")
    ap.add_argument("--json", help="write the results here (rank 0)")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    me, n = comm.Get_rank(), comm.Get_size()
    rows = []
    for nbytes in [parse_size(s) for s in args.sizes.split(",")]:
        send = np.full(nbytes // 4, 0.0, np.float32)  # written: np.zeros of a large buffer maps every page
        recv = np.full(nbytes // 4, 0.0, np.float32)  # to the kernel's one zero page, always in the cache
        iters = args.iters or default_iters(nbytes)
        row = {"size": nbytes}
        for variant, op in (("out_of_place", lambda: comm.Allreduce(send, recv, MPI.SUM)),
                            ("in_place", lambda: comm.Allreduce(MPI.IN_PLACE, recv, MPI.SUM))):
            sec = comm.allreduce(timed(comm, op, iters, args.warmup), MPI.SUM) / n
            row[variant] = {"time_us": sec * 1e6, "bus_bw": nbytes / sec / 1e9 * 2 * (n - 1) / n}
        rows.append(row)
        if me == 0:
            o, i = row["out_of_place"], row["in_place"]
            print(f"mpi n={n} {nbytes:>11} B  out-of-place {o['time_us']:12.1f} us {o['bus_bw']:7.3f} GB/s  "
                  f"in-place {i['time_us']:12.1f} us {i['bus_bw']:7.3f} GB/s", flush=True)
    if me == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"library": "mpi", "ranks": n, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
                       "rows": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
