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
import re
import sys

from collcomm.cli import arguments
from collcomm.cli.errors import EXIT_OK, CommandFailed, UsageError, one_line, reading_inputs


def add_run_command(sub) -> None:
    from collcomm.emulation.options import add_emulation_arguments
    from collcomm.launcher import MAX_LOCAL_RANKS

    r = sub.add_parser("run", help="run a program as N ranks on this machine (like torchrun)",
                       description="Start an embedded coordinator and N ranks of PROGRAM with their COLLCOMM_* "
                                   "environment; prefix output lines with the rank; forward Ctrl-C; when a rank "
                                   "fails, stop the others and exit with its status.")
    r.add_argument("-n", "--nprocs", type=arguments.integer(1, MAX_LOCAL_RANKS, "a number of ranks"), required=True,
                   metavar="N", help=f"number of ranks (at most {MAX_LOCAL_RANKS})")
    r.add_argument("--topology", type=arguments.path, metavar="FILE",
                   help="the job's fabric (collcomm.topology/1), for the planner; 'probe': the ranks measure it at "
                        "init")
    r.add_argument("--timeout", type=arguments.seconds, metavar="SECONDS",
                   help=f"default timeout of every blocking call (at most {arguments.MAX_TIMEOUT:g})")
    add_emulation_arguments(r, "--emulate", "run each rank inside its network namespace of this emulated fabric "
                                            "(built for the job unless `collcomm emulate up` built it; needs root)")
    r.add_argument("program", nargs=argparse.REMAINDER, help="the program and its arguments")
    r.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    """The job's exit status is the command's: 0, or the failing rank's own status."""
    from collcomm.emulation.options import check_emulation_arguments
    from collcomm.launcher import JobRefused, check_job, run

    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise UsageError("run: give the program to run, e.g. collcomm run -n 4 python train.py")
    with reading_inputs("run"):
        check_emulation_arguments(args.emulate, args.scale, args.prefix)
        try:
            check_job(args.nprocs, program, topology=args.topology, timeout=args.timeout, emulate=args.emulate)
        except JobRefused as e:
            raise UsageError(f"run: {e}") from None
    try:
        return run(args.nprocs, program, topology=args.topology, timeout=args.timeout, emulate=args.emulate,
                   scale=args.scale, prefix=args.prefix)
    except JobRefused as e:  # found when the emulated fabric is set up: another one is up under --prefix
        raise UsageError(f"run: {e}") from None


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
    from collcomm.coordinator.standalone import check_arguments, serve_forever

    with reading_inputs("coordinator"):
        tls = check_arguments(args)
    return serve_forever(args.host, args.port, tls=tls, token_file=args.token_file)


def add_status_command(sub) -> None:
    st = sub.add_parser("status", help="the link monitor's latest verdicts and plan changes of a running job",
                        description="Ask the coordinator (COLLCOMM_COORDINATOR; the job token from COLLCOMM_TOKEN "
                                    "or --token-file) for the latest link-monitor report that group rank 0 "
                                    "published (jobs started with COLLCOMM_MONITOR_EVERY or "
                                    "init(monitor_every=...)). A TLS coordinator is verified with COLLCOMM_TLS_CA.")
    st.add_argument("--coordinator", type=arguments.address, default=None, metavar="HOST:PORT",
                    help="default: $COLLCOMM_COORDINATOR")
    st.add_argument("--token-file", type=arguments.path, default=None, metavar="PATH",
                    help="read the job token from PATH (closed to other users: mode 0600); default: $COLLCOMM_TOKEN")
    st.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused: argv is visible to every user
    st.add_argument("--group", type=arguments.integer(0, arguments.MAX_COUNT, "a group id"), default=None,
                    metavar="ID", help="a group id (default: the latest report)")
    st.add_argument("--timeout", type=arguments.seconds, default=5.0, metavar="SECONDS",
                    help="seconds to wait for the coordinator (default 5)")
    st_fmt = st.add_mutually_exclusive_group()
    st_fmt.add_argument("--json", action="store_true", help="print the report as JSON")
    st_fmt.add_argument("--prometheus", action="store_true", help="print it in the Prometheus text format")
    st.set_defaults(func=cmd_status)


