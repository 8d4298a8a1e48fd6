"""Bad arguments to every command line subcommand: exit status 2, one line, no traceback.

``BAD`` is the table of what was tried: for each subcommand of ``collcomm`` (topology, schedule,
run, emulate up/down/status/fault, coordinator, status) and for ``collcomm-perf``, arguments with
bad values (ports, timeouts, counts, sizes, files, addresses) and the word the error line must
hold (the bad argument, or the file it names). Each row runs the entry point in a process of its
own, under a memory limit, and must end with exit status 2 and exactly one line on stderr,
``collcomm: error: ...`` (``collcomm-perf: error: ...``), without a traceback. The processes are
forked from one that imported the entry points once (tests/cli_rows.py: the whole table takes
seconds, not the minutes that a fresh interpreter per row would), and a sample of rows also runs
as a user runs it, ``python -m collcomm.cli``. The issue's examples are rows: ``coordinator --port
99999``, ``run --timeout -5``, ``status`` arguments, ``topology --ranks 100000000``.

Then: how :func:`collcomm.cli.main` treats what a layer below raises (a plain ValueError while
inputs are read is a usage error naming its class; during the work it is a bug and propagates;
CommandFailed is exit 1; ``collcomm run`` keeps its program's exit status), ``collcomm status``
against a coordinator holding malformed reports, and hypothesis feeding arbitrary argv lists to
``main`` in this process (with every entry point that would start a job, a server, a fabric or
a long computation replaced) and to the entry point in a few subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collcomm.cli import main

REPO = Path(__file__).resolve().parent.parent
TOKEN = "abcdefabcdefabcdefabcdefabcdefab"
HUGE = "9" * 5000
MEMORY_LIMIT = 8 << 30  # bytes of address space per row: a row that allocates without bound fails, not the machine
ROW_SECONDS = 60

GOOD_TOPOLOGY = {"format": "collcomm.topology/1", "name": "t",
                 "nodes": [{"id": "a"}, {"id": "b"}, {"id": "s", "kind": "switch"}],
                 "links": [{"src": "a", "dst": "s", "bandwidth": 1}, {"src": "b", "dst": "s", "bandwidth": 1}]}
FILES = {
    "good.json": json.dumps(GOOD_TOPOLOGY),
    "deep.json": "[" * 2000 + "]" * 2000,
    "digits.json": json.dumps(GOOD_TOPOLOGY).replace('"bandwidth": 1}', '"bandwidth": ' + "1" * 5000 + "}", 1),
    "huge_latency.json": json.dumps(GOOD_TOPOLOGY).replace('"bandwidth": 1}', '"bandwidth": 1, "latency_us": 1'
                                                           + "0" * 400 + "}", 1),
    "bandwidth_1e99999999999.json": json.dumps(GOOD_TOPOLOGY).replace('"bandwidth": 1}',
                                                                      '"bandwidth": "1e99999999999"}', 1),
    "open.token": TOKEN + "\n",  # mode 0644: open to other users
}

# (argv, the word the error line must hold[, environment changes]); "collcomm-perf" first: that tool.
BAD = [
    # ------------------------------------------------------------------ collcomm (no command)
    ([], "COMMAND"),
    (["frobnicate"], "frobnicate"),
    (["--frobnicate", "topology", "--preset", "ring"], "--frobnicate"),
    # ------------------------------------------------------------------ topology
    (["topology", "--preset", "ring", "--ranks", "100000000"], "--ranks"),
    (["topology", "--preset", "ring", "--param", "bandwidth=1e99999999999"], "--param bandwidth"),
    (["topology", "--preset", "ring", "--ranks", "0"], "--ranks"),
    (["topology", "--preset", "ring", "--ranks", "-3"], "--ranks"),
    (["topology", "--preset", "ring", "--ranks", "4.5"], "--ranks"),
    (["topology", "--preset", "ring", "--ranks", HUGE], "--ranks"),
    (["topology", "--preset", "ring", "--ranks", "²"], "--ranks"),
    (["topology", "--preset", "dgx-a100", "--boxes", "0"], "--boxes"),
    (["topology", "--preset", "dgx-a100", "--boxes", "x"], "--boxes"),
    (["topology", "--preset", "nope"], "--preset"),
    (["topology", "--preset", "ring", "--param", "ranks"], "--param"),
    # a fraction is quoted as it was typed, not as Python's Fraction(-1, 2)
    (["topology", "--preset", "ring", "--param", "bandwidth=-1/2"], "bandwidth must be positive, got -1/2"),
    (["topology", "--preset", "ring", "--ranks", "4", "--param", "ranks=5/2"], "--param ranks=5/2 disagrees"),
    (["topology", "--topology", ""], "--topology"),
    (["topology", "--topology", "missing.json"], "missing.json"),
    (["topology", "--topology", "."], "'.'"),
    (["topology", "--topology", "deep.json"], "deep.json"),
    (["topology", "--topology", "digits.json"], "digits.json"),
    (["topology", "--topology", "huge_latency.json"], "huge_latency.json"),
    (["topology", "--topology", "bandwidth_1e99999999999.json"], "bandwidth_1e99999999999.json"),
    (["topology", "--topology", "good.json", "--ranks", "2"], "--ranks"),
    (["topology", "--preset", "ring", "-o", ""], "-o"),
    (["topology", "--preset", "ring", "-o", "nodir/t.json"], "-o"),
    (["topology", "--preset", "ring", "--plot", "t.gif"], "--plot"),
    (["topology", "--preset", "ring", "--plot", "."], "--plot"),
    (["topology", "--preset", "ring", "--topology-seconds", "1"], "--topology-seconds"),
    (["topology", "--probe", "-np", "0"], "-np"),
    (["topology", "--probe", "-np", "100000"], "-np"),
    (["topology", "--probe", "-np", "1"], "-np"),
    (["topology", "--probe"], "-np"),
    (["topology", "--probe", "-np", "2", "--topology-seconds", "nan"], "--topology-seconds"),
    (["topology", "--probe", "-np", "2", "--topology-seconds", "-1"], "--topology-seconds"),
    (["topology", "--probe", "-np", "2", "--topology-seconds", "1e400"], "--topology-seconds"),
    (["topology", "--probe", "-np", "2", "--topology-seconds", "61"], "--topology-seconds"),
    (["topology", "--probe", "-np", "2", "--measurements", "nodir/m.json"], "--measurements"),
    (["topology", "--probe", "-np", "2", "--emulate", "missing.json"], "missing.json"),
    (["topology", "--probe", "-np", "2", "--ranks", "4"], "--ranks"),
    (["topology", "--probe", "-np", "2", "--scale", "1GB/s=1Mbit"], "--scale"),
    (["topology", "--preset", "ring", "--frobnicate"], "--frobnicate"),
    # ------------------------------------------------------------------ schedule
    (["schedule", "--topology", ""], "--topology"),
    (["schedule", "--preset", "ring", "--max-trees-per-root", "0"], "--max-trees-per-root"),
    (["schedule", "--preset", "ring", "--max-trees-per-root", "1e3"], "--max-trees-per-root"),
    (["schedule", "--preset", "ring", "--max-trees-per-root", HUGE], "--max-trees-per-root"),
    (["schedule", "--preset", "ring", "--collective", "bogus"], "--collective"),
    (["schedule", "--preset", "ring", "--algorithm", "bogus"], "--algorithm"),
    (["schedule", "--preset", "ring", "-o", "s.json", "--format", "pdf"], "--format"),
    (["schedule", "--preset", "ring", "--format", "json"], "--format"),
    (["schedule", "--preset", "ring", "-o", "nodir/s.json"], "-o"),
    (["schedule", "--preset", "ring", "--plot", "t.png", "--root", "²"], "--root"),
    (["schedule", "--preset", "ring", "--plot", "t.png", "--root", "99"], "--root"),
    (["schedule", "--preset", "ring", "--plot", "t.png", "--root", ""], "--root"),
    (["schedule", "--preset", "ring", "--plot", "t.png", "--root", "a\tb"], "--root"),
    (["schedule", "--preset", "ring", "--plot", "t.png", "--phase", "bogus"], "--phase"),
    (["schedule", "--preset", "ring", "--root", "0"], "--root"),
    (["schedule", "--preset", "ring", "--compare", "--algorithm", "ring"], "--algorithm"),
    (["schedule", "--preset", "ring", "--ranks", "100000000"], "--ranks"),
    (["schedule", "--topology", "deep.json"], "deep.json"),
    # ------------------------------------------------------------------ run
    (["run", "-n", "2", "--timeout", "-5", "true"], "--timeout"),
    (["run", "-n", "2", "--timeout", "0", "true"], "--timeout"),
    (["run", "-n", "2", "--timeout", "nan", "true"], "--timeout"),
    (["run", "-n", "2", "--timeout", "inf", "true"], "--timeout"),
    (["run", "-n", "2", "--timeout", "1e400", "true"], "--timeout"),
    (["run", "-n", "2", "--timeout", "1e10", "true"], "--timeout"),
    (["run", "-n", "2", "--timeout", "soon", "true"], "--timeout"),
    (["run", "-n", "0", "true"], "-n"),
    (["run", "-n", "100000000", "true"], "-n"),
    (["run", "-n", "two", "true"], "-n"),
    (["run", "--timeout", "5", "true"], "-n"),
    (["run", "-n", "2"], "program"),
    (["run", "-n", "2", "no-such-program-anywhere"], "no-such-program-anywhere"),
    (["run", "-n", "2", "./nodir/prog"], "./nodir/prog"),
    (["run", "-n", "2", "--topology", "missing.json", "true"], "missing.json"),
    (["run", "-n", "3", "--topology", "good.json", "true"], "good.json"),
    (["run", "-n", "2", "--topology", "deep.json", "true"], "deep.json"),
    (["run", "-n", "2", "--topology", "", "true"], "--topology"),
    (["run", "-n", "2", "--scale", "1GB/s=1Mbit", "true"], "--scale"),
    (["run", "-n", "2", "--emulate", "good.json", "--prefix", "Bad-1", "true"], "prefix"),
    (["run", "-n", "2", "--emulate", "good.json", "--prefix", "ccx\n", "true"], "prefix"),
    (["run", "-n", "2", "--emulate", "missing.json", "true"], "missing.json"),
    (["run", "-n", "3", "--emulate", "good.json", "true"], "good.json"),
    (["run", "-n", "2", "--emulate", "deep.json", "true"], "deep.json"),
    # ------------------------------------------------------------------ emulate
    (["emulate"], "ACTION"),
    (["emulate", "sideways"], "sideways"),
    (["emulate", "up"], "T.json"),
    (["emulate", "up", ""], "T.json"),
    (["emulate", "up", "missing.json"], "missing.json"),
    (["emulate", "up", "deep.json"], "deep.json"),
    (["emulate", "up", "good.json", "--scale", "fast"], "--scale"),
    (["emulate", "up", "good.json", "--scale", "1e99999999999GB/s=1Mbit"], "--scale"),
    (["emulate", "up", "good.json", "--prefix", "x"], "prefix"),
    (["emulate", "up", "good.json", "--prefix", "ccx\n"], "prefix"),
    (["emulate", "down", "--prefix", "Bad-1"], "prefix"),
    (["emulate", "down", "--prefix", ""], "--prefix"),
    (["emulate", "down", "--prefix", "ccx\n"], "--prefix"),
    (["emulate", "status", "--prefix", "a" * 300], "--prefix"),
    (["emulate", "fault", "--link", "a", "b"], "--down"),
    (["emulate", "fault", "--link", "a", "--down"], "--link"),
    (["emulate", "fault", "--link", "", "b", "--down"], "--link"),
    (["emulate", "fault", "--link", "a", "b", "--bandwidth", "0"], "--bandwidth"),
    (["emulate", "fault", "--link", "a", "b", "--bandwidth", "150%"], "--bandwidth"),
    (["emulate", "fault", "--link", "a", "b", "--bandwidth", "nan%"], "--bandwidth"),
    (["emulate", "fault", "--link", "a", "b", "--bandwidth", HUGE], "--bandwidth"),
    (["emulate", "fault", "--link", "a", "b", "--down", "--both"], "--both"),
    (["emulate", "fault", "--link", "a", "b", "--down", "--up"], "--up"),
    (["emulate", "fault", "--link", "a", "b", "--down", "--prefix", "Bad"], "prefix"),
    # ------------------------------------------------------------------ coordinator
    (["coordinator", "--port", "99999"], "--port"),
    (["coordinator", "--port", "65536"], "--port"),
    (["coordinator", "--port", "-1"], "--port"),
    (["coordinator", "--port", "http"], "--port"),
    (["coordinator", "--port", "1e3"], "--port"),
    (["coordinator", "--port", ""], "--port"),
    (["coordinator", "--port", HUGE], "--port"),
    (["coordinator", "--host", ""], "--host"),
    (["coordinator", "--host", "bad host!"], "--host"),
    (["coordinator", "--host", "h" * 300], "--host"),
    (["coordinator", "--host", "nosuch.invalid", "--port", "0"], "--host"),
    (["coordinator", "--host", "192.0.2.1", "--port", "0"], "192.0.2.1"),  # TEST-NET-1: no address of ours
    (["coordinator", "--token", TOKEN], "--token"),
    (["coordinator", "--host", "127.0.0.1", "--port", "0", "--tls-cert", "missing.pem", "--tls-key", "missing.key"],
     "--tls-cert"),
    (["coordinator", "--host", "127.0.0.1", "--port", "0", "--tls-cert", "good.json"], "--tls-cert"),
    (["coordinator", "--host", "127.0.0.1", "--port", "0", "--tls-cert", ""], "--tls-cert"),
    (["coordinator", "--host", "127.0.0.1", "--port", "0", "--token-file", "open.token"], "open.token"),
    (["coordinator", "--host", "127.0.0.1", "--port", "0", "--token-file", "nodir/job.token"], "nodir/job.token"),
    # ------------------------------------------------------------------ status
    (["status", "--coordinator", "127.0.0.1:99999"], "--coordinator"),
    (["status", "--coordinator", "127.0.0.1:0"], "--coordinator"),
    (["status", "--coordinator", "127.0.0.1:²"], "--coordinator"),
    (["status", "--coordinator", "x"], "--coordinator"),
    (["status", "--coordinator", ""], "--coordinator"),
    (["status", "--coordinator", ":5"], "--coordinator"),
    (["status", "--coordinator", "host:"], "--coordinator"),
    (["status", "--coordinator", "a:b:c"], "--coordinator"),
    (["status", "--coordinator", "[::1"], "--coordinator"),
    (["status", "--coordinator", "héllo:5"], "--coordinator"),
    (["status", "--coordinator", "ipv4:127.0.0.1:5"], "--coordinator"),
    (["status", "--coordinator", "127.0.0.1:1", "--timeout", "-1"], "--timeout"),
    (["status", "--coordinator", "127.0.0.1:1", "--timeout", "0"], "--timeout"),
    (["status", "--coordinator", "127.0.0.1:1", "--timeout", "nan"], "--timeout"),
    (["status", "--coordinator", "127.0.0.1:1", "--timeout", "1e400"], "--timeout"),
    (["status", "--coordinator", "127.0.0.1:1", "--timeout", "1e308"], "--timeout"),
    (["status", "--coordinator", "127.0.0.1:1", "--group", "-1"], "--group"),
    (["status", "--coordinator", "127.0.0.1:1", "--group", "1.5"], "--group"),
    (["status", "--coordinator", "127.0.0.1:1", "--group", HUGE], "--group"),
    (["status", "--coordinator", "127.0.0.1:1", "--token", TOKEN], "--token"),
    (["status", "--coordinator", "127.0.0.1:1", "--token-file", ""], "--token-file"),
    (["status", "--coordinator", "127.0.0.1:1", "--token-file", "missing.token"], "missing.token"),
    (["status", "--coordinator", "127.0.0.1:1", "--token-file", "open.token"], "open.token"),
    (["status", "--coordinator", "127.0.0.1:1", "--token-file", "."], "token file ."),
    (["status", "--coordinator", "127.0.0.1:1", "--json", "--prometheus"], "--prometheus"),
    (["status"], "--coordinator"),
    (["status"], "COLLCOMM_COORDINATOR", {"COLLCOMM_COORDINATOR": "nowhere"}),
    (["status", "--coordinator", "127.0.0.1:1"], "COLLCOMM_TOKEN", {"COLLCOMM_TOKEN": "a b"}),
    (["status", "--coordinator", "127.0.0.1:1"], "COLLCOMM_TOKEN", {"COLLCOMM_TOKEN": None}),
    # ------------------------------------------------------------------ collcomm-perf
    (["collcomm-perf", "-b", "x"], "-b"),
    (["collcomm-perf", "-b", "1e99999999999"], "-b"),
    (["collcomm-perf", "-e", "-5"], "-e"),
    (["collcomm-perf", "-i", "lots"], "-i"),
    (["collcomm-perf", "-f", "0"], "-f"),
    (["collcomm-perf", "-n", "0"], "-n"),
    (["collcomm-perf", "-n", HUGE], "-n"),
    (["collcomm-perf", "-w", "-1"], "-w"),
    (["collcomm-perf", "-c", "x"], "-c"),
    (["collcomm-perf", "-o", "bogus"], "-o"),
    (["collcomm-perf", "-d", "bogus"], "-d"),
    (["collcomm-perf", "-r", "-1"], "-r"),
    (["collcomm-perf", "-a", "9"], "-a"),
    (["collcomm-perf", "-N", "0"], "-N"),
    (["collcomm-perf", "-np", "0"], "-np"),
    (["collcomm-perf", "-np", "100000000"], "-np"),
    (["collcomm-perf", "-T", "-5"], "-T"),
    (["collcomm-perf", "-T", "nan"], "-T"),
    (["collcomm-perf", "--algorithm", "bogus"], "--algorithm"),
    (["collcomm-perf", "--topology", "missing.json"], "missing.json"),
    (["collcomm-perf", "--topology", "deep.json"], "deep.json"),
    (["collcomm-perf", "--compare", "bogus"], "--compare"),
    (["collcomm-perf", "--json", "nodir/p.json"], "--json"),
    (["collcomm-perf", "--plot", "p.gif"], "--plot"),
    (["collcomm-perf", "--scale", "fast"], "--scale"),
    (["collcomm-perf", "bogus_collective"], "bogus_collective"),
]


def _row_id(row) -> str:
    text = " ".join(a if len(a) <= 24 else a[:12] + f"...({len(a)})" for a in row[0]) or "(nothing)"
    return text.encode("unicode_escape").decode() + (f" {row[2]}" if len(row) > 2 else "")


def _prog(argv: list[str]) -> tuple[str, list[str]]:
    return ("collcomm-perf", argv[1:]) if argv[:1] == ["collcomm-perf"] else ("collcomm", argv)


def _command(argv: list[str]) -> tuple[list[str], str]:
    """The command line a user would type, as ``python -m``."""
    prog, args = _prog(argv)
    module = "collcomm.perf" if prog == "collcomm-perf" else "collcomm.cli"
    return [sys.executable, "-m", module, *args], prog


def _environment(changes: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLCOMM_")}
    env.update(COLLCOMM_TOKEN=TOKEN, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    for key, value in (changes or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad-arguments")
    for name, text in FILES.items():
        (d / name).write_text(text)
    (d / "open.token").chmod(0o644)
    return d


@pytest.fixture(scope="module")
def table_results(bad_files) -> list[tuple[str, int | None, str, str]]:
    """(prog, exit status, stdout, stderr) of every row of BAD, each in a process of its own."""
    rows = []
    for row in BAD:
        prog, args = _prog(row[0])
        rows.append({"argv": args, "prog": prog, "env": _environment(row[2] if len(row) > 2 else None),
                     "cwd": str(bad_files)})
    p = subprocess.run([sys.executable, str(REPO / "tests" / "cli_rows.py"), "--parallel", "4", "--timeout",
                        str(ROW_SECONDS), "--memory", str(MEMORY_LIMIT)], input=json.dumps(rows),
                       capture_output=True, text=True, timeout=600, env=_environment(), cwd=bad_files)
    assert p.returncode == 0, p.stderr[-4000:]
    return [(row["prog"], r["status"], r["stdout"], r["stderr"]) for row, r in zip(rows, json.loads(p.stdout))]


def _check_row(row, prog: str, code, out: str, err: str) -> None:
    words = row[1]
    lines = err.splitlines()
    assert code == 2, f"exit status {code}\nstdout: {out[-2000:]}\nstderr: {err[-4000:]}"
    assert "Traceback" not in err and "Traceback" not in out, err[-4000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err[-4000:]}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert words in lines[0], f"the error does not name {words!r}: {lines[0]}"
    assert len(lines[0]) < 1200, f"a line of {len(lines[0])} characters"


# Rows that fail for want of a change in a file of another part of the work (strict: the mark goes
# when the change lands). None now.
PENDING: dict[tuple[str, ...], str] = {}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("index", [
    pytest.param(i, id=_row_id(r), marks=[pytest.mark.xfail(strict=True, reason=PENDING[tuple(r[0])])]
                 if tuple(r[0]) in PENDING else []) for i, r in enumerate(BAD)])
def test_bad_argument_exits_2_with_one_line(table_results, index):
    _check_row(BAD[index], *table_results[index])


# The issue's examples and the first row of the other subcommands, as a user runs them.
ISSUE_EXAMPLES = (["coordinator", "--port", "99999"], ["run", "-n", "2", "--timeout", "-5", "true"],
                  ["status", "--coordinator", "127.0.0.1:99999"],
                  ["topology", "--preset", "ring", "--ranks", "100000000"])
AS_TYPED = [i for i, row in enumerate(BAD) if row[0] in ISSUE_EXAMPLES]
AS_TYPED += [next(i for i, row in enumerate(BAD) if row[0][:1] == [first])
             for first in ("schedule", "emulate", "collcomm-perf")]


@pytest.mark.timeout(300)
def test_a_sample_of_the_table_as_a_user_types_it(bad_files):
    def one(index):
        row = BAD[index]
        command, prog = _command(row[0])
        p = subprocess.run(command, cwd=bad_files, env=_environment(row[2] if len(row) > 2 else None),
                           capture_output=True, text=True, timeout=ROW_SECONDS, stdin=subprocess.DEVNULL)
        return row, prog, p.returncode, p.stdout, p.stderr

    with ThreadPoolExecutor(max_workers=4) as pool:
        for row, prog, code, out, err in pool.map(one, AS_TYPED):
            _check_row(row, prog, code, out, err)


def test_the_table_covers_every_subcommand():
    firsts = {tuple(a[:2]) if a[:1] == ["emulate"] else tuple(a[:1]) for a, *_ in BAD}
    for command in (("topology",), ("schedule",), ("run",), ("coordinator",), ("status",), ("collcomm-perf",),
                    ("emulate", "up"), ("emulate", "down"), ("emulate", "status"), ("emulate", "fault")):
        assert command in firsts, command
    assert len(BAD) >= 150


# ---------------------------------------------------------------------------- what main() makes of errors below
@pytest.fixture
def in_files(bad_files, monkeypatch):
    monkeypatch.chdir(bad_files)
    for key in [k for k in os.environ if k.startswith("COLLCOMM_")]:
        monkeypatch.delenv(key)
    return bad_files


def _one_error_line(capsys, prog: str = "collcomm") -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in captured.err
    return lines[0]


def test_a_plain_value_error_while_inputs_are_read_is_a_usage_error(in_files, capsys, monkeypatch):
    import collcomm.topology.jsonio as jsonio

    def broken(*args, **kwargs):
        raise ValueError("something below went wrong")

    monkeypatch.setattr(jsonio, "load", broken)
    assert main(["schedule", "--topology", "good.json"]) == 2
    line = _one_error_line(capsys)
    # names what was being read and the exception's class: a bug below stays visible as one
    assert "--topology 'good.json'" in line and "ValueError: something below went wrong" in line, line
    assert main(["run", "-n", "2", "--topology", "good.json", "true"]) == 2
    line = _one_error_line(capsys)
    assert "run: ValueError: something below went wrong" in line, line

    def recursion(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(jsonio, "load", recursion)
    assert main(["topology", "--topology", "good.json"]) == 2
    assert "RecursionError" in _one_error_line(capsys)


def test_an_error_of_the_work_itself_is_not_dressed_up_as_usage(in_files, capsys, monkeypatch):
    import collcomm.cli.topology as topology_command

    def buggy(topo):
        raise ValueError("a bug in the summary")

    monkeypatch.setattr(topology_command, "describe_topology", buggy)
    with pytest.raises(ValueError, match="a bug in the summary"):
        main(["topology", "--preset", "ring"])


def test_command_failed_is_exit_1_and_a_missing_coordinator_report_too(in_files, capsys, monkeypatch):
    from collcomm.coordinator.server import CoordinatorServer

    with CoordinatorServer(TOKEN, host="127.0.0.1", port=0) as server:
        monkeypatch.setenv("COLLCOMM_TOKEN", TOKEN)
        assert main(["status", "--coordinator", server.address, "--timeout", "5"]) == 1
        assert "no link-monitor report at" in _one_error_line(capsys)
        address = server.address
    # a coordinator that is gone is not bad input either
    assert main(["status", "--coordinator", address, "--timeout", "1"]) == 1
    assert f"cannot reach coordinator at {address}" in _one_error_line(capsys)


MALFORMED_REPORTS = [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1, 2]", "not a JSON object"),
    (b"null", "not a JSON object"),
    (b"[" * 5000 + b"]" * 5000, "deep"),
    (b"1" * 5000, "digits"),
    (b'{"verdicts": 5}', "verdicts"),
    (b'{"verdicts": [{"x": 1}]}', "verdicts[0]"),
    (b'{"verdicts": [{"link": [0, 1], "state": "down\\n# injected 1", "reason": "r"}]}', "verdicts[0]"),
    (b'{"faults": [{"link": 1}]}', "faults[0]"),
    (b'{"faults": [{"link": ["a", "b"], "state": "down", "fraction": "1e99999999999"}]}', "faults[0].fraction"),
    (b'{"group": "0\\"} 1\\ninjected{x=\\"", "verdicts": []}', "group"),
    (b'{"members": "all"}', "members"),
]


@pytest.mark.timeout(60)
def test_status_refuses_a_malformed_report_with_one_line(in_files, capsys, monkeypatch):
    """The report comes from the job, through the coordinator: whatever it holds, one line and
    exit status 1 (the arguments were fine; what the job wrote is not a report)."""
    from collcomm.coordinator.client import CoordinatorClient
    from collcomm.coordinator.server import CoordinatorServer

    monkeypatch.setenv("COLLCOMM_TOKEN", TOKEN)
    with CoordinatorServer(TOKEN, host="127.0.0.1", port=0) as server, \
            CoordinatorClient(server.address, TOKEN, timeout=5, tls=False) as client:
        for i, (raw, words) in enumerate(MALFORMED_REPORTS):
            client.kv_set("monitor/latest", raw)
            fmt = ([], ["--json"], ["--prometheus"])[i % 3]  # each is read before the format matters
            assert main(["status", "--coordinator", server.address, *fmt]) == 1, (raw[:40], fmt)
            line = _one_error_line(capsys)
            assert "is malformed" in line and words in line, (raw[:40], line)
        good = {"group": 0, "group_name": "world", "members": [0, 1], "epoch": 1, "round": 2,
                "current_plan_epoch": 0, "topology_name": "t", "healthy": 1, "missing_reports": [],
                "verdicts": [{"link": [0, 1], "state": "degraded", "reason": "slow\x1b[2J", "evidence": {}}],
                "faults": [{"link": ["a", "b"], "state": "degraded", "fraction": 0.5, "reason": "x"}], "error": None}
        client.kv_set("monitor/latest", json.dumps(good).encode())
        assert main(["status", "--coordinator", server.address]) == 0
        out = capsys.readouterr().out
        assert "fabric link a -> b: degraded, planned at 1/2 of its bandwidth" in out, out
        assert "\x1b" not in out and "slow\\x1b[2J" in out, out  # a terminal escape from the job is shown, not run


@pytest.mark.timeout(60)
def test_coordinator_refuses_a_port_in_use_with_one_line(in_files, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["coordinator", "--host", "127.0.0.1", "--port", str(port)]) == 2
        line = _one_error_line(capsys)
        assert f"127.0.0.1:{port}" in line and "in use" in line, line


@pytest.mark.timeout(60)
def test_run_keeps_its_programs_exit_status(in_files):
    """A failing rank's own status is the job's, not a usage error's 2 nor a generic 1."""
    p = subprocess.run([sys.executable, "-m", "collcomm.cli", "run", "-n", "1", "--timeout", "30", sys.executable,
                        "-c", "import sys; sys.exit(7)"], capture_output=True, text=True, timeout=50,
                       env=_environment(), cwd=in_files)
    assert p.returncode == 7, p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, words", [(["--port", "99999"], "argument --port"),
                                         (["--host", "bad host!"], "argument --host"),
                                         (["--host", "192.0.2.1", "--port", "0"], "192.0.2.1"),
                                         (["--token-file", ""], "argument --token-file")])
