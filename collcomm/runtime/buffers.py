"""User buffers as flat NumPy views: NumPy arrays and CPU torch tensors, contiguous or refused.

The transport moves bytes and the executor reduces NumPy arrays in place, so every
buffer becomes a 1-D NumPy view of the same memory (no copy); :meth:`Buffer.reducer` picks the
in-place reduction of an op for the buffer's dtype. bfloat16 has no NumPy
type: a bfloat16 tensor travels as uint16 and is reduced through torch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

SUPPORTED = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint32",
             "uint64")
REDUCTIONS = ("sum", "prod", "min", "max", "avg", "band", "bor", "bxor")
BITWISE = ("band", "bor", "bxor")  # integer buffers only
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
        return self.dtype in ("float16", "bfloat16", "float32", "float64")

    def reducer(self, op: str) -> Callable[[np.ndarray, np.ndarray], None]:
        check_reduction(op, self)
        if self.dtype != "bfloat16":
            return numpy_reducer(op)
        return _bfloat16_reducer(op)

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


def check_reduction(op: str, buf: Buffer) -> None:
    if op not in REDUCTIONS:
        raise ValueError(f"unknown reduction {op!r}; choose one of {', '.join(REDUCTIONS)}")
    if op == "avg" and not buf.is_float:
        raise ValueError(f"avg needs a floating-point buffer, got {buf.dtype}")
    if op in BITWISE and buf.is_float:
        raise ValueError(f"{op} needs an integer buffer, got {buf.dtype}")


def as_buffer(x, what: str = "buffer", *, read_only: bool = False) -> Buffer:
    """A flat view of ``x`` (NumPy array or CPU torch tensor); refuses what cannot be used in place.
    ``read_only``: the operation only reads ``x`` (an allgather's or a send's input), so a read-only
    array will do."""
    if isinstance(x, np.ndarray):
        if not x.flags.c_contiguous:
            raise ValueError(f"{what} must be contiguous (C order); pass np.ascontiguousarray(...) and copy back")
        if not x.flags.writeable and not read_only:
            raise ValueError(f"{what} is read-only")
        name = _NAMES.get(x.dtype)  # (dtype.name is slow: computed in Python each time)
        if name is None:
            raise TypeError(f"{what} has dtype {x.dtype.name}; supported: {', '.join(SUPPORTED)}")
        return Buffer(x.reshape(-1), name)
    torch = loaded_torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise TypeError(f"{what} is on {x.device}; the TCP transport takes CPU tensors")
        if not x.is_contiguous():
            raise ValueError(f"{what} must be contiguous; call .contiguous() and copy back")
        if x.dtype == torch.bfloat16:
            return Buffer(x.detach().view(-1).view(torch.int16).numpy().view(np.uint16), "bfloat16")
        arr = x.detach().view(-1).numpy()
        name = _NAMES.get(arr.dtype)
        if name is None:
            raise TypeError(f"{what} has dtype {x.dtype}; supported: {', '.join(SUPPORTED)}")
        return Buffer(arr, name)
    raise TypeError(f"{what} must be a NumPy array or a CPU torch tensor, got {type(x).__name__}")


_NAMES = {np.dtype(n): n for n in SUPPORTED if n != "bfloat16"}


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
        raise TypeError(f"dtype {name} cannot be reduced; supported: {', '.join(SUPPORTED)}")
    return np.dtype("uint16" if name == "bfloat16" else name)
