"""Run many command lines of ``collcomm`` and ``collcomm-perf``, each in a process of its own, fast.

A fresh interpreter spends about half a second importing the command line (numpy, networkx);
a table of a few hundred bad arguments would spend minutes on that alone. This program imports
both entry points once, then forks one child per command line: the child takes the row's
environment, working directory and a limit on its address space, runs the entry point as the
installed script does (``sys.exit(main())``, an uncaught exception printed as a traceback with
exit status 1), and writes its stdout and stderr to files of its own. Up to ``--parallel``
children run at once; one that outlives ``--timeout`` is killed (status None).

stdin: a JSON list of ``{"argv": [...], "prog": "collcomm" | "collcomm-perf", "env": {...},
"cwd": "..."}``; stdout: a JSON list of ``{"status": int | None, "stdout": "...", "stderr":
"..."}`` in the same order. Used by tests/test_cli_arguments.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback


def _child(row: dict, out: str, err: str, memory: int, entry) -> None:
    """In the forked child: become the row's process, run the entry point, never return."""
    code = 1
    try:
        for fd, path in ((1, out), (2, err)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.environ.clear()
        os.environ.update(row["env"])
        os.chdir(row["cwd"])
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        sys.argv = [row["prog"], *row["argv"]]
        try:
            status = entry(row["argv"])
        except SystemExit as e:  # what sys.exit(main()) makes of it
            status = e.code
        if status is None:
            code = 0
        elif isinstance(status, int):
            code = status
        else:
            print(status, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def _warm() -> dict:
    """The entry points, with what every command line imports already imported: the parsers'
    modules (argparse builds every subcommand's parser), the loaders and the coordinator's client
    (gRPC imported, no channel opened: a fork is safe)."""
    import importlib

    import collcomm.perf.options as perf_options
    from collcomm.cli import build_parser
    from collcomm.cli import main as collcomm_main
    from collcomm.perf import main as perf_main

    for module in ("collcomm.coordinator.client", "collcomm.coordinator.tls", "collcomm.coordinator.tokens",
                   "collcomm.perf.launch", "collcomm.topology.jsonio", "collcomm.inputs"):
        importlib.import_module(module)
    build_parser()
    perf_options.parse(["allreduce"])
    return {"collcomm": collcomm_main, "collcomm-perf": perf_main}


def run_rows(rows: list[dict], parallel: int, timeout: float, memory: int) -> list[dict]:
    entries = _warm()
    results: list[dict | None] = [None] * len(rows)
    with tempfile.TemporaryDirectory(prefix="cli-rows-") as tmp:
        files = [(os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")) for i in range(len(rows))]
        running: dict[int, tuple[int, float]] = {}  # pid -> (row, deadline)
        statuses: dict[int, int | None] = {}
        queue = list(range(len(rows)))
        while queue or running:
            while queue and len(running) < parallel:
                i = queue.pop(0)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(rows[i], *files[i], memory, entries[rows[i]["prog"]])
                running[pid] = (i, time.monotonic() + timeout)
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid:
                i, _ = running.pop(pid)
                statuses[i] = os.waitstatus_to_exitcode(wait_status)
                continue
            now = time.monotonic()
            for pid, (i, deadline) in list(running.items()):
                if now > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    running.pop(pid)
                    statuses[i] = None
            time.sleep(0.002)
        for i, (out, err) in enumerate(files):
            with open(out, errors="replace") as f_out, open(err, errors="replace") as f_err:
                results[i] = {"status": statuses[i], "stdout": f_out.read(), "stderr": f_err.read()}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--memory", type=int, default=8 << 30, help="address space of each child, bytes")
    opts = parser.parse_args()
    rows = json.load(sys.stdin)
    json.dump(run_rows(rows, opts.parallel, opts.timeout, opts.memory), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
