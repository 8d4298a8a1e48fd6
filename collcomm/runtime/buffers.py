"""User buffers as flat NumPy views: NumPy arrays and CPU torch tensors, contiguous or refused.

The transport moves bytes and the executor reduces NumPy arrays in place, so every
buffer becomes a 1-D NumPy view of the same memory (no copy); :meth:`Buffer.reducer` picks the
in-place reduction of an op for the buffer's dtype. bfloat16 has no NumPy
type: a bfloat16 tensor travels as uint16 and is reduced through torch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from collcomm.errors import UsageError, UsageTypeError

SUPPORTED = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint32",
             "uint64")
REDUCTIONS = ("sum", "prod", "min", "max", "avg", "band", "bor", "bxor")
BITWISE = ("band", "bor", "bxor")  # integer buffers only
_FLOATS = frozenset(("float16", "bfloat16", "float32", "float64"))
_FLOAT_OPS = frozenset(op for op in REDUCTIONS if op not in BITWISE)
_INTEGER_OPS = frozenset(op for op in REDUCTIONS if op != "avg")
_UFUNC = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum, "avg": np.add,
          "band": np.bitwise_and, "bor": np.bitwise_or, "bxor": np.bitwise_xor}


class Buffer:
    """A user buffer as a flat view. (A plain slotted class: a frozen dataclass costs a
    microsecond to build, a fair share of a small collective on shared memory.)"""

    __slots__ = ("array", "dtype")

    def __init__(self, array: np.ndarray, dtype: str):
        self.array = array  # 1-D view of the user's memory
        self.dtype = dtype  # "float32", ..., "bfloat16"

    @property
    def count(self) -> int:
        return self.array.size

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOATS

    def reducer(self, op: str) -> Callable[[np.ndarray, np.ndarray], None]:
        check_reduction(op, self)
        if self.dtype != "bfloat16":
            return numpy_reducer(op)
        return _bfloat16_reducer(op)

    def combiner(self, op: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
        """``combine(out, a, b)``: out = a (op) b, for a result that lands in a third array (an
        out-of-place reduction's first step: one pass instead of a copy and a reduction)."""
        check_reduction(op, self)
        if self.dtype != "bfloat16":
            return numpy_combiner(op)
        reduce = _bfloat16_reducer(op)

        def combine(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
            np.copyto(out, a)
            reduce(out, b)

        return combine

    def divide(self, divisor: int, part: slice = slice(None)) -> None:
        """In-place ``/= divisor`` (for avg)."""
        if self.dtype == "bfloat16":
            t = _as_bf16(self.array[part])
            t.div_(divisor)
        else:
            view = self.array[part]
            np.divide(view, divisor, out=view, casting="unsafe")


def numpy_reducer(op: str) -> Callable[[np.ndarray, np.ndarray], None]:
    """dst = dst (op) src, in place (NumPy releases the GIL inside)."""
    reducer = _NUMPY_REDUCERS.get(op)
    if reducer is None:
        ufunc = _UFUNC[op]

        def reducer(dst: np.ndarray, src: np.ndarray) -> None:
            ufunc(dst, src, out=dst)

        _NUMPY_REDUCERS[op] = reducer
    return reducer


_NUMPY_REDUCERS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {}


def numpy_combiner(op: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """out = a (op) b (``out`` shares no memory with ``a`` or ``b``)."""
    combiner = _NUMPY_COMBINERS.get(op)
    if combiner is None:
        ufunc = _UFUNC[op]

        def combiner(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
            ufunc(a, b, out=out)

        _NUMPY_COMBINERS[op] = combiner
    return combiner


_NUMPY_COMBINERS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = {}


def check_reduction(op: str, buf: Buffer) -> None:
    """Refuse a reduction that is not one of REDUCTIONS or does not fit the buffer's dtype
    (UsageError naming ``op``)."""
    if type(op) is str and op in (_FLOAT_OPS if buf.dtype in _FLOATS else _INTEGER_OPS):
        return  # (the common case in one look: this runs on every reduction)
    if type(op) is not str or op not in REDUCTIONS:
        what = f"{op!r}" if isinstance(op, str) and len(op) <= 40 else f"of type {type(op).__name__}"
        raise UsageError(f"op: unknown reduction {what}; choose one of {', '.join(REDUCTIONS)}", "op")
    if op == "avg" and not buf.is_float:
        raise UsageError(f"op: avg needs a floating-point buffer, got {buf.dtype}", "op")
    if op in BITWISE and buf.is_float:
        raise UsageError(f"op: {op} needs an integer buffer, got {buf.dtype}", "op")


def as_buffer(x, what: str = "buffer", *, read_only: bool = False) -> Buffer:
    """A flat view of ``x`` (NumPy array or CPU torch tensor); refuses what cannot be used in place
    (UsageError, or UsageTypeError for the wrong kind or dtype, naming ``what``: "allreduce: x").
    ``read_only``: the operation only reads ``x`` (an allgather's or a send's input), so a read-only
    array will do. A Buffer (the API's, checked already) is returned as it is."""
    if type(x) is np.ndarray:  # (the common case first; subclasses below)
        name = _NAMES.get(x.dtype)  # (dtype.name is slow: computed in Python each time)
        flags = x.flags
        if name is not None and flags.c_contiguous and (read_only or flags.writeable):
            return Buffer(x.reshape(-1), name)
        _refuse_array(x, what, read_only)
    if type(x) is Buffer:
        return x
    if isinstance(x, np.ndarray):
        if isinstance(x, np.matrix):  # (reshape(-1) of a matrix is 2-D)
            raise UsageTypeError(f"{what} is a numpy.matrix; pass np.asarray(...)", argument(what))
        _refuse_array(x, what, read_only)
        return Buffer(x.reshape(-1), _NAMES[x.dtype])
    torch = loaded_torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            if x.device.type == "cuda":  # NcclUnavailable naming what is missing (no NCCL, driver or GPU)
                from collcomm.transport.nccl import require_gpu

                require_gpu(f"{what} is on {x.device}")
            raise UsageTypeError(f"{what} is on {x.device}; the TCP transport takes CPU tensors", argument(what))
        if x.layout != torch.strided:
            raise UsageTypeError(f"{what} is a {x.layout} tensor; collectives take dense (strided) tensors",
                                 argument(what))
        if not x.is_contiguous():
            raise UsageError(f"{what} must be contiguous; call .contiguous() and copy back", argument(what))
        if x.dtype == torch.bfloat16:
            return Buffer(x.detach().view(-1).view(torch.int16).numpy().view(np.uint16), "bfloat16")
        name = _TORCH_NAMES[x.dtype]
        if name is None:
            raise UsageTypeError(f"{what} has dtype {x.dtype}; supported: {', '.join(SUPPORTED)}", argument(what))
        return Buffer(x.detach().view(-1).numpy(), name)
    raise UsageTypeError(f"{what} must be a NumPy array or a CPU torch tensor, got {type(x).__name__}",
                         argument(what))


def _refuse_array(x: np.ndarray, what: str, read_only: bool) -> None:
    """Raise why the array ``x`` cannot be used in place (nothing when it can)."""
    if _NAMES.get(x.dtype) is None:
        dtype = x.dtype.name if x.dtype.isnative else x.dtype.str + " (not this machine's byte order)"
        raise UsageTypeError(f"{what} has dtype {dtype}; supported: {', '.join(SUPPORTED)}", argument(what))
    if not x.flags.c_contiguous:
        raise UsageError(f"{what} must be contiguous (C order); pass np.ascontiguousarray(...) and copy back",
                         argument(what))
    if not x.flags.writeable and not read_only:
        raise UsageError(f"{what} is read-only", argument(what))


def argument(what: str) -> str:
    """The argument's name in a description ("allreduce: x" -> "x", "new_group: ranks[1]" -> "ranks")."""
    return what.rpartition(": ")[2].partition("[")[0]


_NAMES = {np.dtype(n): n for n in SUPPORTED if n != "bfloat16"}


class _TorchNames(dict):
    """torch dtype -> name (None: not supported), filled on first use: torch is the program's to import."""

    def __missing__(self, dtype):
        torch = loaded_torch()
        name = None
        for n in SUPPORTED:
            if n != "bfloat16" and getattr(torch, n, None) == dtype:
                name = n
        self[dtype] = name
        return name


_TORCH_NAMES = _TorchNames()


def loaded_torch():
    """The torch module if the program imported it, else None (the runtime does not import it itself)."""
    import sys

    return sys.modules.get("torch")  # only if the user's program imported it


def _as_bf16(arr: np.ndarray):
    torch = loaded_torch()
    return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)


def _bfloat16_reducer(op: str) -> Callable[[np.ndarray, np.ndarray], None]:
    torch = loaded_torch()
    fn = {"sum": torch.add, "avg": torch.add, "prod": torch.mul, "min": torch.minimum, "max": torch.maximum}[op]

    def reduce_into(dst: np.ndarray, src: np.ndarray) -> None:
        d = _as_bf16(dst)
        fn(d, _as_bf16(src), out=d)

    return reduce_into


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy type a dtype name travels and is reduced as (bfloat16: uint16 bits)."""
    if name not in SUPPORTED:
        raise UsageTypeError(f"dtype {name} cannot be reduced; supported: {', '.join(SUPPORTED)}", "dtype")
    return np.dtype("uint16" if name == "bfloat16" else name)
