"""The validation layer of the ``collcomm`` command line: argparse, and the types that check every
argument's value while the command line is parsed, before any work starts.

Each type takes the argument's text and returns its value or raises ``ArgumentTypeError`` (never
anything else: argparse lets other exceptions through as tracebacks), whose message argparse puts
after ``argument --port:``, so every refusal names its argument. The message quotes the value
shortened to one line (:func:`collcomm.inputs.messages.shown`). The limits:

- counts (``-n``, ``--ranks``, ``--boxes``, ...): ASCII decimal integers from 1 to
  :data:`MAX_COUNT` (the layers below bound them further: presets by the nodes they would build,
  ``collcomm run`` by :data:`collcomm.launcher.MAX_LOCAL_RANKS`);
- seconds (``--timeout``): finite, above 0, at most :data:`MAX_TIMEOUT` (the API's limit);
- an address to connect to: ``HOST:PORT``, a port in 1..65535 and a host as
  :func:`collcomm.coordinator.standalone.check_host` takes it (an IP address or a DNS name);
- paths: not empty, no NUL character, encodable for the file system, at most :data:`MAX_PATH_BYTES`;
- any other text: at most :data:`MAX_TEXT_CHARS` characters, no control characters.
"""

from __future__ import annotations

import argparse
import math
import os
import re

from collcomm.cli.errors import UsageError
from collcomm.coordinator.standalone import check_host

MAX_COUNT = (1 << 31) - 1   # ranks travel as 31-bit numbers; any count above this is a mistake
MAX_TIMEOUT = 1e9           # seconds: collcomm.runtime.arguments.MAX_TIMEOUT (a test keeps them equal)
MAX_PATH_BYTES = 4096       # PATH_MAX on Linux
MAX_TEXT_CHARS = 256        # a node id, a prefix, a rank
_DIGITS = re.compile(r"[+-]?[0-9]{1,30}")  # 30 digits: more than any bound here has
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as one exception instead of usage text and exit."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(message)


def _shown(text: str) -> str:
    from collcomm.inputs.messages import shown

    return shown(text)


def integer(low: int, high: int, what: str = "an integer"):
    """An argparse type: a decimal integer in [low, high]."""
    def parse(value: str) -> int:
        stripped = value.strip()
        if _DIGITS.fullmatch(stripped) is None:
            raise argparse.ArgumentTypeError(f"expected {what} in {low}..{high}, got {_shown(value)}")
        number = int(stripped)
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is out of range: expected {what} in {low}..{high}")
        return number

    return parse


positive_int = integer(1, MAX_COUNT, "a positive integer")
port = integer(1, 65535, "a port number")


def seconds_up_to(maximum: float):
    """An argparse type: a finite number of seconds in (0, maximum]."""
    def parse(value: str) -> float:
        stripped = value.strip()
        number = math.nan
        if len(stripped) <= 64:  # float() of a longer text is no number of seconds anyone means
            try:
                number = float(stripped)
            except ValueError:
                pass
        if not (math.isfinite(number) and 0 < number <= maximum):
            raise argparse.ArgumentTypeError(f"expected a finite number of seconds above 0 and at most {maximum:g}, "
                                             f"got {_shown(value)}")
        return number

    return parse


seconds = seconds_up_to(MAX_TIMEOUT)


def path(value: str) -> str:
    """An argparse type: a path the file system can take (it may not exist yet)."""
    if not value:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    if "\0" in value:
        raise argparse.ArgumentTypeError(f"a path cannot hold a NUL character: {_shown(value)}")
    try:
        encoded = os.fsencode(value)
    except UnicodeError:
        raise argparse.ArgumentTypeError(f"cannot be encoded as a path: {_shown(value)}") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise argparse.ArgumentTypeError(f"a path of {len(encoded)} bytes is longer than {MAX_PATH_BYTES}: "
                                         f"{_shown(value)}")
    return value


def name(value: str) -> str:
    """An argparse type: a short name (a node id, a rank, a prefix) on one line."""
    if not value or len(value) > MAX_TEXT_CHARS or _CONTROL.search(value):
        raise argparse.ArgumentTypeError(f"expected a name of 1 to {MAX_TEXT_CHARS} printable characters, got "
                                         f"{_shown(value)}")
    return value


def check_address(value: str) -> str:
    """``value`` when it is ``HOST:PORT`` (``[v6]:PORT``) with a port in 1..65535; ValueError
    otherwise, naming what is wrong."""
    where, sep, number = value.rpartition(":")
    if not sep or not where:
        raise ValueError(f"expected HOST:PORT, got {_shown(value)}")
    if ":" in where and not where.startswith("["):
        raise ValueError(f"expected HOST:PORT with an IPv6 address in brackets ([::1]:29400), got {_shown(value)}")
    check_host(where)
    try:
        port(number)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{_shown(value)}: {e}") from None
    return value


def address(value: str) -> str:
    """An argparse type: :func:`check_address`."""
    try:
        return check_address(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fabric_source(args) -> str:
    """The arguments that name a command's fabric, as an error message names them:
    ``--topology 't.json'`` or ``--preset 'ring'``."""
    if args.topology is not None:
        return f"--topology {_shown(args.topology)}"
    return f"--preset {_shown(args.preset)}"
