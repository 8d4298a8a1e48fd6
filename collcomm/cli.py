"""The ``collcomm`` command line: build and inspect fabrics, generate and compare schedules.

::

    collcomm topology --preset dgx-a100 --boxes 2 --show --plot fabric.png -o fabric.json
    collcomm schedule --topology fabric.json --collective allreduce -o plan.json --plot trees.png
    collcomm schedule --preset dgx-a100 --boxes 2 --compare

Exit status: 0 on success; 2 for bad input (a malformed file, an unknown preset,
parameter or algorithm, an unwritable output), with exactly one line on stderr
that starts with ``collcomm: error:``; 1 when the work itself fails (an algorithm
that is not available or returns an invalid plan); 130 on Ctrl-C. Heavy modules
(matplotlib, the generators) are imported only by the commands that use them.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from collcomm.errors import CollectiveError, ScheduleError, TopologyError

PROG = "collcomm"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
COLLECTIVE_NAMES = ("allgather", "reduce_scatter", "allreduce")


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


class CommandFailed(Exception):
    """The input was fine but the work failed: one line on stderr, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one exception instead of usage text and exit."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(message)


# ---------------------------------------------------------------------------- formatting
def exact(x: Fraction) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def gbps(x: Fraction | None) -> str:
    """``1040/3 GB/s = 346.667 GB/s`` (exact, then decimal); ``300 GB/s`` when whole."""
    if x is None:
        return "n/a (one rank: nothing moves)"
    x = Fraction(x)
    if x.denominator == 1:
        return f"{x.numerator} GB/s"
    return f"{exact(x)} GB/s = {float(x):.3f} GB/s"


def _bw_short(x: Fraction) -> str:
    x = Fraction(x)
    return f"{x.numerator}" if x.denominator == 1 else f"{exact(x)} (={float(x):.4g})"


def _ranks(topo) -> str:
    n, s = topo.num_ranks, len(topo.switches)
    return f"{n} rank{'s' if n != 1 else ''}, {s} switch{'es' if s != 1 else ''}"


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"


# ---------------------------------------------------------------------------- fabrics
def parse_param(text: str) -> tuple[str, str]:
    """``key=value`` -> (key, raw value text)."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or not raw:
        raise UsageError(f"--param {text!r}: expected key=value, e.g. --param bandwidth=25/2")
    return key, raw


def _convert_param(preset: str, key: str, raw: str, default):
    """The value of a --param: true/false, an int or an exact Fraction (a float where the
    preset's default is a float, e.g. ``latency_us``)."""
    words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
    if isinstance(default, bool):
        if raw.lower() in words:
            return words[raw.lower()]
        raise UsageError(f"--param {key}={raw}: preset {preset!r} expects true or false")
    if isinstance(default, float):
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"--param {key}={raw}: preset {preset!r} expects a number") from None
        if not math.isfinite(value):
            raise UsageError(f"--param {key}={raw}: expected a finite number")
        return value
    if raw.lower() in words:
        return words[raw.lower()]
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return Fraction(raw)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--param {key}={raw}: expected an integer, a fraction like 25/2, a decimal "
                         f"or true/false") from None


def _divide(total: int, parts: int, what: str) -> int:
    if parts <= 0 or total % parts:
        raise UsageError(f"--ranks {total} does not divide into {what}")
    return total // parts


