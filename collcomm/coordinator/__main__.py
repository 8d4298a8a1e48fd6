"""``python -m collcomm.coordinator [--host H] [--port P]``: run the coordinator alone.

The token comes from ``$COLLCOMM_TOKEN``; without it one is generated and printed once.
"""

from __future__ import annotations

import argparse
import sys

from collcomm.coordinator.server import serve_forever


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collcomm.coordinator",
                                     description="Run the collcomm coordinator until Ctrl-C, SIGTERM "
                                                 "or a Shutdown call.")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=29400, help="port (default 29400; 0: any free port)")
    args = parser.parse_args(argv)
    return serve_forever(args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
