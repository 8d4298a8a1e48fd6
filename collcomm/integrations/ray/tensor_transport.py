"""collcomm as a Ray Direct Transport (RDT): ``@ray.method(tensor_transport="collcomm")``.

A one-sided transport, which is what collcomm's object layer is: when an actor method annotated
with this transport returns CPU torch tensors, Ray calls :meth:`extract_tensor_transport_metadata`
on that actor, which puts each tensor into collcomm's object layer (zero copy: the tensor is
shared, as Ray's own transports hold it) under ``rdt/<object id>/<i>``. Each actor that consumes
the result gets :meth:`recv_multiple_tensors` called, which pulls the tensors through collcomm:
consumers that ask at about the same time are chained (a pipelined tree, one crossing per node)
instead of each reading from the producer. When Ray's reference counting frees the object,
:meth:`garbage_collect` deletes the keys everywhere.

Ray's documented limits that remain: register before the actors that use it are created, from
the process that creates them (importing :mod:`collcomm.integrations.ray` in the driver does
it); an actor that consumes RDT objects must be declared with ``enable_tensor_transport=True``
(or have an RDT method itself), else Ray never runs the transfer in it and the consumer fails at
Ray's fetch timeout (60 s); actor restarts are not supported by RDT; the driver cannot ``ray.put`` into an RDT
transport. Ours: CPU tensors only; a consumer whose producer died gets
:class:`~collcomm.errors.ObjectLost` (or a timeout) instead of hanging, but the transport does not
abort a transfer in flight (``can_abort_transport`` is False: Ray then handles a failed transfer
by killing the actors involved, as for its other non-abortable transports).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from ray.experimental.rdt.tensor_transport_manager import (CommunicatorMetadata, TensorTransportManager,
                                                           TensorTransportMetadata)

import collcomm.api as api
from collcomm.integrations.ray import job

NAME = "COLLCOMM"


@dataclass
class CollcommTransportMetadata(TensorTransportMetadata):
    keys: List[str] = field(default_factory=list)  # one collcomm object per tensor
    coordinator: tuple = ()  # (address, token): the consumer joins without asking Ray (see job.init)


@dataclass
class CollcommCommunicatorMetadata(CommunicatorMetadata):
    """Nothing: every consumer finds the tensors by key."""


class CollcommTensorTransport(TensorTransportManager):
    @property
    def tensor_transport_backend(self) -> str:
        return NAME

    @staticmethod
    def is_one_sided() -> bool:
        return True

    @staticmethod
    def can_abort_transport() -> bool:
        return False

    def actor_has_tensor_transport(self, actor) -> bool:
        return True  # any actor of the job joins collcomm on first use

    def extract_tensor_transport_metadata(self, obj_id: str, rdt_object: List[Any]) -> CollcommTransportMetadata:
        where = job.coordinator()
        meta, keys = [], []
        for i, t in enumerate(rdt_object):
            if t.device.type != "cpu":
                raise ValueError(f"the collcomm tensor transport moves CPU tensors; tensor {i} is on {t.device}")
            key = f"rdt/{obj_id}/{i}"
            api.put(key, t, copy=not t.is_contiguous())
            meta.append((t.shape, t.dtype))
            keys.append(key)
        return CollcommTransportMetadata(tensor_meta=meta, tensor_device="cpu" if meta else None, keys=keys,
                                         coordinator=where)

    def get_communicator_metadata(self, src_actor, dst_actor, backend: Optional[str] = None):
        return CollcommCommunicatorMetadata()

    def recv_multiple_tensors(self, obj_id: str, tensor_transport_metadata, communicator_metadata,
                              target_buffers: Optional[List[Any]] = None) -> List[Any]:
        import torch

        job.init(where=tuple(tensor_transport_metadata.coordinator) or None)
        out = []
        for i, (key, (shape, dtype)) in enumerate(zip(tensor_transport_metadata.keys,
                                                       tensor_transport_metadata.tensor_meta)):
            buf = target_buffers[i] if target_buffers else torch.empty(shape, dtype=dtype)
            api.get(key, buf)
            out.append(buf)
        return out

    def send_multiple_tensors(self, tensors, tensor_transport_metadata, communicator_metadata):
        raise NotImplementedError("the collcomm tensor transport is one-sided: consumers pull")

    def garbage_collect(self, obj_id: str, tensor_transport_meta, tensors) -> None:
        if not job.joined():
            return
        for key in getattr(tensor_transport_meta, "keys", []):
            try:
                api.delete(key, timeout=10.0)
            except Exception:  # noqa: BLE001 - the job may be ending; nothing to free then
                pass

    def abort_transport(self, obj_id: str, communicator_metadata) -> None:
        pass  # can_abort_transport is False: Ray never calls it


def register() -> bool:
    """Register the transport with Ray in this process (idempotent); False when the installed Ray
    has no ``register_tensor_transport`` or torch is missing."""
    try:
        import torch
        from ray.experimental import register_tensor_transport
        from ray.experimental.rdt import util as rdt_util
    except ImportError:
        return False
    if NAME in getattr(rdt_util, "transport_manager_info", {}):
        return True
    try:
        register_tensor_transport(NAME, ["cpu"], CollcommTensorTransport, torch.Tensor)
    except ValueError:  # registered by another thread in between
        pass
    return True
