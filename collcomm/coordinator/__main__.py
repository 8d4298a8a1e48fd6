"""``python -m collcomm.coordinator [--host H] [--port P] [--tls-cert C --tls-key K] [--token-file F]``:
run the coordinator alone, as ``collcomm coordinator`` does (:mod:`.standalone`).

The token comes from ``--token-file`` or ``$COLLCOMM_TOKEN``; without either one is generated and
written to a new file of mode 0600 whose path is printed (the token itself never is). Bad input
(a token on the command line, a missing or mismatched certificate or key, a token file open to
others) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from collcomm.coordinator.standalone import add_arguments, run

PROG = "python -m collcomm.coordinator"


def _one_line(message) -> str:
    from collcomm.inputs.messages import one_line

    return one_line(" ".join(str(message).split()))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage text
        print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    from collcomm.errors import CollectiveError

    parser = _Parser(prog=PROG, description="Run the collcomm coordinator until Ctrl-C, SIGTERM or a Shutdown call.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (CollectiveError, ValueError, OSError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
