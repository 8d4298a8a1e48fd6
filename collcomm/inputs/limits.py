"""The bounds on what collcomm reads from files and strings, in one frozen value.

Every loader and parser of :mod:`collcomm.inputs` takes a :class:`Limits` (``limits=None``: the
defaults below, each overridden by its environment variable), so a hostile or broken input costs
bounded time and memory and is refused in one line naming the limit and how to raise it:

- ``max_input_bytes`` (``COLLCOMM_MAX_INPUT_BYTES``, 64 MiB): one file or string (topology/1,
  schedule/1, an emulation plan).
- ``max_json_depth`` (``COLLCOMM_MAX_JSON_DEPTH``, 64): arrays and objects nested in one another.
- ``max_number_digits`` (``COLLCOMM_MAX_NUMBER_DIGITS``, 100): the digits of one number, counting
  the zeros its exponent adds (``1e99999999999`` has 99999999999 of them, so it is refused before
  any exact arithmetic); also each side of a fraction ``"p/q"``, and the common denominator of a
  topology's bandwidths (so that sums of them stay small).
- ``max_nodes`` (``COLLCOMM_MAX_NODES``, 65536) and ``max_links`` (``COLLCOMM_MAX_LINKS``,
  262144): the nodes and links of a topology, read from a file or built by a preset.
- ``max_automorphisms`` (``COLLCOMM_MAX_AUTOMORPHISMS``, 64): symmetry hints of a topology file
  (each is verified against every edge).
- ``max_size_bytes`` (``COLLCOMM_MAX_SIZE_BYTES``, 1 PiB): a size such as ``64M`` or ``4GiB``.

The environment is read when a loader runs (not at import), so a test or a job may set it at any
time. The ``*_BYTES`` variables take a size (``128M``), the others an integer; a bad value is a
one-line :class:`~collcomm.errors.CollectiveError` naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Mapping

from collcomm.errors import CollectiveError

ENV_PREFIX = "COLLCOMM_"


@dataclass(frozen=True)
class Limits:
    """The bounds of every loader; see the module's table. ``Limits(max_nodes=1000)`` or
    ``Limits.from_environment().replace(...)`` for other values."""

    max_input_bytes: int = 64 << 20
    max_json_depth: int = 64
    max_number_digits: int = 100
    max_nodes: int = 65536
    max_links: int = 262144
    max_automorphisms: int = 64
    max_size_bytes: int = 1 << 50

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CollectiveError(f"limit {f.name} must be a positive integer, got {value!r}")

    @staticmethod
    def env_name(field: str) -> str:
        """The environment variable of ``field``: ``max_nodes`` -> ``COLLCOMM_MAX_NODES``."""
        return ENV_PREFIX + field.upper()

    def describe(self, field: str) -> str:
        """``"the limit is 65536 (COLLCOMM_MAX_NODES)"``: for the end of an error message."""
        return f"the limit is {getattr(self, field)} ({self.env_name(field)})"

    def replace(self, **changes) -> "Limits":
        return replace(self, **changes)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "Limits":
        """The defaults, each replaced by its environment variable where that is set."""
        env = os.environ if environ is None else environ
        changes = {}
        for f in fields(cls):
            text = env.get(cls.env_name(f.name))
            if text is not None and text.strip():
                changes[f.name] = _env_value(cls.env_name(f.name), text, f.name.endswith("_bytes"))
        return cls(**changes)


def current_limits(limits: Limits | None = None) -> Limits:
    """``limits``, or the defaults as the environment overrides them now."""
    return limits if limits is not None else Limits.from_environment()


def _env_value(name: str, text: str, is_size: bool) -> int:
    if is_size:
        from collcomm.inputs.sizes import SizeError, parse_size

        try:
            value = parse_size(text, maximum=1 << 62)
        except SizeError as e:
            raise CollectiveError(f"{name}: {e}") from None
    else:
        digits = text.strip()
        if not digits.isascii() or not digits.isdigit() or len(digits) > 18:
            raise CollectiveError(f"{name}={text[:40]!r}: expected a positive integer")
        value = int(digits)
    if value < 1:
        raise CollectiveError(f"{name}={text[:40]!r}: expected a positive integer")
    return value