def preset_arguments(name: str, boxes: int | None, ranks: int | None, params: Sequence[str]) -> dict:
    """Keyword arguments of preset ``name`` from --boxes, --ranks (total ranks) and --param.

    --boxes sets ``boxes`` (``leaves`` for leaf-spine); --ranks is the total number of
    ranks: ``ranks``, or ``ranks_per_cluster`` = N/2, ``dim`` = log2 N, ``hosts_per_leaf``
    = N/leaves, boxes = N/(ranks per box), rows x cols = N (most square unless one is given).
    """
    from collcomm.topology.presets import PRESETS, preset_parameters

    if name not in PRESETS:
        raise TopologyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    signature = inspect.signature(PRESETS[name]).parameters
    allowed = preset_parameters(name)
    kwargs: dict = {}
    for text in params:
        key, raw = parse_param(text)
        if key not in signature:
            raise TopologyError(f"preset {name!r} has no parameter {key!r}; it takes: {', '.join(allowed)}")
        if key in kwargs:
            raise UsageError(f"--param {key} is given twice")
        kwargs[key] = _convert_param(name, key, raw, signature[key].default)

    def put(key: str, value, flag: str):
        if key in kwargs and kwargs[key] != value:
            raise UsageError(f"{flag} sets {key}={value}, but --param {key}={kwargs[key]} disagrees")
        kwargs[key] = value

    if boxes is not None:
        key = next((k for k in ("boxes", "leaves") if k in signature), None)
        if key is None:
            raise UsageError(f"preset {name!r} has no boxes; size it with --ranks or --param "
                             f"({', '.join(allowed)})")
        put(key, boxes, "--boxes")
    if ranks is not None:
        if "ranks" in signature:
            put("ranks", ranks, "--ranks")
        elif "ranks_per_cluster" in signature:
            put("ranks_per_cluster", _divide(ranks, 2, "two equal clusters"), "--ranks")
        elif "dim" in signature:
            if ranks < 2 or ranks & (ranks - 1):
                raise UsageError(f"--ranks {ranks}: a hypercube has a power of two (>= 2) ranks")
            put("dim", ranks.bit_length() - 1, "--ranks")
        elif "hosts_per_leaf" in signature:
            leaves = kwargs.get("leaves", signature["leaves"].default)
            put("hosts_per_leaf", _divide(ranks, leaves, f"{leaves} leaves"), "--ranks")
        elif "rows" in signature and "cols" in signature:
            if "rows" in kwargs:
                put("cols", _divide(ranks, kwargs["rows"], f"{kwargs['rows']} rows"), "--ranks")
            elif "cols" in kwargs:
                put("rows", _divide(ranks, kwargs["cols"], f"{kwargs['cols']} columns"), "--ranks")
            else:
                rows = max(d for d in range(1, math.isqrt(max(ranks, 1)) + 1) if ranks % d == 0)
                kwargs.update(rows=rows, cols=ranks // rows)
        elif "boxes" in signature:
            per_box = PRESETS[name](boxes=1).num_ranks
            put("boxes", _divide(ranks, per_box, f"boxes of {per_box} ranks"), "--ranks")
        else:
            raise UsageError(f"preset {name!r} cannot be sized by --ranks; use --param ({', '.join(allowed)})")
    return kwargs


def build_preset(name: str, boxes: int | None = None, ranks: int | None = None, params: Sequence[str] = ()):
    from collcomm.topology.presets import make_preset

    kwargs = preset_arguments(name, boxes, ranks, params)
    try:
        return make_preset(name, **kwargs)
    except TopologyError as e:
        if str(e).startswith("preset "):
            raise
        raise TopologyError(f"preset {name!r}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise TopologyError(f"preset {name!r} rejects {shown or 'its defaults'}: {e}") from None


def load_fabric(args):
    """The topology named on the command line (--topology FILE or --preset NAME ...)."""
    sizing = [flag for flag, value in (("--boxes", args.boxes), ("--ranks", args.ranks), ("--param", args.param))
              if value]
    if args.topology is not None:
        if sizing:
            raise UsageError(f"{sizing[0]} sizes a --preset; a --topology file is used as it is")
        from collcomm.topology.jsonio import load

        return load(args.topology)
    return build_preset(args.preset, args.boxes, args.ranks, args.param or ())


def describe_topology(topo) -> str:
    """A readable summary: ranks, switches, hosts, links by bandwidth, ingress/egress, symmetry."""
    from collcomm.topology.symmetry import symmetry_group

    lines = [f"topology   {topo.name}"]

    def listing(ids, limit=4):
        ids = list(ids)
        if len(ids) <= limit:
            return ", ".join(ids)
        return f"{', '.join(ids[:limit - 1])}, ..., {ids[-1]}"

    lines.append(f"ranks      {topo.num_ranks}: {listing(topo.compute)}")
    lines.append(f"switches   {len(topo.switches)}" + (f": {listing(topo.switches)}" if topo.switches else ""))
    hosts: dict[str, list[int]] = {}
    for n in topo.nodes:
        if n.host is not None:
            counts = hosts.setdefault(n.host, [0, 0])
            counts[0 if n.kind == "compute" else 1] += 1
    if hosts:
        shapes: dict[tuple[int, int], list[str]] = {}
        for h, (r, s) in hosts.items():
            shapes.setdefault((r, s), []).append(h)
        parts = [f"{listing(hs, 3)} ({r} ranks, {s} switches{' each' if len(hs) > 1 else ''})"
                 for (r, s), hs in shapes.items()]
        lines.append(f"hosts      {len(hosts)}: " + "; ".join(parts))
    else:
        lines.append("hosts      none")

    def kind(nid):
        if topo.is_compute(nid):
            return "rank"
        return "host switch" if topo.host_of(nid) else "switch"

    classes: dict[tuple[Fraction, bool], dict[str, int]] = {}
    for link in topo.links:
        a, b = sorted((kind(link.src), kind(link.dst)), key=("rank", "host switch", "switch").index)
        ends = f"{a} - {b}" if link.duplex else f"{kind(link.src)} -> {kind(link.dst)}"
        bucket = classes.setdefault((link.bandwidth, link.duplex), {})
        bucket[ends] = bucket.get(ends, 0) + 1
    duplex = sum(1 for l in topo.links if l.duplex)
    lines.append(f"links      {len(topo.links)} ({duplex} duplex, {len(topo.links) - duplex} one-way), "
                 f"by bandwidth:")
    width = max((len(_bw_short(bw)) for bw, _ in classes), default=0)
    for (bw, dup), ends in sorted(classes.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        total = sum(ends.values())
        what = ", ".join(f"{e} ({c})" if len(ends) > 1 else e for e, c in ends.items())
        lines.append(f"  {_bw_short(bw):>{width}} GB/s  {total:>4} {'duplex' if dup else 'one-way':7}  {what}")
    ingress: dict[str, Fraction] = {c: Fraction(0) for c in topo.compute}
    egress: dict[str, Fraction] = {c: Fraction(0) for c in topo.compute}
    for (u, v), bw in topo.capacity.items():
        if v in ingress:
            ingress[v] += bw
        if u in egress:
            egress[u] += bw
    runs: list[list] = []  # [first rank, last rank, ingress, egress]
    for r, c in enumerate(topo.compute):
        if runs and runs[-1][2:] == [ingress[c], egress[c]]:
            runs[-1][1] = r
        else:
            runs.append([r, r, ingress[c], egress[c]])
    lines.append("per rank   ingress / egress")
    for first, last, i, o in runs[:12]:
        span = f"rank {first}" if first == last else f"ranks {first}-{last}"
        lines.append(f"  {span:<13} {_bw_short(i)} / {_bw_short(o)} GB/s")
    if len(runs) > 12:
        lines.append(f"  ... {len(runs) - 12} more ranges")
    group = symmetry_group(topo)
    orbits = len(group.rank_representatives)
    lines.append(f"symmetry   group of order {group.order} acting freely on the ranks; {orbits} rank "
                 f"orbit{'s' if orbits != 1 else ''} (trees are built for {orbits} root{'s' if orbits != 1 else ''}"
                 f" and mapped to the rest)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- outputs
def _check_output(path: str, flag: str, image: bool = False) -> None:
    """Fail before any work when an output cannot be written where asked."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, not a file")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{flag} {path}: {str(parent)!r} is not a directory")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: directory {str(parent)!r} is not writable")
    if image:
        suffix = p.suffix.lower().lstrip(".")
        supported = {"png", "pdf", "svg", "svgz", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp"}
        if suffix not in supported:
            raise UsageError(f"{flag} {path}: unknown image format {p.suffix or '(none)'!r}; use .png, .svg or .pdf")


def _write_text(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def _draw(fn, path: str, *args, **kwargs) -> None:
    try:
        fn(*args, path=path, **kwargs)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------- topology
def _probe_options(args) -> None:
    """--probe and the flags that only it takes: checked before any work."""
    only = [flag for flag, value in (("-np", args.nprocs), ("--topology-seconds", args.topology_seconds),
                                     ("--measurements", args.measurements), ("--emulate", args.emulate),
                                     ("--scale", args.scale), ("--prefix", args.prefix)) if value is not None]
    if not args.probe:
        if only:
            raise UsageError(f"{only[0]} applies to --probe only")
        return
    sizing = [flag for flag, value in (("--boxes", args.boxes), ("--ranks", args.ranks), ("--param", args.param))
              if value]
    if sizing:
        raise UsageError(f"{sizing[0]} sizes a --preset; --probe measures the fabric (give -np N)")
    if args.topology_seconds is not None and not (math.isfinite(args.topology_seconds)
                                                  and 0 < args.topology_seconds <= 60):
        raise UsageError(f"--topology-seconds {args.topology_seconds:g}: expected a number of seconds in (0, 60]")
    if args.emulate is not None:
        from collcomm.topology.jsonio import load

        fabric = load(args.emulate)
        if args.nprocs is None:
            args.nprocs = fabric.num_ranks
        elif args.nprocs != fabric.num_ranks:
            raise UsageError(f"--emulate {args.emulate} has {fabric.num_ranks} ranks but -np is {args.nprocs}")
    if args.nprocs is None:
        raise UsageError("--probe: give the number of ranks, e.g. collcomm topology --probe -np 4")
    if args.nprocs < 2:
        raise UsageError(f"-np {args.nprocs}: probing needs at least 2 ranks")
    if args.measurements:
        _check_output(args.measurements, "--measurements")


def probe_fabric(args):
    """Run ``python -m collcomm.probing`` as -np ranks (in the emulated fabric with --emulate);
    print what was measured; return the inferred topology."""
    import json
    import tempfile
    import time

    from collcomm.launcher import run
    from collcomm.topology.jsonio import load

    with tempfile.TemporaryDirectory(prefix="collcomm-probe-") as tmp:
        out, meas = os.path.join(tmp, "probed.json"), os.path.join(tmp, "measurements.json")
        command = [sys.executable, "-m", "collcomm.probing", "--out", out, "--measurements", meas]
        if args.topology_seconds is not None:
            command += ["--seconds", repr(args.topology_seconds)]
        options = {}
        if args.emulate is not None:
            options = {"emulate": args.emulate, "scale": args.scale, "prefix": args.prefix}
        start = time.monotonic()
        try:
            code = run(args.nprocs, command, **options)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if code != 0 or not os.path.exists(out):
            raise CommandFailed(f"the probe job of {args.nprocs} ranks failed (exit status {code})")
        topo = load(out)
        with open(meas) as f:
            data = json.load(f)
        if args.measurements:
            _write_text(args.measurements, json.dumps(data, indent=1) + "\n")
    print(describe_probe(data, time.monotonic() - start))
    return topo


def describe_probe(data: dict, elapsed: float) -> str:
    """What a probe measured: time, pairwise bandwidth (MB/s) and latency (us)."""
    import statistics

    from collcomm.topology.inference import Measurements

    m = Measurements.from_json(data)
    lines = [f"probed     {m.n} ranks in {elapsed:.1f} s ({m.seconds:.1f} s measuring, {m.phases} transfer phases "
             f"of {m.window:g} s)"]
    lines += [f"note       {note}" for note in m.notes]
    if m.n <= 16:
        width = max([8] + [len(f"{v * 1000:.4g}") + 1 for v in m.bandwidth.values()])
        lines.append("bandwidth  MB/s alone, row sends to column")
        lines.append(" " * 9 + "".join(f"{c:>{width}}" for c in range(m.n)))
        for a in range(m.n):
            cells = []
            for b in range(m.n):
                cells.append("-" if a == b else f"{m.bandwidth.get((a, b), 0.0) * 1000:.4g}")
            lines.append(f"  {a:<7}" + "".join(f"{c:>{width}}" for c in cells))
        lat = [m.latency_us[k] for k in sorted(m.latency_us)]
        if lat:
            lines.append(f"latency    {min(lat):.0f}-{max(lat):.0f} us (median {statistics.median(lat):.0f})"
                         + (f"; hops {min(m.hops.values())}-{max(m.hops.values())}" if m.hops else ""))
    return "\n".join(lines)


def cmd_topology(args) -> int:
    _probe_options(args)
    if args.output:
        _check_output(args.output, "-o")
    if args.plot:
        _check_output(args.plot, "--plot", image=True)
    topo = probe_fabric(args) if args.probe else load_fabric(args)
    show = args.show or args.probe or not (args.output or args.plot)
    if show:
        print(describe_topology(topo))
    if args.output:
        from collcomm.topology.jsonio import dumps

        _write_text(args.output, dumps(topo) + "\n")
        print(f"wrote {args.output} (collcomm.topology/1)")
    if args.plot:
        from collcomm.topology.plot import plot_topology

        _draw(plot_topology, args.plot, topo)
        print(f"wrote {args.plot}")
    return EXIT_OK


# ---------------------------------------------------------------------------- schedule
def _generate(topo, collective: str, name: str, options: dict):
    """Generate, validate and measure one schedule; raises CollectiveError or CommandFailed."""
    from collcomm.schedules import generate
    from collcomm.schedules.evaluate import algbw, validate

    try:
        schedule = generate(topo, collective, name, **options)
    except ImportError as e:
        raise CommandFailed(f"algorithm {name!r} is not available: {e}") from None
    try:
        validate(schedule, topo)
    except ScheduleError as e:
        raise CommandFailed(f"{name} produced an invalid {collective} schedule: {e}") from None
    return schedule, algbw(schedule, topo)


def _max_depth(schedule) -> int:
    return max((t.depth() for p in schedule.phases for t in p.trees), default=0)


def _ratio(achieved: Fraction | None, optimum: Fraction | None) -> Fraction | None:
    if achieved is None or optimum is None:
        return None
    return achieved / optimum


def _tree_bound(schedule) -> Fraction | None:
    """ForestColl's own target (the cut bound unless switches cannot forward all they could send)."""
    kinds = [p.collective for p in schedule.phases]
    try:
        bounds = [Fraction(schedule.info[k]["optimum_algbw"]) for k in kinds]
    except (KeyError, TypeError, ValueError):
        return None
    return 1 / sum(1 / b for b in bounds)


def cmd_schedule(args) -> int:
    collective = args.collective or ("allreduce" if args.compare else "allgather")
    if args.compare:
        for flag, value in (("--algorithm", args.algorithm), ("-o", args.output), ("--format", args.format),
                            ("--plot", args.plot), ("--root", args.root), ("--phase", args.phase)):
            if value is not None:
                raise UsageError(f"--compare runs every algorithm and writes nothing; leave out {flag}")
    algorithm = args.algorithm or "forestcoll"
    if args.max_trees_per_root is not None and algorithm != "forestcoll":
        raise UsageError("--max-trees-per-root applies to --algorithm forestcoll only")
    fmt = args.format
    if fmt is not None and not args.output:
        raise UsageError("--format chooses the format of -o FILE; give -o too")
    if args.output:
        fmt = fmt or ("msccl-xml" if args.output.lower().endswith(".xml") else "json")
        _check_output(args.output, "-o")
    if args.plot:
        _check_output(args.plot, "--plot", image=True)
        if args.phase is not None and collective != "allreduce" and args.phase != collective:
            raise UsageError(f"--phase {args.phase}: a {collective} schedule has only the {collective} phase")
    elif args.root is not None or args.phase is not None:
        raise UsageError("--root and --phase choose what --plot draws; give --plot too")
    topo = load_fabric(args)
    if args.root is not None:
        root = args.root
        if not (root in topo.compute or (root.isdigit() and int(root) < topo.num_ranks)):
            raise UsageError(f"--root {root}: not a rank of {topo.name} (give 0..{topo.num_ranks - 1} or a rank id "
                             f"such as {topo.compute[0]})")
    from collcomm.schedules.optimum import collective_bound

    optimum = collective_bound(topo, collective)
    if args.compare:
        return _compare(topo, collective, optimum, args.max_trees_per_root)

    options = {} if args.max_trees_per_root is None else {"max_trees_per_root": args.max_trees_per_root}
    schedule, achieved = _generate(topo, collective, algorithm, options)
    ratio = _ratio(achieved, optimum)
    print(f"schedule     {algorithm} {collective} on {topo.name} ({_ranks(topo)})")
    print(f"optimum      {gbps(optimum)}" + ("  (exact cut bound)" if optimum is not None else ""))
    print(f"achieved     {gbps(achieved)}")
    if ratio is not None:
        print(f"ratio        {exact(ratio)}  ({float(ratio) * 100:.3f}% of the optimum)")
    print(f"trees        {schedule.num_trees()}")
    if algorithm == "forestcoll":
        per_root = [(p.collective, schedule.info[p.collective]["trees_per_root"])
                    for p in schedule.phases if p.collective in schedule.info]
        if per_root:
            print("trees/root   " + ", ".join(f"{k} ({kind})" if len(per_root) > 1 else str(k)
                                              for kind, k in per_root))
        bound = _tree_bound(schedule)
        if bound is not None and optimum is not None and bound != optimum:
            print(f"tree bound   {gbps(bound)}  (switches can forward only what reaches them)")
        if args.max_trees_per_root is not None and bound is not None and achieved is not None:
            kept = achieved / bound
            of = "the optimum" if bound == optimum else "the tree bound"
            print(f"kept         {exact(kept)} of {of} ({float(kept) * 100:.3f}%) with at most "
                  f"{args.max_trees_per_root} tree(s) per root")
    print(f"max depth    {_max_depth(schedule)}")
    print(f"generated in {schedule.generation_seconds:.3f} s")
    if args.output:
        if fmt == "msccl-xml":
            try:
                from collcomm.schedules.export_msccl import to_msccl_xml
            except ImportError as e:
                raise CommandFailed(f"MSCCL export is not available: {e}") from None
            _write_text(args.output, to_msccl_xml(schedule, topo))
            print(f"wrote {args.output} (MSCCL XML)")
        else:
            from collcomm.schedules.ir import dumps

            _write_text(args.output, dumps(schedule) + "\n")
            print(f"wrote {args.output} (collcomm.schedule/1)")
    if args.plot:
        from collcomm.schedules.plot import plot_schedule

        _draw(plot_schedule, args.plot, schedule, topo, root=args.root, phase=args.phase)
        print(f"wrote {args.plot}")
    return EXIT_OK


def _compare(topo, collective: str, optimum: Fraction | None, max_trees_per_root: int | None) -> int:
    from collcomm.schedules import ALGORITHMS

    print(f"{collective} on {topo.name} ({_ranks(topo)}); "
          f"optimum {gbps(optimum)}" + (" (exact cut bound)" if optimum is not None else ""))
    header = ("algorithm", "algbw GB/s", "ratio", "trees", "max depth", "generation s")
    rows: list[tuple[str, ...]] = []
    errors: dict[str, str] = {}
    for name in ALGORITHMS:
        options = {"max_trees_per_root": max_trees_per_root} if name == "forestcoll" and max_trees_per_root else {}
        try:
            schedule, achieved = _generate(topo, collective, name, options)
        except KeyboardInterrupt:
            raise
        except (CollectiveError, CommandFailed) as e:
            errors[name] = _one_line(e)
            continue
        except Exception as e:  # noqa: BLE001 - one broken generator must not hide the others
            errors[name] = _one_line(f"internal error: {type(e).__name__}: {e}")
            continue
        ratio = _ratio(achieved, optimum)
        rows.append((name, "n/a" if achieved is None else f"{float(achieved):.3f}",
                     "n/a" if ratio is None else (exact(ratio) if ratio == 1 else f"{float(ratio):.4f}"),
                     str(schedule.num_trees()), str(_max_depth(schedule)), f"{schedule.generation_seconds:.3f}"))
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    widths[0] = max([widths[0]] + [len(n) for n in errors])

    def line(cells):
        return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])

    print(line(header))
    done = {r[0]: r for r in rows}
    for name in ALGORITHMS:
        if name in done:
            print(line(done[name]))
        else:
            print(f"{name.ljust(widths[0])}  error: {errors[name]}")
    note = "ratio = algbw / optimum"
    if max_trees_per_root:
        note += f"; forestcoll with at most {max_trees_per_root} tree(s) per root"
    print(note)
    return EXIT_OK if rows else EXIT_FAILED


# ---------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_fabric_arguments(p: argparse.ArgumentParser, required: bool):
    from collcomm.topology.presets import PRESETS

    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--topology", metavar="FILE", help="a collcomm.topology/1 JSON file")
    src.add_argument("--preset", metavar="NAME", choices=list(PRESETS),
                     help=f"a built-in fabric: {', '.join(PRESETS)}")
    p.add_argument("--boxes", type=_positive_int, metavar="B",
                   help="number of boxes (hosts; leaf switches for leaf-spine)")
    p.add_argument("--ranks", type=_positive_int, metavar="N", help="total number of ranks")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="any other preset parameter (int, fraction like 25/2, decimal, true/false); repeatable")
    return src


def build_parser() -> argparse.ArgumentParser:
    from collcomm._version import __version__
    from collcomm.schedules import ALGORITHMS

    parser = _Parser(prog=PROG, description="Topology-aware collective communication: fabrics and schedules.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("topology", help="build, save, summarise or draw a fabric",
                       description="Build a preset (or load a file), then save it (-o), summarise it (--show, the "
                                   "default) and/or draw it (--plot).")
    fabric = _add_fabric_arguments(t, required=True)
    fabric.add_argument("--probe", action="store_true",
                        help="measure the fabric: run -np N ranks on this machine that probe latency, pairwise "
                             "bandwidth and link sharing, and infer a topology")
    t.add_argument("-np", "--nprocs", type=_positive_int, metavar="N", help="--probe: number of ranks")
    t.add_argument("--topology-seconds", type=float, metavar="S",
                   help="--probe: measuring window of each transfer in seconds (default 0.5)")
    t.add_argument("--measurements", metavar="FILE", help="--probe: also write what was measured (JSON)")
    _add_emulate_arguments(t, "--emulate", "--probe: run the ranks in this emulated fabric (needs root)")
    t.add_argument("-o", "--output", metavar="FILE", help="write collcomm.topology/1 JSON")
    t.add_argument("--show", action="store_true", help="print a summary (default when nothing else is asked)")
    t.add_argument("--plot", metavar="IMAGE", help="draw the fabric (.png, .svg, .pdf)")
    t.set_defaults(func=cmd_topology)

    s = sub.add_parser("schedule", help="generate a schedule and compare it with the optimum",
                       description="Generate a schedule on a fabric and report its bandwidth against the exact "
                                   "optimum (the cut bound); --compare runs every algorithm.")
    _add_fabric_arguments(s, required=True)
    s.add_argument("--collective", choices=COLLECTIVE_NAMES,
                   help="allgather (default), reduce_scatter or allreduce (default with --compare)")
    s.add_argument("--algorithm", choices=list(ALGORITHMS), help="default: forestcoll")
    s.add_argument("--max-trees-per-root", type=_positive_int, metavar="K",
                   help="forestcoll: at most K trees per root (reports the fraction of the optimum kept)")
    s.add_argument("-o", "--output", metavar="FILE", help="write the schedule")
    s.add_argument("--format", choices=("json", "msccl-xml"),
                   help="format of -o: json (collcomm.schedule/1) or msccl-xml (default: from the extension)")
    s.add_argument("--plot", metavar="IMAGE", help="draw one root's trees (.png, .svg, .pdf)")
    s.add_argument("--root", metavar="RANK_OR_ID", help="root whose trees --plot draws (default: rank 0)")
    s.add_argument("--phase", choices=("allgather", "reduce_scatter"),
                   help="phase of an allreduce that --plot draws (default: allgather)")
    s.add_argument("--compare", action="store_true", help="run every algorithm and print a table")
    s.set_defaults(func=cmd_schedule)

    r = sub.add_parser("run", help="run a program as N ranks on this machine (like torchrun)",
                       description="Start an embedded coordinator and N ranks of PROGRAM with their COLLCOMM_* "
                                   "environment; prefix output lines with the rank; forward Ctrl-C; when a rank "
                                   "fails, stop the others and exit with its status.")
    r.add_argument("-n", "--nprocs", type=_positive_int, required=True, metavar="N", help="number of ranks")
    r.add_argument("--topology", metavar="FILE", help="the job's fabric (collcomm.topology/1), for the planner; "
                                                      "'probe': the ranks measure it at init")
    r.add_argument("--timeout", type=float, metavar="SECONDS", help="default timeout of every blocking call")
    _add_emulate_arguments(r, "--emulate", "run each rank inside its network namespace of this emulated fabric "
                                           "(built for the job unless `collcomm emulate up` built it; needs root)")
    r.add_argument("program", nargs=argparse.REMAINDER, help="the program and its arguments")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("emulate", help="build or remove an emulated fabric (network namespaces, veth, tc tbf)",
                       description="Build a topology on this machine out of network namespaces (one per node), "
                                   "veth pairs (one per link) shaped with tc tbf to the scaled bandwidths, and "
                                   "routes; needs root. `down` removes everything under the prefix.")
    esub = e.add_subparsers(dest="action", metavar="ACTION", required=True)
    eu = esub.add_parser("up", help="build the fabric of a topology file")
    eu.add_argument("topology_file", metavar="T.json", help="collcomm.topology/1 file")
    _add_emulate_arguments(eu, None, None)
    eu.set_defaults(func=cmd_emulate_up)
    ed = esub.add_parser("down", help="remove the fabric (and anything left under its prefix)")
    ed.add_argument("--prefix", default=None, metavar="NAME", help="name prefix of the fabric (default ccemu)")
    ed.set_defaults(func=cmd_emulate_down)
    es = esub.add_parser("status", help="show what exists under the prefix")
    es.add_argument("--prefix", default=None, metavar="NAME", help="name prefix of the fabric (default ccemu)")
    es.set_defaults(func=cmd_emulate_status)
    ef = esub.add_parser("fault", help="inject a fault on one link of the fabric: down, throttled, or back up",
                         description="Take one link of the emulated fabric down (a black hole both ways), shape "
                                     "one direction to a percentage of its planned rate, or restore it; needs root.")
    ef.add_argument("--link", nargs=2, required=True, metavar=("A", "B"),
                    help="the link's two ends: node ids of the topology or rank numbers")
    fmode = ef.add_mutually_exclusive_group(required=True)
    fmode.add_argument("--down", action="store_true", help="drop every packet both ways")
    fmode.add_argument("--bandwidth", metavar="PERCENT",
                       help="shape the direction A->B to PERCENT of its planned rate, e.g. 10%%")
    fmode.add_argument("--up", action="store_true", help="restore the planned rates both ways")
    ef.add_argument("--both", action="store_true", help="--bandwidth: shape B->A as well")
    ef.add_argument("--prefix", default=None, metavar="NAME", help="name prefix of the fabric (default ccemu)")
    ef.set_defaults(func=cmd_emulate_fault)

    c = sub.add_parser("coordinator", help="run the coordinator alone, for jobs that span machines",
                       description="Serve rendezvous, groups and the key-value store until Ctrl-C. Ranks find it "
                                   "through COLLCOMM_COORDINATOR=host:port and share COLLCOMM_TOKEN.")
    c.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    c.add_argument("--port", type=int, default=29400, help="port (default 29400; 0: any free port)")
    c.set_defaults(func=cmd_coordinator)

    st = sub.add_parser("status", help="the link monitor's latest verdicts and plan changes of a running job",
                        description="Ask the coordinator (COLLCOMM_COORDINATOR, COLLCOMM_TOKEN) for the latest "
                                    "link-monitor report that group rank 0 published (jobs started with "
                                    "COLLCOMM_MONITOR_EVERY or init(monitor_every=...)).")
    st.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="default: $COLLCOMM_COORDINATOR")
    st.add_argument("--token", default=None, help="default: $COLLCOMM_TOKEN")
    st.add_argument("--group", type=int, default=None, metavar="ID", help="a group id (default: the latest report)")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the coordinator (default 5)")
    st_fmt = st.add_mutually_exclusive_group()
    st_fmt.add_argument("--json", action="store_true", help="print the report as JSON")
    st_fmt.add_argument("--prometheus", action="store_true", help="print it in the Prometheus text format")
    st.set_defaults(func=cmd_status)
    return parser


