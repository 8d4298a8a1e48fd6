"""The ``collcomm`` command line: build and inspect fabrics, generate and compare schedules, run
jobs, build emulated fabrics.

::

    collcomm topology --preset dgx-a100 --boxes 2 --show --plot fabric.png -o fabric.json
    collcomm schedule --topology fabric.json --collective allreduce -o plan.json --plot trees.png
    collcomm schedule --preset dgx-a100 --boxes 2 --compare
    collcomm run -n 4 python train.py
    collcomm emulate up fabric.json --scale 1GB/s=100Mbit

One module per command (:mod:`.topology`, :mod:`.schedule`, :mod:`.jobs` for run, coordinator
and status, :mod:`.emulate`), the fabric a command names in :mod:`.fabric`, what ``topology``
prints in :mod:`.describe`. Exit status (:mod:`.errors`): 0 on success; 2 for bad input (a
malformed file, an unknown preset, parameter or algorithm, an unwritable output), with exactly
one line on stderr that starts with ``collcomm: error:``; 1 when the work itself fails (an
algorithm that is not available or returns an invalid plan); 130 on Ctrl-C. ``collcomm run``
exits with its job's status (the failing rank's own). Heavy modules (matplotlib, the
generators) are imported only by the commands that use them.

Input is checked in one layer, before any work starts: every argument by its argparse type
(:mod:`.arguments`: ports, timeouts, counts, paths, addresses; a refusal names the argument),
then each command's files and combinations of options inside :func:`.errors.reading_inputs`, where
whatever a layer below raises (a ValueError, an OverflowError, a RecursionError, ...) is bad input:
exit 2, one line that names what was read and the exception's class. Once the work has started,
such an exception is a bug and is not dressed up as a usage error: it ends in a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from collcomm.cli import emulate, jobs, schedule, topology
from collcomm.cli.arguments import Parser
from collcomm.cli.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, CommandFailed, UsageError,
                                 one_line, reading_inputs)
from collcomm.cli.fabric import build_preset, load_fabric, preset_arguments
from collcomm.errors import CollectiveError

__all__ = ["CommandFailed", "UsageError", "build_parser", "build_preset", "load_fabric", "main", "preset_arguments"]


def build_parser() -> argparse.ArgumentParser:
    from collcomm._version import __version__

    parser = Parser(prog=PROG, description="Topology-aware collective communication: fabrics and schedules.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    topology.add_command(sub)
    schedule.add_command(sub)
    jobs.add_run_command(sub)
    emulate.add_command(sub)
    jobs.add_coordinator_command(sub)
    jobs.add_status_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``collcomm`` command line; returns the exit status."""
    try:
        parser = build_parser()
        with reading_inputs("the command line"):
            args = parser.parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    except (UsageError, CollectiveError) as e:
        _error(e)
        return EXIT_USAGE
    except CommandFailed as e:
        _error(e)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, without a second error on flush.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_FAILED
    except OSError as e:  # the system refused the work (an input's OSError is a UsageError by now)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _error(f"{where}{e.strerror or type(e).__name__}")
        return EXIT_FAILED


def _error(message) -> None:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
