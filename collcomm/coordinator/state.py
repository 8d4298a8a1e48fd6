"""The coordinator's decisions, as plain data and functions: no gRPC, no threads, no clock.

:class:`CoordinatorState` holds the registration table, the groups and their epochs, the ranks
reported dead, the formations in progress and the key-value store. Each transition is one method
that returns its result, a :class:`Refusal` (a kind and a one-line reason), or :class:`Waiting`
(the call may succeed later; ``reason`` names what is still missing). The server calls these
methods under one lock and turns ``Waiting`` into a wait on a condition variable; the tests call
them directly.

Rules, in brief:

- Registration: the first rank fixes the world size; others that disagree are refused (mismatch).
  World size 0 makes the job *open* (processes that join whenever they start, Ray's actors and
  tasks): ranks are any numbers below MAX_WORLD_SIZE (the joiners draw them from a counter), the
  peer table is whoever has registered so far and no world group forms; groups of registered
  ranks form as in a fixed job. An open job refuses a fixed registration and vice versa.
  A rank registers once per process, identified by (hostname, pid): the same registration again is
  a no-op; another process may take the rank only after the old one was reported dead. The world
  (group id 0) is formed when all ranks have registered; while a rank that has not registered
  stands reported dead, those waiting for the world are refused at once instead of timing out.
- Groups: only the members call, each with the same name and the same member list (the order is
  the group-rank order). The formation completes when every member has a call waiting; a member
  list that differs from the one pending under that name fails every caller of that round with a
  mismatch (a rank that calls again starts a new round). A caller that gives up leaves the round.
  A member that is reported dead fails the round. The same name may be formed again later and
  gets a new group id.
- Failures: reporting a rank marks it dead once (the first reason is kept) and bumps the epoch of
  every group it is in. Epochs come from one counter, so they never repeat.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

WORLD_GROUP_ID = 0
WORLD_GROUP_NAME = "world"
EXTERNAL_REPORTER = -1  # a failure reported by the launcher or a monitor, not by a rank

MAX_WORLD_SIZE = 1 << 20
MAX_NAME_LENGTH = 256
MAX_KEY_LENGTH = 1024
MAX_REASON_LENGTH = 500
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

# Kinds of refusal; the server maps each to a gRPC status code, the client to an error type.
INVALID = "invalid"            # malformed request
MISMATCH = "mismatch"          # ranks disagree (world size, member list)
EXISTS = "exists"              # a live rank registered again by another process
NOT_FOUND = "not_found"        # unknown group
PEER_FAILURE = "peer_failure"  # a rank the call needs was reported dead


# ------------------------------------------------------------------------------------ values
@dataclass(frozen=True)
class Refusal:
    """The request cannot succeed: ``kind`` is one of the kinds above, ``message`` one line."""

    kind: str
    message: str
    rank: int | None = None  # the rank concerned, for PEER_FAILURE


@dataclass(frozen=True)
class Waiting:
    """Not yet: ``reason`` names what is still missing (it becomes the timeout message)."""

    reason: str


@dataclass(frozen=True)
class Peer:
    rank: int
    address: str  # "host:port" of the rank's data listener
    hostname: str
    pid: int


@dataclass(frozen=True)
class PeerTable:
    """The registered world: one peer per rank, ordered by rank, and the world's epoch."""

    peers: tuple[Peer, ...]
    epoch: int

    def __len__(self) -> int:
        return len(self.peers)

    def __getitem__(self, rank: int) -> Peer:
        return self.peers[rank]


@dataclass(frozen=True)
class DeadRank:
    rank: int
    reason: str
    reporter: int  # the reporting rank, or EXTERNAL_REPORTER


@dataclass(frozen=True)
class GroupInfo:
    """A formed group: ``members`` are world ranks in group-rank order; ``dead`` by rank."""

    group_id: int
    name: str
    epoch: int
    members: tuple[int, ...]
    dead: tuple[DeadRank, ...] = ()

    @property
    def dead_ranks(self) -> tuple[int, ...]:
        return tuple(d.rank for d in self.dead)


@dataclass(frozen=True)
class FailureOutcome:
    newly_dead: bool                 # False when the rank was already marked dead
    bumped: tuple[tuple[int, int], ...]  # (group id, new epoch) of every group this report bumped


