"""The Ray broadcast demo: ``python3 -m collcomm.integrations.ray.demo`` on a local Ray.

It starts a local Ray on 127.0.0.1 (``--num-cpus``, default 4), one producer actor and
``--readers`` reader actors, and moves one ``--mib`` MiB NumPy array from the producer to every
reader twice: through ``collcomm.integrations.ray`` (a handle; the readers are chained as they
arrive) and through Ray's own ``ray.put``/``ray.get``; every reader checks the CRC32 of what it
got. Then the same actors form a ``ray.util.collective`` group with backend "collcomm" and
allreduce an array, checked exactly. It prints one line per step and exits 0 when every check
passed. On one machine both paths are limited by memory copies, not by a network: for the
multi-node comparison over emulated 200 Mbit/s links see bench/ray_integration.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="object size in MiB (default 64)")
    ap.add_argument("--readers", type=int, default=3, help="reader actors (default 3)")
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=120.0, help="bound on each step, seconds")
    args = ap.parse_args(argv)
    if args.mib < 1 or args.readers < 1 or args.num_cpus < 1 or args.timeout <= 0:
        ap.error("--mib, --readers, --num-cpus and --timeout must be positive")

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.util.collective as col

    import collcomm.integrations.ray as ccray

    ray.init(num_cpus=args.num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, logging_level="ERROR",
             runtime_env={"worker_process_setup_hook": "collcomm.integrations.ray.setup"})
    try:
        return _run(ray, col, ccray, args)
    finally:
        ccray.shutdown(stop_coordinator=True)
        ray.shutdown()


def _run(ray, col, ccray, args) -> int:
    @ray.remote(num_cpus=0)
    class Actor:
        def make(self, nbytes: int, seed: int):
            self.array = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
            return zlib.crc32(self.array)

        def publish_collcomm(self):
            return ccray.put(self.array, copy=False)

        def publish_ray(self):
            return [ray.put(self.array)]

        def read(self, what) -> tuple[int, float]:
            a = what.get() if isinstance(what, ccray.Handle) else ray.get(what[0])
            return zlib.crc32(a), time.time()

        def allreduce(self, n: int, rank: int) -> bool:
            col.init_collective_group(n, rank, backend="collcomm", group_name="demo")
            x = np.full(1 << 20, rank + 1.0, np.float32)
            col.allreduce(x, "demo")
            return bool((x == n * (n + 1) / 2).all())

    nbytes = args.mib << 20
    producer, *readers = [Actor.remote() for _ in range(args.readers + 1)]
    crc = ray.get(producer.make.remote(nbytes, 1), timeout=args.timeout)
    ray.get([r.read.remote(ccray.put(np.zeros(1))) for r in readers], timeout=args.timeout)  # warm: all joined
    ok = True
    for label, publish in (("collcomm handle", producer.publish_collcomm), ("ray.put/ray.get", producer.publish_ray)):
        what = ray.get(publish.remote(), timeout=args.timeout)
        t0 = time.time()
        got = ray.get([r.read.remote(what) for r in readers], timeout=args.timeout)
        seconds = max(t for _, t in got) - t0
        good = all(c == crc for c, _ in got)
        ok &= good
        print(f"{label:16s} {args.mib} MiB to {args.readers} readers: {seconds:.3f} s "
              f"({'ok' if good else 'WRONG CONTENTS'})", flush=True)
        if isinstance(what, ccray.Handle):
            what.delete()
    n = args.readers + 1
    good = all(ray.get([a.allreduce.remote(n, i) for i, a in enumerate([producer] + readers)], timeout=args.timeout))
    ok &= good
    print(f"ray.util.collective allreduce, backend collcomm, {n} actors: {'ok' if good else 'WRONG RESULT'}",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
