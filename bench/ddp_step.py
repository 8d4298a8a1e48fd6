"""DDP step time with the torch.distributed backend "collcomm" vs gloo, same model, same data.

    python bench/ddp_step.py                          # 2 and 4 ranks on loopback; bench/results/ddp_step.json
    python bench/ddp_step.py -n 4 --models mlp-4m     # one configuration
    sudo python bench/ddp_step.py -n 8 --emulate bench/topologies/two_box.json --scale 1GB/s=50Mbit \
        --results bench/results/ddp_step_emulated.json

The ranks are started by collcomm's launcher (``collcomm.launcher.run``) for both backends, so both
run in the same process layout; with ``--emulate T.json`` every rank runs inside its namespace of
the emulated fabric of that topology (the hook is ``emulate=`` of ``collcomm.launcher.run``; it
needs root, and gloo then also talks over the emulated links; ``--scale`` and ``--prefix`` are those
of ``collcomm emulate``; the fabric is removed after each job, also when it fails). The c10d store
is a FileStore, which every namespace can reach. Each rank builds the model (fixed seed), wraps it in DDP, runs warm-up
steps, then ``--repeats`` blocks of ``--steps`` steps between barriers; a block's time over its steps
is the step time, and the fastest block is reported (the median too).

Models: ``mlp-small`` is the tests' MLP (16-32-4, 676 parameters: latency-bound), ``mlp-4m`` a
512-4096-512 MLP (4.2 M parameters, 16.8 MB of gradients per step: bandwidth-bound).
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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ddp_step.json"
MODELS = {"mlp-small": (16, 32, 4, 8), "mlp-4m": (512, 4096, 512, 32)}  # in, hidden, out, batch


# ---------------------------------------------------------------------------- inside a rank
def _rank_job() -> int:
    import datetime

    import torch
    import torch.distributed as dist
    import torch.nn as nn

    torch.set_num_threads(1)
    backend, model_name = os.environ["BENCH_BACKEND"], os.environ["BENCH_MODEL"]
    steps, repeats, warmup = (int(os.environ[k]) for k in ("BENCH_STEPS", "BENCH_REPEATS", "BENCH_WARMUP"))
    rank, world = int(os.environ["COLLCOMM_RANK"]), int(os.environ["COLLCOMM_WORLD_SIZE"])
    if backend == "collcomm":
        from collcomm.integrations.torch import register

        register()
    dist.init_process_group(backend, init_method=f"file://{os.environ['BENCH_STORE']}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    d_in, hidden, d_out, batch = MODELS[model_name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g)

    def step():
        opt.zero_grad()
        ((ddp(x) - y) ** 2).mean().backward()
        opt.step()

    for _ in range(warmup):
        step()
    blocks = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        dist.barrier()
        blocks.append((time.perf_counter() - t0) / steps)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        Path(os.environ["BENCH_OUT"]).write_text(json.dumps({"blocks_s": blocks, "params": params}))
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------- driver
def _measure(backend: str, n: int, model: str, args) -> dict:
    from collcomm import launcher

    with tempfile.TemporaryDirectory(prefix="ddp-step-") as tmp:
        out = Path(tmp) / "out.json"
        env = {"BENCH_BACKEND": backend, "BENCH_MODEL": model, "BENCH_STEPS": str(args.steps),
               "BENCH_REPEATS": str(args.repeats), "BENCH_WARMUP": str(args.warmup),
               "BENCH_STORE": str(Path(tmp) / "store"), "BENCH_OUT": str(out), "OMP_NUM_THREADS": "1"}
        log = Path(tmp) / "log.txt"
        with open(log, "w") as f:
            code = launcher.run(n, [sys.executable, str(Path(__file__).resolve()), "--rank-job"], env=env,
                                timeout=args.job_timeout, stdout=f, stderr=f, emulate=args.emulate,
                                scale=args.scale, prefix=args.prefix)
        if code != 0 or not out.exists():
            raise SystemExit(f"{backend} x{n} {model} failed (exit {code}):\n" + log.read_text()[-4000:])
        data = json.loads(out.read_text())
    blocks = data["blocks_s"]
    return {"backend": backend, "nprocs": n, "model": model, "params": data["params"], "steps": args.steps,
            "repeats": args.repeats, "step_ms": round(min(blocks) * 1e3, 3),
            "step_ms_median": round(statistics.median(blocks) * 1e3, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, action="append", help="ranks (repeatable; default 2 and 4)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--backends", nargs="+", default=["gloo", "collcomm"], choices=["gloo", "collcomm"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--emulate", metavar="T.json", help="run the ranks in the emulated fabric of this topology "
                    "(collcomm.launcher.run(emulate=...); needs root)")
    ap.add_argument("--scale", help="with --emulate: the rate scale, as for `collcomm emulate up` (the emulated "
                    "benchmarks in bench/RESULTS.md use 1GB/s=50Mbit for two_box)")
    ap.add_argument("--prefix", help="with --emulate: the fabric's name prefix (default that of `collcomm emulate`)")
    ap.add_argument("--job-timeout", type=float, default=120.0, help="bound of one job (s)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--rank-job", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_job:
        return _rank_job()
    import torch

    runs = []
    for n in args.n or [2, 4]:
        for model in args.models:
            for backend in args.backends:
                r = _measure(backend, n, model, args)
                print(f"  {model:10} {n} ranks {backend:9} {r['step_ms']:9.3f} ms/step", flush=True)
                runs.append(r)
    result = {"benchmark": "DDP step time, collcomm vs gloo", "fabric": args.emulate or "loopback",
              "scale": args.scale if args.emulate else None,
              "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "load_avg_at_start": os.getloadavg()[0], "runs": runs,
              "command": "python bench/ddp_step.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")
    table(result)
    return 0


def table(result: dict) -> None:
    print(f"\nDDP step time ({result['fabric']}, {result['cpus']} cpus, torch {result['torch']}), ms per step "
          "(fastest block; median in parentheses)")
    print(f"{'model':10} {'params':>9} {'ranks':>5} {'gloo':>18} {'collcomm':>18} {'collcomm/gloo':>14}")
    keyed = {(r["model"], r["nprocs"], r["backend"]): r for r in result["runs"]}
    for model, n in sorted({(r["model"], r["nprocs"]) for r in result["runs"]}):
        g, c = keyed.get((model, n, "gloo")), keyed.get((model, n, "collcomm"))
        cell = lambda r: f"{r['step_ms']:8.2f} ({r['step_ms_median']:7.2f})" if r else f"{'-':>18}"  # noqa: E731
        ratio = f"{c['step_ms'] / g['step_ms']:14.2f}" if g and c else f"{'-':>14}"
        params = (g or c)["params"]
        print(f"{model:10} {params:>9} {n:>5} {cell(g):>18} {cell(c):>18} {ratio}")


if __name__ == "__main__":
    sys.exit(main())
