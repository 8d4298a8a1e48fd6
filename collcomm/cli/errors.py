"""How a ``collcomm`` command ends: the exit statuses and the exceptions that choose them.

0 on success; 2 for bad input (:class:`UsageError`, or any CollectiveError: a malformed file, an
unknown preset), 1 when the work itself fails (:class:`CommandFailed`), 130 on Ctrl-C. Either
error is one line on stderr starting ``collcomm: error:``.

A command reads and checks its inputs (the arguments argparse has converted, the files they name)
inside :func:`reading_inputs`, before it starts any work: there an exception of a plain Python
kind from a layer below (a ValueError, an OverflowError, a RecursionError, ...) is bad input, not
a crash, and becomes a UsageError whose line names what was being read and the exception's class
(so that a bug below is still visible as one). Outside it, such an exception is a bug of the work
and ends in a traceback as usual.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

PROG = "collcomm"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# What reading an input may raise below the command line besides the library's own errors
# (UnicodeError is a ValueError; listed for the reader).
INPUT_ERRORS = (ValueError, TypeError, OverflowError, RecursionError, MemoryError, UnicodeError)


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


class CommandFailed(Exception):
    """The input was fine but the work failed: one line on stderr, exit status 1."""


def one_line(message) -> str:
    """``message`` on one line: whitespace runs collapsed, control characters escaped, at most
    about a thousand characters (an error may quote a hostile value)."""
    from collcomm.inputs.messages import one_line as bounded

    return bounded(" ".join(str(message).split())) or "unknown error"


@contextmanager
def reading_inputs(what: str) -> Iterator[None]:
    """Inputs named by ``what`` ("--topology t.json", "status") are read and checked here: a
    plain ValueError, TypeError, OverflowError, RecursionError, MemoryError or OSError raised
    below becomes a UsageError ``what: ExceptionClass: message``. The library's own errors and the
    command line's pass unchanged (they already say what is wrong)."""
    from collcomm.errors import CollectiveError

    try:
        yield
    except (UsageError, CommandFailed, CollectiveError):
        raise
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        raise UsageError(f"{what}: {where}{e.strerror or type(e).__name__}") from e
    except INPUT_ERRORS as e:
        raise UsageError(f"{what}: {described(e)}") from e


def described(e: BaseException) -> str:
    """``ValueError: message`` (the class alone when the message is empty, as a MemoryError's is)."""
    text = str(e)
    return f"{type(e).__name__}: {text}" if text.strip() else type(e).__name__