def test_python_m_coordinator_refuses_bad_arguments_with_one_line(in_files, args, words):
    """The coordinator's own front end takes the same options with the same checks."""
    prog = "python -m collcomm.coordinator"
    p = subprocess.run([sys.executable, "-m", "collcomm.coordinator", *args], capture_output=True, text=True,
                       timeout=60, env=_environment(), cwd=in_files, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"{prog}: error: ") and words in p.stderr, p.stderr


def test_an_emulation_prefix_is_matched_whole():
    """``^...$`` with re.match let a trailing newline through (into interface names); fullmatch does not."""
    from collcomm.emulation.plan import EmulationError, check_prefix

    assert check_prefix("ccx") == "ccx"
    for bad in ("ccx\n", "ccx\r", "c", "cc-x", "Ccx", "ccx" * 4, None, 7):
        with pytest.raises(EmulationError, match="emulation prefix must be 2-9 lowercase"):
            check_prefix(bad)


def test_the_cli_timeout_limit_is_the_apis():
    from collcomm.cli.arguments import MAX_TIMEOUT
    from collcomm.runtime import arguments as api_arguments

    assert MAX_TIMEOUT == api_arguments.MAX_TIMEOUT


# ---------------------------------------------------------------------------- arbitrary argv
class Started(BaseException):
    """What the fuzz's stand-ins for the work raise: the arguments were accepted and the work
    would start here (a BaseException, so that no handler of the command takes it for an error)."""


