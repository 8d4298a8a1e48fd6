"""The object layer of one process: ``put``, ``get``, ``reduce_objects``, ``delete``, ``object_info``.

No group is needed: any process of the job can call these at any time. The directory lives in
the coordinator (:mod:`collcomm.coordinator.objects`); copies live in each process's bounded
store (:mod:`.store`) and move by pull between object servers (:mod:`.server`, :mod:`.pull`).

- ``put`` registers the copy with the directory first, then copies the caller's array into the
  store chunk by chunk, so readers start pulling while it is made (``copy=False``: the store
  shares the caller's array, which must not change until ``delete``). Objects of at most
  64 KiB (``COLLCOMM_OBJECT_INLINE_BYTES``) go into the directory itself.
- ``get`` waits in the directory until the object exists, registers this process as a copy (the
  new tail of a chain) and pulls from the source it is given; if that source dies it asks again
  (naming the lost one) and resumes at its byte offset. It returns a read-only zero-copy view of
  the store's copy (or fills ``out``).
- ``reduce_objects``: :mod:`.reduce`.
- ``delete`` removes the directory entry and frees every copy (each holder is told; a dead one
  has nothing to free).

Every call checks its arguments first (:func:`object_key`, :func:`reduce_arguments`): a bad key,
buffer, flag, reduction or count is a :class:`~collcomm.errors.UsageError` (a ValueError) or
:class:`~collcomm.errors.UsageTypeError` (also a TypeError) naming the argument, raised before
anything reaches the directory.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import socket
import threading
import time

import numpy as np

from collcomm.coordinator.objects import Holder, Info, Meta, inline_limit
from collcomm.coordinator.state import MAX_KEY_LENGTH
from collcomm.errors import CollectiveError, CollectiveTimeout, ObjectExists, ObjectLost, UsageError, UsageTypeError
from collcomm.inputs import shown
from collcomm.objects import wire
from collcomm.objects.pull import SourceLost, UpstreamFailed, pull
from collcomm.objects.reduce import Reduction
from collcomm.objects.server import ObjectServer
from collcomm.objects.stage import Stages
from collcomm.objects.store import PRIMARY, REPLICA, ObjectStore
from collcomm.runtime import arguments
from collcomm.runtime.buffers import REDUCTIONS, as_buffer, loaded_torch
from collcomm.runtime.group import Work

log = logging.getLogger("collcomm.objects")

COPY_CHUNK = 4 << 20  # put copies this much at a time, so readers can start on the first chunk
MAX_REPOINTS = 64     # a get gives up after losing this many sources
ASYNC_WORKERS = 16    # threads for async_op calls (they mostly wait)
MAX_REDUCE_KEYS = 1 << 16  # inputs of one reduce_objects (``keys`` may be an endless generator)
# C0 and C1 controls: a key is named in one-line messages and logs, and a newline would split them.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _netns() -> str:
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:  # pragma: no cover - not Linux
        return ""


class ObjectLayer:
    """Objects in flight for one runtime (created on the first object call)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.rank = runtime.rank
        self.client = runtime.client
        self.token = runtime.transport.token
        self.telemetry = runtime.transport.telemetry
        self.inline_limit = inline_limit()
        self.store = ObjectStore(on_evict=self._evicted)
        self.stages = Stages(self.store, self.token, self.rank, self.telemetry)
        self.server = ObjectServer(self.rank, self.token, self.store, host=runtime.listen_host,
                                   advertise_host=runtime.advertise_host, telemetry=self.telemetry,
                                   stages=self.stages, faults=runtime.transport.faults)
        self.holder = Holder(self.rank, self.server.address, f"{socket.gethostname()}/{_netns()}",
                             _box(runtime))
        self._lock = threading.Lock()
        self._active: dict[str, threading.Event] = {}  # gets of this process in progress, by key
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # runs async_op calls

    def submit(self, fn, what: str, async_op: bool):
        """Run ``fn`` now, or (``async_op``) in a worker thread, returning the collectives' Work."""
        if not async_op:
            return fn()
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(ASYNC_WORKERS, thread_name_prefix="collcomm-objects")
            return Work(self._pool.submit(fn), what)

    # ------------------------------------------------------------------ put
    def put(self, key: str, x, copy: bool = True, timeout: float | None = None) -> None:
        key = object_key(key, "put: key")
        array, meta = _as_array(x, key)
        copy = arguments.flag(copy, "copy")
        timeout = self._timeout(timeout)
        raw = array.reshape(-1).view(np.uint8) if array.size else np.empty(0, np.uint8)
        if meta.size <= self.inline_limit:
            self.publish_inline(key, meta, raw, timeout=timeout)
            return
        if key in self.store:
            raise ObjectExists(f"object '{key}' exists already (in this process's store); delete it before "
                               f"putting it again", key)
        shared = raw if not copy else None
        c = self.store.create(key, meta, PRIMARY, share=shared)
        try:
            self.client.object_put(key, meta, self.holder, complete=not copy, timeout=timeout)
        except BaseException:
            self.store.drop(key)
            raise
        if not copy:
            c.advance(c.size)
            return
        for start in range(0, meta.size, COPY_CHUNK):  # readers may pull the first chunks already
            end = min(start + COPY_CHUNK, meta.size)
            np.copyto(c.array[start:end], raw[start:end])
            c.advance(end)
        self.client.object_update(key, self.rank, "complete", timeout=timeout)

    def publish_inline(self, key: str, meta: Meta, raw: np.ndarray, timeout: float) -> None:
        self.client.object_put(key, meta, None, inline=raw.tobytes(), timeout=timeout)

    # ------------------------------------------------------------------ get
    def get(self, key: str, out=None, timeout: float | None = None):
        key = object_key(key, "get: key")
        timeout = self._timeout(timeout)
        deadline = time.monotonic() + timeout
        c = self._local(key, deadline)
        if c is None:
            found = self._fetch(key, deadline)
            if isinstance(found, tuple):  # a small object, from the directory
                meta, data = found
                return _deliver(np.frombuffer(data, np.uint8), meta, out, key)
            c = found
        return _deliver(c.array, c.meta, out, key, readonly=True)

    def _local(self, key: str, deadline: float):
        """This process's copy of ``key`` once whole (waiting for a get of it under way here)."""
        while True:
            with self._lock:
                busy = self._active.get(key)
                if busy is None:
                    c = self.store.get(key)
                    if c is None:
                        self._active[key] = threading.Event()  # this call fetches it
                        return None
                    break
            if not busy.wait(max(0.0, deadline - time.monotonic())):
                raise CollectiveTimeout(f"get of object '{key}' timed out waiting for this process's other get")
        c.wait_complete(deadline)
        return c

    def _fetch(self, key: str, deadline: float):
        """Pull ``key`` into this store (or read it from the directory); see the module."""
        try:
            self.store.expect(key)  # a reader behind us may ask before our copy exists
            src = self.client.object_locate(key, self.holder, timeout=self._left(deadline, key))
            if src.inline is not None:
                return src.meta, src.inline
            c = self.store.create(key, src.meta, REPLICA)
            try:
                self._pull_with_repoints(key, c, src, deadline)
            except BaseException as e:
                self.store.drop(key)
                c.fail(e)
                self._forget(key)
                raise
            self.client.object_update(key, self.rank, "complete", timeout=self._left(deadline, key))
            return c
        finally:
            self.store.unexpect(key)
            with self._lock:
                done = self._active.pop(key, None)
            if done is not None:
                done.set()

    def _pull_with_repoints(self, key: str, c, src, deadline: float) -> None:
        for _ in range(MAX_REPOINTS):
            s = src.source
            if s is None or s.holder.rank == self.rank:
                raise ObjectLost(f"object '{key}': the directory names no other copy", key)
            try:
                pull(c, s.holder.address, s.holder.rank, key, token=self.token, me=self.rank, deadline=deadline,
                     telemetry=self.telemetry)
                return
            except (SourceLost, UpstreamFailed) as e:
                lost = e.rank if isinstance(e, SourceLost) else s.holder.rank
                log.info("rank %d: lost rank %s as the source of object '%s' at byte %d; asking for another",
                         self.rank, lost, key, c.progress)
                if isinstance(e, UpstreamFailed):  # the source is alive; its copy failed: start over
                    c.restart()
                src = self.client.object_locate(key, self.holder, lost_source=lost if isinstance(e, SourceLost)
                                                else None, timeout=self._left(deadline, key))
        raise ObjectLost(f"object '{key}': lost {MAX_REPOINTS} sources in a row", key)

    def _forget(self, key: str) -> None:
        try:
            self.client.object_update(key, self.rank, "abandon", timeout=5.0)
        except CollectiveError:
            pass

    def _evicted(self, key: str) -> None:
        self._forget(key)  # the directory stops sending readers here (before the new copy is made)

    # ------------------------------------------------------------------ reduce, delete, info
    def reduce_objects(self, keys, out_key: str, op: str = "sum", num_required: int | None = None,
                       timeout: float | None = None) -> list[str]:
        keys, out_key, op, num_required = reduce_arguments(keys, out_key, op, num_required)
        return Reduction(self, keys, out_key, op, num_required, self._timeout(timeout)).run()

    def delete(self, key: str, timeout: float | None = None) -> bool:
        """Forget ``key`` and free every copy; False if there was no such object."""
        key = object_key(key, "delete: key")
        timeout = self._timeout(timeout)
        existed, holders = self.client.object_delete(key, timeout=timeout)
        self.store.drop(key)
        deadline = time.monotonic() + min(timeout, 10.0)
        threads = []
        for h in holders:
            if h.rank != self.rank:
                t = threading.Thread(target=self._drop_at, args=(h, key, deadline), daemon=True,
                                     name="collcomm-objects-delete")
                t.start()
                threads.append(t)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return existed

    def _drop_at(self, h: Holder, key: str, deadline: float) -> None:
        try:
            wire.call(h.address, self.token, self.rank, h.rank, {"op": "drop", "names": [key]}, deadline)
        except (OSError, CollectiveError):
            pass  # a dead holder has nothing left to free

    def info(self, key: str, timeout: float | None = None) -> dict:
        i: Info = self.client.object_info(object_key(key, "object_info: key"), timeout=self._timeout(timeout))
        return {"key": i.key, "size": i.meta.size, "dtype": i.meta.dtype, "shape": i.meta.shape,
                "complete": i.complete, "inline": i.inline is not None,
                "locations": [{"rank": l.holder.rank, "complete": l.complete, "source": l.parent}
                              for l in i.locations]}

    def stats(self) -> dict:
        """This process's store: bytes held, the limit, and bytes pulled per copy (for tests and tools)."""
        return {"used": self.store.used, "limit": self.store.limit,
                "copies": {n: {"size": c.size, "received": c.received, "kind": c.kind}
                           for n in self.store.names() if (c := self.store.get(n)) is not None}}

    # ------------------------------------------------------------------ plumbing
    def _timeout(self, timeout: float | None) -> float:
        return arguments.timeout(timeout, self.runtime.timeout)

    @staticmethod
    def _left(deadline: float, key: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CollectiveTimeout(f"get of object '{key}' timed out")
        return left

    def close(self) -> None:
        self.server.close()
        self.stages.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _box(runtime) -> str:
    """The fabric node this rank sits in: the topology's host of its node, else the node itself
    (an open job: the host it registered, e.g. its Ray node)."""
    if runtime.open:
        return f"host/{runtime.hostname}"
    try:
        topo = runtime.world_topology()
        nid = topo.compute[runtime.rank]
        return topo.host_of(nid) or f"{topo.name}/{nid}"
    except (CollectiveError, ValueError, IndexError, OSError):
        return ""


def object_key(key, what: str) -> str:
    """``key`` when it can name an object: a string of 1 to MAX_KEY_LENGTH characters (the
    directory's limit), UTF-8 (it travels in protobuf), without control characters. ``what``
    names the argument ("put: key", "reduce_objects: keys[3]")."""
    if not isinstance(key, str):
        raise UsageTypeError(f"{what} must be a string, got {type(key).__name__} {shown(key)}",
                             arguments.argument(what))
    if not 0 < len(key) <= MAX_KEY_LENGTH or _CONTROL.search(key):
        raise UsageError(f"{what} must be 1 to {MAX_KEY_LENGTH} characters without control characters, got "
                         f"{shown(key)}", arguments.argument(what))
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} cannot be encoded as UTF-8 (a lone surrogate), got {shown(key)}",
                         arguments.argument(what)) from None
    return key


