"""How a ``collcomm`` command ends: the exit statuses and the exceptions that choose them.

0 on success; 2 for bad input (:class:`UsageError`, or any CollectiveError: a malformed file, an
unknown preset), 1 when the work itself fails (:class:`CommandFailed`), 130 on Ctrl-C. Either
error is one line on stderr starting ``collcomm: error:``.
"""

from __future__ import annotations

PROG = "collcomm"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


class CommandFailed(Exception):
    """The input was fine but the work failed: one line on stderr, exit status 1."""


def one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"