def _started(*args, **kwargs):
    raise Started


@pytest.fixture(scope="module")
def nothing_starts(bad_files):
    """In this process, every entry point that would start a job, a server, a fabric or a long
    computation raises Started instead; the working directory is the table's."""
    import collcomm.cli.schedule as schedule_command
    import collcomm.cli.topology as topology_command
    import collcomm.coordinator.client as client
    import collcomm.coordinator.standalone as standalone
    import collcomm.emulation as emulation
    import collcomm.launcher as launcher
    import collcomm.schedules as schedules
    import collcomm.schedules.optimum as optimum

    mp = pytest.MonkeyPatch()
    for module, name in ((launcher, "run"), (standalone, "serve_forever"), (client, "CoordinatorClient"),
                         (emulation, "up"), (emulation, "down"), (emulation, "leftovers"), (emulation, "current"),
                         (emulation, "fault"), (schedules, "generate"), (optimum, "collective_bound"),
                         (topology_command, "describe_topology"), (topology_command, "draw"),
                         (schedule_command, "draw")):
        mp.setattr(module, name, _started)
    mp.chdir(bad_files)
    for key in [k for k in os.environ if k.startswith("COLLCOMM_")]:
        mp.delenv(key)
    mp.setenv("COLLCOMM_TOKEN", TOKEN)
    yield bad_files
    mp.undo()


