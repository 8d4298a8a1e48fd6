"""Sizes in bytes from text: ``123``, ``1K``, ``1.5M``, ``4KiB``, ``2GB``, ``1e3``, ``4T``.

The one size parser of collcomm (``collcomm-perf -b/-e/-i``, ``python -m collcomm.sweep
--min/--max``, ``COLLCOMM_FAULTS`` ``reset:...:after=SIZE``, the ``*_BYTES`` limits). The
grammar::

    SIZE := NUMBER [UNIT] ["i"] ["B"]      case-insensitive, spaces around allowed
    NUMBER := digits ["." digits] | "." digits, then optionally an exponent "e" [sign] digits
    UNIT := K | M | G | T | P              powers of 1024 (K = 1024 bytes)

A fractional number of bytes is rounded down (``0.3K`` is 307). The value is computed exactly
from the digits, never through a float, and refused above ``maximum`` before anything large is
built: ``1e99999999999`` fails at once. A refusal is a :class:`SizeError` (a ValueError) whose
message says what is wrong; each caller puts its own name in front (``-b '12X' is not a size``).
"""

from __future__ import annotations

import re

from collcomm.inputs.limits import Limits, current_limits
from collcomm.inputs.messages import shown

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
MAX_TEXT = 64  # characters of a size: anything longer is no size anyone means
_SIZE = re.compile(r"\s*(?P<int>\d*)(?:\.(?P<frac>\d*))?(?:[eE](?P<exp>[-+]?\d+))?\s*"
                   r"(?:(?P<unit>[KMGTP])I?)?B?\s*", re.IGNORECASE | re.ASCII)
HINT = "give bytes with an optional K, M, G, T or P suffix (powers of 1024), e.g. 1K, 1.5M, 2G"


class SizeError(ValueError):
    """A text that is not a size, or one above the maximum; ``too_large`` tells which."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def human_bytes(n: int) -> str:
    """``1073741824`` -> ``"1G"``; exact multiples of a unit only, else the number."""
    for unit in ("P", "T", "G", "M", "K"):
        if n and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]}{unit}"
    return str(n)


def parse_size(text: str, maximum: int | None = None, limits: Limits | None = None) -> int:
    """Bytes from ``text``; at most ``maximum`` (default: ``limits.max_size_bytes``)."""
    if maximum is None:
        maximum = current_limits(limits).max_size_bytes
    if not isinstance(text, str):
        raise SizeError(f"{shown(text)} is not a size: {HINT}")
    m = _SIZE.fullmatch(text) if len(text) <= MAX_TEXT else None
    if m is None or not (m.group("int") or m.group("frac")):
        raise SizeError(f"{shown(text)} is not a size: {HINT}")
    digits = (m.group("int") or "") + (m.group("frac") or "")
    mantissa = int(digits)
    unit = UNITS[(m.group("unit") or "").upper()]
    exponent = int(m.group("exp") or 0) - len(m.group("frac") or "")  # the value is mantissa * 10**exponent * unit
    if mantissa == 0:
        return 0
    # Orders of magnitude first: 10**exponent is built only when the result is within reach.
    order = len(digits.lstrip("0")) + exponent + len(str(unit))  # value < 10**order
    if order - 2 > len(str(maximum)):
        raise SizeError(f"{shown(text)} is more than the maximum of {maximum} bytes ({human_bytes(maximum)})",
                        too_large=True)
    if order < 0:  # less than one byte
        return 0
    value = mantissa * unit * 10**exponent if exponent >= 0 else mantissa * unit // 10**-exponent
    if value > maximum:
        raise SizeError(f"{shown(text)} is more than the maximum of {maximum} bytes ({human_bytes(maximum)})",
                        too_large=True)
    return value
