"""A/B of environment settings on one collcomm-perf command: runs alternate between the settings
(ABBA...), and the medians of each setting's runs are printed.

    python bench/perf_ab.py broadcast 2 4M 3 COLLCOMM_SHM_DIRECT_BYTES=off COLLCOMM_SHM_DIRECT_BYTES=0
    ITERS=100 python bench/perf_ab.py allgather 2 1M 3 COLLCOMM_SHM_DIRECT_BYTES=off "A=1;B=2"

Arguments: collective, ranks, size, rounds, then one setting per argument ("NAME=VALUE;NAME=VALUE",
or "-" for none). Each run is ``collcomm-perf COLL -np N -b SIZE -e SIZE -n ITERS -w 20``
(``ITERS``: environment, default 40); the out-of-place time and busbw of the size are kept.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 5:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: perf_ab.py COLL N SIZE ROUNDS SETTING [SETTING ...]", file=sys.stderr)
        return 2
    coll, n, size, rounds, settings = argv[0], argv[1], argv[2], int(argv[3]), argv[4:]
    res: dict[str, list[tuple[float, float]]] = {s: [] for s in settings}
    for r in range(rounds):
        for s in (settings if r % 2 == 0 else settings[::-1]):
            env = dict(os.environ)
            for kv in s.split(";"):
                if kv != "-":
                    k, v = kv.split("=", 1)
                    env[k] = v
            out = subprocess.run([sys.executable, "-m", "collcomm.perf", coll, "-np", n, "-b", size, "-e", size,
                                  "-n", os.environ.get("ITERS", "40"), "-w", "20"], env=env, capture_output=True,
                                 text=True, timeout=600, check=True).stdout
            row = [line for line in out.splitlines() if line.strip() and not line.startswith("#")][-1].split()
            res[s].append((float(row[5]), float(row[7])))
    for s, v in res.items():
        print(f"{coll} n={n} {size} {s:45s} time_us med {statistics.median(t for t, _ in v):9.1f}  "
              f"busbw med {statistics.median(b for _, b in v):.2f}  all {[b for _, b in v]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
