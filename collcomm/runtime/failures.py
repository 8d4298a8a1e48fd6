"""How a failure seen by one member reaches every member of the group, with the same typed error.

While an operation waits it polls the coordinator every quarter second
(:func:`outside_failure`) for a dead member, an abort record of the same operation, or a member
waiting in a different operation of the same number, so a failure seen by one rank (a lost
connection, ranks that disagree) reaches every member within the poll period; otherwise it
raises CollectiveTimeout at its timeout. A member whose operation failed records why
(:func:`record_abort`; the first record is the cause, later ones its echoes) and sends abort
frames on its connections; a member that saw only the echo (a peer that left) raises the
recorded first cause instead (:func:`first_cause`), so every member names the same culprit.
"""

from __future__ import annotations

from collcomm.errors import CollectiveError, EvictedError, MismatchError, PeerFailure
from collcomm.transport.frames import abort_text, error_from_abort


def abort_key(group, seq: int) -> str:
    """The coordinator key of operation ``seq``'s abort record: "<reporter>#<abort text>"."""
    return f"abort/{group.id}/{group.epoch}/{seq}"


def recorded_abort(rt, group, seq: int) -> tuple[int, str] | None:
    """(reporter rank, abort text) of the record of why operation ``seq`` failed; None when no
    member recorded one (or it cannot be read)."""
    try:
        text = rt.client.kv_get(abort_key(group, seq), timeout=0.0)
    except CollectiveError:
        return None
    reporter, _, abort = text.decode(errors="replace").partition("#")
    try:
        return int(reporter), abort
    except ValueError:
        return None


def evicted_error(rank: int, group, reason: str) -> EvictedError:
    return EvictedError(f"rank {rank} was declared failed ({reason or 'reported dead'}) and {group.name!r} went on "
                        f"without it; its epoch {group.epoch} is stale", rank=rank, epoch=group.epoch)


def outside_failure(rt, group, seq: int, desc: int | None = None, describe: str = "",
                    watch: tuple = ()) -> BaseException | None:
    """What the coordinator knows that this waiting operation does not: a dead member, an
    abort recorded for it (or for the operations in ``watch``), or a member waiting in an
    operation of the same number that is not this one (ranks that disagree may exchange no
    frame at all, e.g. two ranks that each think they are the root of a reduce)."""
    try:
        status = rt.client.group_status(group.id, timeout=5.0)
    except CollectiveError:
        status = None
    if status is not None:
        me = [d for d in status.dead if d.rank == rt.rank]
        if me:
            return evicted_error(rt.rank, group, me[0].reason)
        dead = [d for d in status.dead if d.rank in group.members and d.rank != rt.rank]
        if dead:
            d = dead[0]
            return PeerFailure(f"rank {d.rank} failed: {d.reason or 'reported dead'}", rank=d.rank)
    for s_ in (seq,) + tuple(watch):
        record = recorded_abort(rt, group, s_)
        if record is not None:
            return error_from_abort(record[1], record[0])
    if desc is None:
        return None
    key = abort_key(group, seq) + "/desc/"
    try:
        rt.client.kv_set(key + str(rt.rank), f"{desc}|{describe}".encode(), timeout=5.0)
        for member in group.members:
            if member == rt.rank:
                continue
            try:
                theirs = rt.client.kv_get(key + str(member), timeout=0.0).decode(errors="replace")
            except CollectiveError:
                continue
            their_desc, _, their_text = theirs.partition("|")
            if their_desc != str(desc):
                return MismatchError(f"rank {member} waits in {their_text} #{seq} while this rank runs "
                                     f"{describe}")
    except CollectiveError:
        return None
    return None


def record_abort(rt, group, seq: int, error: CollectiveError) -> None:
    """Record why operation ``seq`` failed, unless another member recorded it first (the first
    failure is the cause; later ones are its echoes)."""
    key = abort_key(group, seq)
    try:
        if rt.client.kv_add(key + "/reports", 1, timeout=5.0) == 1:
            rt.client.kv_set(key, f"{rt.rank}#{abort_text(error)}".encode(), timeout=5.0)
    except CollectiveError:
        pass


def evicted(rt, group) -> EvictedError | None:
    """An EvictedError when the coordinator lists this rank among the group's dead (it hung and
    the others went on without it), else None."""
    try:
        status = rt.client.group_status(group.id, timeout=5.0)
    except CollectiveError:
        return None
    for d in status.dead:
        if d.rank == rt.rank:
            return evicted_error(rt.rank, group, d.reason)
    return None


def first_cause(rt, group, seq: int, error: CollectiveError) -> CollectiveError:
    """The error to raise for operation ``seq``: a PeerFailure seen here may be the echo of a
    failure another member saw first (a member that failed, left its operation and closed its
    connections looks gone from here). When a member already recorded why ``seq`` failed,
    that first cause is raised, so every member names the same culprit."""
    if not isinstance(error, PeerFailure):
        return error
    record = recorded_abort(rt, group, seq)
    if record is None or record[0] == rt.rank:
        return error
    return error_from_abort(record[1], record[0])