def reduce_arguments(keys, out_key, op, num_required) -> tuple[list[str], str, str, int | None]:
    """reduce_objects' arguments checked: ``keys`` a non-empty sequence of distinct keys (at most
    MAX_REDUCE_KEYS), ``out_key`` a key not among them, ``op`` a reduction, ``num_required`` None
    or an integer in 1..len(keys)."""
    if isinstance(keys, (str, bytes, dict)) or not hasattr(keys, "__iter__"):
        raise UsageTypeError(f"reduce_objects: keys must be a sequence of object keys (a list, a tuple), got "
                             f"{type(keys).__name__} {shown(keys)}", "keys")
    checked: list[str] = []
    seen: set[str] = set()
    for i, key in enumerate(keys):  # stops early: ``keys`` may be endless
        if i >= MAX_REDUCE_KEYS:
            raise UsageError(f"reduce_objects: keys has more than {MAX_REDUCE_KEYS} entries", "keys")
        key = object_key(key, f"reduce_objects: keys[{i}]")
        if key in seen:
            raise UsageError(f"reduce_objects: keys[{i}] repeats {shown(key)}", "keys")
        seen.add(key)
        checked.append(key)
    if not checked:
        raise UsageError("reduce_objects: keys is empty; give at least one object key", "keys")
    out_key = object_key(out_key, "reduce_objects: out_key")
    if out_key in seen:
        raise UsageError(f"reduce_objects: out_key {shown(out_key)} is also one of the keys", "out_key")
    if not isinstance(op, str):
        raise UsageTypeError(f"reduce_objects: op must be one of {', '.join(REDUCTIONS)}, got "
                             f"{type(op).__name__} {shown(op)}", "op")
    if op not in REDUCTIONS:
        raise UsageError(f"reduce_objects: op {shown(op)} is not a reduction; choose one of {', '.join(REDUCTIONS)}",
                         "op")
    if num_required is not None:
        num_required = arguments.integer(num_required, "reduce_objects: num_required")
        if not 1 <= num_required <= len(checked):
            raise UsageError(f"reduce_objects: num_required={num_required} must be between 1 and {len(checked)} "
                             f"(the number of keys)", "num_required")
    return checked, out_key, op, num_required


