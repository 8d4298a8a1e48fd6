"""This process's copies of objects: a bounded store of buffers that fill while they are read.

A :class:`Copy` is one buffer and how much of it is there (``progress``: the first ``progress``
bytes are final). Whoever fills it (a put copying the caller's array, a pull from another
process, a reduce stage adding partial sums) calls :meth:`Copy.advance`; whoever reads it (the
object server streaming it on, a stage, ``get``) waits on :meth:`Copy.wait_beyond`. A copy can
*restart* (a reduction that lost an input recomputes it: readers start again from byte 0, told
by the generation number) or *fail* (readers get the error).

The :class:`ObjectStore` holds this process's copies under names (object keys, and the outputs
of reduce stages), bounded by ``COLLCOMM_OBJECT_STORE_BYTES`` (default: half of the machine's
memory). When a new copy does not fit, idle replicas (copies a get pulled, complete, that no
one is streaming) are dropped, oldest first, and the directory is told; copies that were put
here, reduce results and anything being read are never evicted: past them the store refuses
the new copy (:class:`~collcomm.errors.ObjectStoreFull`). A NumPy view that ``get`` handed out
keeps its buffer alive on its own (the store only stops counting it).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Callable

import numpy as np

from collcomm.coordinator.objects import Meta
from collcomm.errors import CollectiveTimeout, ObjectExists, ObjectStoreFull

PRIMARY = "primary"   # put here (or a reduce result): never evicted
REPLICA = "replica"   # pulled by a get: evicted when idle and room is needed
STAGE = "stage"       # a reduce stage's partial sums: dropped when the reduction ends


def default_limit() -> int:
    raw = os.environ.get("COLLCOMM_OBJECT_STORE_BYTES", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) <= 0:
            raise ValueError(f"COLLCOMM_OBJECT_STORE_BYTES={raw!r} is not a positive number of bytes")
        return int(raw)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):  # pragma: no cover - not Linux
        return 8 << 30


class Copy:
    """One buffer that fills from the front; see the module."""

    def __init__(self, name: str, meta: Meta, array: np.ndarray, kind: str,
                 cond: threading.Condition | None = None):
        self.name, self.meta, self.kind = name, meta, kind
        self.array = array                       # flat uint8 view of the bytes
        self.view = memoryview(array)            # (zero copy for sockets)
        self.size = meta.size
        self.progress = 0
        self.generation = 0
        self.error: BaseException | None = None
        self.streams = 0                         # readers being served from it now
        self.received = 0                        # payload bytes pulled into it (resent ones too)
        self.cond = cond if cond is not None else threading.Condition()  # (shared by a stage's inputs)
        self.created = time.monotonic()

    @property
    def complete(self) -> bool:
        return self.progress >= self.size and self.error is None

    def advance(self, upto: int, generation: int | None = None) -> None:
        """The first ``upto`` bytes are final (of ``generation``: stale advances are ignored)."""
        with self.cond:
            if generation is not None and generation != self.generation:
                return
            if upto > self.progress:
                self.progress = min(upto, self.size)
                self.cond.notify_all()

    def restart(self) -> int:
        """Start again from byte 0 (readers are told by the new generation); returns it."""
        with self.cond:
            self.generation += 1
            self.progress = 0
            self.cond.notify_all()
            return self.generation

    def fail(self, error: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def wait_beyond(self, offset: int, generation: int, deadline: float,
                    give_up: Callable[[], bool] | None = None, poll: float = 1.0) -> int:
        """Wait until more than ``offset`` bytes are there (or all are); return ``progress``.
        Raises the copy's error, :class:`Restarted` when its generation moved on, or
        CollectiveTimeout at ``deadline``; ``give_up()`` (looked at every ``poll`` s) ends the
        wait with CollectiveTimeout too (a reader that went away)."""
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self.generation != generation:
                    raise Restarted(self.generation)
                if self.progress > offset or self.progress >= self.size:
                    return self.progress
                left = deadline - time.monotonic()
                if left <= 0 or (give_up is not None and give_up()):
                    raise CollectiveTimeout(f"object '{self.name}': no bytes beyond {offset} of {self.size} "
                                            f"arrived in time")
                self.cond.wait(min(left, poll))

    def wait_complete(self, deadline: float) -> None:
        """Wait until every byte is there (through restarts); raise the copy's error or a timeout."""
        with self.cond:
            while self.progress < self.size or self.error is not None:
                if self.error is not None:
                    raise self.error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CollectiveTimeout(f"object '{self.name}': {self.progress} of {self.size} bytes "
                                            f"arrived in time")
                self.cond.wait(min(left, 1.0))