# Values of no particular argument: numbers at and past every bound, text that no parser expects.
JUNK = ["", " ", "-", "--", "-5", "-1", "0", "1", "2", "7", "65535", "65536", "99999", "1.5", "1e3", "1e400", "-1e400",
        "nan", "inf", "1e-400", "0x10", "²", "٣", "1_0", HUGE, "x" * 5000, "a\x00b", "\udc80", "\ud800", "é", "\n",
        "a b", "\x1b[2J", "missing.json", ".", "/", "/dev/null", "/etc", "bogus"]
FILE_VALUES = ["good.json", "deep.json", "digits.json", "huge_latency.json", "missing.json", "open.token",
               "nodir/x.json", "/dev/null", "."]
# Sizes a preset may be given in the fuzz: small ones (a large preset is the table's business, in
# a process with a memory limit) and junk.
SIZES = ["-1", "0", "1", "2", "3", "4", "x", "1.5", "1e3", HUGE, "²", ""]
# Each command's flags, and the values that each is likely to be given (None: a flag without a
# value); a fuzzed value is one of these or junk, so that the command lines reach every check.
FABRIC = {"--topology": FILE_VALUES, "--preset": ["ring", "star", "torus", "dgx-a100", "bogus"], "--boxes": SIZES,
          "--ranks": SIZES, "--param": ["ranks=4", "ranks=x", "bandwidth=25/2", "bandwidth=1e99999999999",
                                        "latency_us=1e400", "bandwidth", "=", "colour=3"]}
