"""Bounded JSON: a file or a string of at most ``max_input_bytes``, nested at most
``max_json_depth`` deep, no number longer than ``max_number_digits``, no NaN or infinity.

``json.loads`` alone recurses once per nesting level (2,000 nested arrays end in RecursionError),
turns a 5,000-digit integer into ``ValueError: Exceeds the limit (4300 digits)`` and ``1e400``
into ``inf``, and ``Path.read_text`` reads ``/dev/zero`` until memory runs out. Here:

1. a file's size is checked (``fstat``) before it is read, and never more than the limit plus
   one byte is read (a pipe or a device has no size to check); a FIFO nobody writes to reads as
   empty instead of blocking the open;
2. the nesting depth is measured by a scan of the text (strings removed, brackets counted with
   C-speed string operations), never by recursion;
3. ``json.loads`` runs with hooks that refuse NaN and Infinity, integers of too many digits and
   floats that are not finite; the refused value is located in the document and named by its path
   (``links[3].latency_us``).

Every refusal is ``error(message)``, the caller's error type, in one line naming ``what`` (the
file or "topology"), the place and the limit.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from array import array
from itertools import accumulate
from pathlib import Path
from typing import Any

from collcomm.inputs.limits import Limits, current_limits
from collcomm.inputs.messages import shown

# A JSON string (the unrolled form: linear time, no backtracking); an unterminated one runs to the end.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes


class _Refused:
    """A number the hooks would not turn into a value: kept in the tree so that its path can be
    named, then reported (a document holding one is never returned)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def read_bounded(path: str | os.PathLike, *, what: str, error, limits: Limits | None = None) -> str:
    """The text of ``path`` (UTF-8; a byte-order mark is skipped), refused when larger than
    ``max_input_bytes``. ``what`` names the file in messages ("topology file")."""
    limits = current_limits(limits)
    cap = limits.max_input_bytes
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO that no process writes to returns at once (then reads EOF)
        # instead of waiting forever; reads block as usual once the flag is cleared.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError
            if stat.S_ISREG(info.st_mode) and info.st_size > cap:
                raise error(f"{what} {str(p)!r} has {info.st_size} bytes; {limits.describe('max_input_bytes')}")
            os.set_blocking(fd, True)
            data = f.read(cap + 1)
    except FileNotFoundError:
        raise error(f"{what} {str(p)!r} does not exist") from None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise error(f"cannot read {what} {str(p)!r}: {e.__class__.__name__}") from None
    except OSError as e:
        raise error(f"cannot read {what} {str(p)!r}: {e.strerror or e.__class__.__name__}") from None
    if len(data) > cap:
        raise error(f"{what} {str(p)!r} has more than {cap} bytes; {limits.describe('max_input_bytes')}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"cannot read {what} {str(p)!r}: not UTF-8 text (byte {e.start})") from None


def nesting_depth(text: str, strings_removed: bool = False) -> int:
    """How deep arrays and objects nest in ``text`` (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub("", text if strings_removed else _STRING.sub("", text))
    if not brackets:
        return 0
    steps = array("b", brackets.encode("ascii").translate(_STEP))
    return max(accumulate(steps))


def _deep_place(text: str, limit: int) -> tuple[int, int]:
    """(line, column) of the bracket that opens level ``limit + 1`` (called only when one does)."""
    depth = 0
    for m in re.finditer(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', text, re.S):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                start = m.start()
                line = text.count("\n", 0, start) + 1
                return line, start - (text.rfind("\n", 0, start) + 1) + 1
        elif c in "]}":
            depth -= 1
    return 0, 0


def parse_json(text: str, *, what: str, error, limits: Limits | None = None) -> Any:
    """``text`` as JSON within ``limits``; ``what`` names it in messages ("topology", "t.json")."""
    limits = current_limits(limits)
    if not isinstance(text, str):
        raise error(f"{what} must be text, got {type(text).__name__}")
    if len(text) > limits.max_input_bytes:
        raise error(f"{what} has {len(text)} characters; {limits.describe('max_input_bytes')}")
    outside_strings = _STRING.sub("", text)
    if nesting_depth(outside_strings, strings_removed=True) > limits.max_json_depth:
        line, col = _deep_place(text, limits.max_json_depth)
        raise error(f"{what} nests arrays and objects more than {limits.max_json_depth} deep (line {line} column "
                    f"{col}); {limits.describe('max_json_depth')}")
    digits = limits.max_number_digits
    # The hooks for numbers cost a Python call per number: they run only when a literal could break
    # a limit (a run of more than ``digits`` digits, or :data:`_MAY_OVERFLOW`). Otherwise no
    # integer is too long and no float overflows, and json parses at C speed.
    long_run = re.search(rf"\d{{{digits + 1},}}", outside_strings) is not None
    may_overflow = long_run or _MAY_OVERFLOW.search(outside_strings) is not None
    if len(text) > NAMED_CHARS and long_run:  # a large document: one regex pass finds the place
        place = _long_digits_place(text, digits)
        if place is not None:
            raise error(f"{what}: a number at line {place[0]} column {place[1]} has more than {digits} digits; "
                        f"{limits.describe('max_number_digits')}")
    hooks = _NumberHooks(digits, limits, name_paths=len(text) <= NAMED_CHARS)
    chosen = {"parse_constant": hooks.parse_constant}
    if may_overflow:
        chosen.update(parse_float=hooks.parse_float, parse_int=hooks.parse_int if long_run else None)
    try:
        data = json.loads(text, **{k: v for k, v in chosen.items() if v is not None})
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except _RefusedNow as e:  # a large document: refused at the first bad number, without its path
        raise error(f"{what}: {e.args[0]}") from None
    except RecursionError:  # not reached within the depth limit; kept for a limit raised past Python's stack
        raise error(f"{what} nests too deep for Python's parser; {limits.describe('max_json_depth')}") from None
    except ValueError:  # an integer past Python's own digit limit, with max_number_digits raised above it
        raise error(f"{what} holds a number past Python's integer digit limit; "
                    f"{limits.describe('max_number_digits')}") from None
    if hooks.refused:
        path, bad = _find_refused(data)
        raise error(f"{what}: {path or 'the document'}: {bad.reason}")
    return data


# Documents up to this size have a refused number named by its path (links[3].latency_us: found by
# a walk of the parsed document); larger ones by its line and column, or at the first one found.
NAMED_CHARS = 1 << 20
# What could make a float overflow: more than 100 digits in a row, or an exponent of 200 or more
# (with at most 100 integer digits, a smaller exponent gives less than 1e300; a negative one never
# overflows).
_MAY_OVERFLOW = re.compile(r"\d{101,}|[eE]\+?0*(?:[2-9]\d\d|[1-9]\d{3,})")


class _RefusedNow(Exception):
    """Raised from a hook to stop parsing a large document at its first bad number."""


class _NumberHooks:
    """json.loads' hooks: refuse integers of too many digits, floats that are not finite, NaN and
    Infinity; each refusal is a :class:`_Refused` left in the document (to be named by its path),
    or, for a large document, raised at once."""

    def __init__(self, digits: int, limits: Limits, name_paths: bool):
        self.digits, self.limits, self.name_paths = digits, limits, name_paths
        self.refused: list[_Refused] = []

    def refuse(self, reason: str) -> _Refused:
        if not self.name_paths:
            raise _RefusedNow(reason)
        r = _Refused(reason)
        self.refused.append(r)
        return r

    def parse_int(self, s: str):
        n = len(s) - s.startswith("-")
        if n > self.digits:
            return self.refuse(f"a number of {n} digits; {self.limits.describe('max_number_digits')}")
        return int(s)

    def parse_float(self, s: str):
        mantissa = s.split("e")[0].split("E")[0]
        if sum(c.isdigit() for c in mantissa) > self.digits:
            return self.refuse(f"a number of more than {self.digits} digits; "
                               f"{self.limits.describe('max_number_digits')}")
        value = float(s)  # fast whatever the exponent: 1e99999999999 is inf
        if not math.isfinite(value):
            return self.refuse(f"{shown(s)} is beyond the range of a float (about 1.8e308)")
        return value

    def parse_constant(self, s: str):
        return self.refuse(f"{s} is not a number JSON allows (no NaN or infinity)")


def _long_digits_place(text: str, digits: int) -> tuple[int, int] | None:
    """(line, column) of the first run of more than ``digits`` digits outside strings, found by one
    regex pass (possessive: linear, never backtracking); None when none is (then the document is
    not valid JSON before it, which json reports)."""
    safe = re.compile(rf'(?:"[^"\\]*+(?:\\.[^"\\]*+)*+"|[^"\d]++|\d{{1,{digits}}}+(?!\d))*+', re.S)
    end = safe.match(text).end()
    if end >= len(text) or not text[end].isdigit():
        return None
    return text.count("\n", 0, end) + 1, end - (text.rfind("\n", 0, end) + 1) + 1


def _find_refused(data: Any) -> tuple[str, _Refused]:
    """The path (``links[3].latency_us``) of the first refused number in ``data``, without recursion."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _Refused):
            return path, value
        if isinstance(value, dict):
            items = [(v, f"{path}.{_key(k)}" if path else _key(k)) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            continue
        stack.extend(reversed(items))  # document order
    raise AssertionError("a refused number was not found in the document")


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,40}", k) else shown(k, 40)


def load_json_file(path: str | os.PathLike, *, what: str, error, limits: Limits | None = None) -> Any:
    """The JSON of file ``path`` within ``limits``; messages start with the file's name."""
    limits = current_limits(limits)
    text = read_bounded(path, what=what, error=error, limits=limits)
    return parse_json(text, what=Path(path).name, error=error, limits=limits)
