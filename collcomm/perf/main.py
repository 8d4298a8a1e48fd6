"""``collcomm-perf``'s entry point: one process launches the ranks; each rank runs the sweep.

A process is a rank when collcomm's launcher (or ``collcomm run``, or the ``--compare mpi``
path) started it, which its environment says (``COLLCOMM_PERF_REPORT`` from the launching
``collcomm-perf``; ``COLLCOMM_RANK`` under ``collcomm run -n N collcomm-perf ...``, where rank 0
prints the table itself, behind the launcher's ``[rank 0]`` prefix). Otherwise it is the
launching process: it checks the command line and starts ``-np`` ranks.

Exit status: 0; 1 when an element was wrong (the table says FAILED) or a rank failed (its
error on stderr); 2 for bad input, with one line on stderr starting ``collcomm-perf: error:``;
130 on Ctrl-C.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from collcomm.perf.options import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, EXIT_WRONG, PROG, UsageError, parse


def _one_line(message) -> str:
    return " ".join(str(message).split()) or "unknown error"


def _in_rank() -> bool:
    from collcomm.perf.launch import REPORT_ENV

    return any(os.environ.get(v) for v in (REPORT_ENV, "COLLCOMM_RANK", "COLLCOMM_PERF_RANK_FROM_MPI"))


def rank_main(opts) -> int:
    from collcomm.perf import sweep
    from collcomm.perf.launch import REPORT_ENV, FileEmitter
    from collcomm.perf.report import Reporter

    path = os.environ.get(REPORT_ENV)
    if path:  # started by collcomm-perf: -np was its business
        sweep.run(opts, FileEmitter(path))
        return EXIT_OK
    world = os.environ.get("COLLCOMM_WORLD_SIZE")
    if opts.nprocs is not None and world is not None and int(world) != opts.nprocs:
        raise UsageError(f"-np {opts.nprocs}: this process is already a rank of a job of {world}; leave out -np")
    reporter = Reporter(opts)
    sweep.run(opts, reporter.handle)
    if os.environ.get("COLLCOMM_RANK", "0") == "0" and reporter.ended:
        return reporter.finish()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``collcomm-perf``; returns the exit status (a rank exits here)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    in_rank = _in_rank()
    if in_rank:
        _leave(_main(argv, True))
    return _main(argv, False)


def _leave(code: int) -> None:
    """A rank that imported torch ends with os._exit once everything is flushed and closed: such
    ranks sometimes abort at interpreter exit, after all their work, with "terminate called without
    an active exception" (SIGABRT) — seen as well with a plain ``collcomm run`` script that
    allreduces bfloat16 tensors, so a matter of collcomm's daemon transport threads and torch at
    finalization, not of this tool; the cause is not pinned down yet."""
    if "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _main(argv: list[str], in_rank: bool) -> int:
    from collcomm.errors import CollectiveError

    try:
        opts = parse(argv)
        if in_rank:
            return rank_main(opts)
        from collcomm.perf.launch import launch

        return launch(opts)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    except UsageError as e:
        if not in_rank or os.environ.get("COLLCOMM_RANK", "0") == "0":  # one line, not one per rank
            print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except CollectiveError as e:
        where = f"rank {os.environ.get('COLLCOMM_RANK')}: " if in_rank else ""
        print(f"{PROG}: error: {where}{type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return EXIT_WRONG
    except BrokenPipeError:  # the reader went away (| head)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_WRONG


if __name__ == "__main__":
    sys.exit(main())
