"""The commands that run jobs or talk to them: ``collcomm run`` (N ranks on this machine, like
torchrun, through :mod:`collcomm.launcher`), ``collcomm coordinator`` (the coordinator alone, for
jobs that span machines: :mod:`collcomm.coordinator.standalone`) and ``collcomm status`` (a
running job's link-monitor report).

The job token never appears on a command line: ``coordinator`` and ``status`` take it from
``COLLCOMM_TOKEN`` or ``--token-file PATH`` (a file closed to other users) and refuse ``--token``;
``run`` hands its ranks a fresh one in their environment. With ``COLLCOMM_TLS_CA`` set,
``status`` verifies a TLS coordinator (``coordinator --tls-cert C --tls-key K``) with that CA."""

from __future__ import annotations

import argparse
import os
import sys

from collcomm.cli.arguments import positive_int
from collcomm.cli.errors import EXIT_OK, CommandFailed, UsageError


def add_run_command(sub) -> None:
    from collcomm.emulation.options import add_emulation_arguments

    r = sub.add_parser("run", help="run a program as N ranks on this machine (like torchrun)",
                       description="Start an embedded coordinator and N ranks of PROGRAM with their COLLCOMM_* "
                                   "environment; prefix output lines with the rank; forward Ctrl-C; when a rank "
                                   "fails, stop the others and exit with its status.")
    r.add_argument("-n", "--nprocs", type=positive_int, required=True, metavar="N", help="number of ranks")
    r.add_argument("--topology", metavar="FILE", help="the job's fabric (collcomm.topology/1), for the planner; "
                                                      "'probe': the ranks measure it at init")
    r.add_argument("--timeout", type=float, metavar="SECONDS", help="default timeout of every blocking call")
    add_emulation_arguments(r, "--emulate", "run each rank inside its network namespace of this emulated fabric "
                                            "(built for the job unless `collcomm emulate up` built it; needs root)")
    r.add_argument("program", nargs=argparse.REMAINDER, help="the program and its arguments")
    r.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from collcomm.emulation.options import check_emulation_arguments
    from collcomm.launcher import run

    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise UsageError("run: give the program to run, e.g. collcomm run -n 4 python train.py")
    check_emulation_arguments(args.emulate, args.scale, args.prefix)
    try:
        return run(args.nprocs, program, topology=args.topology, timeout=args.timeout, emulate=args.emulate,
                   scale=args.scale, prefix=args.prefix)
    except ValueError as e:
        raise UsageError(str(e)) from None


def add_coordinator_command(sub) -> None:
    from collcomm.coordinator.standalone import add_arguments

    c = sub.add_parser("coordinator", help="run the coordinator alone, for jobs that span machines",
                       description="Serve rendezvous, groups and the key-value store until Ctrl-C or SIGTERM. Ranks "
                                   "find it through COLLCOMM_COORDINATOR=host:port and share the job token "
                                   "(COLLCOMM_TOKEN); with --tls-cert/--tls-key they verify it with COLLCOMM_TLS_CA "
                                   "(the CA certificate that signed CERT). The token comes from --token-file or "
                                   "COLLCOMM_TOKEN; without either one is generated into a new mode-0600 file whose "
                                   "path is printed. The token is never printed or taken on the command line.")
    add_arguments(c)
    c.set_defaults(func=cmd_coordinator)


def cmd_coordinator(args) -> int:
    from collcomm.coordinator.standalone import run

    return run(args)


def add_status_command(sub) -> None:
    st = sub.add_parser("status", help="the link monitor's latest verdicts and plan changes of a running job",
                        description="Ask the coordinator (COLLCOMM_COORDINATOR; the job token from COLLCOMM_TOKEN "
                                    "or --token-file) for the latest link-monitor report that group rank 0 "
                                    "published (jobs started with COLLCOMM_MONITOR_EVERY or "
                                    "init(monitor_every=...)). A TLS coordinator is verified with COLLCOMM_TLS_CA.")
    st.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="default: $COLLCOMM_COORDINATOR")
    st.add_argument("--token-file", default=None, metavar="PATH",
                    help="read the job token from PATH (closed to other users: mode 0600); default: $COLLCOMM_TOKEN")
    st.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused: argv is visible to every user
    st.add_argument("--group", type=int, default=None, metavar="ID", help="a group id (default: the latest report)")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the coordinator (default 5)")
    st_fmt = st.add_mutually_exclusive_group()
    st_fmt.add_argument("--json", action="store_true", help="print the report as JSON")
    st_fmt.add_argument("--prometheus", action="store_true", help="print it in the Prometheus text format")
    st.set_defaults(func=cmd_status)


def cmd_status(args) -> int:
    import json

    from collcomm.coordinator.client import CoordinatorClient
    from collcomm.coordinator.standalone import refuse_token_argument
    from collcomm.coordinator.tokens import token_from
    from collcomm.errors import CollectiveTimeout
    from collcomm.runtime.monitor import prometheus

    refuse_token_argument("status", args.token)
    address = args.coordinator or os.environ.get("COLLCOMM_COORDINATOR")
    if not address:
        raise UsageError("status: no coordinator: give --coordinator HOST:PORT or set COLLCOMM_COORDINATOR")
    token = token_from(args.token_file)
    if not token:
        raise UsageError("status: no job token: set COLLCOMM_TOKEN or give --token-file PATH")
    key = "monitor/latest" if args.group is None else f"monitor/latest/{args.group}"
    try:
        client = CoordinatorClient(address, token, timeout=args.timeout)
    except ValueError as e:  # a malformed address or timeout (a bad CA file is a CollectiveError)
        raise UsageError(f"status: {e}") from None
    with client:
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
