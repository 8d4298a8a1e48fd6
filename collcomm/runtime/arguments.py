"""The checks of the public API's arguments, in one place.

Every call of :mod:`collcomm.api` checks what the caller gave it before anything is sent, so a
local mistake is a :class:`~collcomm.errors.UsageError` (a ValueError) or
:class:`~collcomm.errors.UsageTypeError` (also a TypeError) on the calling rank, naming the
argument and the limit, and never a hang, a PeerFailure blaming a healthy peer, or a silently
different call (``new_group([0, 1.7])`` forming [0, 1]). Buffers and reductions are checked by
:func:`collcomm.runtime.buffers.as_buffer` and :func:`~collcomm.runtime.buffers.check_reduction`,
which raise the same errors.

The rules:

* a rank (``root``, ``dst``, ``src``, a member of ``new_group``) is an integer (a Python int or a
  NumPy integer; not a bool, not a float even when integral) in range;
* a timeout is a real number of seconds, finite, above 0 and at most :data:`MAX_TIMEOUT`; None
  means the default (``init(timeout=...)``, ``COLLCOMM_TIMEOUT`` or 300 s). 0 and negative values
  cannot be honoured (the call would fail before it started), nor can NaN or infinity (nothing
  waits forever: a blocking call always ends at its timeout); a bool is refused as a type error.

The checks on the path of every collective are written for speed (the common types first): they
add well under a microsecond to a call.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np

from collcomm.coordinator.state import MAX_NAME_LENGTH
from collcomm.errors import UsageError, UsageTypeError
from collcomm.runtime.buffers import Buffer, argument, as_buffer, check_reduction
from collcomm.runtime.group import Group

# The longest timeout (seconds, about 31 years): a longer one cannot be honoured (Python's waits
# refuse more than threading.TIMEOUT_MAX) and would only hide a mistake (milliseconds for seconds).
MAX_TIMEOUT = 1e9
MAX_RANK = (1 << 31) - 1  # ranks travel as 31-bit numbers (handshakes, the coordinator)
MAX_TAG = (1 << 31) - 1   # tags: 0 <= tag < MAX_TAG (P2P_BASE + tag names a connection)
MAX_NAME = MAX_NAME_LENGTH  # characters of a group's name (the coordinator's limit)
MAX_MEMBERS = 1 << 16     # members of a group of an open job (a world's: its size)


def timeout(value, default: float, what: str = "timeout") -> float:
    """``value`` (seconds) checked, or ``default`` when it is None."""
    if value is None:
        return default
    if isinstance(value, (float, int)) and type(value) is not bool:  # the common cases first (np.float64 is a
        if 0 < value <= MAX_TIMEOUT:                                  # float; NaN fails the comparison)
            return float(value)
    return _timeout(value, what)


def optional_timeout(value, what: str = "timeout") -> float | None:
    """``value`` checked like :func:`timeout`, None passed on (the callee's default)."""
    return None if value is None else timeout(value, 0.0, what)


def _timeout(value, what: str) -> float:
    # a real number (Decimal, a 0-d torch tensor: anything float() takes that is not text or a bool)
    if isinstance(value, (bool, np.bool_, str, bytes)) or not (isinstance(value, numbers.Real)
                                                              or hasattr(value, "__float__")):
        raise UsageTypeError(f"{what} must be a number of seconds (or None for the default), got "
                             f"{type(value).__name__} {_show(value)}", argument(what))
    try:
        seconds = float(value)
    except OverflowError:  # (an int or a Fraction beyond any float)
        seconds = math.inf
    except (TypeError, ValueError):  # (a tensor of several elements, a complex number)
        raise UsageTypeError(f"{what} must be a number of seconds (or None for the default), got "
                             f"{type(value).__name__} {_show(value)}", argument(what)) from None
    if isinstance(value, bool) or getattr(value, "dtype", None) is not None and str(value.dtype) == "torch.bool":
        raise UsageTypeError(f"{what} must be a number of seconds, got a bool", argument(what))
    if math.isnan(seconds) or math.isinf(seconds):
        raise UsageError(f"{what}={seconds} cannot be honoured: give a finite number of seconds in (0, "
                         f"{MAX_TIMEOUT:g}], or None for the default", argument(what))
    if seconds <= 0:
        raise UsageError(f"{what}={_show(value)} cannot be honoured: it must be above 0 (None: the default)",
                         argument(what))
    if seconds > MAX_TIMEOUT:
        raise UsageError(f"{what}={_show(value)} is longer than the limit of {MAX_TIMEOUT:g} s", argument(what))
    return seconds


def integer(value, what: str) -> int:
    """``value`` as an int: anything that is an integer by ``operator.index`` (a Python or NumPy
    integer, a 0-d integer torch tensor), not a bool, not a float even when integral."""
    if type(value) is int:
        return value
    is_bool = isinstance(value, (bool, np.bool_)) or str(getattr(value, "dtype", "")) == "torch.bool"
    if not is_bool:
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise UsageTypeError(f"{what} must be an integer, got {type(value).__name__} {_show(value)}", argument(what))


def rank(value, size: int, what: str, within: str = "") -> int:
    """``value`` checked as a rank in [0, size) (of ``within``: "the world of 4", "group ...")."""
    if type(value) is int and 0 <= value < size:
        return value
    r = integer(value, what)
    if not 0 <= r < size:
        raise UsageError(f"{what}={_show(r)} is out of range: {within or 'the ranks'} are 0..{size - 1}",
                         argument(what))
    return r


def flag(value, what: str) -> bool:
    """A yes/no argument (``async_op``): a bool, a NumPy bool, or 0 / 1 (as C and torch callers write)."""
    if value is False or value is True:
        return value
    if isinstance(value, np.bool_) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise UsageTypeError(f"{what} must be True or False, got {type(value).__name__} {_show(value)}", what)


def tag(value) -> int:
    """A point-to-point tag: an integer in [0, 2**31 - 1)."""
    t = integer(value, "tag")
    if not 0 <= t < MAX_TAG:
        raise UsageError(f"tag={_show(t)} is out of range: tags are 0..{MAX_TAG - 1}", "tag")
    return t


def members(ranks, world_size: int | None, me: int) -> list[int]:
    """The world ranks of ``new_group(ranks)``: integers, in the world (``world_size`` None: an
    open job, any rank below 2**31), unique, this rank among them."""
    if isinstance(ranks, (str, bytes, dict)) or not _iterable(ranks):
        raise UsageTypeError(f"new_group: ranks must be a sequence of integers (a list, a tuple, a range), got "
                             f"{type(ranks).__name__} {_show(ranks)}", "ranks")
    limit = MAX_RANK if world_size is None else world_size
    within = "ranks of an open job" if world_size is None else f"the ranks of the world of {world_size}"
    out: list[int] = []
    seen: set[int] = set()
    for i, value in enumerate(ranks):  # (stops early: ``ranks`` may be a huge range or an endless generator)
        r = rank(value, limit, f"new_group: ranks[{i}]", within)
        if r in seen:
            raise UsageError(f"new_group: rank {r} appears twice in ranks (ranks[{i}])", "ranks")
        if i >= MAX_MEMBERS:  # (a world's group stops at its size: ranks in range and unique)
            raise UsageError(f"new_group: ranks has more than {MAX_MEMBERS} entries, the limit of a group", "ranks")
        seen.add(r)
        out.append(r)
    if not out:
        raise UsageError("new_group: ranks is empty; a group has this rank among its members", "ranks")
    if me not in seen:
        raise UsageError(f"new_group: only the members call it; rank {me} is not in ranks {_show(out)}", "ranks")
    return out


def group(value) -> Group:
    """``group=``: a Group (``cc.new_group``, ``cc.shrink``); None is the world (the caller's)."""
    if type(value) is Group or isinstance(value, Group):
        return value
    raise UsageTypeError(f"group must be a group made by collcomm.new_group (or None for the world), got "
                         f"{type(value).__name__}", "group")


def root(value, g: Group, what: str) -> int:
    """A collective's ``root``: a rank of the group ``g`` (its group rank)."""
    if type(value) is int and 0 <= value < g.size:  # (the words below only for a refusal)
        return value
    return rank(value, g.size, f"{what}: root", f"the ranks of group {g.name!r}")


# ---------------------------------------------------------------------------- buffers
def buffer(x, what: str, *, read_only: bool = False) -> Buffer:
    """``x`` as a Buffer (see :func:`~collcomm.runtime.buffers.as_buffer`)."""
    return as_buffer(x, what, read_only=read_only)


def reduction(x, op, what: str) -> Buffer:
    """``x`` as a Buffer that ``op`` can reduce."""
    buf = as_buffer(x, what)
    check_reduction(op, buf)
    return buf


def reduced(out, x, op, what: str) -> tuple[Buffer, Buffer | None]:
    """A reduction's input and the buffer its result lands in (:func:`into`), ``op`` checked."""
    if out is None:
        return reduction(x, op, f"{what}: x"), None
    src, dst = into(out, x, what)
    check_reduction(op, src)
    return src, dst


def into(out, x, what: str) -> tuple[Buffer, Buffer | None]:
    """An operation's input and the buffer its result lands in: (``x``, None) in place (``out``
    None, or the very memory of ``x``); else (``x``, ``out``) of the same dtype and number of
    elements, ``x`` only read (a read-only array will do) and sharing no memory with ``out``."""
    if out is None:
        return as_buffer(x, f"{what}: x"), None
    src, dst = as_buffer(x, f"{what}: x", read_only=True), as_buffer(out, f"{what}: out")
    if dst.dtype != src.dtype:
        raise UsageTypeError(f"{what}: out has dtype {dst.dtype}, x {src.dtype}; they must be the same", "out")
    if dst.count != src.count:
        raise UsageError(f"{what}: out holds {dst.count} elements, x {src.count}; they must be equal", "out")
    a, b = src.array, dst.array
    if np.may_share_memory(a, b):  # (both flat and contiguous: overlapping bounds are shared memory)
        if a.__array_interface__["data"][0] == b.__array_interface__["data"][0]:
            return dst, None  # out is x: in place
        raise UsageError(f"{what}: out overlaps x without being x; pass out=x (in place) or a separate buffer",
                         "out")
    return src, dst


def gathered(out, x, n: int, me: int) -> tuple[Buffer, Buffer]:
    """allgather's (output, input): the same dtype, the output n times the input, the input
    either this member's (``me``) block of the output (in place) or sharing no memory with it."""
    src, dst = as_buffer(x, "allgather: x", read_only=True), as_buffer(out, "allgather: out")
    if dst.dtype != src.dtype:
        raise UsageTypeError(f"allgather: out has dtype {dst.dtype}, x {src.dtype}; they must be the same", "out")
    if dst.count != n * src.count:
        raise UsageError(f"allgather: out holds {dst.count} elements, needs {n} x {src.count} = {n * src.count} "
                         f"(group size x the elements of x)", "out")
    if overlaps_beside_block(src.array, dst.array, me):
        raise UsageError(f"allgather: x overlaps out without being this rank's block of it "
                         f"(out[{me} * x.size:{me + 1} * x.size]); pass that block (in place) or a separate "
                         f"buffer", "x")
    return dst, src


def overlaps_beside_block(x: np.ndarray, out: np.ndarray, me: int) -> bool:
    """Whether allgather's ``x`` shares memory with ``out`` (both contiguous) without being member
    ``me``'s block of it, the one overlap allowed (in place). The API and the lane both ask."""
    return bool(np.may_share_memory(x, out)) and (x.__array_interface__["data"][0] !=
                                                   out.__array_interface__["data"][0] + me * x.size * out.itemsize)


def scattered(out, x, op, n: int) -> tuple[Buffer, Buffer]:
    """reduce_scatter's (output, input): the same dtype, the input n times the output, ``op`` fits."""
    src, dst = as_buffer(x, "reduce_scatter: x"), as_buffer(out, "reduce_scatter: out")
    if dst.dtype != src.dtype:
        raise UsageTypeError(f"reduce_scatter: out has dtype {dst.dtype}, x {src.dtype}; they must be the same",
                             "out")
    if src.count != n * dst.count:
        raise UsageError(f"reduce_scatter: x holds {src.count} elements, needs {n} x {dst.count} = "
                         f"{n * dst.count} (group size x the elements of out)", "x")
    check_reduction(op, src)
    return dst, src


def exchanged(out, x, n: int) -> tuple[Buffer, Buffer]:
    """alltoall's (output, input): the same dtype and size, a multiple of the group size n."""
    src, dst = as_buffer(x, "alltoall: x"), as_buffer(out, "alltoall: out")
    if dst.dtype != src.dtype:
        raise UsageTypeError(f"alltoall: out has dtype {dst.dtype}, x {src.dtype}; they must be the same", "out")
    if dst.count != src.count:
        raise UsageError(f"alltoall: out holds {dst.count} elements, x {src.count}; they must be equal", "out")
    if src.count % n:
        raise UsageError(f"alltoall: x's {src.count} elements do not split into {n} equal blocks (one per group "
                         f"rank); give a multiple of {n}", "x")
    return dst, src


def group_name(name) -> str | None:
    """``new_group``'s name: None (one is made of the members) or a string of at most MAX_NAME characters."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise UsageTypeError(f"new_group: name must be a string, got {type(name).__name__}", "name")
    if len(name) > MAX_NAME:
        raise UsageError(f"new_group: name has {len(name)} characters, more than the limit of {MAX_NAME}", "name")
    return name


def _iterable(value) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _show(value) -> str:
    """A short repr for a message (an argument may be huge: an int of 10,000 digits has no repr)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a user's object whose repr fails still gets its error
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."