@dataclass(frozen=True)
class Summary:
    world_size: int  # 0 until the first registration
    registered: int


# ------------------------------------------------------------------------------- formatting
def name_ranks(ranks: Iterable[int]) -> str:
    """``rank 2`` or ``ranks 0-3, 7`` (consecutive runs collapsed)."""
    ordered = sorted(set(ranks))
    runs: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ("rank " if len(ordered) == 1 else "ranks ") + ", ".join(runs)


def one_line(text: str, limit: int = MAX_REASON_LENGTH) -> str:
    """Collapse whitespace (newlines included) and cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def seconds(value: float) -> str:
    """``0.5s``, ``12s``, ``300s``: a duration for a message."""
    return f"{value:.0f}s" if value >= 100 else f"{value:.3g}s"


def _members_text(members: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, members)) + "]"


def parse_address(address: str) -> tuple[str, int] | None:
    """``("host", port)`` from ``host:port`` or ``[v6]:port``, optionally followed by ``#extra``
    (transport hints such as a local socket name); None when malformed."""
    tcp, _, extra = str(address).partition("#")
    if any(c.isspace() for c in extra):
        return None
    host, sep, port = tcp.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") != host.endswith("]") or any(c.isspace() for c in host):
        return None
    return host, int(port)


# ----------------------------------------------------------------------- group formations
@dataclass(eq=False)
class Formation:
    """One round of forming the group ``name``: who is waiting, and how the round ended."""

    name: str
    members: tuple[int, ...]
    waiting: Counter = field(default_factory=Counter)  # rank -> calls of that rank waiting
    result: GroupInfo | None = None
    failure: Refusal | None = None

    def missing(self) -> list[int]:
        return [m for m in self.members if not self.waiting[m]]


@dataclass(frozen=True, eq=False)
class FormationTicket:
    """A caller's place in a formation; pass it to ``formation_outcome`` / ``leave_group``."""

    formation: Formation
    rank: int


@dataclass
class _MismatchedRound:
    """A name whose last round failed on a member-list mismatch; late callers of that round are
    told too, until each of them has been told once."""

    lists: list[tuple[tuple[int, ...], int]]  # (member list, first rank that proposed it)
    told: set[int]

    def message(self, name: str) -> str:
        proposals = "; ".join(f"{_members_text(m)} from rank {r}" for m, r in self.lists)
        return f"ranks disagree on the members of group '{name}': {proposals}"

    def everyone_told(self) -> bool:
        return all(set(m) <= self.told for m, _ in self.lists)


@dataclass
class _Group:
    group_id: int
    name: str
    members: tuple[int, ...]
    epoch: int
    dead: dict[int, DeadRank] = field(default_factory=dict)

    def info(self) -> GroupInfo:
        dead = tuple(self.dead[r] for r in sorted(self.dead))
        return GroupInfo(self.group_id, self.name, self.epoch, self.members, dead)


