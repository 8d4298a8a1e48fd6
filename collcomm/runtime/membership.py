"""Membership changes of a group: shrink (without its failed members) and grow (re-admitting
restarted ranks), each at a new epoch decided through the coordinator.

Every survivor calls the same function; the coordinator's atomic counter elects the member that
writes the decision, and all of them form the new group from it. The old group's connections
are closed, so a late frame of the old epoch is refused and never reaches the new group.
"""

from __future__ import annotations

import json
import socket
import time

from collcomm.errors import CollectiveError, CollectiveTimeout, EvictedError
from collcomm.runtime.failures import evicted_error
from collcomm.runtime.group import Group
from collcomm.schedules.planner import restrict

WORLD_GROUP = 0


def shrink(rt, group=None, timeout: float | None = None):
    """Re-form ``group`` (default: the world) without its failed members, at a new epoch.

    Every survivor calls it. Each checks in under ``shrink/<group>/<epoch>/``; a member that
    the coordinator lists as dead, or whose listener refuses connections (its process is
    gone), is out at once; one that neither checks in nor is known dead within ``timeout``
    (a hung rank) is declared failed. The first member to see every member accounted for (or
    its deadline pass) writes the decision (the coordinator's atomic counter elects it) and
    reports the missing members dead; every survivor then forms the new group (a new group id
    and epoch at the coordinator). The old group's connections are closed, so a late frame of
    the old epoch is refused and never reaches the new group. A member left out raises
    EvictedError."""
    group = current(rt, group)
    timeout = rt.timeout if timeout is None else float(timeout)
    prefix = f"shrink/{group.id}/{group.epoch}"
    deadline = time.monotonic() + timeout
    rt.client.kv_set(f"{prefix}/in/{rt.rank}", b"1", timeout=timeout)
    checked_in: set[int] = {rt.rank}
    dead: dict[int, str] = {}
    probed: dict[int, float] = {}
    decision = None
    while decision is None:
        try:
            decision = json.loads(rt.client.kv_get(f"{prefix}/decision", timeout=0.0))
            break
        except CollectiveTimeout:
            pass
        try:
            status = rt.client.group_status(group.id, timeout=5.0)
            for d in status.dead:
                if d.rank in group.members:
                    dead.setdefault(d.rank, d.reason)
        except CollectiveError:
            pass
        if rt.rank in dead:
            raise evicted_error(rt.rank, group, dead[rt.rank])
        for r in group.members:
            if r in checked_in or r in dead:
                continue
            try:
                rt.client.kv_get(f"{prefix}/in/{r}", timeout=0.0)
                checked_in.add(r)
                continue
            except CollectiveTimeout:
                pass
            if time.monotonic() - probed.get(r, -1e9) >= 0.5:
                probed[r] = time.monotonic()
                if _process_gone(rt.peer_addresses.get(r)):
                    dead[r] = "its process is gone (nothing listens at its address)"
        missing = [r for r in group.members if r not in checked_in and r not in dead]
        expired = time.monotonic() >= deadline
        if (not missing or expired) and rt.client.kv_add(f"{prefix}/decider", 1, timeout=5.0) == 1:
            for r in missing:
                dead[r] = f"did not rejoin the group within {timeout:g} s (hung?)"
            for r, reason in sorted(dead.items()):
                try:
                    rt.client.report_failure(group.id, r, reporter=rt.rank,
                                             reason=f"shrink of {group.name}: {reason}", timeout=5.0)
                except CollectiveError:
                    pass
            survivors = [r for r in group.members if r not in dead]
            decision = {"members": survivors, "dead": {str(r): dead[r] for r in sorted(dead)},
                        "by": rt.rank}
            rt.client.kv_set(f"{prefix}/decision", json.dumps(decision).encode(), timeout=5.0)
            break
        if expired and time.monotonic() >= deadline + timeout:
            raise CollectiveTimeout(f"shrink of {group}: no decision within {2 * timeout:g} s")
        time.sleep(0.05)
    members = [int(r) for r in decision["members"]]
    if rt.rank not in members:
        raise evicted_error(rt.rank, group, decision["dead"].get(str(rt.rank), "left out of the shrink"))
    info = rt.client.form_group(f"{prefix}/group", members, rt.rank,
                                timeout=max(deadline + timeout - time.monotonic(), 1.0))
    new = Group(rt, info.group_id, group.name, list(info.members), info.epoch)
    new.lineage = list(group.lineage)
    new.chunk_override = group.chunk_override
    if group.monitor is not None:  # keep the monitor's re-planned fabric, cut to the survivors
        try:
            new.set_topology(restrict(group.monitor.topology, [group.members.index(r) for r in members],
                                      f"{group.monitor.topology.name}/shrunk"))
        except CollectiveError:
            pass
    _succeed(rt, group, new)
    return new


