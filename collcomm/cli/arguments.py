"""argparse pieces every ``collcomm`` command uses."""

from __future__ import annotations

import argparse

from collcomm.cli.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as one exception instead of usage text and exit."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
