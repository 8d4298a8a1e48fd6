"""The object directory's decisions, as plain data and functions (no gRPC, no threads, no clock).

The directory maps an object key to its size, dtype and shape and to where copies of it are:
each *location* is a process (rank, data address, host, box) holding the object whole or in
part. A location is recorded before its copy is complete, so a reader can pull from a copy that
is itself still arriving (the Hoplite design, ``shared/notes/objects.md``). Small objects
(``inline``) live in the directory itself and are served from it.

How a reader is given a source (:meth:`ObjectDirectory.locate`): a location feeds one reader
at a time, so copies form *chains* (source -> r1 -> r2 ...); a new reader takes a free location
(one feeding nobody), on its own host if it can, at the shortest chain depth (a complete copy
has depth 0), and becomes the new tail itself. The box comes before all that
(:func:`_preference`): a reader takes a copy in its own box (a fabric node: a topology's host,
an emulated node), even a busy one, before any copy across the fabric, so the object crosses
the thin link into a box once, however readers of different boxes interleave.
Readers that arrive together thus form one pipelined chain, and later readers hang shorter
chains off copies that completed: a tree of chains built without a global schedule. Preferring
the reader's box and host is what Hoplite does not do: a copy already behind a thin link is
read from there, so the object crosses that link once.

Faults: a reader that lost its source (:meth:`ObjectDirectory.locate` with ``lost_source``)
drops that location and is re-pointed, never to a copy downstream of itself (which holds less
and would wait on it); the dead node's own source, which holds at least as much, is then free.
A rank reported dead (:meth:`ObjectDirectory.drop_rank`) loses every location. An object with
no location left is lost (refused, naming it).

Memory: inline bytes and per-entry bookkeeping are counted against ``max_bytes``; past it a put
is refused (kind ``full``), nothing already stored is touched.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

from collcomm.coordinator.state import INVALID, MAX_KEY_LENGTH, Refusal, Waiting

INLINE_LIMIT = 64 << 10              # objects up to this many bytes live in the directory
DEFAULT_MAX_BYTES = 1 << 30          # the directory's memory bound (COLLCOMM_DIRECTORY_BYTES)
ENTRY_OVERHEAD = 512                 # bytes counted per object and per location (bookkeeping)
TOMBSTONES = 65536                   # deleted keys remembered (a get of one fails at once)
MAX_DIMS = 32

EXISTS = "object_exists"        # a key put twice (protocol maps each kind to a status code)
NOT_FOUND = "object_not_found"
FULL = "full"          # the directory's memory bound
LOST = "lost"          # every copy of the object is gone
DELETED = "deleted"    # the key was deleted


@dataclass(frozen=True)
class Holder:
    """A process that holds (or is receiving) a copy: where its object server listens."""

    rank: int
    address: str
    host: str = ""
    box: str = ""


@dataclass(frozen=True)
class Meta:
    size: int          # bytes
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Location:
    holder: Holder
    complete: bool
    parent: int | None = None   # the rank it pulls from (None: the original, or it is complete)
    children: int = 0           # readers it feeds now
    depth: int = 0              # chain depth when it was placed (0: complete)


@dataclass(frozen=True)
class LocationView:
    """What callers see of a location."""

    holder: Holder
    complete: bool
    parent: int | None
    children: int


@dataclass(frozen=True)
class Info:
    key: str
    meta: Meta
    inline: bytes | None
    locations: tuple[LocationView, ...]

    @property
    def complete(self) -> bool:
        return self.inline is not None or any(l.complete for l in self.locations)


@dataclass(frozen=True)
class Source:
    """The answer to a read: the object's meta and either its bytes or whom to pull from."""

    meta: Meta
    inline: bytes | None = None
    source: LocationView | None = None


@dataclass
class _Entry:
    meta: Meta
    inline: bytes | None
    locations: dict[int, Location] = field(default_factory=dict)

    def cost(self) -> int:
        return ENTRY_OVERHEAD * (1 + len(self.locations)) + (len(self.inline) if self.inline else 0)


def inline_limit() -> int:
    """Objects up to this many bytes live in the directory (``COLLCOMM_OBJECT_INLINE_BYTES``,
    default 64 KiB; the coordinator and the ranks read the same variable)."""
    raw = os.environ.get("COLLCOMM_OBJECT_INLINE_BYTES", "").strip()
    if not raw:
        return INLINE_LIMIT
    if not raw.isdigit() or int(raw) > 1 << 20:
        raise ValueError(f"COLLCOMM_OBJECT_INLINE_BYTES={raw!r} is not a number of bytes up to 1 MiB")
    return int(raw)