def _check_buf(x, key: str):
    """put's ``buf`` checked without copying it: a NumPy array of a dtype that can travel, or a CPU
    torch tensor (UsageTypeError naming ``buf``); returns torch when it is a tensor, else None."""
    if isinstance(x, np.ndarray):
        if x.dtype.hasobject or x.dtype.fields is not None:
            raise UsageTypeError(f"put of object '{key}': buf has dtype {x.dtype}, which cannot travel (objects or "
                                 f"records)", "buf")
        return None
    torch = loaded_torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise UsageTypeError(f"put of object '{key}': buf is on {x.device}; put takes CPU tensors", "buf")
        return torch
    raise UsageTypeError(f"put of object '{key}': buf must be a NumPy array or a CPU torch tensor, got "
                         f"{type(x).__name__}", "buf")


def _as_array(x, key: str) -> tuple[np.ndarray, Meta]:
    """The bytes of ``x`` (put's ``buf``, checked by :func:`_check_buf`) and its meta."""
    torch = _check_buf(x, key)
    if torch is None:
        a = np.ascontiguousarray(x)
        return a, Meta(a.nbytes, a.dtype.str if a.dtype.byteorder == ">" else a.dtype.name, tuple(a.shape))
    t = x.detach().contiguous()
    if t.dtype == torch.bfloat16:
        a = t.view(torch.int16).numpy().view(np.uint16)
        return a, Meta(a.nbytes, "bfloat16", tuple(t.shape))
    a = t.numpy()
    return a, Meta(a.nbytes, a.dtype.name, tuple(a.shape))