OUTPUTS = ["t.json", "t.xml", "nodir/t.json", ".", "/dev/null/x", "t.png", "t.gif", ""]
EMULATION = {"--emulate": FILE_VALUES, "--scale": ["1GB/s=100Mbit", "fast", "1e99999999999GB/s=1Mbit", "0GB/s=1bit"],
             "--prefix": ["ccfz", "Bad-1", "x", "ccx\n", "a" * 300]}
COUNTS = ["0", "1", "2", "3", "1024", "1025", "x", "-2", HUGE]
SECONDS = ["0.5", "5", "0", "-5", "nan", "inf", "1e400", "1e10", "soon"]
FLAGS = {
    "topology": {**FABRIC, **EMULATION, "--probe": None, "-np": COUNTS, "--topology-seconds": SECONDS,
                 "--measurements": OUTPUTS, "-o": OUTPUTS, "--show": None, "--plot": OUTPUTS, "--top": FILE_VALUES},
    "schedule": {**FABRIC, "--collective": ["allgather", "allreduce", "reduce_scatter", "alltoall"],
                 "--algorithm": ["forestcoll", "ring", "bogus"], "--max-trees-per-root": COUNTS, "-o": OUTPUTS,
                 "--format": ["json", "msccl-xml", "pdf"], "--plot": OUTPUTS,
                 "--root": ["0", "3", "99", "²", "r0", ""],
                 "--phase": ["allgather", "reduce_scatter", "bogus"], "--compare": None},
    "run": {"-n": COUNTS, "--topology": FILE_VALUES + ["probe"], "--timeout": SECONDS, **EMULATION},
    "emulate up": {"(file)": FILE_VALUES, "--scale": EMULATION["--scale"], "--prefix": EMULATION["--prefix"]},
    "emulate down": {"--prefix": EMULATION["--prefix"]},
    "emulate status": {"--prefix": EMULATION["--prefix"]},
    "emulate fault": {"--link": ["r0", "0", "", "a\tb"], "--down": None, "--up": None,
                      "--bandwidth": ["10%", "0", "150", "nan%", HUGE], "--both": None,
                      "--prefix": EMULATION["--prefix"]},
    "coordinator": {"--host": ["127.0.0.1", "localhost", "::1", "[::1]", "bad host!", "192.0.2.1", ""],
                    "--port": ["0", "99999", "-1", "http", "65535"], "--tls-cert": FILE_VALUES,
                    "--tls-key": FILE_VALUES, "--token-file": FILE_VALUES + ["nodir/job.token"], "--token": [TOKEN]},
    "status": {"--coordinator": ["127.0.0.1:1", "127.0.0.1:99999", "[::1]:5", "x", "héllo:5", ""],
               "--token-file": FILE_VALUES, "--token": [TOKEN], "--group": ["0", "-1", "1.5", HUGE],
               "--timeout": SECONDS, "--json": None, "--prometheus": None},
}
COMMON = ["-h", "--help", "--version", "--frobnicate"]
PROGRAMS = ["true", "no-such-program-anywhere", "./nodir/prog", "--", sys.executable]