def _add_emulate_arguments(p: argparse.ArgumentParser, flag: str | None, help_text: str | None) -> None:
    if flag:
        p.add_argument(flag, metavar="T.json", dest="emulate", help=help_text)
    p.add_argument("--scale", default=None, metavar="BW=RATE",
                   help="topology bandwidth to tc rate, e.g. 1GB/s=100Mbit (the default)")
    p.add_argument("--prefix", default=None, metavar="NAME",
                   help="name prefix of namespaces and interfaces (default ccemu)")


def cmd_run(args) -> int:
    from collcomm.launcher import run

    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise UsageError("run: give the program to run, e.g. collcomm run -n 4 python train.py")
    try:
        return run(args.nprocs, program, topology=args.topology, timeout=args.timeout, emulate=args.emulate,
                   scale=args.scale, prefix=args.prefix)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_emulate_up(args) -> int:
    from collcomm.topology import emulate as emu
    from collcomm.topology import jsonio

    emu.require_root()
    topo = jsonio.load(args.topology_file)
    p = emu.up(emu.plan(topo, args.prefix or emu.DEFAULT_PREFIX, args.scale or emu.DEFAULT_SCALE))
    print(f"{p.name}: {len(p.namespaces)} namespaces ({p.num_ranks} ranks), {len(p.veths)} shaped links, "
          f"coordinator network {p.mgmt_host}/16 on {p.mgmt_bridge}; remove with "
          f"`{PROG} emulate down --prefix {p.prefix}`")
    for r in range(p.num_ranks):
        print(f"  rank {r}  {p.node_ids[r]:<20} namespace {p.namespaces[r]:<12} address {p.addresses[r]}")
    return EXIT_OK