def cmd_status(args) -> int:
    import json

    from collcomm.coordinator.client import CoordinatorClient, CoordinatorUnavailable
    from collcomm.coordinator.standalone import refuse_token_argument
    from collcomm.coordinator.tokens import token_from
    from collcomm.errors import CollectiveTimeout

    with reading_inputs("status"):
        refuse_token_argument("status", args.token)
        address = args.coordinator or os.environ.get("COLLCOMM_COORDINATOR")
        if not address:
            raise UsageError("status: no coordinator: give --coordinator HOST:PORT or set COLLCOMM_COORDINATOR")
        if args.coordinator is None:
            try:
                arguments.check_address(address)
            except ValueError as e:
                raise UsageError(f"status: COLLCOMM_COORDINATOR: {e}") from None
        token = token_from(args.token_file)
        if not token:
            raise UsageError("status: no job token: set COLLCOMM_TOKEN or give --token-file PATH")
        key = "monitor/latest" if args.group is None else f"monitor/latest/{args.group}"
        client = CoordinatorClient(address, token, timeout=args.timeout)
    with client:
        try:
            client.ping(timeout=args.timeout)  # reach it within --timeout (a report is asked for once, below)
        except CoordinatorUnavailable as e:  # not bad input: the job's coordinator is gone, or not there yet
            raise CommandFailed(str(e)) from None
        try:
            raw = client.kv_get(key, timeout=0)
        except CollectiveTimeout:
            raise CommandFailed(f"no link-monitor report at {address}" + (
                f" for group {args.group}" if args.group is not None else "") +
                "; is the job running with COLLCOMM_MONITOR_EVERY set?") from None
    report = checked_report(raw, f"the link-monitor report {key!r} at {address}")
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
        return EXIT_OK
    if args.prometheus:
        from collcomm.runtime.monitor import prometheus

        sys.stdout.write(prometheus({"group": report.get("group"), "verdicts": report.get("verdicts", []),
                                     "plan_epoch": report.get("current_plan_epoch", 0),
                                     "faults": report.get("faults", [])}))
        return EXIT_OK
    # Text fields on one line each, control characters escaped (they come from the job).
    print(one_line(f"group {report.get('group')} ({report.get('group_name')}, members {report.get('members')}, "
                   f"epoch {report.get('epoch')}): round {report.get('round')}, plan epoch "
                   f"{report.get('current_plan_epoch')} on {report.get('topology_name')}; "
                   f"{report.get('healthy', 0)} healthy links"))
    if report.get("missing_reports"):
        print(f"  missing reports from ranks {report['missing_reports']}")
    for v in report.get("verdicts", []):
        print(f"  {v['state']:<9} {one_line(v['reason'])}")
    for f in report.get("faults", []):
        print("  " + one_line(f"fabric link {f['link'][0]} -> {f['link'][1]}: {f['state']}, planned at "
                              f"{f['fraction']} of its bandwidth"))
    if report.get("error"):
        print(f"  error: {one_line(report['error'])}")
    return EXIT_OK


# ------------------------------------------------------------------ the report `status` prints
# The report comes from the job (any holder of the token may write the key), so it is read as
# untrusted input: bounded JSON, and every field that status prints or puts in a Prometheus label
# of the type it must have; a report that is not is the command's failure (exit status 1).
_STATE = re.compile(r"[a-z_]{1,32}", re.ASCII)
_SCALARS = (int, str)
_NUMBERS = ("group", "epoch", "round", "current_plan_epoch", "healthy")
_TEXTS = ("group_name", "topology_name", "error")


def checked_report(raw: bytes, what: str) -> dict:
    """The link-monitor report in ``raw``, its fields checked; CommandFailed naming ``what`` and
    the field when it is malformed."""
    from fractions import Fraction

    from collcomm.inputs import exact_number, parse_json
    from collcomm.inputs.messages import shown

    def malformed(message: str) -> CommandFailed:
        return CommandFailed(f"{what} is malformed: {message}")

    def bad(field: str, why: str) -> CommandFailed:
        return malformed(f"{field} {why}")

    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise malformed(f"not UTF-8 text (byte {e.start})") from None
    report = parse_json(text, what="its text", error=malformed)
    if not isinstance(report, dict):
        raise malformed("not a JSON object")
    for field in _NUMBERS:
        value = report.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad(field, f"must be an integer, got {shown(value)}")
    for field in _TEXTS:
        if report.get(field) is not None and not isinstance(report[field], str):
            raise bad(field, f"must be text, got {shown(report[field])}")
    for field in ("members", "missing_reports"):
        value = report.get(field)
        if value is not None and not (isinstance(value, list) and all(
                isinstance(r, int) and not isinstance(r, bool) for r in value)):
            raise bad(field, f"must be a list of ranks, got {shown(value)}")
    verdicts, faults = report.get("verdicts", []), report.get("faults", [])
    if not isinstance(verdicts, list):
        raise bad("verdicts", f"must be a list, got {shown(verdicts)}")
    if not isinstance(faults, list):
        raise bad("faults", f"must be a list, got {shown(faults)}")
    for i, v in enumerate(verdicts):
        link = v.get("link") if isinstance(v, dict) else None
        if not (isinstance(v, dict) and isinstance(v.get("state"), str) and _STATE.fullmatch(v["state"])
                and isinstance(v.get("reason"), str)
                and (isinstance(link, _SCALARS) or (isinstance(link, list) and len(link) == 2
                                                    and all(isinstance(e, _SCALARS) for e in link)))):
            raise bad(f"verdicts[{i}]", f"must be an object with a link (a rank pair), a state and a reason, got "
                                        f"{shown(v)}")
    for i, f in enumerate(faults):
        link = f.get("link") if isinstance(f, dict) else None
        if not (isinstance(f, dict) and isinstance(f.get("state"), str) and _STATE.fullmatch(f["state"])
                and isinstance(link, list) and len(link) == 2 and all(isinstance(e, _SCALARS) for e in link)
                and isinstance(f.get("fraction"), (int, float, str)) and not isinstance(f["fraction"], bool)):
            raise bad(f"faults[{i}]", f"must be an object with a link (two node ids), a state and a fraction, got "
                                      f"{shown(f)}")
        fraction = exact_number(f["fraction"], f"faults[{i}].fraction", error=malformed, low=0, high=1)
        f["fraction"] = str(Fraction(fraction))  # bounded and exact, as the job writes it ("1/10")
    return report
