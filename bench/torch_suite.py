"""PyTorch's own distributed test suite (torch.testing._internal.distributed.distributed_test) for
the "collcomm" backend and, at the same world size, for gloo.

    python bench/torch_suite.py                          # both backends, WORLD_SIZE=3 (20-40 min on 2 cores)
    python bench/torch_suite.py --backend collcomm -k test_all_reduce_sum -k test_broadcast
    python bench/torch_suite.py --list                   # the test names

Writes the counts (passed / failed / skipped) and, per failing test, the last line of its error
to bench/results/torch_suite.json (merged per backend, so a partial run updates its backend only;
a run with -k over a full run of the same backend and world size updates only those tests' outcomes
and the counts, and lists itself under "reruns")
and prints them, plus the tests gloo passes but collcomm fails.

How it runs the suite (the recipe out-of-tree backends use): BACKEND, WORLD_SIZE and TEMP_DIR in
the environment; the backend registered; its name added to DistTestCases.backend_feature["plugin"],
["ddp"] and ["subgroup"] *before* the suite is imported; a class
``T(TestDistBackend, DistributedTest._DistTestBase)`` whose setUp spawns the ranks. Each backend
runs in a subprocess of its own (the suite reads BACKEND when imported); DISTRIBUTED_TESTS_DEFAULT_TIMEOUT
(default here 120 s) bounds every test, so a hang fails that test instead of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "torch_suite.json"

# ---------------------------------------------------------------------------- inside a suite process
# (top level: the ranks the suite spawns import this file again and must find class T)
if os.environ.get("COLLCOMM_TORCH_SUITE") == "1" and "BACKEND" in os.environ:
    import torch.distributed as dist

    if os.environ["BACKEND"] == "collcomm" or os.environ.get("COLLCOMM_AS_GLOO") == "1":
        from collcomm.integrations.torch import register

        register()
    if os.environ.get("COLLCOMM_AS_GLOO") == "1":  # --as-gloo: collcomm answers where the suite asks for gloo
        import functools

        def _swap(fn, position):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                if kwargs.get("backend") in ("gloo", dist.Backend.GLOO):
                    kwargs["backend"] = "collcomm"
                elif len(args) > position and args[position] in ("gloo", dist.Backend.GLOO):
                    args = args[:position] + ("collcomm",) + args[position + 1:]
                return fn(*args, **kwargs)
            return wrapper

        dist.init_process_group = _swap(dist.init_process_group, 0)
        dist.new_group = _swap(dist.new_group, 2)
    from torch.testing._internal.common_distributed import DistTestCases

    if os.environ["BACKEND"] not in ("gloo", "nccl", "ucc"):
        for feature in ("plugin", "ddp", "subgroup"):
            DistTestCases.backend_feature[feature].add(os.environ["BACKEND"])
    from torch.testing._internal.distributed.distributed_test import DistributedTest, TestDistBackend

    class T(TestDistBackend, DistributedTest._DistTestBase):
        def setUp(self):
            super().setUp()
            self._spawn_processes()


def _last_line(text: str) -> str:
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    # the most telling line: the last exception line of the first failing rank
    for l in lines:
        if re.match(r"^(\w+\.)*\w*(Error|Exception|Timeout|Failure)\b", l) and "Traceback" not in l:
            best = l
    try:
        return best[:300]  # type: ignore[possibly-undefined]
    except NameError:
        return (lines[-1] if lines else "")[:300]


class _Collect(unittest.TextTestResult):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.outcomes: dict[str, dict] = {}
        self._started = 0.0

    def startTest(self, test):
        self._started = time.monotonic()
        super().startTest(test)

    def _note(self, test, status, detail=""):
        name = test.id().rsplit(".", 1)[-1]
        self.outcomes[name] = {"status": status, "seconds": round(time.monotonic() - self._started, 2),
                               **({"reason": detail} if detail else {})}
        tail = f": {detail}" if detail else ""
        sys.stderr.write(f"[suite] {name}: {status} ({self.outcomes[name]['seconds']} s){tail}\n")
        sys.stderr.flush()

    def addSuccess(self, test):
        super().addSuccess(test)
        self._note(test, "passed")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._note(test, "failed", _last_line(self._exc_info_to_string(err, test)))

    def addError(self, test, err):
        super().addError(test, err)
        self._note(test, "failed", _last_line(self._exc_info_to_string(err, test)))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._note(test, "skipped", str(reason)[:200])

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._note(test, "passed")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._note(test, "failed", "unexpected success")


def _names(patterns: list[str]) -> list[str]:
    names = sorted(n for n in unittest.TestLoader().getTestCaseNames(T))  # noqa: F821 - defined above
    if patterns:
        names = [n for n in names if any(re.search(p, n) for p in patterns)]
    return names


def _run_inside(patterns: list[str], out: Path) -> int:
    names = _names(patterns)
    suite = unittest.TestSuite(T(n) for n in names)  # noqa: F821
    started = time.time()
    result = unittest.TextTestRunner(resultclass=_Collect, verbosity=0, stream=open(os.devnull, "w")).run(suite)
    outcomes = result.outcomes
    for n in names:  # a test the runner never reported (should not happen) counts as failed
        outcomes.setdefault(n, {"status": "failed", "reason": "no result"})
    out.write_text(json.dumps({"outcomes": outcomes, "seconds": round(time.time() - started, 1)}))
    return 0


# ---------------------------------------------------------------------------- orchestration
def _run_backend(backend: str, world_size: int, patterns: list[str], timeout_s: float, per_test: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"torch-suite-{backend}-") as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, COLLCOMM_TORCH_SUITE="1", BACKEND="gloo" if backend == "collcomm-as-gloo" else backend,
                   COLLCOMM_AS_GLOO="1" if backend == "collcomm-as-gloo" else "0", WORLD_SIZE=str(world_size),
                   TEMP_DIR=tmp, DISTRIBUTED_TESTS_DEFAULT_TIMEOUT=str(per_test), OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")
        for k in ("RANK", "LOCAL_RANK", "MASTER_PORT", "INIT_METHOD"):
            env.pop(k, None)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--inside", str(out)]
        for p in patterns:
            cmd += ["-k", p]
        started = time.time()
        proc = subprocess.run(cmd, env=env, timeout=timeout_s)
        if not out.exists():
            raise SystemExit(f"the {backend} suite run wrote no result (exit {proc.returncode})")
        data = json.loads(out.read_text())
    outcomes = data["outcomes"]
    counts = {s: sum(1 for o in outcomes.values() if o["status"] == s) for s in ("passed", "failed", "skipped")}
    return {"world_size": world_size, **counts, "total": len(outcomes), "seconds": round(time.time() - started, 1),
            "patterns": patterns, "failed_tests": {n: o.get("reason", "") for n, o in sorted(outcomes.items())
                                                   if o["status"] == "failed"},
            "outcomes": outcomes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", action="append", choices=["collcomm", "gloo", "collcomm-as-gloo"],
                    help="default: collcomm and gloo; collcomm-as-gloo runs the suite as if for gloo (its "
                    "gloo-only tests too) with every gloo group made by collcomm instead")
    ap.add_argument("--world-size", type=int, default=3)
    ap.add_argument("-k", dest="patterns", action="append", default=[], help="regex on test names (repeatable)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="bound of one backend's whole run (s)")
    ap.add_argument("--per-test", type=int, default=120, help="DISTRIBUTED_TESTS_DEFAULT_TIMEOUT (s)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--inside", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inside is not None:
        return _run_inside(args.patterns, args.inside)
    if args.list:
        env = dict(os.environ, COLLCOMM_TORCH_SUITE="1", BACKEND="gloo", WORLD_SIZE=str(args.world_size),
                   TEMP_DIR=tempfile.gettempdir())
        code = "import runpy,sys; m=runpy.run_path(sys.argv[1]); print('\\n'.join(m['_names'](sys.argv[2:])))"
        return subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve()), *args.patterns],
                              env=env).returncode
    import torch

    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    results["torch"] = torch.__version__
    results.setdefault("backends", {})
    for backend in args.backend or ["collcomm", "gloo"]:
        print(f"running the suite for {backend} (WORLD_SIZE={args.world_size}) ...", flush=True)
        run = _run_backend(backend, args.world_size, args.patterns, args.timeout, args.per_test)
        results["backends"][backend] = _merge(results["backends"].get(backend), run)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    report(results)
    return 0


def _merge(previous: dict | None, run: dict) -> dict:
    """A run with -k over a full run of the same backend and world size (a rerun of some tests)
    updates those tests' outcomes in it and recounts; any other run replaces the entry."""
    if not (run["patterns"] and previous and not previous.get("patterns")
            and previous.get("world_size") == run["world_size"]):
        return run
    outcomes = {**previous["outcomes"], **run["outcomes"]}
    counts = {s: sum(1 for o in outcomes.values() if o["status"] == s) for s in ("passed", "failed", "skipped")}
    reruns = previous.get("reruns", []) + [{"tests": sorted(run["outcomes"]), "seconds": run["seconds"],
                                            "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}]
    return {**previous, **counts, "total": len(outcomes), "outcomes": outcomes, "reruns": reruns,
            "failed_tests": {n: o.get("reason", "") for n, o in sorted(outcomes.items()) if o["status"] == "failed"}}


def report(results: dict) -> None:
    backends = results.get("backends", {})
    print(f"\nPyTorch {results.get('torch')} distributed_test suite")
    print(f"{'backend':10} {'world':>5} {'passed':>7} {'failed':>7} {'skipped':>8} {'total':>6} {'minutes':>8}")
    for name, r in backends.items():
        print(f"{name:10} {r['world_size']:>5} {r['passed']:>7} {r['failed']:>7} {r['skipped']:>8} {r['total']:>6} "
              f"{r['seconds'] / 60:>8.1f}")
    g = backends.get("gloo")
    for name in ("collcomm", "collcomm-as-gloo"):
        c = backends.get(name)
        if not (c and g):
            continue
        gap = sorted(n for n, o in g["outcomes"].items() if o["status"] == "passed"
                     and c["outcomes"].get(n, {}).get("status") == "failed")
        print(f"\ntests gloo passes and {name} fails: {len(gap)}")
        for n in gap:
            print(f"  {n}: {c['failed_tests'].get(n, '')}")
        gated = sorted(n for n, o in g["outcomes"].items() if o["status"] == "passed"
                       and c["outcomes"].get(n, {}).get("status") == "skipped")
        print(f"tests gloo passes and {name} skips (the suite gates them on the backend's name, CUDA, ...): "
              f"{len(gated)}")
        extra = sorted(n for n, o in c["outcomes"].items() if o["status"] == "passed"
                       and g["outcomes"].get(n, {}).get("status") != "passed")
        print(f"tests {name} passes and gloo does not: {len(extra)}")


if __name__ == "__main__":
    sys.exit(main())
