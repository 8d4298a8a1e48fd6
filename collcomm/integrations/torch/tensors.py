"""torch tensors as the runtime's buffers, and the checks every call makes on its tensors.

The runtime works on contiguous 1-D buffers: a non-contiguous tensor (or a conjugate or negative
view) is copied to a contiguous one and back (:func:`contiguous`, :func:`copy_back`). Reductions see
bool as uint8 and complex as real pairs (:func:`reduce_view`); data movement (broadcast, gathers,
scatters, all-to-all, send/recv) takes any dtype, as bytes when NumPy has no such type
(:func:`move_view`). Only strided CPU tensors are taken.
"""

from __future__ import annotations

import torch

from collcomm.integrations.torch.reductions import REDUCIBLE

_MOVABLE = REDUCIBLE  # dtypes that travel as themselves (others as bytes)


def contiguous(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a contiguous tensor to work on, the user's tensor to copy the result back into or None)."""
    t = t.detach()
    if t.is_contiguous() and not t.is_conj() and not t.is_neg():
        return t, None
    return t.resolve_conj().resolve_neg().contiguous(), t


def copy_back(work: torch.Tensor, orig: torch.Tensor | None) -> None:
    """Copy the result in ``work`` into the user's tensor ``orig`` (from :func:`contiguous`), if any."""
    if orig is not None:
        orig.copy_(work)


def reduce_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of contiguous ``t`` that the runtime reduces (bool as uint8, complex as real pairs)."""
    flat = t.reshape(-1)
    if flat.is_complex():
        return torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    return flat


def move_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of contiguous ``t`` for data movement (as bytes when NumPy has no such type)."""
    flat = t.reshape(-1)
    if flat.dtype in _MOVABLE:
        return flat
    if flat.is_complex():
        return torch.view_as_real(flat).reshape(-1)
    return flat.view(torch.uint8)


def check_cpu(tensors, what: str) -> None:
    """Raise unless every one of ``tensors`` is a strided CPU tensor."""
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"collcomm: {what} expects tensors, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"collcomm: {what} supports CPU tensors only, got a tensor on {t.device}")
        if t.layout != torch.strided:
            raise ValueError(f"collcomm: {what} does not support {t.layout} tensors")


def single(tensors, what: str) -> torch.Tensor:
    """The one CPU tensor of a call that takes a list of one tensor (or the tensor itself)."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    if len(tensors) != 1:
        raise ValueError(f"collcomm: {what} takes exactly one tensor per call (CPU, one device), got {len(tensors)}")
    check_cpu(tensors, what)
    return tensors[0]


def same_dtype(tensors, dtype: torch.dtype, what: str) -> None:
    """Raise unless every one of ``tensors`` has ``dtype``."""
    for t in tensors:
        if t.dtype != dtype:
            raise TypeError(f"collcomm: {what}: tensors of dtype {t.dtype} and {dtype} mixed")
