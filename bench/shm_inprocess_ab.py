"""Small collectives on shared memory timed in alternating blocks inside one job, so that the
scheduler's placement of the ranks (which moves 4-rank times by tens of us between jobs) falls on
every case alike.

    collcomm run -n 4 python bench/shm_inprocess_ab.py                 # the API's calls, 4 KB
    LAYERS=1 collcomm run -n 4 python bench/shm_inprocess_ab.py        # the API against the lane's step called directly
    SETTINGS="5,50 0,50 0,1000" collcomm run -n 4 python bench/shm_inprocess_ab.py   # the waiter's spin,yield

Blocks of B operations (default 300) cycle through the cases, in reverse every other block; rank 0
prints the median over the blocks of each case's time per operation.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

import collcomm as cc


def main() -> None:
    cc.init()
    me, n = cc.rank(), cc.world_size()
    x = np.ones(1024, np.float32)
    part, gathered = np.empty(1024 // n, np.float32), np.empty(1024 * n, np.float32)
    cases = {"allreduce": lambda: cc.allreduce(x, "max"), "reduce_scatter": lambda: cc.reduce_scatter(part, x, "max"),
             "allgather": lambda: cc.allgather(gathered, x), "broadcast": lambda: cc.broadcast(x, 0),
             "barrier": lambda: cc.barrier()}
    for f in cases.values():
        for _ in range(200):
            f()
    group = cc.api._group(None)
    arena = group.lane.arena
    if os.environ.get("LAYERS"):
        lane = group.lane
        shot = lane.allreduces[(x.dtype, x.size, "max")]
        cases = {"cc.allreduce": cases["allreduce"],
                 "lane.run": lambda: lane.run(shot, lane.allreduce_step, x, None, 30.0, x.nbytes)}
    elif os.environ.get("SETTINGS"):  # the same allreduce under each waiter setting
        allreduce = cases["allreduce"]

        def under(spin: int, yields: int):
            def run():
                arena.spin, arena.yields = spin, yields
                allreduce()
            return run

        cases = {f"spin,yield {s}": under(*(int(v) for v in s.split(","))) for s in os.environ["SETTINGS"].split()}
    per = int(os.environ.get("B", "300"))
    res = {k: [] for k in cases}
    for blk in range(int(os.environ.get("BLOCKS", "16"))):
        for k in (list(cases) if blk % 2 == 0 else list(cases)[::-1]):
            f = cases[k]
            t = time.perf_counter_ns()
            for _ in range(per):
                f()
            res[k].append((time.perf_counter_ns() - t) / per / 1e3)
    if me == 0:
        for k, v in res.items():
            print(f"{n} ranks, 4 KB {k:22s}: median {statistics.median(v):6.1f} us per operation", flush=True)
    cc.shutdown()


if __name__ == "__main__":
    main()
