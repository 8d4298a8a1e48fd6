"""``collcomm emulate up|down|status|fault``: build an emulated fabric (network namespaces, veth
pairs, tc tbf; :mod:`collcomm.emulation`), remove it, show it, or inject a fault on one link.
Every action needs root; ``down`` removes everything under the prefix, also after a crash."""

from __future__ import annotations

from collcomm.cli import arguments
from collcomm.cli.errors import EXIT_OK, PROG, UsageError, reading_inputs


def add_command(sub) -> None:
    from collcomm.emulation.options import add_emulation_arguments

    e = sub.add_parser("emulate", help="build or remove an emulated fabric (network namespaces, veth, tc tbf)",
                       description="Build a topology on this machine out of network namespaces (one per node), "
                                   "veth pairs (one per link) shaped with tc tbf to the scaled bandwidths, and "
                                   "routes; needs root. `down` removes everything under the prefix.")
    esub = e.add_subparsers(dest="action", metavar="ACTION", required=True)
    eu = esub.add_parser("up", help="build the fabric of a topology file")
    eu.add_argument("topology_file", type=arguments.path, metavar="T.json", help="collcomm.topology/1 file")
    add_emulation_arguments(eu, None, None)
    eu.set_defaults(func=cmd_emulate_up)
    ed = esub.add_parser("down", help="remove the fabric (and anything left under its prefix)")
    ed.add_argument("--prefix", type=arguments.name, default=None, metavar="NAME",
                    help="name prefix of the fabric (default ccemu)")
    ed.set_defaults(func=cmd_emulate_down)
    es = esub.add_parser("status", help="show what exists under the prefix")
    es.add_argument("--prefix", type=arguments.name, default=None, metavar="NAME",
                    help="name prefix of the fabric (default ccemu)")
    es.set_defaults(func=cmd_emulate_status)
    ef = esub.add_parser("fault", help="inject a fault on one link of the fabric: down, throttled, or back up",
                         description="Take one link of the emulated fabric down (a black hole both ways), shape "
                                     "one direction to a percentage of its planned rate, or restore it; needs root.")
    ef.add_argument("--link", type=arguments.name, nargs=2, required=True, metavar=("A", "B"),
                    help="the link's two ends: node ids of the topology or rank numbers")
    fmode = ef.add_mutually_exclusive_group(required=True)
    fmode.add_argument("--down", action="store_true", help="drop every packet both ways")
    fmode.add_argument("--bandwidth", metavar="PERCENT",
                       help="shape the direction A->B to PERCENT of its planned rate, e.g. 10%%")
    fmode.add_argument("--up", action="store_true", help="restore the planned rates both ways")
    ef.add_argument("--both", action="store_true", help="--bandwidth: shape B->A as well")
    ef.add_argument("--prefix", type=arguments.name, default=None, metavar="NAME",
                    help="name prefix of the fabric (default ccemu)")
    ef.set_defaults(func=cmd_emulate_fault)


def cmd_emulate_up(args) -> int:
    from collcomm import emulation as emu
    from collcomm.emulation.options import check_emulation_arguments
    from collcomm.topology import jsonio

    with reading_inputs("emulate up"):
        check_emulation_arguments(None, args.scale, args.prefix, flag=None)
        emu.require_root()
        topo = jsonio.load(args.topology_file)
        plan = emu.plan(topo, args.prefix or emu.DEFAULT_PREFIX, args.scale or emu.DEFAULT_SCALE)
    p = emu.up(plan)
    print(f"{p.name}: {len(p.namespaces)} namespaces ({p.num_ranks} ranks), {len(p.veths)} shaped links, "
          f"coordinator network {p.mgmt_host}/16 on {p.mgmt_bridge}; remove with "
          f"`{PROG} emulate down --prefix {p.prefix}`")
    for r in range(p.num_ranks):
        print(f"  rank {r}  {p.node_ids[r]:<20} namespace {p.namespaces[r]:<12} address {p.addresses[r]}")
    return EXIT_OK


def cmd_emulate_down(args) -> int:
    from collcomm import emulation as emu

    with reading_inputs("emulate down"):
        prefix = emu.check_prefix(args.prefix or emu.DEFAULT_PREFIX)
    gone = emu.down(prefix)
    print(f"removed {len(gone['namespaces'])} namespaces, {len(gone['links'])} links and "
          f"{len(gone['pids'])} processes under prefix {prefix!r}")
    return EXIT_OK


def cmd_emulate_status(args) -> int:
    from collcomm import emulation as emu

    with reading_inputs("emulate status"):
        prefix = emu.check_prefix(args.prefix or emu.DEFAULT_PREFIX)
        emu.require_root()
    left = emu.leftovers(prefix)
    p = emu.current(prefix)
    state = f"up: {p.name}, {p.num_ranks} ranks" if p else ("down" if not left["namespaces"] else "partial")
    print(f"{prefix}: {state}; {len(left['namespaces'])} namespaces, {len(left['links'])} root links, "
          f"{len(left['pids'])} processes")
    return EXIT_OK


def cmd_emulate_fault(args) -> int:
    from collcomm import emulation as emu

    with reading_inputs("emulate fault"):
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
