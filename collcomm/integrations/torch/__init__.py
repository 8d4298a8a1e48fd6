"""collcomm as a ``torch.distributed`` backend: ``dist.init_process_group(backend="collcomm")``.

Registration happens on its own: the package declares an entry point in the group
``torch.backends`` (``collcomm = "collcomm.integrations.torch:_autoload"``), which PyTorch calls
at the end of ``import torch`` (unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``). Calling
:func:`register` by hand does the same and is harmless when repeated.

::

    import torch.distributed as dist
    dist.init_process_group(backend="collcomm")      # under torchrun, or with init_method/rank/world_size

The first process group (the default one) makes this process join a collcomm job through the
c10d store PyTorch hands over: rank 0 starts an embedded coordinator with a random token and
publishes its address and the token in the store; the other ranks read them there. Later groups
(``dist.new_group``, DeviceMesh dimensions) become collcomm groups.

This module is loaded by ``import torch`` itself, so it imports nothing heavy and never raises at
import; the implementation, in the modules below, is imported only when a process group is created
(or :class:`ProcessGroupCollcomm` is asked for):

* :mod:`.process_group`: :class:`ProcessGroupCollcomm`, every collective, and the backend's creator;
* :mod:`.rendezvous`: joining the collcomm job (embedded coordinator) and forming subgroups through
  the c10d store;
* :mod:`.work`: lanes that run a group's operations in order, and the ``Work`` handles and futures;
* :mod:`.tensors`: torch tensors as the runtime's buffers (contiguous copies, flat views, checks);
* :mod:`.reductions`: torch's ``ReduceOp`` as collcomm reductions, per dtype;
* :mod:`.errors`: collcomm errors as torch's ``DistBackendError``;
* :mod:`.timeouts`: torch's timeouts as seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # at run time ProcessGroupCollcomm is loaded on first use (module __getattr__)
    from collcomm.integrations.torch.process_group import ProcessGroupCollcomm

BACKEND = "collcomm"

__all__ = ["BACKEND", "ProcessGroupCollcomm", "register"]


def register() -> bool:
    """Register the backend "collcomm" with torch.distributed (cpu tensors); return True when this
    call registered it, False when it was already registered or torch.distributed is unavailable."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if BACKEND in dist.Backend.backend_list:  # torch 2.5 asserts on a second registration
        return False
    dist.Backend.register_backend(BACKEND, _create_process_group, devices=["cpu"])  # a list: a str is iterated
    return True


def _autoload() -> None:
    """The ``torch.backends`` entry point: called at the end of ``import torch``. An exception here
    would break ``import torch`` itself, so it never raises."""
    try:
        register()
    except Exception:  # noqa: BLE001 - a broken plugin must not break torch
        pass


def _create_process_group(store, group_rank: int, group_size: int, timeout):
    """The creator PyTorch calls for every process group with backend "collcomm"."""
    from collcomm.integrations.torch import process_group

    return process_group.create_process_group(store, group_rank, group_size, timeout)


def __getattr__(name: str):
    if name == "ProcessGroupCollcomm":
        from collcomm.integrations.torch import process_group

        return process_group.ProcessGroupCollcomm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