def _numpy_type(dtype: str) -> np.dtype:
    return np.dtype("uint16") if dtype == "bfloat16" else np.dtype(dtype)


def put_arguments(key, buf, copy) -> str:
    """put's arguments checked (the key, what ``buf`` is, ``copy``), before anything is sent."""
    key = object_key(key, "put: key")
    _check_buf(buf, key)  # (not _as_array: that copies a non-contiguous buffer, and put does it again)
    arguments.flag(copy, "copy")
    return key


def get_arguments(key, out) -> str:
    """get's arguments checked (the key; ``out`` None, or a writable buffer), before it waits."""
    key = object_key(key, "get: key")
    if out is not None:
        _target(out, key)
    return key


def _target(out, key: str) -> np.ndarray:
    """``out`` of a get as a flat writable array (a tensor's memory, seen through NumPy)."""
    if isinstance(out, np.ndarray):  # any dtype: only the bytes must fit
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise UsageError(f"get of object '{key}': out must be a writable C-contiguous array", "out")
        return out.reshape(-1)
    return as_buffer(out, f"get of object '{key}': out").array


def _deliver(raw: np.ndarray, meta: Meta, out, key: str, readonly: bool = False):
    """The object as an array of its dtype and shape (a read-only view of ``raw``), or copied into ``out``."""
    typed = raw.view(_numpy_type(meta.dtype)).reshape(meta.shape)
    if out is None:
        if readonly or not typed.flags.writeable:
            typed = typed.view()
            typed.flags.writeable = False
        if meta.dtype == "bfloat16":
            torch = loaded_torch()
            if torch is not None:
                return torch.from_numpy(typed.copy()).view(torch.bfloat16)
        return typed
    target = _target(out, key)
    if target.nbytes != meta.size:
        raise UsageError(f"get of object '{key}': out holds {target.nbytes} bytes, the object {meta.size}", "out")
    np.copyto(target.view(np.uint8), raw)
    return out
