"""What per-frame authentication (COLLCOMM_AUTH_FRAMES=1) costs: the loopback allreduce with and
without it, in the same run.

    python bench/frame_auth_cost.py                       # 4 ranks, 64 MB, 7 rounds
    python bench/frame_auth_cost.py --sizes 1M,64M --rounds 5

Each round runs `collcomm-perf` (4 local ranks, float32 sum, out-of-place and in-place) twice,
once without frame MACs and once with them, in alternating order, and keeps the out-of-place
time (rank average, median of the timed iterations' mean). The report is the median over
rounds of each, and the median of the per-round ratios (with MACs / without). Writes
bench/results/frame_auth_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def run_perf(size: str, ranks: int, iters: int, auth: bool) -> dict[int, float]:
    """Out-of-place time (seconds) per size in bytes of one collcomm-perf run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "perf.json"
        env = dict(os.environ, COLLCOMM_AUTH_FRAMES="1" if auth else "0")
        cmd = [sys.executable, "-m", "collcomm.perf", "-np", str(ranks), "-b", size, "-e", size,
               "-n", str(iters), "-w", "3", "-c", "1", "--json", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"collcomm-perf failed ({proc.returncode}): {proc.stderr[-2000:]}")
        data = json.loads(out.read_text())
    times = {}
    for row in data["rows"]:
        for variant in ("out_of_place", "in_place"):
            if row[variant]["nwrong"]:
                raise SystemExit(f"collcomm-perf reported wrong results: {row}")
        times[int(row["size"])] = float(row["out_of_place"]["time"]) * 1e-6
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64M", help="comma-separated sizes (collcomm-perf syntax)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=str(HERE / "results" / "frame_auth_cost.json"))
    args = p.parse_args()
    load_at_start = os.getloadavg()
    rows = []
    for size in args.sizes.split(","):
        plain, sealed, ratios = [], [], []
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            got = {auth: run_perf(size, args.ranks, args.iters, auth) for auth in order}
            (nbytes, t_plain), = got[False].items()
            t_sealed = got[True][nbytes]
            plain.append(t_plain)
            sealed.append(t_sealed)
            ratios.append(t_sealed / t_plain)
            print(f"{size} round {r + 1}: without {t_plain * 1e3:.1f} ms, with {t_sealed * 1e3:.1f} ms, "
                  f"ratio {t_sealed / t_plain:.3f}", flush=True)
        row = {"size": size, "bytes": nbytes, "ranks": args.ranks, "rounds": args.rounds,
               "without_ms": [round(t * 1e3, 2) for t in plain], "with_ms": [round(t * 1e3, 2) for t in sealed],
               "median_without_ms": round(statistics.median(plain) * 1e3, 2),
               "median_with_ms": round(statistics.median(sealed) * 1e3, 2),
               "median_ratio": round(statistics.median(ratios), 3),
               "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}
        rows.append(row)
        print(f"{size}: median {row['median_without_ms']} ms without, {row['median_with_ms']} ms with frame MACs; "
              f"ratio {row['median_ratio']} (range {row['ratio_range'][0]}-{row['ratio_range'][1]})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "what": "allreduce float32 sum, out-of-place, loopback, collcomm-perf; COLLCOMM_AUTH_FRAMES=0 vs 1",
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cores",
        "load_at_start": load_at_start, "load_at_end": os.getloadavg(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
