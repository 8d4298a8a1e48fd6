"""Quoting untrusted values in error messages: short, on one line, whatever the input holds.

An error names the bad value, but the value may be a 60 MB string, a 5,000-digit number or text
with newlines and terminal escapes; quoted through :func:`shown` it is at most a few dozen
characters of one line. :func:`one_line` bounds a whole message the same way.
"""

from __future__ import annotations

import re
from fractions import Fraction

SHOWN_CHARS = 60      # of one quoted value
MESSAGE_CHARS = 1000  # of a whole message
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: what could break a line
# or drive a terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match) -> str:
    return f"\\x{ord(match.group()):02x}" if ord(match.group()) < 0x100 else f"\\u{ord(match.group()):04x}"


def _cut(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return f"{text[:width - 20]}...({len(text)} characters)"


def shown(value, width: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for a message: at most about ``width`` characters, no control characters.
    A long number is cut without being converted whole (``repr`` of an int has a digit limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * width:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    if isinstance(value, Fraction):  # as the user writes it ("25/2"), not repr's Fraction(25, 2)
        size = max(value.numerator.bit_length(), value.denominator.bit_length())
        if size > 4 * width:
            return f"a fraction of about {int(size * 0.30103)} digits"
        return _cut(str(value), width)
    if isinstance(value, str):
        text = repr(value[:width + 1])
        if len(value) > width:
            text = f"{repr(value[:width - 20])}...({len(value)} characters)"
        return _CONTROL.sub(_escape, text)
    if isinstance(value, (list, tuple, dict)) and len(value) > width:
        return f"{type(value).__name__} of {len(value)} entries"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past Python's digit limit, a deep list
        return f"a {type(value).__name__}"
    return _CONTROL.sub(_escape, _cut(text, width))


def one_line(message: str, width: int = MESSAGE_CHARS) -> str:
    """``message`` on one line of at most about ``width`` characters."""
    return _CONTROL.sub(_escape, _cut(str(message), width))
