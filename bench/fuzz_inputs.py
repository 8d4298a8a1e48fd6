"""The long fuzz run of collcomm's loaders of untrusted text (issue 20): at least 10,000 generated
inputs per surface, each of which must load or raise the library's own error within 1 s and a
bounded amount of memory.

    nice .venv/bin/python bench/fuzz_inputs.py                  # 10,000 inputs per surface
    .venv/bin/python bench/fuzz_inputs.py --count 500 --surface sizes
    .venv/bin/python bench/fuzz_inputs.py --at-limits           # also: the largest inputs the defaults accept

The surfaces, their generators (hypothesis strategies: damaged valid documents, hostile raw tokens,
arbitrary text) and the errors each may raise are those of ``tests/test_fuzz_loaders.py``
(:data:`SURFACES`), which runs the same thing briefly in CI. Every input is timed
(``perf_counter``) and its allocations traced (``tracemalloc``'s peak above the level before it);
a failure is an exception of another type, a message of more than one line, more than
:data:`TIME_BOUND` seconds of CPU or more than :data:`MEMORY_BOUND` bytes (timed with tracing on:
the times are upper bounds; the wall-clock time is shown too, but not held to the bound, since on a
shared machine it counts the waits for a CPU). Prints a markdown table:
surface, inputs tried (distinct), loaded, refused by error type, worst time, peak memory,
failures, then the first failures in full. Exit status 1 when any input failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import resource
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIME_BOUND = 1.0            # seconds per input
MEMORY_BOUND = 256 << 20    # bytes traced per input
DEFAULT_COUNT = 10_000


def _fuzz_module():
    sys.path.insert(0, str(REPO / "tests"))
    spec = importlib.util.spec_from_file_location("test_fuzz_loaders", REPO / "tests" / "test_fuzz_loaders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Row:
    surface: str
    tried: int = 0
    distinct: int = 0
    loaded: int = 0
    refused: Counter = field(default_factory=Counter)
    failures: int = 0
    worst_s: float = 0.0       # CPU seconds of the slowest input
    worst_wall_s: float = 0.0  # wall-clock seconds (on a busy machine, waiting for a CPU counts too)
    peak_bytes: int = 0
    examples: list = field(default_factory=list)  # the first failures: (input, what went wrong)
    wall_s: float = 0.0


def run_surface(name: str, count: int, fuzz=None) -> Row:
    from hypothesis import HealthCheck, Phase, given, settings

    fuzz = fuzz or _fuzz_module()
    strategy, loader, errors, env = fuzz.SURFACES[name]
    row, seen = Row(name), set()

    def fail(given_input, what: str) -> None:
        row.failures += 1
        if len(row.examples) < 5:
            row.examples.append((repr(given_input)[:300], what[:500]))

    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(given_input):
        row.tried += 1
        seen.add(hash(repr(given_input)))
        tracemalloc.start()  # around the loader only: hypothesis's own allocations are not the loader's
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            loader(given_input)
            outcome = None
        except errors as e:
            outcome = type(e).__name__
            if "\n" in str(e) or len(str(e)) > 1200:
                fail(given_input, f"{outcome} of {len(str(e))} characters / several lines: {str(e)[:200]!r}")
        except Exception as e:  # noqa: BLE001 - anything else is what this run looks for
            outcome = "FAILED"
            fail(given_input, f"{type(e).__name__}: {e}")
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        row.worst_s = max(row.worst_s, cpu)
        row.worst_wall_s = max(row.worst_wall_s, wall)
        row.peak_bytes = max(row.peak_bytes, peak)
        if cpu > TIME_BOUND:
            fail(given_input, f"took {cpu:.2f} s of CPU ({wall:.2f} s wall)")
        if peak > MEMORY_BOUND:
            fail(given_input, f"allocated {peak / 2**20:.0f} MiB")
        if outcome is None:
            row.loaded += 1
        elif outcome != "FAILED":
            row.refused[outcome] += 1

    t0 = time.perf_counter()
    with fuzz.environment(env):
        one()
    row.distinct = len(seen)
    row.wall_s = time.perf_counter() - t0
    return row


def run_all(count: int = DEFAULT_COUNT, surfaces=None, progress=None) -> list[Row]:
    fuzz = _fuzz_module()
    rows = []
    for name in surfaces or list(fuzz.SURFACES):
        row = run_surface(name, count, fuzz)
        rows.append(row)
        if progress:
            progress(row)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| surface | inputs tried (distinct) | loaded | refused (by error type) | worst time: CPU (wall) "
             "| peak memory | failures |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        refused = ", ".join(f"{k} {v}" for k, v in r.refused.most_common()) or "-"
        worst = f"{r.worst_s * 1000:.0f} ms ({r.worst_wall_s * 1000:.0f} ms)"
        lines.append(f"| {r.surface} | {r.tried} ({r.distinct}) | {r.loaded} | {refused} | {worst} "
                     f"| {r.peak_bytes / 2**10:.0f} KiB | {r.failures} |")
    for r in rows:
        for given_input, what in r.examples:
            lines.append(f"\nFAILED {r.surface}: {what}\n  input: {given_input}")
    return "\n".join(lines)


def at_limits() -> str:
    """The largest inputs the default limits accept, and the largest they refuse: time and memory."""
    import json

    from collcomm.errors import TopologyError
    from collcomm.inputs import Limits
    from collcomm.topology import jsonio, make_preset

    limits = Limits()
    side = int((limits.max_links * 2) ** 0.5)
    while side * (side - 1) // 2 > limits.max_links:
        side -= 1
    cases = [
        (f"preset ring, ranks={limits.max_nodes} (the node limit)",
         lambda: make_preset("ring", ranks=limits.max_nodes)),
        (f"preset fully-connected, ranks={side} ({side * (side - 1) // 2} links, the link limit)",
         lambda: make_preset("fully-connected", ranks=side)),
        ("preset ring, ranks=100000000 (refused)", lambda: make_preset("ring", ranks=100_000_000)),
        ("topology/1 text of max_input_bytes: a flat array of 0s (parsed, refused: not an object)",
         lambda: jsonio.loads("[" + "0," * (limits.max_input_bytes // 2 - 2) + "0]")),
        ("the same, ending in a 101-digit number (refused by its line and column)",
         lambda: jsonio.loads("[" + "0," * (limits.max_input_bytes // 2 - 60) + "9" * 101 + "]")),
        ("the same size of floats 1e300 (each checked for overflow; refused: not an object)",
         lambda: jsonio.loads("[" + "1e300," * (limits.max_input_bytes // 6 - 2) + "0]")),
        ("topology/1 text of max_input_bytes + 1 (refused before parsing)",
         lambda: jsonio.loads(" " * (limits.max_input_bytes + 1))),
        ("topology/1 file of ring(65536) as saved", lambda: jsonio.loads(json.dumps(jsonio.to_dict(
            make_preset("ring", ranks=limits.max_nodes))))),
    ]
    def attempt(call) -> str:
        try:
            return f"loaded ({call().num_ranks} ranks)"
        except TopologyError as e:
            return f"TopologyError: {str(e)[:90]}"

    lines = ["| input at the default limits | outcome | CPU time | peak memory (traced) |", "|---|---|---:|---:|"]
    for what, call in cases:
        c0 = time.process_time()  # timed untraced, then run again traced for its memory
        outcome = attempt(call)
        cpu = time.process_time() - c0
        tracemalloc.start()
        attempt(call)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        lines.append(f"| {what} | {outcome} | {cpu:.2f} s | {peak / 2**20:.0f} MiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/fuzz_inputs.py", description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=DEFAULT_COUNT, help="inputs per surface (default 10000)")
    ap.add_argument("--surface", action="append", help="only the surfaces whose name contains this (repeatable)")
    ap.add_argument("--at-limits", action="store_true", help="also time the largest inputs the defaults accept")
    args = ap.parse_args(argv)
    fuzz = _fuzz_module()
    names = [n for n in fuzz.SURFACES if not args.surface or any(s in n for s in args.surface)]
    print(f"# bench/fuzz_inputs.py --count {args.count}: {datetime.datetime.now().isoformat(timespec='seconds')}, "
          f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"niceness {os.nice(0)}", flush=True)

    def progress(row: Row) -> None:
        print(f"  {row.surface}: {row.tried} inputs in {row.wall_s:.0f} s, {row.failures} failures",
              file=sys.stderr, flush=True)

    rows = run_all(args.count, names, progress) if args.count > 0 else []
    print(table(rows))
    print(f"\nBounds per input: {TIME_BOUND:g} s, {MEMORY_BOUND >> 20} MiB traced; peak RSS of the whole run "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; preset inputs run under "
          f"{', '.join(f'{k}={v}' for k, v in fuzz.PARAM_LIMITS.items())}.")
    if args.at_limits:
        print()
        print(at_limits())
    return 1 if any(r.failures for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
