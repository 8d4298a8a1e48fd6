"""Allgather and broadcast on one machine, large sizes: collcomm with its copies into the result
streamed past the cache (through the segments, the default from 4 MiB) against collcomm reading
its peers directly (``COLLCOMM_SHM_STREAM_BYTES=off``: what it did before) and OpenMPI's shared
memory, measured in the same ``collcomm-perf --compare mpi`` runs.

    python bench/streamed_copies.py          # bench/results/streamed_copies.json + bench/streamed_copies.png

Sizes 4 MB to 256 MB (x4; from 4 MB, where copies start to stream), 2 and 4 ranks, out-of-place
busbw, ``--iters`` operations (20) per size. The two settings alternate (ABBA over ``--rounds``
rounds, 4); each cell keeps its rounds, OpenMPI's from every run; the plot shows their medians and,
as bars, their ranges (this machine's runs move by 2x and more). Needs OpenMPI and mpi4py (bench/shm_collectives.py says how).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

from shm_collectives import HERE, busbw_axes, have_mpi, perf

SETTINGS = {"streamed": {}, "direct": {"COLLCOMM_SHM_STREAM_BYTES": "off"}}
MB = 1 << 20


def measure(coll: str, n: int, rounds: int, iters: int) -> dict:
    """{size: {"streamed": [busbw...], "direct": [...], "mpi-shm": [...]}} over the rounds."""
    cells: dict = {}
    for r in range(rounds):
        for name in (SETTINGS if r % 2 == 0 else list(SETTINGS)[::-1]):
            for row in perf(coll, n, 4 * MB, 256 * MB, iters, "mpi", env=SETTINGS[name]):
                cell = cells.setdefault(str(row["size"]), {"streamed": [], "direct": [], "mpi-shm": [], "wrong": 0})
                cell[name].append(row["out_of_place"]["bus_bw"])
                cell["mpi-shm"].append(row["compare"]["mpi"]["out_of_place"]["bus_bw"])
                cell["wrong"] += row["out_of_place"]["nwrong"] + row["compare"]["mpi"]["out_of_place"]["nwrong"]
    return cells


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["runs"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        table = results["runs"][key]
        sizes = sorted(table, key=int)
        for name, style in (("streamed", dict(linewidth=2.5)), ("direct", dict(linestyle="--")),
                            ("mpi-shm", dict(color="tab:red"))):
            label = {"streamed": "collcomm, streamed copies", "direct": "collcomm, direct reads (before)",
                     "mpi-shm": "OpenMPI shared memory"}[name]
            mid = [statistics.median(table[s][name]) for s in sizes]
            spread = [[m - min(table[s][name]) for m, s in zip(mid, sizes)],
                      [max(table[s][name]) - m for m, s in zip(mid, sizes)]]
            ax.errorbar([int(s) for s in sizes], mid, yerr=spread, marker="o", capsize=3, label=label, **style)
        busbw_axes(ax, key)
        ax.set_ylim(bottom=0)
    fig.suptitle("allgather and broadcast on one machine (2 cores): copies into the result past the cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "streamed_copies.json")
    ap.add_argument("--plot", type=Path, default=HERE / "streamed_copies.png")
    args = ap.parse_args(argv)
    if not have_mpi():
        print("streamed_copies: needs OpenMPI and mpi4py (see bench/shm_collectives.py)", file=sys.stderr)
        return 2
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"platform": platform.platform(), "python": platform.python_version()},
               "rounds": args.rounds, "iters": args.iters, "runs": {}}
    for coll in ("allgather", "broadcast"):
        for n in (2, 4):
            print(f"running {coll} n={n} ...", flush=True)
            results["runs"][f"{coll} n={n}"] = table = measure(coll, n, args.rounds, args.iters)
            for size in sorted(table, key=int):
                c = table[size]
                s, d, m = (statistics.median(c[k]) for k in ("streamed", "direct", "mpi-shm"))
                print(f"  {int(size) >> 20:4d} MB: streamed {s:5.2f}  direct {d:5.2f}  mpi-shm {m:5.2f} GB/s  "
                      f"streamed/mpi {s / m:4.2f}  direct/mpi {d / m:4.2f}  wrong {c['wrong']}", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    plot(results, args.plot)
    print(f"wrote {args.results} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
