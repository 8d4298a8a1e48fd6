"""Ray objects moved through collcomm's object layer: small handles in Ray's calls, bytes on trees.

``put(array)`` publishes the array in this process's collcomm store and returns a
:class:`Handle`: a key (and a tiny Ray object, below) that pickles to a few hundred bytes and
travels through ordinary Ray task and actor calls. ``handle.get()`` in any task or actor of the
job fetches it through the object layer: readers that ask at about the same time are chained
(each streams on what it has received while it is still arriving) in the order they arrive,
one crossing per node. ``reduce(handles, num_required=k)`` sums (or min/max/prod) the first k
objects to be put and returns a handle to the result, which readers can get while it is being
reduced. Ray keeps scheduling, retries and restarts; collcomm moves the bytes.

Lifetime: a collcomm object lives in the process that put it (and in every complete copy a
reader made) until ``handle.delete()``. The putting process makes a one-byte Ray object of its
own and holds it until the object is deleted there (the handle carries it too): Ray does not
retire a worker that owns live objects, so a task's output outlives the task even when nobody
holds its handle yet (a ``reduce`` waiting for it). A process that dies takes its copies with it:
``get`` then resumes from another copy or raises :class:`~collcomm.errors.ObjectLost`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import ray

import collcomm.api as api
from collcomm.errors import CollectiveTimeout
from collcomm.integrations.ray import job


@dataclass(frozen=True)
class Handle:
    """A collcomm object of the Ray job: ``get``, ``put`` (when made empty by :func:`handle`),
    ``delete``, ``info``. ``sources``: for a reduction's result, the keys it used."""

    key: str
    sources: tuple[str, ...] = ()
    keepalive: Any = field(default=None, compare=False, repr=False)  # an ObjectRef owned by the putter

    def put(self, obj, *, copy: bool = True, timeout: float | None = None) -> "Handle":
        """Publish ``obj`` (NumPy array or CPU torch tensor) under this handle's key; returns the
        handle to pass on (it keeps the putting process alive while referenced)."""
        job.init()
        api.put(self.key, obj, copy=copy, timeout=timeout)
        return Handle(self.key, self.sources, _keepalive(self.key))

    def get(self, out=None, *, timeout: float | None = None):
        """The array (read-only, zero copy), or copied into ``out``; waits up to ``timeout`` for
        the object to be put."""
        job.init()
        return api.get(self.key, out, timeout=timeout)

    def delete(self, *, timeout: float | None = None) -> bool:
        """Free every copy of the object; False if there was none."""
        job.init()
        _KEEP.pop(self.key, None)
        return api.delete(self.key, timeout=timeout)

    def info(self, *, timeout: float | None = None) -> dict:
        job.init()
        return api.object_info(self.key, timeout=timeout)


def handle(name: str | None = None) -> Handle:
    """An empty handle (a fresh key): hand it to the task that will ``put`` into it, and to the
    readers or the :func:`reduce` that wait for it."""
    return Handle(f"ray/{name}" if name else f"ray/obj/{uuid.uuid4().hex}")


def put(obj, *, name: str | None = None, copy: bool = True, timeout: float | None = None) -> Handle:
    """Publish ``obj`` and return its handle (see the module's notes on lifetime)."""
    return handle(name).put(obj, copy=copy, timeout=timeout)


def get(h: Handle, out=None, *, timeout: float | None = None):
    return h.get(out, timeout=timeout)


def reduce(handles: Sequence[Handle], *, op: str = "sum", num_required: int | None = None,
           name: str | None = None, timeout: float | None = None) -> Handle:
    """Reduce the objects of ``handles`` (put already or later) using the first ``num_required``
    to be put (all when None); returns the result's handle, whose ``sources`` are the keys used.
    Items may also be Ray ObjectRefs of tasks that return handles (their results are awaited)."""
    job.init()
    handles = list(handles)
    refs = [h for h in handles if isinstance(h, ray.ObjectRef)]
    if refs and num_required is not None and len(refs) == len(handles):
        # Tasks' results: the first num_required tasks to finish (their objects are put by then).
        handles, _ = ray.wait(refs, num_returns=num_required, timeout=timeout)
        if len(handles) < num_required:
            raise CollectiveTimeout(f"reduce: only {len(handles)} of the {num_required} tasks needed "
                                        f"finished within {timeout:g} s")
        num_required = None
    keys = [_key(h, timeout) for h in handles]
    out = handle(name)
    used = api.reduce_objects(keys, out.key, op, num_required, timeout=timeout)
    return Handle(out.key, tuple(used), _keepalive(out.key))


def _key(h, timeout: float | None) -> str:
    if isinstance(h, ray.ObjectRef):
        h = ray.get(h, timeout=timeout)
    if not isinstance(h, Handle):
        raise TypeError(f"reduce takes collcomm handles (or ObjectRefs of them), got {type(h).__name__}")
    return h.key


_KEEP: dict = {}  # key -> the Ray object that keeps this process from being retired while it holds the key


def _keepalive(key: str):
    ref = _KEEP[key] = ray.put(b"\0")
    return ref
