"""``collcomm schedule``: generate a schedule on a fabric and report its bandwidth against the exact
optimum (the cut bound); write it (JSON or MSCCL XML) or draw one root's trees; ``--compare`` runs
every generator and prints a table."""

from __future__ import annotations

from fractions import Fraction

from collcomm.cli import arguments
from collcomm.cli.errors import EXIT_FAILED, EXIT_OK, CommandFailed, UsageError, one_line, reading_inputs
from collcomm.cli.fabric import add_fabric_arguments, load_fabric
from collcomm.cli.formatting import exact, gbps, ranks_and_switches
from collcomm.cli.outputs import check_output, draw, write_text
from collcomm.errors import CollectiveError, ScheduleError

COLLECTIVE_NAMES = ("allgather", "reduce_scatter", "allreduce")


def add_command(sub) -> None:
    from collcomm.schedules import ALGORITHMS

    s = sub.add_parser("schedule", help="generate a schedule and compare it with the optimum",
                       description="Generate a schedule on a fabric and report its bandwidth against the exact "
                                   "optimum (the cut bound); --compare runs every algorithm.")
    add_fabric_arguments(s, required=True)
    s.add_argument("--collective", choices=COLLECTIVE_NAMES,
                   help="allgather (default), reduce_scatter or allreduce (default with --compare)")
    s.add_argument("--algorithm", choices=list(ALGORITHMS), help="default: forestcoll")
    s.add_argument("--max-trees-per-root", type=arguments.positive_int, metavar="K",
                   help="forestcoll: at most K trees per root (reports the fraction of the optimum kept)")
    s.add_argument("-o", "--output", type=arguments.path, metavar="FILE", help="write the schedule")
    s.add_argument("--format", choices=("json", "msccl-xml"),
                   help="format of -o: json (collcomm.schedule/1) or msccl-xml (default: from the extension)")
    s.add_argument("--plot", type=arguments.path, metavar="IMAGE", help="draw one root's trees (.png, .svg, .pdf)")
    s.add_argument("--root", type=arguments.name, metavar="RANK_OR_ID",
                   help="root whose trees --plot draws (default: rank 0)")
    s.add_argument("--phase", choices=("allgather", "reduce_scatter"),
                   help="phase of an allreduce that --plot draws (default: allgather)")
    s.add_argument("--compare", action="store_true", help="run every algorithm and print a table")
    s.set_defaults(func=cmd_schedule)


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


def _check_options(args, collective: str) -> None:
    """The options' combinations and the output paths, checked before the fabric is built."""
    if args.compare:
        for flag, value in (("--algorithm", args.algorithm), ("-o", args.output), ("--format", args.format),
                            ("--plot", args.plot), ("--root", args.root), ("--phase", args.phase)):
            if value is not None:
                raise UsageError(f"--compare runs every algorithm and writes nothing; leave out {flag}")
    algorithm = args.algorithm or "forestcoll"
    if args.max_trees_per_root is not None and algorithm != "forestcoll":
        raise UsageError("--max-trees-per-root applies to --algorithm forestcoll only")
    if args.format is not None and not args.output:
        raise UsageError("--format chooses the format of -o FILE; give -o too")
    if args.output:
        check_output(args.output, "-o")
    if args.plot:
        check_output(args.plot, "--plot", image=True)
        if args.phase is not None and collective != "allreduce" and args.phase != collective:
            raise UsageError(f"--phase {args.phase}: a {collective} schedule has only the {collective} phase")
    elif args.root is not None or args.phase is not None:
        raise UsageError("--root and --phase choose what --plot draws; give --plot too")


def _check_root(root: str, topo) -> None:
    # ASCII digits only: str.isdigit() is true of "²", which int() refuses.
    if not (root in topo.compute or (root.isascii() and root.isdigit() and int(root) < topo.num_ranks)):
        raise UsageError(f"--root {root}: not a rank of {topo.name} (give 0..{topo.num_ranks - 1} or a rank id "
                         f"such as {topo.compute[0]})")


def cmd_schedule(args) -> int:
    collective = args.collective or ("allreduce" if args.compare else "allgather")
    algorithm = args.algorithm or "forestcoll"
    fmt = args.format
    if args.output:
        fmt = fmt or ("msccl-xml" if args.output.lower().endswith(".xml") else "json")
    with reading_inputs("schedule"):
        _check_options(args, collective)
    with reading_inputs(arguments.fabric_source(args)):
        topo = load_fabric(args)
    if args.root is not None:
        _check_root(args.root, topo)
    from collcomm.schedules.optimum import collective_bound

    optimum = collective_bound(topo, collective)
    if args.compare:
        return _compare(topo, collective, optimum, args.max_trees_per_root)

    options = {} if args.max_trees_per_root is None else {"max_trees_per_root": args.max_trees_per_root}
    schedule, achieved = _generate(topo, collective, algorithm, options)
    ratio = _ratio(achieved, optimum)
    print(f"schedule     {algorithm} {collective} on {topo.name} ({ranks_and_switches(topo)})")
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
            write_text(args.output, to_msccl_xml(schedule, topo))
            print(f"wrote {args.output} (MSCCL XML)")
        else:
            from collcomm.schedules.ir import dumps

            write_text(args.output, dumps(schedule) + "\n")
            print(f"wrote {args.output} (collcomm.schedule/1)")
    if args.plot:
        from collcomm.schedules.plot import plot_schedule

        draw(plot_schedule, args.plot, schedule, topo, root=args.root, phase=args.phase)
        print(f"wrote {args.plot}")
    return EXIT_OK


def _compare(topo, collective: str, optimum: Fraction | None, max_trees_per_root: int | None) -> int:
    from collcomm.schedules import ALGORITHMS

    print(f"{collective} on {topo.name} ({ranks_and_switches(topo)}); "
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
            errors[name] = one_line(e)
            continue
        except Exception as e:  # noqa: BLE001 - one broken generator must not hide the others
            errors[name] = one_line(f"internal error: {type(e).__name__}: {e}")
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
