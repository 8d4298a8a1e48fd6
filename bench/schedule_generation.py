"""Schedule generation time and achieved bandwidth versus fabric size.

    python bench/schedule_generation.py            # full sweep (a few minutes on 2 cores)
    python bench/schedule_generation.py --quick    # small sizes only

For each fabric: ForestColl allgather generation time (best of --repeat runs for runs
under a second), the exact optimum, the achieved algbw (checked equal to the optimum
by the generator itself), trees per root, number of trees, depth, max-flow calls.
Writes bench/results/schedule_generation.json and bench/schedule_generation.png and
prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from fractions import Fraction
from pathlib import Path

from collcomm.schedules.forestcoll import forestcoll
from collcomm.topology import presets as P

HERE = Path(__file__).parent

FAMILIES = {
    "DGX-A100 boxes": (lambda b: P.dgx_a100(b), [1, 2, 4, 8, 16, 32, 64, 128]),
    "MI250 boxes": (lambda b: P.mi250(b), [1, 2, 4, 8, 16]),
    "2D torus (side)": (lambda s: P.torus2d(s, s), [2, 4, 8, 16, 32]),
}
QUICK = {"DGX-A100 boxes": [1, 2, 4], "MI250 boxes": [1, 2], "2D torus (side)": [2, 4, 8]}


def measure(make, size: int, repeat: int) -> dict:
    topo = make(size)
    best = None
    schedule = None
    for _ in range(repeat):
        start = time.perf_counter()
        schedule = forestcoll(topo, "allgather")
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
        if elapsed > 1.0:
            break
    info = schedule.info["allgather"]
    assert info["optimal"] and schedule.algbw == Fraction(info["optimum_algbw"])
    return {
        "fabric": topo.name, "ranks": topo.num_ranks, "switches": len(topo.switches),
        "seconds": round(best, 4), "optimum_algbw": info["optimum_algbw"], "algbw": str(schedule.algbw),
        "algbw_gbps": round(float(schedule.algbw), 3), "exact": schedule.algbw == Fraction(info["optimum_algbw"]),
        "trees_per_root": info["trees_per_root"], "trees": info["trees"], "max_depth": info["max_depth"],
        "symmetry_order": info["symmetry_order"], "maxflow_calls": schedule.info["maxflow_calls"],
        "step_seconds": info["seconds"],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in FAMILIES:
        pts = [r for r in rows if r["family"] == family]
        if pts:
            ax.plot([r["ranks"] for r in pts], [r["seconds"] for r in pts], "o-", label=family)
    ref = {"A100 x2 (reference code)": (16, 9.1), "MI250 x2 (reference code)": (32, 36.4),
           "1024 GPUs (published large-scale)": (1024, 36 * 60)}
    for label, (x, y) in ref.items():
        ax.plot([x], [y], "kx")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 3) if x < 512 else (-150, 6), fontsize=7)
    ax.axhline(600, color="grey", ls=":", lw=1)
    ax.annotate("10 min target", (1.5, 600), fontsize=7, color="grey", va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks")
    ax.set_ylabel("generation time (s), exactly optimal allgather")
    ax.set_title("ForestColl schedule generation (collcomm, 2-core machine)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--repeat", type=int, default=3, help="runs per fabric (best time kept) for fast ones")
    args = ap.parse_args()
    rows = []
    for family, (make, sizes) in FAMILIES.items():
        for size in (QUICK[family] if args.quick else sizes):
            row = {"family": family, "size": size, **measure(make, size, args.repeat)}
            rows.append(row)
            print(f"{row['fabric']:>16}  {row['ranks']:5d} ranks  {row['seconds']:9.3f} s  "
                  f"algbw {row['algbw_gbps']:9.3f} GB/s (= optimum {row['optimum_algbw']})  k={row['trees_per_root']}"
                  f"  trees={row['trees']}  depth={row['max_depth']}", flush=True)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}", "command": "python bench/schedule_generation.py"
            + (" --quick" if args.quick else "")}
    (out / "schedule_generation.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, HERE / "schedule_generation.png")
    print()
    print("| fabric | ranks | generation (s) | algbw (GB/s) = optimum | k | trees | depth | max-flows |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['fabric']} | {r['ranks']} | {r['seconds']:.3f} | {r['algbw_gbps']:.2f} ({r['algbw']}) | "
              f"{r['trees_per_root']} | {r['trees']} | {r['max_depth']} | {r['maxflow_calls']} |")


if __name__ == "__main__":
    main()