def cmd_emulate_down(args) -> int:
    from collcomm.topology import emulate as emu

    prefix = emu.check_prefix(args.prefix or emu.DEFAULT_PREFIX)
    gone = emu.down(prefix)
    print(f"removed {len(gone['namespaces'])} namespaces, {len(gone['links'])} links and "
          f"{len(gone['pids'])} processes under prefix {prefix!r}")
    return EXIT_OK


def cmd_emulate_status(args) -> int:
    from collcomm.topology import emulate as emu

    prefix = emu.check_prefix(args.prefix or emu.DEFAULT_PREFIX)
    emu.require_root()
    left = emu.leftovers(prefix)
    p = emu.current(prefix)
    state = f"up: {p.name}, {p.num_ranks} ranks" if p else ("down" if not left["namespaces"] else "partial")
    print(f"{prefix}: {state}; {len(left['namespaces'])} namespaces, {len(left['links'])} root links, "
          f"{len(left['pids'])} processes")
    return EXIT_OK


def cmd_emulate_fault(args) -> int:
    from collcomm.topology import emulate as emu

    prefix = emu.check_prefix(args.prefix or emu.DEFAULT_PREFIX)
    if args.both and args.bandwidth is None:
        raise UsageError("--both applies to --bandwidth (--down and --up act on both directions)")
    percent = emu.parse_percent(args.bandwidth) if args.bandwidth is not None else None
    emu.require_root("collcomm emulate fault")
    p = emu.current(prefix)
    if p is None:
        raise UsageError(f"no emulated fabric is up under prefix {prefix!r}; build one with "
                         f"`{PROG} emulate up T.json --prefix {prefix}`")
    mode = "down" if args.down else "up" if args.up else "bandwidth"
    print(emu.fault(p, args.link[0], args.link[1], mode, percent, both=args.both))
    return EXIT_OK