def grow(rt, group=None, timeout: float | None = None):
    """Admit restarted ranks into ``group`` (default: the world) at a new epoch.

    After a shrink, a new process started with a failed rank's number (``init`` with the same
    rank, coordinator and token) takes the rank over at the coordinator (it is no longer listed
    dead). Every survivor and every such newcomer calls ``grow``. The first survivor to arrive
    decides (the coordinator's atomic counter elects it) who joins: the ranks the group was
    first formed with that are neither members now nor dead, i.e. that registered again; it
    writes the decision, with the newcomers' addresses, for the survivors and for each newcomer
    (``rejoin/<rank>/<address>``). Then all of them form the new group (a new group id and
    epoch); the old group's connections are closed as after a shrink. A newcomer waits (up to
    ``timeout``) until survivors admit it; a survivor that finds nobody to admit returns the
    group unchanged (so survivors call it once the newcomers' ``init`` returned)."""
    timeout = rt.timeout if timeout is None else float(timeout)
    deadline = time.monotonic() + timeout
    if rt.rejoining:
        key = f"rejoin/{rt.rank}/{rt.transport.address}"
        decision = json.loads(rt.client.kv_get(key, timeout=timeout))
        old = rt.world
    else:
        group = current(rt, group)
        group.grows += 1  # every member calls grow() on a group equally often: the round's number
        prefix = f"grow/{group.id}/{group.epoch}/{group.grows}"
        if rt.client.kv_add(f"{prefix}/decider", 1, timeout=timeout) == 1:
            table = rt.client.register(rt.rank, rt.world_size, rt.transport.address, hostname=rt.hostname,
                                       timeout=timeout)
            status = rt.client.group_status(WORLD_GROUP, timeout=timeout)
            dead = {d.rank for d in status.dead}
            joiners = [r for r in group.lineage if r not in group.members and r not in dead]
            peers = {p.rank: p for p in table.peers}
            decision = {"prefix": prefix, "name": group.name,
                        "members": [r for r in group.lineage if r in group.members or r in joiners],
                        "joiners": joiners, "addresses": {str(r): peers[r].address for r in joiners},
                        "hostnames": {str(r): peers[r].hostname for r in joiners}, "by": rt.rank}
            text = json.dumps(decision).encode()
            rt.client.kv_set(f"{prefix}/decision", text, timeout=timeout)
            for r in joiners:
                rt.client.kv_set(f"rejoin/{r}/{peers[r].address}", text, timeout=timeout)
        else:
            decision = json.loads(rt.client.kv_get(f"{prefix}/decision", timeout=timeout))
        if not decision["joiners"]:
            return group
        old = group
    for r in decision["joiners"]:  # where the newcomers listen; they number their messages afresh
        address = decision["addresses"][str(r)]
        rt.transport.set_peers({r: address})
        rt.peer_addresses[r] = address
        rt.set_hostname(r, decision["hostnames"][str(r)])
        rt.p2p.forget(r)
    members = [int(r) for r in decision["members"]]
    info = rt.client.form_group(f"{decision['prefix']}/group", members, rt.rank,
                                timeout=max(deadline - time.monotonic(), 1.0))
    new = Group(rt, info.group_id, decision["name"], list(info.members), info.epoch)
    new.lineage = list(old.lineage)
    rt.rejoining = False  # a newcomer's ``old`` is its stand-in world, replaced here
    _succeed(rt, old, new)
    return new


def current(rt, group=None):
    """``group`` (default: the world) as it is now: its latest successor, of which this rank is
    a member."""
    group = rt.world if group is None else group
    while group.successor is not None:
        group = group.successor
    if group.me is None:
        raise ValueError(f"rank {rt.rank} is not a member of {group}")
    return group


def _succeed(rt, old, new) -> None:
    """``new`` replaces ``old`` (shrunk or grown): the world too where ``old`` was the world,
    and ``old``'s connections are closed."""
    rt.groups[new.id] = new
    old.successor = new
    if rt.world is old:
        rt.world = new
    _retire(rt, old)


def _retire(rt, group) -> None:
    """Close the connections and the mailbox of a group that was shrunk: a frame of its old
    epoch (from a member that wakes up late) meets a closed connection, never the new group."""
    rt.transport.close_group(group.id, EvictedError(f"{group} was shrunk", epoch=group.epoch))


def _process_gone(address: str | None) -> bool:
    """True when nothing listens at a rank's registered address (connection refused): its process
    is gone. A hung (stopped) process still accepts, so it is not "gone" here."""
    if not address:
        return False
    tcp, _, local = address.partition("#@")
    if local:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect("\0" + local)
            return False
        except ConnectionRefusedError:
            return True
        except OSError:
            pass  # another machine or namespace: try TCP
        finally:
            s.close()
    host, _, port = tcp.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True
    except (OSError, ValueError):
        return False
