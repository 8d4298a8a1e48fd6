"""``collcomm topology``: build a preset (or load a file, or measure the fabric with ``--probe``),
then save it, summarise it and/or draw it.

``--probe`` runs ``python -m collcomm.probing`` as ``-np`` ranks on this machine through
collcomm's launcher (inside an emulated fabric with ``--emulate``) and infers a topology from
what they measured.
"""

from __future__ import annotations

import os
import sys

from collcomm.cli import arguments
from collcomm.cli.describe import describe_probe, describe_topology
from collcomm.cli.errors import EXIT_OK, CommandFailed, UsageError, reading_inputs
from collcomm.cli.fabric import add_fabric_arguments, load_fabric
from collcomm.cli.outputs import check_output, draw, write_text

MAX_PROBE_SECONDS = 60.0  # of one transfer's measuring window


def add_command(sub) -> None:
    from collcomm.emulation.options import add_emulation_arguments
    from collcomm.launcher import MAX_LOCAL_RANKS

    t = sub.add_parser("topology", help="build, save, summarise or draw a fabric",
                       description="Build a preset (or load a file), then save it (-o), summarise it (--show, the "
                                   "default) and/or draw it (--plot).")
    fabric = add_fabric_arguments(t, required=True)
    fabric.add_argument("--probe", action="store_true",
                        help="measure the fabric: run -np N ranks on this machine that probe latency, pairwise "
                             "bandwidth and link sharing, and infer a topology")
    t.add_argument("-np", "--nprocs", type=arguments.integer(1, MAX_LOCAL_RANKS, "a number of ranks"), metavar="N",
                   help="--probe: number of ranks")
    t.add_argument("--topology-seconds", type=arguments.seconds_up_to(MAX_PROBE_SECONDS), metavar="S",
                   help="--probe: measuring window of each transfer in seconds (default 0.5)")
    t.add_argument("--measurements", type=arguments.path, metavar="FILE",
                   help="--probe: also write what was measured (JSON)")
    add_emulation_arguments(t, "--emulate", "--probe: run the ranks in this emulated fabric (needs root)")
    t.add_argument("-o", "--output", type=arguments.path, metavar="FILE", help="write collcomm.topology/1 JSON")
    t.add_argument("--show", action="store_true", help="print a summary (default when nothing else is asked)")
    t.add_argument("--plot", type=arguments.path, metavar="IMAGE", help="draw the fabric (.png, .svg, .pdf)")
    t.set_defaults(func=cmd_topology)


def cmd_topology(args) -> int:
    with reading_inputs("topology"):
        _probe_options(args)
        if args.output:
            check_output(args.output, "-o")
        if args.plot:
            check_output(args.plot, "--plot", image=True)
    if args.probe:
        topo = probe_fabric(args)
    else:
        with reading_inputs(arguments.fabric_source(args)):
            topo = load_fabric(args)
    show = args.show or args.probe or not (args.output or args.plot)
    if show:
        print(describe_topology(topo))
    if args.output:
        from collcomm.topology.jsonio import dumps

        write_text(args.output, dumps(topo) + "\n")
        print(f"wrote {args.output} (collcomm.topology/1)")
    if args.plot:
        from collcomm.topology.plot import plot_topology

        draw(plot_topology, args.plot, topo)
        print(f"wrote {args.plot}")
    return EXIT_OK


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
    from collcomm.emulation.options import check_emulation_arguments

    check_emulation_arguments(args.emulate, args.scale, args.prefix)
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
        check_output(args.measurements, "--measurements")


def probe_fabric(args):
    """Run ``python -m collcomm.probing`` as -np ranks (in the emulated fabric with --emulate);
    print what was measured; return the inferred topology."""
    import json
    import tempfile
    import time

    from collcomm.launcher import JobRefused, run
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
        except JobRefused as e:  # e.g. another emulated fabric is up under --prefix
            raise UsageError(f"--probe: {e}") from None
        if code != 0 or not os.path.exists(out):
            raise CommandFailed(f"the probe job of {args.nprocs} ranks failed (exit status {code})")
        topo = load(out)
        with open(meas) as f:
            data = json.load(f)
        if args.measurements:
            write_text(args.measurements, json.dumps(data, indent=1) + "\n")
    print(describe_probe(data, time.monotonic() - start))
    return topo
