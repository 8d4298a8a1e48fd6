"""The fabric a command works on, from the command line: ``--topology FILE`` or ``--preset NAME``
sized by ``--boxes``, ``--ranks`` (total ranks) and ``--param key=value``."""

from __future__ import annotations

import argparse
import inspect
import math
import re
from typing import Sequence

from collcomm.cli.arguments import path, positive_int
from collcomm.cli.errors import UsageError
from collcomm.errors import TopologyError
from collcomm.inputs import current_limits, exact_number, float_from_text, integer_from_text, shown


def add_fabric_arguments(p: argparse.ArgumentParser, required: bool):
    """--topology FILE | --preset NAME, and --boxes, --ranks, --param; returns the exclusive group
    (a command may add another source of fabrics to it, e.g. --probe)."""
    from collcomm.topology.presets import PRESETS

    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--topology", type=path, metavar="FILE", help="a collcomm.topology/1 JSON file")
    src.add_argument("--preset", metavar="NAME", choices=list(PRESETS),
                     help=f"a built-in fabric: {', '.join(PRESETS)}")
    p.add_argument("--boxes", type=positive_int, metavar="B",
                   help="number of boxes (hosts; leaf switches for leaf-spine)")
    p.add_argument("--ranks", type=positive_int, metavar="N", help="total number of ranks")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="any other preset parameter (int, fraction like 25/2, decimal, true/false); repeatable")
    return src


def parse_param(text: str) -> tuple[str, str]:
    """``key=value`` -> (key, raw value text)."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or not raw:
        raise UsageError(f"--param {shown(text)}: expected key=value, e.g. --param bandwidth=25/2")
    return key, raw


_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_INTEGER = re.compile(r"[-+]?\d+", re.ASCII)
_NUMERIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(/\d+)?", re.ASCII)


def _convert_param(preset: str, key: str, raw: str, default):
    """The value of a --param: true/false, an int or an exact Fraction (a float where the
    preset's default is a float, e.g. ``latency_us``). Text that is no such value is a UsageError;
    a number past collcomm's limits (``bandwidth=1e99999999999``: more digits than
    ``COLLCOMM_MAX_NUMBER_DIGITS`` written out) a TopologyError, as in a topology file, refused
    from its digits before anything is computed."""
    where = f"--param {key}"
    if isinstance(default, bool):
        if raw.lower() in _WORDS:
            return _WORDS[raw.lower()]
        raise UsageError(f"--param {key}={_as_given(raw)}: preset {preset!r} expects true or false")
    if isinstance(default, float):
        if not _looks_numeric(raw):
            raise UsageError(f"--param {key}={_as_given(raw)}: preset {preset!r} expects a number")
        return float_from_text(raw, where, error=TopologyError)
    if raw.lower() in _WORDS:
        return _WORDS[raw.lower()]
    if not _looks_numeric(raw):
        raise UsageError(f"--param {key}={_as_given(raw)}: expected an integer, a fraction like 25/2, a decimal "
                         f"or true/false")
    if _INTEGER.fullmatch(raw):
        return integer_from_text(raw, where, error=TopologyError)
    return exact_number(raw, where, error=TopologyError)


def _as_given(raw: str) -> str:
    """The value as the user typed it, when it is short and printable (else quoted, shortened)."""
    return raw if len(raw) <= 60 and raw.isprintable() else shown(raw)


def _looks_numeric(raw: str) -> bool:
    """Digits with a sign, point, exponent or fraction bar: a number's text, whatever its size."""
    return _NUMERIC.fullmatch(raw) is not None


def _divide(total: int, parts: int, what: str) -> int:
    if parts <= 0 or total % parts:
        raise UsageError(f"--ranks {total} does not divide into {what}")
    return total // parts


