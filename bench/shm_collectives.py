"""collcomm on one machine (shared memory) against gloo and OpenMPI, side by side, and collcomm
over its sockets (COLLCOMM_TRANSPORT=unix, what every collective used before shared memory).

    python bench/shm_collectives.py                  # 2 and 4 ranks; bench/results/shm_collectives.json + .png
    python bench/shm_collectives.py -n 2 --quick     # one configuration, fewer sizes

Every number comes from ``collcomm-perf`` (nccl-tests' method: time, algbw, busbw, #wrong per
size; out-of-place; the average of the ranks' medians over ``--iters`` operations, by default 1000
up to 64 KB, 200 up to 4 MB and 20 beyond, one run per band): one run with
``--compare gloo,mpi`` (the peers in the same processes, alternately per size; OpenMPI with its
default transport, shared memory on one machine), one with ``--compare mpi-tcp`` (OpenMPI with
``--mca btl tcp,self``), one with ``COLLCOMM_TRANSPORT=unix``. Allreduce (float32 sum) from 1 KB
to 256 MB; allgather, reduce_scatter and broadcast at 4 KB, 1 MB and 64 MB. Then one job per rank
count measures memory: each rank's peak RSS through a 256 MB allreduce, the shared memory its
group maps while it runs (``/proc/self/maps``: the names are already gone from /dev/shm), and
what /dev/shm holds after the job.

The MPI peers need OpenMPI and mpi4py: ``apt-get install openmpi-bin libopenmpi-dev`` and
``pip install -e ".[mpi]"`` (the ``mpi`` extra); without them those columns are left out and the
run says so. That the in-harness peers read like the peers alone is checked by
bench/peers_harness_check.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "shm_collectives.json"
PLOT = HERE / "shm_collectives.png"
KB, MB = 1 << 10, 1 << 20


def have_mpi() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mpiexec") is not None


def perf(coll: str, n: int, lo: int, hi: int, iters: int, compare: str | None, env: dict | None = None,
         factor: int = 4) -> list[dict]:
    """One collcomm-perf run; its rows (collcomm's and the compared libraries')."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "perf.json"
        cmd = [sys.executable, "-m", "collcomm.perf", coll, "-np", str(n), "-b", str(lo), "-e", str(hi), "-f",
               str(factor), "-n", str(iters), "-w", "3", "--json", str(out)]
        if compare:
            cmd += ["--compare", compare]
        proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())["rows"]


# Iterations by size: a median of 20 operations at 4 KB with 4 ranks on 2 cores moved by 2-3x
# between runs (2026-12-07: 165 us in one run, 66 us in the next); the plain peer scripts time
# 1000 small operations for the same reason (bench/plain_mpi.py, bench/plain_gloo.py).
def iterations(nbytes: int) -> int:
    return 1000 if nbytes <= 64 * KB else 200 if nbytes <= 4 * MB else 20


