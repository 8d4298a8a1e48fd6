"""Bounded reading of untrusted input: the limits, JSON, numbers and sizes every loader uses.

Tier 0 (like :mod:`collcomm.errors`, the only part of collcomm it imports): the topology/1 and
schedule/1 loaders, the emulation plan, presets, ``--param`` values, ``collcomm-perf``'s sizes and
``COLLCOMM_FAULTS`` all read through it, so that no input, however hostile, costs more than
bounded time and memory, and each refusal is one line in the caller's own error type naming the
field and the limit.

- :mod:`collcomm.inputs.limits`: :class:`Limits`, the bounds, their defaults and environment
  variables (``COLLCOMM_MAX_INPUT_BYTES``, ``COLLCOMM_MAX_JSON_DEPTH``, ...).
- :mod:`collcomm.inputs.jsonparse`: JSON from a file or a string within the limits.
- :mod:`collcomm.inputs.numbers`: exact fractions and finite floats, checked before they are built.
- :mod:`collcomm.inputs.sizes`: ``64M``, ``1.5K``, ``4GiB`` as bytes, with a maximum.
- :mod:`collcomm.inputs.messages`: values quoted short and on one line.
"""

from collcomm.inputs.jsonparse import load_json_file, parse_json, read_bounded
from collcomm.inputs.limits import Limits, current_limits
from collcomm.inputs.messages import one_line, shown
from collcomm.inputs.numbers import exact_number, finite_float, float_from_text, integer_from_text
from collcomm.inputs.sizes import SizeError, parse_size

__all__ = ["Limits", "SizeError", "current_limits", "exact_number", "finite_float", "float_from_text",
           "integer_from_text", "load_json_file", "one_line", "parse_json", "parse_size", "read_bounded", "shown"]
