"""The command-line options of an emulated fabric (``--emulate T.json``, ``--scale``, ``--prefix``),
added and checked here for every command that has them (``collcomm run``, ``collcomm topology
--probe``, ``collcomm emulate up``, ``collcomm-perf``), so that they mean the same everywhere.
Left out, ``--scale`` and ``--prefix`` are None: :data:`DEFAULT_SCALE` and :data:`DEFAULT_PREFIX`."""

from __future__ import annotations

import argparse

from collcomm.emulation.plan import DEFAULT_PREFIX, DEFAULT_SCALE, EmulationError, check_prefix, parse_scale


def add_emulation_arguments(parser: argparse.ArgumentParser, flag: str | None, help_text: str | None) -> None:
    """``flag`` (e.g. ``--emulate``, stored as ``emulate``; None: the command always emulates),
    ``--scale`` and ``--prefix``."""
    if flag:
        parser.add_argument(flag, metavar="T.json", dest="emulate", help=help_text)
    parser.add_argument("--scale", default=None, metavar="BW=RATE",
                        help=f"topology bandwidth to tc rate, e.g. {DEFAULT_SCALE} (the default)")
    parser.add_argument("--prefix", default=None, metavar="NAME",
                        help=f"name prefix of namespaces and interfaces (default {DEFAULT_PREFIX})")


def check_emulation_arguments(emulate: str | None, scale: str | None, prefix: str | None,
                              flag: str | None = "--emulate") -> None:
    """Refuse a bad ``--scale`` or ``--prefix`` before anything starts (EmulationError, one line),
    and either of them without ``flag`` where the command emulates only when asked."""
    if flag and emulate is None:
        given = [name for name, value in (("--scale", scale), ("--prefix", prefix)) if value is not None]
        if given:
            raise EmulationError(f"{given[0]} applies to {flag} only")
    if scale is not None:
        parse_scale(scale)
    if prefix is not None:
        check_prefix(prefix)