def cmd_status(args) -> int:
    import json

    from collcomm.coordinator.client import CoordinatorClient
    from collcomm.errors import CollectiveTimeout
    from collcomm.runtime.monitor import prometheus

    address = args.coordinator or os.environ.get("COLLCOMM_COORDINATOR")
    token = args.token or os.environ.get("COLLCOMM_TOKEN")
    if not address or not token:
        raise UsageError("status: give --coordinator and --token (or set COLLCOMM_COORDINATOR and COLLCOMM_TOKEN)")
    key = "monitor/latest" if args.group is None else f"monitor/latest/{args.group}"
    with CoordinatorClient(address, token, timeout=args.timeout) as client:
        try:
            report = json.loads(client.kv_get(key, timeout=0))
        except CollectiveTimeout:
            raise CommandFailed(f"no link-monitor report at {address}" + (
                f" for group {args.group}" if args.group is not None else "") +
                "; is the job running with COLLCOMM_MONITOR_EVERY set?") from None
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
        return EXIT_OK
    if args.prometheus:
        sys.stdout.write(prometheus({"group": report.get("group"), "verdicts": report.get("verdicts", []),
                                     "plan_epoch": report.get("current_plan_epoch", 0),
                                     "faults": report.get("faults", [])}))
        return EXIT_OK
    print(f"group {report.get('group')} ({report.get('group_name')}, members {report.get('members')}, epoch "
          f"{report.get('epoch')}): round {report.get('round')}, plan epoch {report.get('current_plan_epoch')} "
          f"on {report.get('topology_name')}; {report.get('healthy', 0)} healthy links")
    if report.get("missing_reports"):
        print(f"  missing reports from ranks {report['missing_reports']}")
    for v in report.get("verdicts", []):
        print(f"  {v['state']:<9} {v['reason']}")
    for f in report.get("faults", []):
        print(f"  fabric link {f['link'][0]} -> {f['link'][1]}: {f['state']}, planned at {f['fraction']} of its "
              f"bandwidth")
    if report.get("error"):
        print(f"  error: {report['error']}")
    return EXIT_OK


def cmd_coordinator(args) -> int:
    from collcomm.coordinator.server import serve_forever

    return serve_forever(args.host, args.port)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``collcomm`` command line; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    except (UsageError, CollectiveError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except CommandFailed as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, without a second error on flush.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_FAILED
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"{PROG}: error: {where}{_one_line(e.strerror or e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