# What makes each command's line complete (added to most fuzzed lines, so that they get past
# argparse's "required" and reach the command's own checks).
BASE = {"topology": ["--preset", "ring"], "schedule": ["--preset", "ring"], "run": ["-n", "2"],
        "emulate up": ["good.json"], "emulate fault": ["--link", "r0", "r1", "--down"],
        "coordinator": ["--host", "127.0.0.1", "--port", "0"], "status": ["--coordinator", "127.0.0.1:1"]}


@st.composite
def command_lines(draw) -> list[str]:
    """A command, mostly with what completes it, then a few of its flags with likely or junk
    values; now and then a flag of every command's, or anything at all."""
    junk = st.sampled_from(JUNK) | st.text(max_size=12)
    command = draw(st.sampled_from(sorted(FLAGS) + ["(anything)"]))
    if command == "(anything)":
        words = sorted({f for flags in FLAGS.values() for f in flags} | set(FLAGS) | set(COMMON))
        return draw(st.lists(st.sampled_from(words) | junk, max_size=8))
    flags = FLAGS[command]
    argv = command.split()
    if draw(st.integers(0, 3)):
        argv += BASE.get(command, [])
    for _ in range(draw(st.integers(0, 5))):
        flag = draw(st.sampled_from(sorted(flags) + ["(junk)"]) if draw(st.integers(0, 15)) else
                    st.sampled_from(COMMON))
        values = flags.get(flag)
        if flag == "(junk)":
            argv.append(draw(junk))
            continue
        if flag != "(file)":
            argv.append(flag)
        if flag == "--link":
            argv += [draw(st.sampled_from(values)), draw(st.sampled_from(values))]
        elif values is not None:
            argv.append(draw(st.sampled_from(values)) if draw(st.integers(0, 3)) else draw(junk))
    if command == "run" and draw(st.integers(0, 3)):
        argv += [draw(st.sampled_from(PROGRAMS))]
    return argv