# ------------------------------------------------------------------------------ the state
class CoordinatorState:
    """Everything the coordinator knows. Not thread-safe: the caller serialises access."""

    def __init__(self) -> None:
        self.world_size: int | None = None
        self.open = False  # world size 0: ranks join whenever they start (see the module's rules)
        self._world_size_from: int | None = None  # the rank whose registration fixed it
        self.peers: dict[int, Peer] = {}
        self.dead: dict[int, DeadRank] = {}       # current processes reported dead, by rank
        self.groups: dict[int, _Group] = {}       # formed groups, the world included
        self.forming: dict[str, Formation] = {}   # rounds in progress, by name
        self._mismatched: dict[str, _MismatchedRound] = {}
        self.kv: dict[str, bytes] = {}
        self._epoch = 0
        self._next_group_id = WORLD_GROUP_ID + 1

    def _new_epoch(self) -> int:
        self._epoch += 1
        return self._epoch

    # ---------------------------------------------------------------------- registration
    def register(self, rank: int, world_size: int, address: str, hostname: str,
                 pid: int) -> Refusal | None:
        """Record ``rank``'s process; None when accepted (or already recorded as such)."""
        if world_size == 0:
            refusal = self._open_registration(rank)
            if refusal is not None:
                return refusal
        elif not 0 < world_size <= MAX_WORLD_SIZE:
            return Refusal(INVALID, f"rank {rank} registered with world size {world_size}; "
                                    f"it must be between 1 and {MAX_WORLD_SIZE} (0: an open job)")
        elif not 0 <= rank < world_size:
            return Refusal(INVALID, f"rank {rank} is out of range for world size {world_size}")
        if parse_address(address) is None:
            return Refusal(INVALID, f"rank {rank} registered address {address!r}; "
                                    "expected host:port with a port in 1-65535")
        if len(hostname) > MAX_NAME_LENGTH:
            return Refusal(INVALID, f"rank {rank} registered a hostname longer than {MAX_NAME_LENGTH}")
        if world_size == 0:
            pass
        elif self.open:
            return Refusal(MISMATCH, f"rank {rank} registered with world size {world_size}, but this job "
                                     "is open (its processes join with world size 0)")
        elif self.world_size is None:
            self.world_size, self._world_size_from = world_size, rank
        elif world_size != self.world_size:
            return Refusal(MISMATCH, f"world size mismatch: rank {rank} registered with world size "
                                     f"{world_size}, but the job's world size is {self.world_size} "
                                     f"(from rank {self._world_size_from})")
        peer = Peer(rank, address, hostname, pid)
        old = self.peers.get(rank)
        if old is None and rank in self.dead:  # reported dead before it registered: a new process
            self._revive(rank)
        elif old is not None:
            same_process = (old.hostname, old.pid) == (hostname, pid)
            if same_process and rank in self.dead:
                return Refusal(PEER_FAILURE, f"rank {rank} (pid {pid} on {hostname}) was reported "
                                             f"dead ({self.dead[rank].reason}); restart it to rejoin",
                               rank=rank)
            if same_process and old == peer:
                return None
            if rank not in self.dead:
                return Refusal(EXISTS, f"rank {rank} is already registered by pid {old.pid} on "
                                       f"{old.hostname} at {old.address}; another process may take "
                                       "it only after that one is reported dead")
            self._revive(rank)
        self.peers[rank] = peer
        if self.open:
            return None
        if len(self.peers) == self.world_size and WORLD_GROUP_ID not in self.groups:
            dead = {r: d for r, d in self.dead.items() if r < self.world_size}
            self.groups[WORLD_GROUP_ID] = _Group(WORLD_GROUP_ID, WORLD_GROUP_NAME,
                                                 tuple(range(self.world_size)), self._new_epoch(), dead)
        return None

    def _open_registration(self, rank: int) -> Refusal | None:
        """A registration with world size 0: the job is (or becomes) open."""
        if not 0 <= rank < MAX_WORLD_SIZE:
            return Refusal(INVALID, f"rank {rank} is out of range for an open job (0 to {MAX_WORLD_SIZE - 1})")
        if self.world_size is not None:
            return Refusal(MISMATCH, f"rank {rank} asked to join an open job, but this job's world size is "
                                     f"{self.world_size} (from rank {self._world_size_from})")
        self.open = True
        return None

    def _revive(self, rank: int) -> None:
        """A new process takes over a dead rank: the world (if formed) moves to a new epoch."""
        del self.dead[rank]
        world = self.groups.get(WORLD_GROUP_ID)
        if world is not None:
            world.dead.pop(rank, None)
            world.epoch = self._new_epoch()

    def peer_table(self) -> PeerTable | Refusal | Waiting:
        """The whole world once every rank has registered; a refusal when a rank that has not
        registered was reported dead (a new process may still take its place)."""
        if self.open:  # whoever has joined so far; an open job has no world group
            return PeerTable(tuple(self.peers[r] for r in sorted(self.peers)), 0)
        world = self.groups.get(WORLD_GROUP_ID)
        if world is not None:
            return PeerTable(tuple(self.peers[r] for r in range(len(self.peers))), world.epoch)
        if self.world_size is None:
            return Waiting("no rank has registered")
        missing = [r for r in range(self.world_size) if r not in self.peers]
        dead = [r for r in missing if r in self.dead]
        if dead:
            verb = "was" if len(dead) == 1 else "were"
            return Refusal(PEER_FAILURE, f"{name_ranks(dead)} {verb} reported dead before registering "
                                         f"({self.dead[dead[0]].reason}); the world of size "
                                         f"{self.world_size} cannot form", rank=dead[0])
        return Waiting(f"still missing {name_ranks(missing)} of world size {self.world_size} "
                       f"({len(self.peers)} registered)")

    # --------------------------------------------------------------------------- groups
    def join_group(self, name: str, members: Sequence[int], rank: int) -> Refusal | FormationTicket:
        """Add ``rank``'s call to the round forming ``name``; completes it when all are in."""
        members = tuple(members)
        label = f"group '{name}' {_members_text(members)}"
        if not name or len(name) > MAX_NAME_LENGTH:
            return Refusal(INVALID, f"rank {rank} gave a group name of length {len(name)}; "
                                    f"it must be 1 to {MAX_NAME_LENGTH} characters")
        if not members:
            return Refusal(INVALID, f"rank {rank} asked to form group '{name}' with no members")
        repeated = sorted({m for m in members if members.count(m) > 1})
        if repeated:
            return Refusal(INVALID, f"{label} lists {name_ranks(repeated)} more than once")
        if self.world_size is not None:
            outside = [m for m in members if not 0 <= m < self.world_size]
            if outside:
                return Refusal(INVALID, f"{label} names {name_ranks(outside)} outside world "
                                        f"size {self.world_size}")
        if rank not in members:
            return Refusal(INVALID, f"rank {rank} called form_group for {label} but is not "
                                    "in its member list")
        refusal = self._mismatch_told(name, members, rank)
        if refusal is not None:
            return refusal
        dead = [m for m in members if m in self.dead]
        if dead:
            verb = "was" if len(dead) == 1 else "were"
            return Refusal(PEER_FAILURE, f"cannot form {label}: {name_ranks(dead)} {verb} reported "
                                         f"dead ({self.dead[dead[0]].reason})", rank=dead[0])
        formation = self.forming.get(name)
        if formation is not None and formation.members != members:
            return self._fail_on_mismatch(formation, members, rank)
        if formation is None:
            formation = self.forming[name] = Formation(name, members)
        formation.waiting[rank] += 1
        if not formation.missing():
            group = _Group(self._next_group_id, name, members, self._new_epoch())
            self._next_group_id += 1
            self.groups[group.group_id] = group
            formation.result = group.info()
            del self.forming[name]
        return FormationTicket(formation, rank)

    def _mismatch_told(self, name: str, members: tuple[int, ...], rank: int) -> Refusal | None:
        """Tell a late caller of a round that failed on a mismatch; None when it starts anew."""
        record = self._mismatched.get(name)
        if record is None:
            return None
        if rank in record.told:  # this rank already heard: its new call is a new round
            del self._mismatched[name]
            return None
        record.told.add(rank)
        if all(members != m for m, _ in record.lists):
            record.lists.append((members, rank))
        message = record.message(name)
        if record.everyone_told():
            del self._mismatched[name]
        return Refusal(MISMATCH, message)

    def _fail_on_mismatch(self, formation: Formation, members: tuple[int, ...],
                          rank: int) -> Refusal:
        first = min(formation.waiting)  # any waiting rank proposed the pending list
        record = _MismatchedRound([(formation.members, first), (members, rank)],
                                  set(formation.waiting) | {rank})
        formation.failure = Refusal(MISMATCH, record.message(formation.name))
        del self.forming[formation.name]
        if not record.everyone_told():
            self._mismatched[formation.name] = record
        return formation.failure

    def formation_outcome(self, ticket: FormationTicket) -> GroupInfo | Refusal | Waiting:
        formation = ticket.formation
        if formation.result is not None:
            return formation.result
        if formation.failure is not None:
            return formation.failure
        return Waiting(f"group '{formation.name}' {_members_text(formation.members)} is still "
                       f"missing {name_ranks(formation.missing())}")

    def leave_group(self, ticket: FormationTicket) -> None:
        """The caller gave up (timeout, cancelled): the round waits for it to call again."""
        formation = ticket.formation
        if formation.result is not None or formation.failure is not None:
            return
        formation.waiting[ticket.rank] -= 1
        if formation.waiting[ticket.rank] <= 0:
            del formation.waiting[ticket.rank]
        if not formation.waiting and self.forming.get(formation.name) is formation:
            del self.forming[formation.name]

    def group_status(self, group_id: int) -> GroupInfo | Refusal:
        group = self.groups.get(group_id)
        if group is not None:
            return group.info()
        if group_id == WORLD_GROUP_ID:
            return Refusal(NOT_FOUND, "the world (group 0) is not formed: "
                                      + self._world_progress())
        return Refusal(NOT_FOUND, f"no group has id {group_id}")

    def _world_progress(self) -> str:
        if self.open:
            return (f"this job is open ({len(self.peers)} process(es) joined); its groups are formed "
                    "by their members")
        progress = self.peer_table()
        return progress.reason if isinstance(progress, Waiting) else progress.message

    # ------------------------------------------------------------------------- failures
    def report_failure(self, group_id: int, rank: int, reporter: int,
                       reason: str) -> Refusal | FailureOutcome:
        """Mark ``rank`` dead; bump every group it is in; fail the rounds waiting for it."""
        if group_id == WORLD_GROUP_ID:
            if self.world_size is not None and not 0 <= rank < self.world_size:
                return Refusal(INVALID, f"rank {rank} is out of range for world size {self.world_size}")
        else:
            group = self.groups.get(group_id)
            if group is None:
                return Refusal(NOT_FOUND, f"failure report for rank {rank}: no group has id {group_id}")
            if rank not in group.members:
                return Refusal(INVALID, f"rank {rank} is not a member of group {group_id} "
                                        f"'{group.name}' {_members_text(group.members)}")
        reason = one_line(reason)
        if not reason:
            reason = ("reported by the launcher" if reporter == EXTERNAL_REPORTER
                      else f"reported by rank {reporter}")
        newly_dead = rank not in self.dead
        if newly_dead:
            self.dead[rank] = DeadRank(rank, reason, reporter)
        entry = self.dead[rank]
        bumped = []
        for group in self.groups.values():
            if rank in group.members and rank not in group.dead:
                group.dead[rank] = entry
                group.epoch = self._new_epoch()
                bumped.append((group.group_id, group.epoch))
        for name, formation in list(self.forming.items()):
            if rank in formation.members:
                formation.failure = Refusal(
                    PEER_FAILURE, f"cannot form group '{name}' {_members_text(formation.members)}: "
                                  f"rank {rank} was reported dead ({entry.reason})", rank=rank)
                del self.forming[name]
        return FailureOutcome(newly_dead, tuple(sorted(bumped)))

    # ------------------------------------------------------------------------ key-value
    @staticmethod
    def _check_key(key: str) -> Refusal | None:
        if not key or len(key) > MAX_KEY_LENGTH:
            return Refusal(INVALID, f"key of length {len(key)}; it must be 1 to {MAX_KEY_LENGTH} characters")
        return None

    def kv_set(self, key: str, value: bytes) -> Refusal | None:
        refusal = self._check_key(key)
        if refusal is None:
            self.kv[key] = bytes(value)
        return refusal

    def kv_get(self, key: str) -> bytes | Refusal | Waiting:
        refusal = self._check_key(key)
        if refusal is not None:
            return refusal
        value = self.kv.get(key)
        return Waiting(f"key '{key}' is not set") if value is None else value

    def kv_delete(self, key: str) -> bool | Refusal:
        refusal = self._check_key(key)
        return refusal if refusal is not None else self.kv.pop(key, None) is not None

    def kv_add(self, key: str, delta: int) -> int | Refusal:
        """Add ``delta`` to the decimal integer stored at ``key`` (absent: 0); return the sum."""
        refusal = self._check_key(key)
        if refusal is not None:
            return refusal
        current = self.kv.get(key, b"0")
        try:
            value = int(current.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return Refusal(INVALID, f"key '{key}' holds {len(current)} bytes that are not a "
                                    "decimal integer; kv_add needs a counter")
        value += delta
        if not INT64_MIN <= value <= INT64_MAX:
            return Refusal(INVALID, f"kv_add on key '{key}' would overflow a 64-bit integer")
        self.kv[key] = str(value).encode("ascii")
        return value

    # ---------------------------------------------------------------------------- health
    def summary(self) -> Summary:
        return Summary(self.world_size or 0, len(self.peers))
