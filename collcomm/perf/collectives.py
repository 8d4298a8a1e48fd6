"""What each collective means to the benchmark: buffer sizes, printed count, bandwidth factor,
which buffer is the input and which the output in each variant, and the check data.

Sizes and counts follow nccl-tests. For a requested size S of a type of ``w`` bytes, count =
S // w elements; then (n ranks, c = count // n):

=============== ============= ============== ================ ================ ===============
collective       send buffer   recv buffer    printed size     printed count    busbw / algbw
=============== ============= ============== ================ ================ ===============
allreduce        count         count          count * w        count            2(n-1)/n
allgather        c             c * n          c * n * w        c (sent)         (n-1)/n
reduce_scatter   c * n         c              c * n * w        c (received)     (n-1)/n
alltoall         c * n         c * n          c * n * w        c (per peer)     (n-1)/n
broadcast        count         count          count * w        count            1
reduce           count         count          count * w        count            1
=============== ============= ============== ================ ================ ===============

algbw = printed size / time (GB/s, GB = 1e9 bytes).

Variants. Out-of-place: the input is the send buffer, the output the receive buffer; where an
API works only in place (torch's allreduce, broadcast and reduce; MPI's broadcast) the operation
is "copy the send buffer into the receive buffer, then run in place", and the copy is timed (it
is what a caller of that API pays for out-of-place). collcomm's allreduce, reduce and broadcast
take the receive buffer (``out=``). In-place: the output buffer is the
input (allreduce, broadcast, reduce, alltoall: the receive buffer), for allgather the input is
this rank's slice of the output, for reduce_scatter the output is this rank's slice of the input
(as in NCCL).

Check data (``-c``): element i of rank r's input is a hash of (r, i) taken to small integers
(0..15 for half and bfloat16, fewer for bfloat16 beyond 17 ranks, 0..1023 for float, double
and the wider integers, the type's range for int8/uint8; 1 or 2 for prod), so a block or chunk
that lands at a wrong offset or comes from a wrong rank differs almost everywhere, and every
sum, product, minimum and maximum over the ranks is exact in the type (integers wrap, and wrap
the same in any order). avg is the exact sum divided once by n, which rounds the same way in the
library and in the reference.
Before each check the output buffer is filled with the expected result with its lowest bit
flipped, so an element the operation does not write counts as wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STORAGE = {"int8": np.int8, "uint8": np.uint8, "int32": np.int32, "uint32": np.uint32, "int64": np.int64,
           "uint64": np.uint64, "half": np.float16, "float": np.float32, "double": np.float64,
           "bfloat16": np.uint16}  # bfloat16 is held as its bits
_RANGE = {"int8": 128, "uint8": 256, "half": 16, "bfloat16": 16}
_UFUNC = {"sum": np.add, "avg": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}


@dataclass(frozen=True)
class Layout:
    size: int        # bytes, as printed (algbw = size / time)
    count: int       # elements, as printed
    send: int        # elements of the send buffer
    recv: int        # elements of the receive buffer


def itemsize(dtype: str) -> int:
    return np.dtype(STORAGE[dtype]).itemsize


def layout(coll: str, nbytes: int, dtype: str, n: int) -> Layout:
    w = itemsize(dtype)
    count = nbytes // w
    c = count // n
    if coll == "allgather":
        return Layout(c * n * w, c, c, c * n)
    if coll == "reduce_scatter":
        return Layout(c * n * w, c, c * n, c)
    if coll == "alltoall":
        return Layout(c * n * w, c, c * n, c * n)
    return Layout(count * w, count, count, count)


def busbw_factor(coll: str, n: int) -> float:
    if coll == "allreduce":
        return 2 * (n - 1) / n
    if coll in ("allgather", "reduce_scatter", "alltoall"):
        return (n - 1) / n
    return 1.0


def root_of(coll: str, root: int) -> int:
    """The printed root: -1 for collectives without one."""
    return root if coll in ("broadcast", "reduce") else -1


def views(coll: str, inplace: bool, send, recv, me: int, n: int):
    """(input, output) of a variant, as views of the send and receive buffers (NumPy arrays or tensors)."""
    if not inplace:
        return send, recv
    if coll == "allgather":
        c = len(recv) // n
        return recv[me * c:(me + 1) * c], recv
    if coll == "reduce_scatter":
        c = len(send) // n
        return send, send[me * c:(me + 1) * c]
    return recv, recv


def input_used(coll: str, me: int, root: int) -> bool:
    """Whether this rank's input matters (a broadcast reads only the root's)."""
    return coll != "broadcast" or me == root


def output_checked(coll: str, me: int, root: int) -> bool:
    """Whether this rank's output is defined (a reduce leaves its result at the root only)."""
    return coll != "reduce" or me == root