def preset_arguments(name: str, boxes: int | None, ranks: int | None, params: Sequence[str]) -> dict:
    """Keyword arguments of preset ``name`` from --boxes, --ranks (total ranks) and --param.

    --boxes sets ``boxes`` (``leaves`` for leaf-spine); --ranks is the total number of
    ranks: ``ranks``, or ``ranks_per_cluster`` = N/2, ``dim`` = log2 N, ``hosts_per_leaf``
    = N/leaves, boxes = N/(ranks per box), rows x cols = N (most square unless one is given).
    """
    from collcomm.topology.presets import PRESETS, preset_parameters

    if name not in PRESETS:
        raise TopologyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    signature = inspect.signature(PRESETS[name]).parameters
    allowed = preset_parameters(name)
    kwargs: dict = {}
    for text in params:
        key, raw = parse_param(text)
        if key not in signature:
            raise TopologyError(f"preset {name!r} has no parameter {shown(key)}; it takes: {', '.join(allowed)}")
        if key in kwargs:
            raise UsageError(f"--param {key} is given twice")
        kwargs[key] = _convert_param(name, key, raw, signature[key].default)

    def put(key: str, value, flag: str):
        if key in kwargs and kwargs[key] != value:
            raise UsageError(f"{flag} sets {key}={value}, but --param {key}={shown(kwargs[key])} disagrees")
        kwargs[key] = value

    limits = current_limits()
    for flag, value in (("--boxes", boxes), ("--ranks", ranks)):
        if value is not None and value > limits.max_nodes:  # before any arithmetic on it (a torus's divisors)
            raise TopologyError(f"{flag} {value} makes more than the {limits.max_nodes} nodes a topology may have; "
                                f"{limits.describe('max_nodes')}")
    if boxes is not None:
        key = next((k for k in ("boxes", "leaves") if k in signature), None)
        if key is None:
            raise UsageError(f"preset {name!r} has no boxes; size it with --ranks or --param "
                             f"({', '.join(allowed)})")
        put(key, boxes, "--boxes")
    if ranks is not None:
        if "ranks" in signature:
            put("ranks", ranks, "--ranks")
        elif "ranks_per_cluster" in signature:
            put("ranks_per_cluster", _divide(ranks, 2, "two equal clusters"), "--ranks")
        elif "dim" in signature:
            if ranks < 2 or ranks & (ranks - 1):
                raise UsageError(f"--ranks {ranks}: a hypercube has a power of two (>= 2) ranks")
            put("dim", ranks.bit_length() - 1, "--ranks")
        elif "hosts_per_leaf" in signature:
            leaves = kwargs.get("leaves", signature["leaves"].default)
            put("hosts_per_leaf", _divide(ranks, leaves, f"{leaves} leaves"), "--ranks")
        elif "rows" in signature and "cols" in signature:
            if "rows" in kwargs:
                put("cols", _divide(ranks, kwargs["rows"], f"{kwargs['rows']} rows"), "--ranks")
            elif "cols" in kwargs:
                put("rows", _divide(ranks, kwargs["cols"], f"{kwargs['cols']} columns"), "--ranks")
            else:
                rows = max(d for d in range(1, math.isqrt(max(ranks, 1)) + 1) if ranks % d == 0)
                kwargs.update(rows=rows, cols=ranks // rows)
        elif "boxes" in signature:
            per_box = PRESETS[name](boxes=1).num_ranks
            put("boxes", _divide(ranks, per_box, f"boxes of {per_box} ranks"), "--ranks")
        else:
            raise UsageError(f"preset {name!r} cannot be sized by --ranks; use --param ({', '.join(allowed)})")
    return kwargs


def build_preset(name: str, boxes: int | None = None, ranks: int | None = None, params: Sequence[str] = ()):
    from collcomm.topology.presets import make_preset

    kwargs = preset_arguments(name, boxes, ranks, params)
    try:
        return make_preset(name, **kwargs)
    except TopologyError as e:
        if str(e).startswith("preset "):
            raise
        raise TopologyError(f"preset {name!r}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise TopologyError(f"preset {name!r} rejects {shown or 'its defaults'}: {e}") from None


def load_fabric(args):
    """The topology named on the command line (--topology FILE or --preset NAME ...)."""
    sizing = [flag for flag, value in (("--boxes", args.boxes), ("--ranks", args.ranks), ("--param", args.param))
              if value]
    if args.topology is not None:
        if sizing:
            raise UsageError(f"{sizing[0]} sizes a --preset; a --topology file is used as it is")
        from collcomm.topology.jsonio import load

        return load(args.topology)
    return build_preset(args.preset, args.boxes, args.ranks, args.param or ())
