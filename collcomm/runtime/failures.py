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

import time

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
    key = _desc_key(group, seq)
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
                return mismatch(rt.rank, describe, member, their_text)
    except CollectiveError:
        return None
    return None


# ---------------------------------------------------------------------------- ranks that disagree
# How long a rank whose operation failed with a MismatchError waits for the description of the
# peer's operation (the peer publishes it as soon as it learns of the failure: at once from an abort
# frame, within a poll period from the coordinator's record). Past it the error says "another operation".
MISMATCH_WAIT = 1.0


def _desc_key(group, seq: int) -> str:
    """Where each member publishes "<hash>|<words>" of its operation ``seq`` (read by the others)."""
    return abort_key(group, seq) + "/desc/"


def mismatch(me: int, mine: str, peer: int, theirs: str | None) -> MismatchError:
    """The error of ranks that disagree, worded the same on every path and true on any rank it
    reaches: "rank 0 runs allreduce of ... but rank 1 runs broadcast of ..."."""
    return MismatchError(f"rank {me} runs {mine} but rank {peer} runs {theirs or 'a different operation'}",
                         rank=peer)


def publish_operation(rt, group, seq: int, desc: int, describe: str) -> None:
    """Publish what this rank runs as operation ``seq`` (its hash and its words), for members that
    disagree with it (:func:`explain_mismatch`)."""
    try:
        rt.client.kv_set(_desc_key(group, seq) + str(rt.rank), f"{desc}|{describe}".encode(), timeout=5.0)
    except CollectiveError:
        pass


def explain_mismatch(rt, group, seq: int, error: MismatchError, desc: int, describe: str,
                     wait: float = MISMATCH_WAIT) -> MismatchError:
    """The MismatchError this rank raises for operation ``seq``: its own operation and that of a peer
    that runs another one, whoever detected the disagreement (over sockets a rank sees only the hash
    of a peer's operation, and a rank told by another learns only what that one saw).

    This rank publishes its operation (:func:`publish_operation`) and reads the peers' as they
    publish theirs, for at most ``wait`` seconds: first the peer the error names, then the rank that
    recorded why the operation failed and the one it blamed, then the other members."""
    publish_operation(rt, group, seq, desc, describe)
    candidates = [error.rank] if error.rank is not None else []
    record = recorded_abort(rt, group, seq)
    if record is not None:
        candidates.append(record[0])
        culprit = record[1].split("|", 2)[1] if record[1].count("|") >= 2 else ""
        if culprit.lstrip("-").isdigit():
            candidates.append(int(culprit))
    candidates += group.members
    key, deadline = _desc_key(group, seq), time.monotonic() + wait
    tried: set[int] = set()
    agrees = False  # the peer the error names runs this very operation (its pieces did not fit: another plan)
    for peer in candidates:
        if peer == rt.rank or peer in tried or peer not in group.members:
            continue
        tried.add(peer)
        try:
            theirs = rt.client.kv_get(key + str(peer), timeout=max(deadline - time.monotonic(), 0.0))
        except CollectiveError:
            continue
        their_desc, _, their_text = theirs.decode(errors="replace").partition("|")
        if their_desc != str(desc):
            return mismatch(rt.rank, describe, peer, their_text)
        agrees = agrees or peer == error.rank
    if agrees or str(error).startswith(f"rank {rt.rank} runs "):
        return error  # its own words are the best ones
    if error.rank is not None:
        return mismatch(rt.rank, describe, error.rank, None)
    return MismatchError(f"rank {rt.rank} runs {describe} but another member runs a different operation ({error})")


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