# ---------------------------------------------------------------------------- check data
def _hash(rank: int, start: int, count: int) -> np.ndarray:
    """A well-mixed uint32 per element index (start ... start + count - 1) of ``rank``'s data."""
    h = np.arange(start, start + count, dtype=np.uint32)
    h *= np.uint32(0x9E3779B1)
    h ^= np.uint32(((rank + 1) * 0x85EBCA77) & 0xFFFFFFFF)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0xC2B2AE3D)
    h ^= h >> np.uint32(13)
    return h


def from_values(dtype: str, values: np.ndarray) -> np.ndarray:
    """Small non-negative integers (exact in every type) as the type's storage."""
    if dtype == "bfloat16":
        return (values.astype(np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    return values.astype(STORAGE[dtype])


def value_range(dtype: str, n: int) -> int:
    """Check values are 0 .. range - 1: sums of n of them stay exact in half (2048) and bfloat16 (256)."""
    top = _RANGE.get(dtype, 1024)
    exact = {"half": 2048, "bfloat16": 256}.get(dtype)
    while exact is not None and top > 2 and (top - 1) * n > exact:
        top //= 2
    return top


def pattern(dtype: str, op: str, rank: int, count: int, start: int = 0, n: int = 1) -> np.ndarray:
    """Elements ``start`` ... ``start + count - 1`` of ``rank``'s check input in a world of ``n``."""
    h = _hash(rank, start, count)
    if op == "prod":
        values = (h & np.uint32(1)) + np.uint32(1)
    else:
        values = h & np.uint32(value_range(dtype, n) - 1)
    return from_values(dtype, values)


def neutral(dtype: str, op: str, count: int) -> np.ndarray:
    """What the timed iterations run on: 0 (1 for prod), so repeating an in-place reduction never
    overflows or slows down in subnormals."""
    return from_values(dtype, np.full(count, 1 if op == "prod" else 0, np.uint32))


def reduce_parts(dtype: str, op: str, parts: list[np.ndarray], n: int) -> np.ndarray:
    """The reduction of the ranks' parts (storage arrays) as the libraries compute it."""
    if dtype == "bfloat16":
        import torch

        fn = {"sum": torch.add, "avg": torch.add, "prod": torch.mul, "min": torch.minimum,
              "max": torch.maximum}[op]
        bits = parts[0].copy()
        acc = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        for p in parts[1:]:
            fn(acc, torch.from_numpy(p.view(np.int16)).view(torch.bfloat16), out=acc)
        if op == "avg":
            acc.div_(n)
        return bits
    acc = parts[0].copy()
    for p in parts[1:]:
        _UFUNC[op](acc, p, out=acc)
    if op == "avg":
        np.divide(acc, n, out=acc, casting="unsafe")
    return acc


def expected(coll: str, dtype: str, op: str, me: int, n: int, root: int, lay: Layout) -> np.ndarray | None:
    """This rank's correct output (storage dtype), or None where the output is not defined."""
    if not output_checked(coll, me, root):
        return None
    c = lay.count
    if coll in ("allreduce", "reduce"):
        return reduce_parts(dtype, op, [pattern(dtype, op, r, c, 0, n) for r in range(n)], n)
    if coll == "reduce_scatter":
        return reduce_parts(dtype, op, [pattern(dtype, op, r, c, me * c, n) for r in range(n)], n)
    if coll == "allgather":
        return np.concatenate([pattern(dtype, op, r, c, 0, n) for r in range(n)])
    if coll == "alltoall":  # block i comes from rank i: its block ``me``
        return np.concatenate([pattern(dtype, op, i, c, me * c, n) for i in range(n)])
    return pattern(dtype, op, root, c, 0, n)  # broadcast


def flipped(values: np.ndarray) -> np.ndarray:
    """``values`` with the lowest bit of every element flipped (differs from it everywhere)."""
    bits = values.view(f"u{values.itemsize}") ^ np.array(1, f"u{values.itemsize}")
    return bits.view(values.dtype)


def count_wrong(got: np.ndarray, want: np.ndarray) -> int:
    return int(np.count_nonzero(got != want))


def corrupt(values: np.ndarray, index: int) -> None:
    """Flip the lowest bit of one element in place (the fault-injection hook)."""
    if values.size:
        bits = values.view(f"u{values.itemsize}")
        bits[index % values.size] ^= np.array(1, f"u{values.itemsize}")
