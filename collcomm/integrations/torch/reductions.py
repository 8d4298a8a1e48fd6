"""torch's ``ReduceOp`` as collcomm's reductions, per dtype.

Reductions run on float16/bfloat16/float32/float64, int8..int64, uint8 (also uint32/64), bool (as
uint8: SUM/MAX/BOR = or, PRODUCT/MIN/BAND = and, BXOR = xor) and complex (as real pairs: SUM, AVG,
PREMUL_SUM only); PREMUL_SUM is a SUM of the inputs scaled by its factor (:func:`scale`).
:func:`reduction` raises at the call for what cannot be done, naming the op and the dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_RedOpType = dist.ReduceOp.RedOpType
REDUCIBLE = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
             torch.int64, torch.uint8, torch.uint32, torch.uint64}  # dtypes the runtime reduces as themselves
_OP_NAMES = {_RedOpType.SUM: "sum", _RedOpType.PRODUCT: "prod", _RedOpType.MIN: "min", _RedOpType.MAX: "max",
             _RedOpType.AVG: "avg", _RedOpType.BAND: "band", _RedOpType.BOR: "bor", _RedOpType.BXOR: "bxor",
             _RedOpType.PREMUL_SUM: "premul_sum"}
_BOOL_OPS = {"sum": "max", "prod": "min", "min": "min", "max": "max", "band": "band", "bor": "bor", "bxor": "bxor"}
_BITWISE = ("band", "bor", "bxor")


def _op_name(op) -> str:
    kind = getattr(op, "op", op)
    for key, name in _OP_NAMES.items():
        if kind == key:
            return name
    raise ValueError(f"collcomm: unsupported reduction {op!r}")


def reduction(op, dtype: torch.dtype, what: str):
    """(collcomm reduction name, PREMUL_SUM factor or None) for ``op`` on ``dtype``; raises for
    what cannot be done, naming the op and the dtype."""
    name = _op_name(op)
    label = f"ReduceOp.{name.upper() if name != 'prod' else 'PRODUCT'}"
    factor = None
    if name == "premul_sum":
        state = op.__getstate__() if hasattr(op, "__getstate__") else None
        factor = state[1] if isinstance(state, tuple) and len(state) > 1 else getattr(op, "factor", None)
        if factor is None:
            raise ValueError(f"collcomm: {what}: ReduceOp.PREMUL_SUM without a factor")
        name = "sum"
    if dtype.is_complex:
        if name not in ("sum", "avg"):
            raise ValueError(f"collcomm: {what} does not support {label} on complex tensors ({dtype})")
    elif dtype == torch.bool:
        if name not in _BOOL_OPS or factor is not None:
            raise ValueError(f"collcomm: {what} does not support {label if factor is None else 'PREMUL_SUM'} on "
                             f"{dtype} tensors")
        name = _BOOL_OPS[name]
    elif dtype not in REDUCIBLE:
        raise TypeError(f"collcomm: {what} does not support dtype {dtype}")
    elif dtype.is_floating_point:
        if name in _BITWISE:
            raise ValueError(f"collcomm: {what} does not support {label} on floating-point tensors ({dtype})")
    elif name == "avg" or factor is not None:
        raise ValueError(f"collcomm: {what} does not support {'AVG' if name == 'avg' else 'PREMUL_SUM'} on "
                         f"integer tensors ({dtype})")
    return name, factor


def scale(t: torch.Tensor, factor) -> None:
    """``t *= factor`` (PREMUL_SUM), for a float or a one-element tensor factor."""
    if isinstance(factor, torch.Tensor):
        factor = factor.to(device="cpu").reshape(-1)[0].item()
    if t.is_complex():
        torch.view_as_real(t).mul_(factor)
    else:
        t.mul_(factor)
