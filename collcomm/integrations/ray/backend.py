"""collcomm as a ``ray.util.collective`` backend: ``backend="collcomm"``.

Ray builds a group as ``CollcommGroup(world_size, rank, group_name)`` in every member (from
``init_collective_group`` in the actor, or lazily on the first call after the driver's
``create_collective_group``). The member joins its Ray job's collcomm job (:mod:`.job`), then
the members find each other through the coordinator's key-value store: each draws the group's
incarnation number (``ray/<group>/<rank>/incarnations``: a name destroyed and created again gets
a fresh set of keys), writes its collcomm rank under it and reads everyone else's, and they form
a collcomm group in Ray's rank order. The collectives then run on it exactly as collcomm's own.

Beyond Ray's own backends: every call is bounded (the options' ``timeout_ms`` when set, else the
job's timeout, 60 s by default) and a dead member gives a typed collcomm error
(:class:`~collcomm.errors.PeerFailure`, :class:`~collcomm.errors.CollectiveTimeout`) on the
others; :func:`shrink` re-forms the group without its dead members and the survivors go on with
new ranks (in the old order) and a smaller world size. Differences from Ray's gloo backend are
listed in ``README.md`` (``reducescatter`` leaves its inputs unchanged). Like gloo, a read-only
NumPy array (Ray's arguments) is written into, with a warning.
"""

from __future__ import annotations

import ctypes
import warnings
import zlib

import numpy as np
from ray.util.collective.collective_group.base_collective_group import BaseGroup
from ray.util.collective.types import ReduceOp

import collcomm.api as api
from collcomm.errors import CollectiveError
from collcomm.integrations.ray import job

BACKEND = "COLLCOMM"


class TensorShapeError(ValueError, RuntimeError):
    """Tensors of a call that do not fit together; a RuntimeError too, as Ray's gloo backend
    raises (torch's) for the same mistakes."""
_OPS = {ReduceOp.SUM: "sum", ReduceOp.PRODUCT: "prod", ReduceOp.MIN: "min", ReduceOp.MAX: "max"}


class CollcommGroup(BaseGroup):
    """One ``ray.util.collective`` group on collcomm."""

    def __init__(self, world_size: int, rank: int, group_name: str, *_ignored):
        super().__init__(world_size, rank, group_name)
        job.init()
        rt = api.runtime()
        self._timeout = rt.timeout
        client = rt.client
        base = f"ray/{group_name}"
        incarnation = client.kv_add(f"{base}/{rank}/incarnations", 1, timeout=self._timeout)
        client.kv_set(f"{base}/{incarnation}/{rank}", str(rt.rank).encode(), timeout=self._timeout)
        members = [int(client.kv_get(f"{base}/{incarnation}/{r}", timeout=self._timeout))
                   for r in range(world_size)]
        self._group = api.new_group(members, name=f"{base}/{incarnation}", timeout=self._timeout)
        # Point-to-point messages are numbered per pair of processes and tag: a tag per group keeps
        # two groups between the same pair of actors apart.
        self._tag = zlib.crc32(group_name.encode()) % ((1 << 31) - 2)

    # ------------------------------------------------------------------ Ray's class contract
    @classmethod
    def backend(cls):
        return BACKEND

    @classmethod
    def check_backend_availability(cls) -> bool:
        return True

    def destroy_group(self):
        self._group.close()

    @property
    def collcomm_group(self):
        """The collcomm group underneath (its current successor after a shrink)."""
        return self._group

    # ------------------------------------------------------------------ collectives
    def allreduce(self, tensor, allreduce_options=None):
        api.allreduce(_one(tensor, "allreduce"), _op(allreduce_options), group=self._group,
                      timeout=self._bound(allreduce_options))

    def barrier(self, barrier_options=None):
        api.barrier(group=self._group, timeout=self._bound(barrier_options))

    def reduce(self, tensor, reduce_options=None):
        root = int(getattr(reduce_options, "root_rank", 0))
        api.reduce(_one(tensor, "reduce"), root=root, op=_op(reduce_options), group=self._group,
                   timeout=self._bound(reduce_options))

    def broadcast(self, tensor, broadcast_options=None):
        root = int(getattr(broadcast_options, "root_rank", 0))
        api.broadcast(_one(tensor, "broadcast"), root=root, group=self._group,
                      timeout=self._bound(broadcast_options))

    def allgather(self, tensor_list, tensor, allgather_options=None):
        x = _one(tensor, "allgather", writable=False)
        outs = _many(tensor_list, "allgather", self._world_size)
        for i, o in enumerate(outs):
            if _shape(o) != _shape(x):
                raise TensorShapeError(f"allgather: output {i} has shape {_shape(o)}, the input {_shape(x)}")
        flat = _empty_like(x, self._world_size)
        api.allgather(flat, x, group=self._group, timeout=self._bound(allgather_options))
        for i, o in enumerate(outs):
            _copy_into(o, flat[i])

    def reducescatter(self, tensor, tensor_list, reducescatter_options=None):
        out = _one(tensor, "reducescatter")
        ins = _many(tensor_list, "reducescatter", self._world_size, writable=False)
        for i, t in enumerate(ins):
            if _shape(t) != _shape(out):
                raise TensorShapeError(f"reducescatter: input {i} has shape {_shape(t)}, the output {_shape(out)}")
        stacked = _stack(ins)
        api.reduce_scatter(out, stacked, _op(reducescatter_options), group=self._group,
                           timeout=self._bound(reducescatter_options))

    def send(self, tensor, send_options):
        dst = self._member(int(send_options.dst_rank), "send")
        api.send(_one(tensor, "send", writable=False), dst, tag=self._tag, timeout=self._bound(send_options))

    def recv(self, tensor, recv_options):
        src = self._member(int(recv_options.src_rank), "recv")
        api.recv(_one(tensor, "recv"), src, tag=self._tag, timeout=self._bound(recv_options))

    # ------------------------------------------------------------------ membership
    def shrink(self, timeout: float | None = None) -> None:
        """Re-form the group without its dead or hung members (every survivor calls it)."""
        self._group = api.shrink(self._group, timeout=self._timeout if timeout is None else timeout)
        self._rank, self._world_size = self._group.rank, self._group.size

    # ------------------------------------------------------------------ helpers
    def _bound(self, options) -> float:
        ms = getattr(options, "timeout_ms", None)
        seconds = ms.total_seconds() if hasattr(ms, "total_seconds") else None
        return seconds if seconds is not None and seconds > 0 else self._timeout

    def _member(self, group_rank: int, what: str) -> int:
        members = self._group.members
        if not 0 <= group_rank < len(members):
            raise ValueError(f"{what}: rank {group_rank} is not in group '{self._group_name}' of size {len(members)}")
        return members[group_rank]


