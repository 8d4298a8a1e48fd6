"""Everyone present: objects (chains built on arrival) against the planned collectives.

    python3 bench/objects_vs_collectives.py                      # 4 ranks on loopback
    python3 bench/objects_vs_collectives.py -n 8 --sizes 1M,16M,64M
    sudo python3 bench/objects_vs_collectives.py --emulate bench/topologies/star4.json --scale 1GB/s=200Mbit

When every member of a group is there at once, a broadcast or an allreduce of one object can
run either way: as objects (rank 0 puts, the others get: one pipelined chain; every rank puts
its input, rank 0 reduce_objects, the others get the result: allreduce = reduce + get) or as the
collective the planner plans for the fabric (cc.broadcast, cc.allreduce: ForestColl's trees or
a ring). This measures both in the same processes, per size (after a barrier; the time is the
slowest rank's; median of --iters), and writes bench/results/objects_vs_collectives.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def rank_main() -> int:
    import numpy as np

    import collcomm as cc

    sizes = [int(s) for s in os.environ["BENCH_SIZES"].split(",")]
    iters = int(os.environ["BENCH_ITERS"])
    cc.init(timeout=600)
    me, n = cc.rank(), cc.world_size()

    def slowest(seconds: float) -> float:
        t = np.array([seconds])
        cc.allreduce(t, op="max")
        return float(t[0])

    rows = []
    for size in sizes:
        count = size // 4
        x = np.full(count, me + 1.0, np.float32)
        times: dict[str, list[float]] = {k: [] for k in ("get", "broadcast", "reduce+get", "allreduce")}
        for it in range(iters + 1):  # the first round warms up
            tag = f"{size}/{it}"
            cc.barrier()
            t0 = time.perf_counter()
            if me == 0:
                cc.put(f"b/{tag}", x)
            got = cc.get(f"b/{tag}", timeout=300)
            t_get = slowest(time.perf_counter() - t0)
            assert got[0] == 1.0 and got[-1] == 1.0
            del got
            buf = x.copy()
            cc.barrier()
            t0 = time.perf_counter()
            cc.broadcast(buf, root=0)
            t_bc = slowest(time.perf_counter() - t0)
            assert buf[0] == 1.0
            cc.barrier()
            t0 = time.perf_counter()
            cc.put(f"in/{tag}/{me}", x)
            if me == 0:
                cc.reduce_objects([f"in/{tag}/{r}" for r in range(n)], f"sum/{tag}", timeout=300)
            s = cc.get(f"sum/{tag}", timeout=300)
            t_red = slowest(time.perf_counter() - t0)
            assert s[0] == n * (n + 1) / 2, s[0]
            del s
            buf = x.copy()
            cc.barrier()
            t0 = time.perf_counter()
            cc.allreduce(buf)
            t_ar = slowest(time.perf_counter() - t0)
            assert buf[0] == n * (n + 1) / 2
            cc.barrier()
            if me == 0:
                for key in [f"b/{tag}", f"sum/{tag}"] + [f"in/{tag}/{r}" for r in range(n)]:
                    cc.delete(key)
            cc.barrier()
            if it:
                for k, v in zip(times, (t_get, t_bc, t_red, t_ar)):
                    times[k].append(v)
        row = {"bytes": size, **{k: statistics.median(v) for k, v in times.items()}}
        rows.append(row)
        if me == 0:
            print(f"{size:>10} B  get {row['get'] * 1e3:8.1f} ms  broadcast {row['broadcast'] * 1e3:8.1f} ms  "
                  f"reduce+get {row['reduce+get'] * 1e3:8.1f} ms  allreduce {row['allreduce'] * 1e3:8.1f} ms",
                  flush=True)
    if me == 0:
        Path(os.environ["BENCH_OUT"]).write_text(json.dumps(rows))
    cc.barrier()
    cc.shutdown()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--sizes", default="256K,1M,4M,16M,64M")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--emulate", default=None, help="a topology file to build as an emulated fabric (root)")
    ap.add_argument("--scale", default="1GB/s=200Mbit")
    ap.add_argument("--out", default=str(HERE / "results" / "objects_vs_collectives.json"))
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    from collcomm.launcher import run as launch

    tmp = Path(args.out).with_suffix(".rows.tmp")
    env = dict(os.environ, BENCH_SIZES=",".join(map(str, sizes)), BENCH_ITERS=str(args.iters), BENCH_OUT=str(tmp),
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    kw = {"emulate": args.emulate, "scale": args.scale, "prefix": "ccovc"} if args.emulate else {}
    code = launch(args.n, [sys.executable, __file__, "--rank"], env=env, **kw)
    if code:
        return code
    rows = json.loads(tmp.read_text())
    tmp.unlink()
    record = {"command": "python3 bench/objects_vs_collectives.py " + " ".join(sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": f"{platform.node()}, {os.cpu_count()} cores",
              "ranks": args.n, "fabric": args.emulate or "loopback", "scale": args.scale if args.emulate else None,
              "rows": rows}
    out = Path(args.out)
    runs = json.loads(out.read_text()) if out.exists() else []
    runs = [r for r in runs if (r["fabric"], r["ranks"]) != (record["fabric"], record["ranks"])] + [record]
    out.write_text(json.dumps(runs, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        sys.exit(rank_main())
    sys.exit(main())