class Restarted(Exception):
    """The copy being read restarted from byte 0 (generation ``generation``)."""

    def __init__(self, generation: int):
        super().__init__(f"restarted (generation {generation})")
        self.generation = generation


class ObjectStore:
    """Named copies, bounded (see the module)."""

    def __init__(self, limit: int | None = None, on_evict: Callable[[str], None] | None = None):
        self.limit = default_limit() if limit is None else int(limit)
        self.on_evict = on_evict                  # tells the directory a replica is gone
        self._copies: OrderedDict[str, Copy] = OrderedDict()
        self._pending: set[str] = set()           # names announced, whose copy is being made
        self._cond = threading.Condition()
        self.used = 0

    def __contains__(self, name: str) -> bool:
        return name in self._copies

    def get(self, name: str) -> Copy | None:
        return self._copies.get(name)

    def expect(self, name: str) -> None:
        """``name`` is about to be created here (a reader registered before its copy exists)."""
        with self._cond:
            self._pending.add(name)

    def unexpect(self, name: str) -> None:
        with self._cond:
            self._pending.discard(name)
            self._cond.notify_all()

    def lookup(self, name: str, wait_s: float) -> Copy | None:
        """The copy ``name``, waiting up to ``wait_s`` while it is announced but not made yet."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                c = self._copies.get(name)
                if c is not None or name not in self._pending:
                    return c
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def create(self, name: str, meta: Meta, kind: str, share: np.ndarray | None = None) -> Copy:
        """A new, empty copy (or one over ``share``, the caller's own bytes: nothing allocated)."""
        with self._cond:
            if name in self._copies:
                raise ObjectExists(f"object '{name}' is already in this process's store", name)
            need = 0 if share is not None else meta.size
            evicted = self._make_room(need, name)
            array = share if share is not None else np.empty(meta.size, dtype=np.uint8)
            copy = Copy(name, meta, array, kind)
            self._copies[name] = copy
            self.used += meta.size
            self._pending.discard(name)
            self._cond.notify_all()
        for gone in evicted:
            if self.on_evict is not None:
                self.on_evict(gone)
        return copy

    def _make_room(self, need: int, name: str) -> list[str]:
        if self.used + need <= self.limit:
            return []
        idle = [c for c in self._copies.values() if c.kind == REPLICA and c.complete and c.streams == 0]
        freed, evicted = 0, []
        for c in idle:
            if self.used - freed + need <= self.limit:
                break
            freed += c.size
            evicted.append(c.name)
        if self.used - freed + need > self.limit:
            raise ObjectStoreFull(f"object '{name}' ({need} bytes) does not fit in this process's object store: "
                                  f"{self.used} of {self.limit} bytes hold objects that are put here or being "
                                  f"read (COLLCOMM_OBJECT_STORE_BYTES raises the bound; delete objects to free it)",
                                  name)
        for n in evicted:
            self._remove(n)
        return evicted

    def _remove(self, name: str) -> Copy | None:
        c = self._copies.pop(name, None)
        if c is not None:
            self.used -= c.size
        return c

    def drop(self, name: str) -> bool:
        """Forget the copy ``name`` (readers streaming it keep their reference to the end)."""
        with self._cond:
            c = self._remove(name)
            self._pending.discard(name)
            self._cond.notify_all()
        return c is not None

    def names(self) -> list[str]:
        with self._cond:
            return list(self._copies)
