"""Numbers from untrusted input: finite, in range, and exact ones built only when they are small.

``Fraction("1e99999999999")`` computes ``10**99999999999`` (it hangs); ``float(10**400)`` raises
OverflowError; ``json`` turns ``1e400`` into infinity. The functions here look at the digits
first: a number with more than ``Limits.max_number_digits`` digits written out (counting the zeros
an exponent adds) is refused before anything is built, a float must be finite, and each value is
checked against the range its caller gives. A refusal is ``error(message)``, the caller's own
error type (TopologyError for a topology, ScheduleError for a schedule, ...), one line naming
``where`` (the field), the value (shortened) and the bound.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from collcomm.inputs.limits import Limits, current_limits
from collcomm.inputs.messages import shown

_DECIMAL = re.compile(r"\s*(?P<sign>[-+]?)(?P<int>\d*)(?:\.(?P<frac>\d*))?(?:[eE](?P<exp>[-+]?\d+))?\s*", re.ASCII)
_RATIO = re.compile(r"\s*(?P<num>[-+]?\d+)\s*/\s*(?P<den>\d+)\s*", re.ASCII)
_INTEGER = re.compile(r"\s*[-+]?\d+\s*", re.ASCII)
_FLOAT_WORDS = re.compile(r"\s*[-+]?(inf|infinity|nan)\s*", re.IGNORECASE)
LOG10_2 = 0.30103


def _bound(x) -> str:
    """A bound as a message shows it: 0, 1e+12, 0.5."""
    return f"{float(x):g}"


def _too_many_digits(where: str, value, limits: Limits) -> str:
    return (f"{where} has more than {limits.max_number_digits} digits written out ({shown(value)}); "
            f"{limits.describe('max_number_digits')}")


def _int_digits(n: int) -> int:
    """About the number of decimal digits of ``n``, without converting it (an upper bound)."""
    return int(abs(n).bit_length() * LOG10_2) + 1


def _check_range(x, value, where: str, error, low, high, low_open: bool):
    if low is not None and (x <= low if low_open else x < low):
        if low == 0 and low_open:
            raise error(f"{where} must be positive, got {shown(value)}")
        raise error(f"{where} must be {'above' if low_open else 'at least'} {_bound(low)}, got {shown(value)}")
    if high is not None and x > high:
        raise error(f"{where} must be at most {_bound(high)}, got {shown(value)}")
    return x


def _exact_from_text(text: str, where: str, error, limits: Limits, what: str) -> Fraction:
    digits = limits.max_number_digits
    if len(text) > 2 * digits + 40:  # more characters than any number within the limit can have
        raise error(_too_many_digits(where, text, limits))
    m = _RATIO.fullmatch(text)
    if m is not None:
        num, den = m.group("num"), m.group("den")
        if len(num.lstrip("+-")) > digits or len(den) > digits:
            raise error(_too_many_digits(where, text, limits))
        try:
            n, d = int(num), int(den)
        except ValueError:  # a limit set above Python's own int digit limit
            raise error(_too_many_digits(where, text, limits)) from None
        if d == 0:
            raise error(f"{where} must be {what}, got {shown(text)} (a zero denominator)")
        return Fraction(n, d)
    m = _DECIMAL.fullmatch(text)
    if m is None or not (m.group("int") or m.group("frac")):
        raise error(f"{where} must be {what}, got {shown(text)}")
    written = (m.group("int") or "") + (m.group("frac") or "")
    exp_text = m.group("exp") or "0"
    if len(written) > digits or len(exp_text.lstrip("+-")) > 18:
        raise error(_too_many_digits(where, text, limits))
    exponent = int(exp_text)
    if abs(exponent) > digits:
        raise error(_too_many_digits(where, text, limits))
    try:
        mantissa = int(written)
    except ValueError:
        raise error(_too_many_digits(where, text, limits)) from None
    if m.group("sign") == "-":
        mantissa = -mantissa
    scale = exponent - len(m.group("frac") or "")  # the value is mantissa * 10**scale
    # the digits written out with the exponent's zeros (1e100 and 1e-100: the extremes of a limit of 100)
    if len(written.lstrip("0")) + abs(scale) > digits + 1:
        raise error(_too_many_digits(where, text, limits))
    return Fraction(mantissa * 10**scale) if scale >= 0 else Fraction(mantissa, 10**-scale)


def exact_number(value, where: str, *, error, limits: Limits | None = None, low=None, high=None,
                 low_open: bool = False, what: str = 'a number or a fraction like "25/2"') -> Fraction:
    """An exact Fraction from an int, a float (its shortest decimal text: 0.1 is 1/10), a Fraction
    or a string (an integer, a decimal with an optional exponent, or ``"p/q"``), within
    [low, high] (``low_open``: above low). ``where`` names the field ("link 0 (a -> b): bandwidth")."""
    limits = current_limits(limits)
    if isinstance(value, bool):
        raise error(f"{where} must be {what}, got {shown(value)}")
    if isinstance(value, int):
        if _int_digits(value) > limits.max_number_digits + 1:
            raise error(_too_many_digits(where, value, limits))
        x = Fraction(value)
    elif isinstance(value, Fraction):
        if max(_int_digits(value.numerator), _int_digits(value.denominator)) > limits.max_number_digits + 1:
            raise error(_too_many_digits(where, value, limits))
        x = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise error(f"{where} must be a finite number, got {shown(value)}")
        x = Fraction(repr(value))  # at most 17 digits and an exponent of 308 or -324
    elif isinstance(value, str):
        x = _exact_from_text(value, where, error, limits, what)
    else:
        raise error(f"{where} must be {what}, got {shown(value)}")
    return _check_range(x, value, where, error, low, high, low_open)


def finite_float(value, where: str, *, error, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """A finite float from an int or a float (not a bool), within [low, high]."""
    def refuse():
        bounds = "".join(part for part in (
            "" if low is None else f" {'>' if low_open else '>='} {_bound(low)}",
            "" if high is None else f"{' and' if low is not None else ''} <= {_bound(high)}"))
        return error(f"{where} must be a finite number{bounds}, got {shown(value)}")

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise refuse()
    if isinstance(value, int):
        if abs(value).bit_length() > 1024:  # beyond any float
            raise refuse()
        value_f = float(value)
    else:
        value_f = value
    if not math.isfinite(value_f):
        raise refuse()
    if (low is not None and (value_f <= low if low_open else value_f < low)) or (high is not None and value_f > high):
        raise refuse()
    return value_f


def float_from_text(text: str, where: str, *, error, low: float | None = None, high: float | None = None,
                    low_open: bool = False, limits: Limits | None = None) -> float:
    """A finite float from a decimal text (``2``, ``0.5``, ``1e-3``), within [low, high]."""
    limits = current_limits(limits)
    m = _DECIMAL.fullmatch(text) if len(text) <= limits.max_number_digits + 40 else None
    if m is None or not (m.group("int") or m.group("frac")):
        if _FLOAT_WORDS.fullmatch(text):
            raise error(f"{where} must be a finite number, got {shown(text)}")
        if len(text) > limits.max_number_digits + 40:
            raise error(_too_many_digits(where, text, limits))
        raise error(f"{where} must be a number, got {shown(text)}")
    value = float(text)  # fast whatever the exponent: 1e99999999999 is inf, refused here
    if not math.isfinite(value):
        raise error(f"{where} must be a finite number, got {shown(text)}")
    return finite_float(value, where, error=error, low=low, high=high, low_open=low_open)


def integer_from_text(text: str, where: str, *, error, limits: Limits | None = None, low: int | None = None,
                      high: int | None = None) -> int:
    """An int from decimal digits (with an optional sign), within [low, high]."""
    limits = current_limits(limits)
    if _INTEGER.fullmatch(text) is None:
        raise error(f"{where} must be an integer, got {shown(text)}")
    if len(text.strip().lstrip("+-")) > limits.max_number_digits:
        raise error(_too_many_digits(where, text, limits))
    try:
        value = int(text)
    except ValueError:
        raise error(_too_many_digits(where, text, limits)) from None
    return _check_range(value, text, where, error, low, high, False)