def _check_command_line(argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except Started:  # the arguments were accepted: the work would start here
        return
    text = err.getvalue()
    assert code in (0, 1, 2), (argv, code, text)
    assert "Traceback" not in text, (argv, text)
    if code != 0:
        lines = text.splitlines()
        assert len(lines) == 1 and lines[0].startswith("collcomm: error: "), (argv, text)


@pytest.mark.timeout(300)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=command_lines())
def test_arbitrary_command_lines_end_in_0_1_or_2_with_at_most_one_line(nothing_starts, argv):
    _check_command_line(argv)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@settings(max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=command_lines())
def test_arbitrary_command_lines_long_run(nothing_starts, argv):
    _check_command_line(argv)


@pytest.mark.timeout(300)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=command_lines())
def test_arbitrary_command_lines_in_a_process_of_their_own(bad_files, argv):
    """As a user runs them, with an unknown option first so that nothing can start (argparse still
    converts and checks every other argument before it reports the unknown one)."""
    argv = [a for a in argv if "\x00" not in a]  # argv of a process cannot hold NUL
    argv = argv[:1] + ["--no-such-option"] + argv[1:]
    command, _ = _command(argv)
    p = subprocess.run(command, cwd=bad_files, env=_environment(), capture_output=True, timeout=ROW_SECONDS,
                       stdin=subprocess.DEVNULL)
    err = p.stderr.decode(errors="replace")
    assert p.returncode in (0, 2), (argv, p.returncode, err)
    assert "Traceback" not in err
    if p.returncode == 2:
        assert len(err.splitlines()) == 1 and err.startswith("collcomm: error: "), (argv, err)