def _op(options) -> str:
    op = getattr(options, "reduceOp", ReduceOp.SUM)
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(f"unsupported reduce op {op!r}; collcomm supports {sorted(o.name for o in _OPS)}") from None


def _one(tensor, what: str, writable: bool = True):
    """The buffer inside Ray's one-element list, checked (a read-only one as a writable view: see
    _writable; ``writable`` False: the call only reads it, so no warning)."""
    t = tensor[0] if isinstance(tensor, list) and len(tensor) == 1 else tensor
    _check(t, what)
    return _writable(t, what, warn=writable)


def _many(tensor_list, what: str, n: int, writable: bool = True) -> list:
    items = tensor_list[0] if isinstance(tensor_list, list) and len(tensor_list) == 1 and \
        isinstance(tensor_list[0], list) else tensor_list
    if len(items) != n:
        raise TensorShapeError(f"{what}: the tensor list has {len(items)} entries; the group has {n} members")
    for t in items:
        _check(t, what)
    return [_writable(t, what, warn=writable) for t in items]


_WARNED_READ_ONLY = False


def _writable(t, what: str, warn: bool = True):
    """A writable view of ``t``'s own memory. Ray hands NumPy arrays that arrived as arguments over
    read-only, backed by its object store; its gloo backend writes into them anyway (through
    ``torch.from_numpy``), and Ray code relies on it. To switch backends by one word we do the same,
    with the same warning: the result lands in that memory, which Ray's other readers of the object
    on this node share."""
    global _WARNED_READ_ONLY
    if not isinstance(t, np.ndarray) or t.flags.writeable:
        return t
    if not t.flags.c_contiguous:
        if not warn:
            return np.ascontiguousarray(t)  # only read: a copy serves
        raise ValueError(f"{what}: the NumPy array is read-only and not contiguous; pass a copy (arr.copy())")
    if warn and not _WARNED_READ_ONLY:
        _WARNED_READ_ONLY = True
        warnings.warn(f"{what}: writing into a read-only NumPy array (Ray passes arrays in arguments read-only, "
                      "backed by its object store), as Ray's gloo backend does; pass a copy to avoid it",
                      UserWarning, stacklevel=4)
    if t.nbytes == 0:
        return np.empty_like(t)
    raw = (ctypes.c_char * t.nbytes).from_address(t.ctypes.data)
    return np.frombuffer(raw, dtype=t.dtype).reshape(t.shape)


def _check(t, what: str) -> None:
    if isinstance(t, np.ndarray):
        return
    torch = _torch()
    if torch is not None and isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            raise ValueError(f"{what}: collcomm's Ray backend takes CPU tensors; this one is on {t.device}")
        return
    raise CollectiveError(f"{what}: expected a NumPy array or a CPU torch tensor, got {type(t).__name__}")


def _torch():
    from collcomm.runtime.buffers import loaded_torch

    return loaded_torch()


def _shape(t) -> tuple:
    return tuple(t.shape)


def _empty_like(x, n: int):
    if isinstance(x, np.ndarray):
        return np.empty((n,) + x.shape, dtype=x.dtype)
    return _torch().empty((n,) + tuple(x.shape), dtype=x.dtype)


def _stack(items):
    if all(isinstance(t, np.ndarray) for t in items):
        return np.stack(items)
    torch = _torch()
    return torch.stack([torch.as_tensor(t) for t in items])


def _copy_into(dst, src) -> None:
    if isinstance(dst, np.ndarray):
        np.copyto(dst, np.asarray(src))
    else:
        dst.copy_(_torch().as_tensor(src))


def register() -> bool:
    """Register the backend with ``ray.util.collective`` in this process (idempotent); False when
    the installed Ray has no backend registry (before 2.5x)."""
    try:
        from ray.util.collective.backend_registry import _global_registry, register_collective_backend
    except ImportError:
        return False
    if not _global_registry.is_registered(BACKEND):
        try:
            register_collective_backend(BACKEND, CollcommGroup)
        except ValueError:  # registered by another thread in between
            pass
    return True