def _view(loc: Location) -> LocationView:
    return LocationView(loc.holder, loc.complete, loc.parent, loc.children)


def _preference(loc: Location, reader: Holder) -> tuple:
    """Which copy a reader takes: one in its own box first (another box only when its own has
    none: a thin link is crossed once), then one feeding nobody (chains), then on its own host,
    then the shortest chain, complete before partial, lowest rank."""
    other_box = bool(loc.holder.box and reader.box and loc.holder.box != reader.box)
    other_host = not (loc.holder.host and loc.holder.host == reader.host)
    return (other_box, loc.children, other_host, loc.depth, not loc.complete, loc.holder.rank)


class ObjectDirectory:
    """Keys -> meta and locations; one instance per coordinator, used under its lock."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, inline_limit: int = INLINE_LIMIT):
        self.max_bytes = int(max_bytes)
        self.inline_limit = int(inline_limit)
        self._entries: dict[str, _Entry] = {}
        self._deleted: OrderedDict[str, None] = OrderedDict()
        self.used = 0

    # ------------------------------------------------------------------ checks
    @staticmethod
    def check_key(key: str) -> Refusal | None:
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            return Refusal(INVALID, f"object key must be a non-empty string of at most {MAX_KEY_LENGTH} "
                                    f"characters, got {str(key)[:40]!r}")
        return None

    def _missing(self, key: str) -> Refusal | Waiting:
        if key in self._deleted:
            return Refusal(DELETED, f"object '{key}' was deleted")
        return Waiting(f"no object '{key}' was put")

    # ------------------------------------------------------------------ put
    def put(self, key: str, meta: Meta, holder: Holder | None, *, complete: bool = False,
            inline: bytes | None = None) -> Refusal | None:
        """Publish ``key``: its bytes (``inline``, at most ``inline_limit``) or ``holder``'s copy,
        registered before it is complete unless ``complete``."""
        bad = self.check_key(key)
        if bad:
            return bad
        if key in self._entries:
            return Refusal(EXISTS, f"object '{key}' exists already; delete it before putting it again")
        if meta.size < 0 or len(meta.shape) > MAX_DIMS or any(d < 0 for d in meta.shape):
            return Refusal(INVALID, f"object '{key}': bad size {meta.size} or shape {meta.shape}")
        if inline is not None:
            if len(inline) != meta.size or meta.size > self.inline_limit:
                return Refusal(INVALID, f"object '{key}': {len(inline)} inline bytes for a size of {meta.size} "
                                        f"(inline limit {self.inline_limit})")
        elif holder is None:
            return Refusal(INVALID, f"object '{key}' has neither bytes nor a holder")
        entry = _Entry(meta, bytes(inline) if inline is not None else None)
        if holder is not None and inline is None:
            entry.locations[holder.rank] = Location(holder, complete)
        cost = entry.cost()
        if self.used + cost > self.max_bytes:
            return Refusal(FULL, f"the object directory is full ({self.used} of {self.max_bytes} bytes in use, "
                                 f"object '{key}' needs {cost}; COLLCOMM_DIRECTORY_BYTES raises the bound)")
        self._entries[key] = entry
        self._deleted.pop(key, None)
        self.used += cost
        return None

    # ------------------------------------------------------------------ read
    def locate(self, key: str, reader: Holder, *, register: bool = True,
               lost_source: int | None = None) -> Source | Refusal | Waiting:
        """Where ``reader`` pulls ``key`` from (see the module). With ``register`` the reader
        becomes a partial location (the new tail) at once; a reader that already is one is
        re-pointed (after ``lost_source`` failed it)."""
        bad = self.check_key(key)
        if bad:
            return bad
        entry = self._entries.get(key)
        if entry is None:
            return self._missing(key)
        if entry.inline is not None:
            return Source(entry.meta, inline=entry.inline)
        mine = entry.locations.get(reader.rank)
        if lost_source is not None and (mine is None or mine.parent == lost_source):
            # (a late report, from a reader already re-pointed, must not drop a live copy)
            self._drop_location(entry, lost_source)
        if mine is not None and mine.complete:
            return Source(entry.meta, source=_view(mine))
        if mine is not None and mine.parent is not None and register:  # it still has a source: let it go
            self._release(entry, mine)
        banned = self._downstream(entry, reader.rank) if mine is not None else set()
        candidates = [l for r, l in entry.locations.items() if r != reader.rank and r not in banned]
        if not candidates:
            return Refusal(LOST, f"object '{key}' is lost: no copy is left that holds more than rank "
                                 f"{reader.rank}'s")
        best = min(candidates, key=lambda l: _preference(l, reader))
        if register:
            if mine is None:
                grow = ENTRY_OVERHEAD
                if self.used + grow > self.max_bytes:
                    return Refusal(FULL, f"the object directory is full ({self.used} of {self.max_bytes} bytes)")
                self.used += grow
                mine = entry.locations[reader.rank] = Location(reader, False)
            mine.parent = best.holder.rank
            mine.depth = best.depth + 1
            best.children += 1
        return Source(entry.meta, source=_view(best))

    def _downstream(self, entry: _Entry, rank: int) -> set[int]:
        """Ranks that pull (directly or not) from ``rank``'s copy."""
        below: set[int] = set()
        frontier = [rank]
        while frontier:
            r = frontier.pop()
            for other, loc in entry.locations.items():
                if loc.parent == r and other not in below and other != rank:
                    below.add(other)
                    frontier.append(other)
        return below

    def _release(self, entry: _Entry, loc: Location) -> None:
        parent = entry.locations.get(loc.parent) if loc.parent is not None else None
        if parent is not None and parent.children > 0:
            parent.children -= 1
        loc.parent = None

    def _drop_location(self, entry: _Entry, rank: int) -> None:
        loc = entry.locations.pop(rank, None)
        if loc is None:
            return
        self.used -= ENTRY_OVERHEAD
        self._release(entry, loc)
        for other in entry.locations.values():  # its readers are orphans until they ask again
            if other.parent == rank:
                other.parent = None

    def complete(self, key: str, rank: int) -> Refusal | None:
        """``rank``'s copy is whole: it becomes a chain head, and its source is free again."""
        entry = self._entries.get(key)
        if entry is None:
            return self._gone(key)
        loc = entry.locations.get(rank)
        if loc is None:
            return Refusal(NOT_FOUND, f"rank {rank} holds no copy of object '{key}'")
        self._release(entry, loc)
        loc.complete, loc.depth = True, 0
        return None

    def abandon(self, key: str, rank: int) -> Refusal | None:
        """``rank`` gave up its copy (a read that failed or timed out)."""
        entry = self._entries.get(key)
        if entry is None:
            return self._gone(key)
        self._drop_location(entry, rank)
        return None

    def _gone(self, key: str) -> Refusal:
        if key in self._deleted:
            return Refusal(DELETED, f"object '{key}' was deleted")
        return Refusal(NOT_FOUND, f"no object '{key}'")

    def drop_rank(self, rank: int) -> None:
        """``rank`` died: every copy it held is gone."""
        for entry in self._entries.values():
            self._drop_location(entry, rank)

    # ------------------------------------------------------------------ info, delete, readiness
    def info(self, key: str) -> Info | Refusal:
        bad = self.check_key(key)
        if bad:
            return bad
        entry = self._entries.get(key)
        if entry is None:
            return self._gone(key)
        return Info(key, entry.meta, entry.inline,
                    tuple(_view(l) for _, l in sorted(entry.locations.items())))

    def delete(self, key: str) -> tuple[bool, tuple[Holder, ...]] | Refusal:
        """Forget ``key``; the holders whose copies must now be freed."""
        bad = self.check_key(key)
        if bad:
            return bad
        entry = self._entries.pop(key, None)
        if entry is None:
            return False, ()
        self.used -= entry.cost()
        self._deleted[key] = None
        while len(self._deleted) > TOMBSTONES:
            self._deleted.popitem(last=False)
        return True, tuple(l.holder for l in entry.locations.values())

    def ready(self, keys: Iterable[str], known: int = 0) -> list[Info] | Refusal | Waiting:
        """The objects among ``keys`` that exist, once more than ``known`` of them do (the
        inputs of a reduction, as they become ready); a deleted one is refused. Inline objects
        come without their bytes (``inline`` is empty)."""
        keys = list(keys)
        out = []
        for k in keys:
            bad = self.check_key(k)
            if bad:
                return bad
            if k in self._entries:
                info = self.info(k)
                if info.inline:  # the bytes are read with a locate (the answer stays small)
                    info = Info(info.key, info.meta, b"", info.locations)
                out.append(info)
            elif k in self._deleted:
                return Refusal(DELETED, f"object '{k}' was deleted")
        if len(out) > known or len(out) == len(keys):
            return out
        return Waiting(f"{len(keys) - len(out)} of the objects {_names(keys)} were not put")

    def __len__(self) -> int:
        return len(self._entries)


def _names(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:4])
    return shown + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