def bands(lo: int, hi: int, only: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    """The sizes lo..hi (x4 steps; ``only``: just those) grouped by their number of iterations."""
    sizes, s = [], lo
    while s <= hi:
        if only is None or s in only:
            sizes.append(s)
        s *= 4
    out: list[tuple[int, int]] = []
    for size in sizes:
        if out and iterations(out[-1][1]) == iterations(size) and only is None:
            out[-1] = (out[-1][0], size)
        else:
            out.append((size, size))
    return out


def collect(n: int, coll: str, sizes: list[tuple[int, int]], iters: int | None, mpi: bool) -> dict:
    """{size: {library: {"time": us, "busbw": GB/s, "wrong": n}}} for one collective and rank count,
    one ``collcomm-perf`` run per band of sizes and comparison."""
    table: dict = {}

    def put(rows, rename: dict):
        for row in rows:
            cell = table.setdefault(row["size"], {})
            sides = {"collcomm": row["out_of_place"], **{k: v["out_of_place"] for k, v in row.get("compare", {}).items()}}
            for lib, side in sides.items():
                if lib in rename:
                    cell[rename[lib]] = {"time": side["time"], "busbw": side["bus_bw"], "wrong": side["nwrong"]}

    for lo, hi in sizes:
        k = iters or iterations(lo)
        put(perf(coll, n, lo, hi, k, "gloo,mpi" if mpi else "gloo"),
            {"collcomm": "collcomm", "gloo": "gloo", "mpi": "mpi-shm"})
        if mpi:
            put(perf(coll, n, lo, hi, k, "mpi-tcp"), {"mpi-tcp": "mpi-tcp", "collcomm": "collcomm (mpiexec)"})
        put(perf(coll, n, lo, hi, k, None, env={"COLLCOMM_TRANSPORT": "unix"}), {"collcomm": "collcomm sockets"})
    return table


MEMORY_JOB = r'''
import os, resource, numpy as np, collcomm as cc
cc.init()
x = np.ones((256 << 20) // 4, np.float32)
cc.allreduce(x)
cc.allreduce(x)
maps = [l for l in open("/proc/self/maps").read().splitlines() if "/collcomm-" in l]
shm = sum(int(l.split()[0].split("-")[1], 16) - int(l.split()[0].split("-")[0], 16) for l in maps)
ok = bool(x[0] == cc.world_size() ** 2 and x[-1] == cc.world_size() ** 2)
print("MEM", cc.rank(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, shm, len(maps), ok, flush=True)
cc.shutdown()
'''


def memory(n: int) -> dict:
    before = set(os.listdir("/dev/shm"))
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(MEMORY_JOB)
    try:
        proc = subprocess.run([sys.executable, "-m", "collcomm.cli", "run", "-n", str(n), sys.executable, f.name],
                              capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(f.name)
    ranks = []
    for line in proc.stdout.splitlines():
        if "MEM " in line:
            rank, rss, shm, segs, ok = line.split("MEM ", 1)[1].split()
            ranks.append({"rank": int(rank), "peak_rss": int(rss), "shm_mapped": int(shm), "segments": int(segs),
                          "exact": ok == "True"})
    left = sorted(set(os.listdir("/dev/shm")) - before)
    return {"buffer": 256 * MB, "ranks": sorted(ranks, key=lambda r: r["rank"]), "dev_shm_left": left,
            "returncode": proc.returncode}


def table_text(results: dict) -> str:
    lines = []
    for key, table in results["runs"].items():
        libs = sorted({lib for cell in table.values() for lib in cell}, key=ORDER.index)
        lines.append(f"\n{key} (busbw GB/s; 4 KB also in us per op)")
        lines.append("| size | " + " | ".join(libs) + " | collcomm / best peer |")
        lines.append("|---" * (len(libs) + 2) + "|")
        for size in sorted(table, key=int):
            cell = table[size]
            peers = [cell[l]["busbw"] for l in ("gloo", "mpi-shm", "mpi-tcp") if l in cell]
            ratio = cell["collcomm"]["busbw"] / max(peers) if peers and max(peers) > 0 else float("nan")
            cols = []
            for lib in libs:
                c = cell.get(lib)
                cols.append("" if c is None else (f"{c['busbw']:.3f} ({c['time']:.1f} us)" if int(size) <= 16 * KB
                                                   else f"{c['busbw']:.2f}"))
            lines.append(f"| {_size(int(size))} | " + " | ".join(cols) + f" | {ratio:.2f} |")
    return "\n".join(lines)


ORDER = ["collcomm", "collcomm (mpiexec)", "collcomm sockets", "gloo", "mpi-shm", "mpi-tcp"]


def _size(b: int) -> str:
    return f"{b // MB} MB" if b >= MB else f"{b // KB} KB"


def busbw_axes(ax, title: str) -> None:
    """One panel of busbw against message size, as the bench plots draw it."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in results["runs"] if k.startswith("allreduce")]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        table = results["runs"][key]
        sizes = sorted(table, key=int)
        for lib in ORDER:
            pts = [(int(s), table[s][lib]["busbw"]) for s in sizes if lib in table[s]]
            if pts and lib != "collcomm (mpiexec)":
                ax.plot(*zip(*pts), marker="o", label=lib, linewidth=2.5 if lib == "collcomm" else 1.2)
        busbw_axes(ax, key)
        ax.set_yscale("log")
    fig.suptitle("allreduce float32 sum on one machine (2 cores): collcomm shared memory vs peers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, action="append", help="rank counts (default 2 and 4)")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed operations per size (default: 1000 up to 64 KB, 200 up to 4 MB, 20 beyond)")
    ap.add_argument("--quick", action="store_true", help="allreduce 4 KB to 64 MB only, no memory job")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--plot", type=Path, default=PLOT)
    args = ap.parse_args(argv)
    mpi = have_mpi()
    if not mpi:
        print("OpenMPI or mpi4py missing: no MPI columns (apt-get install openmpi-bin libopenmpi-dev; "
              "pip install -e '.[mpi]')", file=sys.stderr)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
               "iters": args.iters or "1000 up to 64 KB, 200 up to 4 MB, 20 beyond", "runs": {}, "memory": {}}
    for n in args.n or [2, 4]:
        plan = [("allreduce", bands(4 * KB, 64 * MB) if args.quick else bands(KB, 256 * MB))]
        if not args.quick:  # the other collectives at 4 KB, 1 MB and 64 MB
            plan += [(c, bands(4 * KB, 64 * MB, only=(4 * KB, MB, 64 * MB)))
                     for c in ("allgather", "reduce_scatter", "broadcast")]
        for coll, sizes in plan:
            key = f"{coll} n={n}"
            print(f"running {key} ...", file=sys.stderr, flush=True)
            table = collect(n, coll, sizes, args.iters, mpi)
            results["runs"][key] = {str(k): v for k, v in sorted(table.items())}
        if not args.quick:
            results["memory"][str(n)] = memory(n)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    print(table_text(results))
    for n, m in results["memory"].items():
        for r in m["ranks"]:
            print(f"memory n={n} rank {r['rank']}: peak RSS {r['peak_rss'] / MB:.0f} MB (buffer {m['buffer'] // MB} MB, "
                  f"bound {2 * m['buffer'] // MB + 64} MB), shared memory mapped {r['shm_mapped'] / MB:.1f} MB in "
                  f"{r['segments']} segments, exact {r['exact']}")
        print(f"memory n={n}: /dev/shm after the job: {m['dev_shm_left'] or 'nothing new'}")
    plot(results, args.plot)
    print(f"wrote {args.results} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
