"""Numbers as the ``collcomm`` commands print them: exact fractions, then decimals."""

from __future__ import annotations

from fractions import Fraction


def exact(x: Fraction) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def gbps(x: Fraction | None) -> str:
    """``1040/3 GB/s = 346.667 GB/s`` (exact, then decimal); ``300 GB/s`` when whole."""
    if x is None:
        return "n/a (one rank: nothing moves)"
    x = Fraction(x)
    if x.denominator == 1:
        return f"{x.numerator} GB/s"
    return f"{exact(x)} GB/s = {float(x):.3f} GB/s"


def bw_short(x: Fraction) -> str:
    x = Fraction(x)
    return f"{x.numerator}" if x.denominator == 1 else f"{exact(x)} (={float(x):.4g})"


def ranks_and_switches(topo) -> str:
    n, s = topo.num_ranks, len(topo.switches)
    return f"{n} rank{'s' if n != 1 else ''}, {s} switch{'es' if s != 1 else ''}"
