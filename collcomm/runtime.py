"""The process-wide runtime behind the public API: rendezvous, groups, collectives, waits.

A :class:`Runtime` registers this rank's TCP listener with the coordinator, learns
the peer table, and runs collectives for :class:`Group` objects. A group numbers its
operations; every member runs them in the same order, one at a time, so an
operation's frames are recognised by (group, epoch, sequence number). Operations
issued with ``async_op=True`` run in the group's worker thread, in order.

While an operation waits it polls the coordinator every quarter second for a dead
member or an abort record of the same operation, so a failure seen by one rank (a
lost connection, ranks that disagree) reaches every member within the poll period,
with the typed error naming what happened; otherwise it raises CollectiveTimeout at
its timeout.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import socket
import threading
import time
from typing import Callable

import numpy as np

from collcomm.buffers import Buffer, as_buffer
from collcomm.errors import CollectiveError, CollectiveTimeout, EvictedError, MismatchError, PeerFailure
from collcomm.planner import Planner, flat_topology, restrict
from collcomm.schedules.ir import ALLGATHER, ALLREDUCE, REDUCE_SCATTER
from collcomm.topology import jsonio
from collcomm.topology.model import Topology
from collcomm.transport import frames
from collcomm.transport.executor import DEFAULT_CHUNK_BYTES, ExecutionPlan, Operation, shard_layout
from collcomm.transport.frames import DATA, Header
from collcomm.transport.tcp import P2P_BASE, TcpTransport, abort_text, error_from_abort

DEFAULT_TIMEOUT = 300.0
POLL_SECONDS = 0.25
WORLD_GROUP = 0


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw}")
    return value


class Work:
    """The handle of an asynchronous operation."""

    def __init__(self, future: concurrent.futures.Future, what: str):
        self._future = future
        self._what = what

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the operation completes (or ``timeout`` s pass: CollectiveTimeout); re-raise its error."""
        try:
            self._future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise CollectiveTimeout(f"{self._what} did not complete within {timeout:g} s") from None
        return True

    def is_completed(self) -> bool:
        return self._future.done()

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None


class Group:
    """A set of ranks that run collectives together (``new_group`` / the world)."""

    def __init__(self, runtime: "Runtime", group_id: int, name: str, members: list[int], epoch: int):
        self.runtime = runtime
        self.id, self.name, self.epoch = group_id, name, epoch
        self.members = list(members)
        self.lineage = list(members)  # the members it was formed with; shrink keeps it, grow re-admits from it
        self.grows = 0  # grow() rounds on this group so far
        self.me = self.members.index(runtime.rank) if runtime.rank in self.members else None
        self._index = {r: i for i, r in enumerate(self.members)}
        self.size = len(self.members)
        self._seq = itertools.count()
        self._lock = threading.Lock()  # one operation at a time, in order
        self._pending = 0
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._planner: Planner | None = None
        self._plans: dict = {}
        self.successor: "Group | None" = None  # set by shrink(): the survivors' group
        self.monitor = None  # collcomm.faults.monitor.GroupMonitor, when monitoring is on
        self.failed_operations = 0  # operations that raised here (the monitor reports the count)
        self.chunk_override: int | None = None  # the monitor's chunk size (collcomm.faults.chunks)

    def __repr__(self) -> str:
        return f"Group({self.name!r}, members={self.members})"

    @property
    def rank(self) -> int:
        """This process's rank within the group."""
        return self.me

    # ------------------------------------------------------------------ planning
    @property
    def chunk_bytes(self) -> int:
        """The largest chunk of this group's operations: the runtime's, or the monitor's fit to
        the measured link rates (every member switches at the same operation)."""
        return self.chunk_override or self.runtime.chunk_bytes

    @property
    def planner(self) -> Planner:
        if self._planner is None:
            self._planner = Planner(self.runtime.group_topology(self))
        return self._planner

    def set_topology(self, topo: Topology) -> None:
        """Plan on ``topo`` from the next operation on (the monitor's re-planned fabric)."""
        self._planner = Planner(topo)
        self._plans.clear()

    def next_seq(self) -> int:
        """The number of the next operation; the monitor's round (reports, plan switch) runs first."""
        if self.successor is not None:
            raise CollectiveError(f"{self} was shrunk to {self.successor}; run collectives on that group")
        seq = next(self._seq)
        if self.monitor is None and self.runtime.monitor_every > 0 and self.size > 1:
            from collcomm.faults.monitor import GroupMonitor

            self.monitor = GroupMonitor(self, self.runtime.monitor_every)
        if self.monitor is not None:
            self.monitor.before_operation(seq)
        return seq

    def _plan(self, schedule, shards: dict, chunk_elems: int) -> ExecutionPlan:
        key = (id(schedule), tuple(sorted(shards.items())), chunk_elems)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 256:
                self._plans.clear()
            plan = self._plans[key] = ExecutionPlan(schedule, self.me, shards, chunk_elems)
        return plan

    # ------------------------------------------------------------------ running
    def submit(self, fn: Callable[[], None], what: str, async_op: bool):
        """Run ``fn`` after every earlier operation of this group; return a Work when asynchronous."""
        if self.me is None:
            raise ValueError(f"rank {self.runtime.rank} is not a member of {self}")
        if not async_op:
            with self._lock:
                if self._pending == 0:
                    fn()
                    return None
            self._ensure_worker().submit(fn).result()
            return None
        with self._lock:
            self._pending += 1

        def run():
            try:
                fn()
            finally:
                with self._lock:
                    self._pending -= 1

        return Work(self._ensure_worker().submit(run), what)

    def _ensure_worker(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"collcomm-group{self.id}")
        return self._worker

    def run_schedule(self, kind: str, buf: Buffer, work: np.ndarray, shards: dict, *, reducer, chained: bool,
                     desc_fields: tuple, timeout: float, nbytes: int, algorithm: str | None = None,
                     watch_previous: bool = False) -> None:
        """Run the collective ``kind`` (allgather/reduce_scatter/allreduce schedule) on ``work``.
        ``watch_previous``: also fail when the previous operation was aborted elsewhere."""
        seq = self.next_seq()
        watch = (seq - 1,) if watch_previous and seq > 0 else ()
        rt = self.runtime
        schedule = self.planner.schedule(kind, nbytes, algorithm or rt.algorithm)
        itemsize = work.dtype.itemsize
        chunk_elems = max(1, self.chunk_bytes // itemsize)
        plan = self._plan(schedule, shards, chunk_elems)
        describe = f"{desc_fields[0]} of {buf.count} {buf.dtype}" + (f" ({desc_fields[3]})" if desc_fields[3] else "")
        desc = frames.describe(self.id, self.epoch, *desc_fields)
        links: dict[int, object] = {}
        op = Operation(links=links.__getitem__, member_of=self._index.__getitem__, me=self.me, group=self.id,
                       epoch=self.epoch, op_seq=seq, desc=desc, describe=describe, work=work, plan=plan,
                       reducer=reducer, chained=chained, max_chunk_bytes=chunk_elems * itemsize)
        self._execute(op, seq, plan.peers, links, timeout, watch)

    def _execute(self, op, seq: int, peers, links: dict, timeout: float, watch: tuple = ()) -> None:
        rt = self.runtime
        mailbox = rt.transport.mailbox(self.id)
        check = lambda: rt.outside_failure(self, seq, op.desc, op.describe, watch)  # noqa: E731
        deadline = time.monotonic() + timeout
        try:
            # Every connection is open before the operation takes frames (early ones wait in their
            # sockets), so a frame's handler never has to open one.
            for peer in sorted(peers):
                links[peer] = rt.transport.link(self.members[peer], self.id, self.epoch,
                                                max(deadline - time.monotonic(), 0.0), check=check)
            mailbox.register(seq, op)
            op.start()
            op.wait(max(deadline - time.monotonic(), 0.0), poll=check, poll_every=POLL_SECONDS)
        except CollectiveError as e:
            error = self._cause(seq, e)
            self._failed(seq, error)
            evicted = rt.evicted(self)
            if evicted is not None:
                raise evicted from e
            if rt.auto_shrink and isinstance(error, (PeerFailure, CollectiveTimeout)):
                try:  # leave the group shrunk for the next call; this call still raises
                    rt.shrink(self)
                except CollectiveError:
                    pass
            if error is e:
                raise
            raise error from e
        finally:
            mailbox.finish(seq)

    def _cause(self, seq: int, error: CollectiveError) -> CollectiveError:
        """The error to raise for operation ``seq``: a PeerFailure seen here may be the echo of a
        failure another member saw first (a member that failed, left its operation and closed its
        connections looks gone from here). When a member already recorded why ``seq`` failed,
        that first cause is raised, so every member names the same culprit."""
        if not isinstance(error, PeerFailure):
            return error
        try:
            text = self.runtime.client.kv_get(_abort_key(self, seq), timeout=0.0)
        except CollectiveError:
            return error
        reporter, _, abort = text.decode(errors="replace").partition("#")
        try:
            reporter_rank = int(reporter)
        except ValueError:
            return error
        if reporter_rank == self.runtime.rank:
            return error
        return error_from_abort(abort, reporter_rank)

    def _failed(self, seq: int, error: CollectiveError) -> None:
        """Tell the other members why: the coordinator's record (read by members that wait) and
        abort frames on every connection of the group (for members that are mid-operation)."""
        self.failed_operations += 1
        rt = self.runtime
        rt.record_abort(self, seq, error)
        rt.transport.abort_group(self.id, seq, error)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)


class Runtime:
    """Everything one process needs to take part in collectives."""

    def __init__(self, rank: int, world_size: int, coordinator: str, token: str, *, timeout: float | None = None,
                 topology: str | Topology | None = None, host: str | None = None,
                 algorithm: str | None = None, chunk_bytes: int | None = None, auto_shrink: bool | None = None,
                 monitor_every: int | None = None):
        from collcomm.coordinator.client import CoordinatorClient

        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.rank, self.world_size = rank, world_size
        self.timeout = timeout if timeout is not None else _env_float("COLLCOMM_TIMEOUT", DEFAULT_TIMEOUT)
        self.algorithm = algorithm or os.environ.get("COLLCOMM_ALGORITHM") or None
        self.chunk_bytes = chunk_bytes or int(_env_float("COLLCOMM_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
        # A size the user chose stays; the default one the link monitor may fit to the measured
        # link rates (collcomm.faults.chunks), group by group.
        self.chunk_fixed = bool(chunk_bytes) or bool(os.environ.get("COLLCOMM_CHUNK_BYTES", "").strip())
        self.auto_shrink = bool(auto_shrink) if auto_shrink is not None else \
            os.environ.get("COLLCOMM_AUTO_SHRINK", "").strip().lower() in ("1", "true", "yes", "on")
        self.monitor_every = int(monitor_every) if monitor_every is not None else \
            int(os.environ.get("COLLCOMM_MONITOR_EVERY") or 0)
        if self.monitor_every < 0:
            raise ValueError(f"monitor_every must be >= 0, got {self.monitor_every}")
        listen = host or os.environ.get("COLLCOMM_HOST") or ("127.0.0.1" if coordinator.startswith(
            ("127.", "localhost")) else "0.0.0.0")
        advertise = None if listen not in ("0.0.0.0", "") else _own_address(coordinator)
        self.transport = TcpTransport(rank, token, host=listen, advertise_host=advertise)
        self.client = CoordinatorClient(coordinator, token, timeout=self.timeout)
        try:
            # A new process for a rank that stands reported dead (the old one failed and the others
            # shrank): it takes the rank over and waits to be admitted by the survivors' grow().
            self.rejoining = self._reported_dead(rank)
            table = self.client.register(rank, world_size, self.transport.address, timeout=self.timeout)
        except BaseException:
            self.transport.close()
            self.client.close()
            raise
        self.transport.set_peers({p.rank: p.address for p in table.peers})
        self.peer_addresses = {p.rank: p.address for p in table.peers}
        self.hostnames = [p.hostname for p in table.peers]
        self._topology_source = topology if topology is not None else os.environ.get("COLLCOMM_TOPOLOGY") or None
        probing = isinstance(self._topology_source, str) and self._topology_source.strip().lower() == "probe"
        self._world_topology: Topology | None = None
        self.world = Group(self, WORLD_GROUP, "world", list(range(world_size)), table.epoch)
        self.groups: dict[int, Group] = {WORLD_GROUP: self.world}
        self._p2p_seq: dict[tuple[int, int, int], itertools.count] = {}
        self._p2p_lock = threading.Lock()
        self.closed = False
        if probing and world_size > 1:  # COLLCOMM_TOPOLOGY=probe / init(topology="probe"): measure the fabric now
            from collcomm.topology.probe import probe_at_init

            try:
                self._topology_source = probe_at_init(self)
            except BaseException:
                self.close()
                raise
        elif probing:
            self._topology_source = None

    def _reported_dead(self, rank: int) -> bool:
        try:
            status = self.client.group_status(WORLD_GROUP, timeout=min(self.timeout, 5.0))
        except CollectiveError:  # the world is not formed yet: a first start
            return False
        return any(d.rank == rank for d in status.dead)

    # ------------------------------------------------------------------ fabric
    def world_topology(self) -> Topology:
        if self._world_topology is None:
            src = self._topology_source
            if isinstance(src, Topology):
                topo = src
            elif src:
                topo = jsonio.load(src)
            else:
                topo = flat_topology(self.hostnames, f"flat{self.world_size}")
            if topo.num_ranks != self.world_size:
                raise ValueError(f"topology {topo.name!r} has {topo.num_ranks} ranks but the world has "
                                 f"{self.world_size}")
            self._world_topology = topo
        return self._world_topology

    def group_topology(self, group: Group) -> Topology:
        world = self.world_topology()
        try:
            return restrict(world, group.members, f"{world.name}/{group.name}")
        except CollectiveError:
            return flat_topology([self.hostnames[r] for r in group.members], f"flat/{group.name}")

    # ------------------------------------------------------------------ groups
    def new_group(self, ranks, name: str | None = None, timeout: float | None = None) -> Group:
        members = [int(r) for r in ranks]
        if len(set(members)) != len(members):
            raise ValueError(f"new_group: duplicate ranks in {members}")
        for r in members:
            if not 0 <= r < self.world_size:
                raise ValueError(f"new_group: rank {r} is not in the world of {self.world_size}")
        if self.rank not in members:
            raise ValueError(f"new_group: only the members call it; rank {self.rank} is not in {members}")
        name = name or "group-" + "-".join(map(str, members))
        info = self.client.form_group(name, members, self.rank, timeout=timeout or self.timeout)
        group = Group(self, info.group_id, name, list(info.members), info.epoch)
        self.groups[group.id] = group
        return group

    # ------------------------------------------------------------------ failures seen elsewhere
    def outside_failure(self, group: Group, seq: int, desc: int | None = None, describe: str = "",
                        watch: tuple = ()) -> BaseException | None:
        """What the coordinator knows that this waiting operation does not: a dead member, an
        abort recorded for it (or for the operations in ``watch``), or a member waiting in an
        operation of the same number that is not this one (ranks that disagree may exchange no
        frame at all, e.g. two ranks that each think they are the root of a reduce)."""
        try:
            status = self.client.group_status(group.id, timeout=5.0)
        except CollectiveError:
            status = None
        if status is not None:
            me = [d for d in status.dead if d.rank == self.rank]
            if me:
                return _evicted_error(self.rank, group, me[0].reason)
            dead = [d for d in status.dead if d.rank in group.members and d.rank != self.rank]
            if dead:
                d = dead[0]
                return PeerFailure(f"rank {d.rank} failed: {d.reason or 'reported dead'}", rank=d.rank)
        for s_ in (seq,) + tuple(watch):
            try:
                text = self.client.kv_get(_abort_key(group, s_), timeout=0.0)
            except CollectiveError:
                continue
            reporter, _, abort = text.decode(errors="replace").partition("#")
            return error_from_abort(abort, int(reporter))
        if desc is None:
            return None
        key = _abort_key(group, seq) + "/desc/"
        try:
            self.client.kv_set(key + str(self.rank), f"{desc}|{describe}".encode(), timeout=5.0)
            for member in group.members:
                if member == self.rank:
                    continue
                try:
                    theirs = self.client.kv_get(key + str(member), timeout=0.0).decode(errors="replace")
                except CollectiveError:
                    continue
                their_desc, _, their_text = theirs.partition("|")
                if their_desc != str(desc):
                    return MismatchError(f"rank {member} waits in {their_text} #{seq} while this rank runs "
                                         f"{describe}")
        except CollectiveError:
            return None
        return None

    def record_abort(self, group: Group, seq: int, error: CollectiveError) -> None:
        """Record why operation ``seq`` failed, unless another member recorded it first (the first
        failure is the cause; later ones are its echoes)."""
        key = _abort_key(group, seq)
        try:
            if self.client.kv_add(key + "/reports", 1, timeout=5.0) == 1:
                self.client.kv_set(key, f"{self.rank}#{abort_text(error)}".encode(), timeout=5.0)
        except CollectiveError:
            pass

    # ------------------------------------------------------------------ shrinking
    def evicted(self, group: Group) -> EvictedError | None:
        """An EvictedError when the coordinator lists this rank among the group's dead (it hung and
        the others went on without it), else None."""
        try:
            status = self.client.group_status(group.id, timeout=5.0)
        except CollectiveError:
            return None
        for d in status.dead:
            if d.rank == self.rank:
                return _evicted_error(self.rank, group, d.reason)
        return None

    def shrink(self, group: Group | None = None, timeout: float | None = None) -> Group:
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
        group = self._current(group)
        timeout = self.timeout if timeout is None else float(timeout)
        prefix = f"shrink/{group.id}/{group.epoch}"
        deadline = time.monotonic() + timeout
        self.client.kv_set(f"{prefix}/in/{self.rank}", b"1", timeout=timeout)
        checked_in: set[int] = {self.rank}
        dead: dict[int, str] = {}
        probed: dict[int, float] = {}
        decision = None
        while decision is None:
            try:
                decision = json.loads(self.client.kv_get(f"{prefix}/decision", timeout=0.0))
                break
            except CollectiveTimeout:
                pass
            try:
                status = self.client.group_status(group.id, timeout=5.0)
                for d in status.dead:
                    if d.rank in group.members:
                        dead.setdefault(d.rank, d.reason)
            except CollectiveError:
                pass
            if self.rank in dead:
                raise _evicted_error(self.rank, group, dead[self.rank])
            for r in group.members:
                if r in checked_in or r in dead:
                    continue
                try:
                    self.client.kv_get(f"{prefix}/in/{r}", timeout=0.0)
                    checked_in.add(r)
                    continue
                except CollectiveTimeout:
                    pass
                if time.monotonic() - probed.get(r, -1e9) >= 0.5:
                    probed[r] = time.monotonic()
                    if _process_gone(self.peer_addresses.get(r)):
                        dead[r] = "its process is gone (nothing listens at its address)"
            missing = [r for r in group.members if r not in checked_in and r not in dead]
            expired = time.monotonic() >= deadline
            if (not missing or expired) and self.client.kv_add(f"{prefix}/decider", 1, timeout=5.0) == 1:
                for r in missing:
                    dead[r] = f"did not rejoin the group within {timeout:g} s (hung?)"
                for r, reason in sorted(dead.items()):
                    try:
                        self.client.report_failure(group.id, r, reporter=self.rank,
                                                   reason=f"shrink of {group.name}: {reason}", timeout=5.0)
                    except CollectiveError:
                        pass
                survivors = [r for r in group.members if r not in dead]
                decision = {"members": survivors, "dead": {str(r): dead[r] for r in sorted(dead)},
                            "by": self.rank}
                self.client.kv_set(f"{prefix}/decision", json.dumps(decision).encode(), timeout=5.0)
                break
            if expired and time.monotonic() >= deadline + timeout:
                raise CollectiveTimeout(f"shrink of {group}: no decision within {2 * timeout:g} s")
            time.sleep(0.05)
        members = [int(r) for r in decision["members"]]
        if self.rank not in members:
            raise _evicted_error(self.rank, group, decision["dead"].get(str(self.rank), "left out of the shrink"))
        info = self.client.form_group(f"{prefix}/group", members, self.rank,
                                      timeout=max(deadline + timeout - time.monotonic(), 1.0))
        new = Group(self, info.group_id, group.name, list(info.members), info.epoch)
        new.lineage = list(group.lineage)
        new.chunk_override = group.chunk_override
        if group.monitor is not None:  # keep the monitor's re-planned fabric, cut to the survivors
            try:
                new._planner = Planner(restrict(group.monitor.topology, [group.members.index(r) for r in members],
                                                f"{group.monitor.topology.name}/shrunk"))
            except CollectiveError:
                pass
        self._succeed(group, new)
        return new

    def grow(self, group: Group | None = None, timeout: float | None = None) -> Group:
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
        timeout = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        if self.rejoining:
            key = f"rejoin/{self.rank}/{self.transport.address}"
            decision = json.loads(self.client.kv_get(key, timeout=timeout))
            old = self.world
        else:
            group = self._current(group)
            group.grows += 1  # every member calls grow() on a group equally often: the round's number
            prefix = f"grow/{group.id}/{group.epoch}/{group.grows}"
            if self.client.kv_add(f"{prefix}/decider", 1, timeout=timeout) == 1:
                table = self.client.register(self.rank, self.world_size, self.transport.address, timeout=timeout)
                status = self.client.group_status(WORLD_GROUP, timeout=timeout)
                dead = {d.rank for d in status.dead}
                joiners = [r for r in group.lineage if r not in group.members and r not in dead]
                peers = {p.rank: p for p in table.peers}
                decision = {"prefix": prefix, "name": group.name,
                            "members": [r for r in group.lineage if r in group.members or r in joiners],
                            "joiners": joiners, "addresses": {str(r): peers[r].address for r in joiners},
                            "hostnames": {str(r): peers[r].hostname for r in joiners}, "by": self.rank}
                text = json.dumps(decision).encode()
                self.client.kv_set(f"{prefix}/decision", text, timeout=timeout)
                for r in joiners:
                    self.client.kv_set(f"rejoin/{r}/{peers[r].address}", text, timeout=timeout)
            else:
                decision = json.loads(self.client.kv_get(f"{prefix}/decision", timeout=timeout))
            if not decision["joiners"]:
                return group
            old = group
        for r in decision["joiners"]:  # where the newcomers listen; they number their messages afresh
            address = decision["addresses"][str(r)]
            self.transport.set_peers({r: address})
            self.peer_addresses[r] = address
            if self.hostnames[r] != decision["hostnames"][str(r)]:
                self.hostnames[r] = decision["hostnames"][str(r)]
                self._world_topology = None
            with self._p2p_lock:
                for k in [k for k in self._p2p_seq if k[0] == r]:
                    del self._p2p_seq[k]
        members = [int(r) for r in decision["members"]]
        info = self.client.form_group(f"{decision['prefix']}/group", members, self.rank,
                                      timeout=max(deadline - time.monotonic(), 1.0))
        new = Group(self, info.group_id, decision["name"], list(info.members), info.epoch)
        new.lineage = list(old.lineage)
        self.rejoining = False  # a newcomer's ``old`` is its stand-in world, replaced here
        self._succeed(old, new)
        return new

    def _current(self, group: Group | None) -> Group:
        """``group`` (default: the world) as it is now: its latest successor, of which this rank is
        a member."""
        group = self.world if group is None else group
        while group.successor is not None:
            group = group.successor
        if group.me is None:
            raise ValueError(f"rank {self.rank} is not a member of {group}")
        return group

    def _succeed(self, old: Group, new: Group) -> None:
        """``new`` replaces ``old`` (shrunk or grown): the world too where ``old`` was the world,
        and ``old``'s connections are closed."""
        self.groups[new.id] = new
        old.successor = new
        if self.world is old:
            self.world = new
        self._retire(old)

    def _retire(self, group: Group) -> None:
        """Close the connections and the mailbox of a group that was shrunk: a frame of its old
        epoch (from a member that wakes up late) meets a closed connection, never the new group."""
        self.transport.close_group(group.id, EvictedError(f"{group} was shrunk", epoch=group.epoch))

    # ------------------------------------------------------------------ point to point
    def p2p_seq(self, peer: int, tag: int, direction: str) -> int:
        with self._p2p_lock:
            key = (peer, tag, direction == "send")
            counter = self._p2p_seq.setdefault(key, itertools.count())
            return next(counter)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for g in self.groups.values():
            g.close()
        self.transport.close()
        self.client.close()


def _abort_key(group: Group, seq: int) -> str:
    return f"abort/{group.id}/{group.epoch}/{seq}"


def _evicted_error(rank: int, group: Group, reason: str) -> EvictedError:
    return EvictedError(f"rank {rank} was declared failed ({reason or 'reported dead'}) and {group.name!r} went on "
                        f"without it; its epoch {group.epoch} is stale", rank=rank, epoch=group.epoch)


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


def _own_address(coordinator: str) -> str:
    """The local address that reaches the coordinator (what peers on other machines can use)."""
    host, _, port = coordinator.rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, int(port)))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


# ---------------------------------------------------------------------------- collectives
def allreduce(rt: Runtime, group: Group, x, op: str, timeout: float, watch_previous: bool = False) -> None:
    buf = as_buffer(x)
    reducer = buf.reducer(op)
    if buf.count == 0 or group.size == 1:
        return
    shards = dict(enumerate(shard_layout(buf.count, group.size)))
    group.run_schedule(ALLREDUCE, buf, buf.array, shards, reducer=reducer, chained=True,
                       desc_fields=("allreduce", buf.dtype, buf.count, op, -1), timeout=timeout, nbytes=buf.nbytes,
                       watch_previous=watch_previous)
    if op == "avg":
        buf.divide(group.size)


def allgather(rt: Runtime, group: Group, out, x, timeout: float) -> None:
    src, dst = as_buffer(x, "input"), as_buffer(out, "output")
    n = src.count
    if dst.dtype != src.dtype:
        raise TypeError(f"allgather: output dtype {dst.dtype} differs from input dtype {src.dtype}")
    if dst.count != n * group.size:
        raise ValueError(f"allgather: output holds {dst.count} elements, needs {group.size} x {n} = "
                         f"{group.size * n}")
    dst.array[group.me * n:(group.me + 1) * n] = src.array
    if n == 0 or group.size == 1:
        return
    shards = {r: (r * n, n) for r in range(group.size)}
    group.run_schedule(ALLGATHER, dst, dst.array, shards, reducer=None, chained=False,
                       desc_fields=("allgather", dst.dtype, n, "", -1), timeout=timeout, nbytes=dst.nbytes)


def reduce_scatter(rt: Runtime, group: Group, out, x, op: str, timeout: float) -> None:
    src, dst = as_buffer(x, "input"), as_buffer(out, "output")
    m = dst.count
    if dst.dtype != src.dtype:
        raise TypeError(f"reduce_scatter: output dtype {dst.dtype} differs from input dtype {src.dtype}")
    if src.count != m * group.size:
        raise ValueError(f"reduce_scatter: input holds {src.count} elements, needs {group.size} x {m} = "
                         f"{group.size * m}")
    reducer = src.reducer(op)
    work = src.array.copy()  # the input stays as the caller gave it
    if m and group.size > 1:
        shards = {r: (r * m, m) for r in range(group.size)}
        group.run_schedule(REDUCE_SCATTER, src, work, shards, reducer=reducer, chained=False,
                           desc_fields=("reduce_scatter", src.dtype, m, op, -1), timeout=timeout,
                           nbytes=src.nbytes)
    dst.array[:] = work[group.me * m:(group.me + 1) * m]
    if op == "avg":
        dst.divide(group.size)


def broadcast(rt: Runtime, group: Group, x, root: int, timeout: float) -> None:
    buf = as_buffer(x)
    _check_root(group, root)
    if buf.count == 0 or group.size == 1:
        return
    fields = ("broadcast", buf.dtype, buf.count, "", root)
    _rooted(rt, group, fields, timeout, lambda: group.run_schedule(
        ALLGATHER, buf, buf.array, {root: (0, buf.count)}, reducer=None, chained=False, desc_fields=fields,
        timeout=timeout, nbytes=buf.nbytes * group.size))


def reduce(rt: Runtime, group: Group, x, root: int, op: str, timeout: float) -> None:
    buf = as_buffer(x)
    _check_root(group, root)
    reducer = buf.reducer(op)
    if buf.count == 0 or group.size == 1:
        return
    work = buf.array if group.me == root else buf.array.copy()  # only the root's buffer changes
    fields = ("reduce", buf.dtype, buf.count, op, root)
    _rooted(rt, group, fields, timeout, lambda: group.run_schedule(
        REDUCE_SCATTER, buf, work, {root: (0, buf.count)}, reducer=reducer, chained=False, desc_fields=fields,
        timeout=timeout, nbytes=buf.nbytes * group.size))
    if op == "avg" and group.me == root:
        buf.divide(group.size)


def _rooted(rt: Runtime, group: Group, fields: tuple, timeout: float, run) -> None:
    """Run a rooted collective, then agree on what it was.

    In a broadcast or reduce some ranks only send, so the rank that finds a disagreement may be
    the only one to see it while the others return. After the operation every rank allreduces
    (max) the hash of its description and its negation; the allreduce also watches the abort
    record of the operation itself. A rank whose operation failed does not take part: the
    others learn of it from that record. A disagreement is a MismatchError on every rank."""
    mine = frames.describe(*fields) >> 1  # fits int64
    run()
    seen = np.array([mine, -mine], dtype=np.int64)
    allreduce(rt, group, seen, "max", timeout, watch_previous=True)
    if int(seen[0]) != mine or int(seen[1]) != -mine:
        raise MismatchError(f"ranks disagree on this {fields[0]} (this rank: {fields[2]} {fields[1]}, "
                            f"root {fields[4]}{', ' + fields[3] if fields[3] else ''})")


def barrier(rt: Runtime, group: Group, timeout: float) -> None:
    token = np.zeros(1, dtype=np.int32)
    allreduce(rt, group, token, "sum", timeout)


def alltoall(rt: Runtime, group: Group, out, x, timeout: float) -> None:
    """Block j of ``x`` goes to group rank j and lands there as block ``group.me`` of ``out``.

    A pairwise exchange on the group's connections: in step k = 1..n-1 this rank sends its
    block to member (me + k) mod n and receives from member (me - k) mod n, so in every step
    each member sends to a different peer. Sends are queued on the links' sender threads and
    every receive lands straight in ``out`` (registered before the first send), so no order of
    arrival can deadlock. ``out`` may be ``x`` itself (the input is then copied first)."""
    src, dst = as_buffer(x, "input"), as_buffer(out, "output")
    n, me = group.size, group.me
    if dst.dtype != src.dtype:
        raise TypeError(f"alltoall: output dtype {dst.dtype} differs from input dtype {src.dtype}")
    if dst.count != src.count:
        raise ValueError(f"alltoall: output holds {dst.count} elements, input {src.count}; they must be equal")
    if src.count % n:
        raise ValueError(f"alltoall: {src.count} elements do not split into {n} equal blocks (one per group "
                         f"rank); give a multiple of {n}")
    block = src.count // n
    data = src.array
    if np.may_share_memory(data, dst.array):
        data = data.copy()  # in place: blocks arrive over blocks not sent yet
    dst.array[me * block:(me + 1) * block] = data[me * block:(me + 1) * block]
    if block == 0 or n == 1:
        return
    seq = group.next_seq()
    itemsize = data.dtype.itemsize
    chunk_elems = max(1, group.chunk_bytes // itemsize)
    desc = frames.describe(group.id, group.epoch, "alltoall", dst.dtype, dst.count, "", -1)
    links: dict[int, object] = {}
    op = _Alltoall(links=links.__getitem__, member_of=group._index.__getitem__, me=me, n=n, group=group.id,
                   epoch=group.epoch, op_seq=seq, desc=desc, describe=f"alltoall of {dst.count} {dst.dtype}",
                   send=data, recv=dst.array, block=block, chunk_elems=chunk_elems)
    group._execute(op, seq, [(me + k) % n for k in range(1, n)], links, timeout)


class _Alltoall(Operation):
    """An alltoall as frame events (the executor's Operation without a schedule): for every other
    member, the chunks of the block to send and of the block to receive. Frames carry tree 0 and
    the chunk number; a frame is accepted only from the member whose block it is, with exactly
    the chunk's length and this operation's description (else MismatchError, as everywhere)."""

    def __init__(self, *, links, member_of, me: int, n: int, group: int, epoch: int, op_seq: int, desc: int,
                 describe: str, send: np.ndarray, recv: np.ndarray, block: int, chunk_elems: int):
        # Operation's waiting and failure handling use these fields; the plan-driven ones stay unset.
        self._links, self._member_of = links, member_of
        self.me, self.n, self.group, self.epoch, self.op_seq = me, n, group, epoch, op_seq
        self.desc, self.describe = desc, describe
        self.itemsize = send.dtype.itemsize
        self.send_bytes, self.recv_bytes = send.view(np.uint8), recv.view(np.uint8)
        self.block, self.chunk_elems = block, chunk_elems
        self.chunks = -(-block // chunk_elems)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.error: BaseException | None = None
        self._events = 2 * (n - 1) * self.chunks
        self._from_peer = {p: self.chunks for p in range(n) if p != me}
        self._seen: set[tuple[int, int]] = set()

    def _span(self, member: int, chunk: int) -> tuple[int, int]:
        """Byte range of ``chunk`` of block ``member``."""
        lo = member * self.block + chunk * self.chunk_elems
        hi = min(lo + self.chunk_elems, (member + 1) * self.block)
        return lo * self.itemsize, hi * self.itemsize

    def start(self) -> None:
        for k in range(1, self.n):  # pairwise order: step k sends to me + k
            peer = (self.me + k) % self.n
            for c in range(self.chunks):
                if self.error is not None:
                    return  # a failed operation sends nothing more
                lo, hi = self._span(peer, c)
                view = memoryview(self.send_bytes[lo:hi])
                header = Header(DATA, self.group, self.epoch, self.op_seq, 0, c, self.desc, len(view),
                                frames.checksum(view))
                try:
                    self._links(peer).send(header, view, self._event_done)
                except CollectiveError as e:
                    self.failed(e)
                    return

    def destination(self, header: Header, world_peer: int) -> memoryview:
        peer = self._member_of(world_peer)
        if header.desc != self.desc:
            raise MismatchError(f"rank {peer} runs a different operation #{self.op_seq} than this rank's "
                                f"{self.describe}")
        c = header.chunk
        lo, hi = self._span(peer, c) if 0 <= c < self.chunks else (0, -1)
        with self._lock:
            fresh = (peer, c) not in self._seen
            self._seen.add((peer, c))
        if header.tree != 0 or header.length != hi - lo or not fresh:
            raise MismatchError(f"rank {peer} sent an unexpected piece (chunk {c}, {header.length} bytes) for "
                                f"this rank's {self.describe}")
        return memoryview(self.recv_bytes[lo:hi])

    def delivered(self, header: Header, view: memoryview, world_peer: int) -> None:
        self._event_done(self._member_of(world_peer))


def _check_root(group: Group, root: int) -> None:
    if not isinstance(root, (int, np.integer)) or not 0 <= root < group.size:
        raise ValueError(f"root {root!r} is not a rank of {group} (0..{group.size - 1})")


class _PointToPoint:
    """One message between two ranks: the sender's k-th send with a tag meets the receiver's k-th receive."""

    def __init__(self, view: memoryview, peer: int, seq: int, desc: int, what: str):
        self.view, self.peer, self.seq, self.desc, self.what = view, peer, seq, desc, what
        self._done = threading.Event()
        self.error: BaseException | None = None

    def destination(self, header: Header, peer: int) -> memoryview:
        if header.desc != self.desc or header.length != len(self.view):
            raise MismatchError(f"rank {peer} sent {header.length} bytes for this rank's {self.what} of "
                                f"{len(self.view)} bytes (or a different dtype)")
        return self.view

    def delivered(self, header: Header, view: memoryview, peer: int) -> None:
        self._done.set()

    def failed(self, error: BaseException) -> None:
        if self._done.is_set():
            return  # the message already arrived (or left): a peer that closes afterwards changes nothing
        if self.error is None:
            self.error = error
        self._done.set()

    def sent(self) -> None:
        self._done.set()

    def wait(self, timeout: float) -> None:
        if not self._done.wait(timeout):
            raise CollectiveTimeout(f"{self.what} did not complete within {timeout:g} s")
        if self.error is not None:
            raise self.error


def send(rt: Runtime, x, dst: int, tag: int, timeout: float) -> None:
    buf = as_buffer(x)
    _check_peer(rt, dst, tag)
    group = P2P_BASE + tag
    seq = rt.p2p_seq(dst, tag, "send")
    view = memoryview(buf.array.view(np.uint8))
    desc = frames.describe("p2p", buf.dtype)
    msg = _PointToPoint(view, dst, seq, desc, f"send of {buf.count} {buf.dtype} to rank {dst}")
    link = rt.transport.link(dst, group, 0, timeout)
    link.send(Header(DATA, group, 0, seq, desc=desc, length=len(view), checksum=frames.checksum(view)), view,
              msg.sent)
    msg.wait(timeout)


def recv(rt: Runtime, x, src: int, tag: int, timeout: float) -> None:
    buf = as_buffer(x)
    _check_peer(rt, src, tag)
    group = P2P_BASE + tag
    seq = rt.p2p_seq(src, tag, "recv")
    view = memoryview(buf.array.view(np.uint8))
    msg = _PointToPoint(view, src, seq, frames.describe("p2p", buf.dtype),
                        f"recv of {buf.count} {buf.dtype} from rank {src}")
    mailbox = rt.transport.mailbox(group, src)
    mailbox.register(seq, msg)
    try:
        rt.transport.link(src, group, 0, timeout)
        msg.wait(timeout)
    finally:
        mailbox.finish(seq)


def _check_peer(rt: Runtime, peer: int, tag: int) -> None:
    if not isinstance(peer, (int, np.integer)) or not 0 <= peer < rt.world_size or peer == rt.rank:
        raise ValueError(f"peer {peer!r} must be another rank of the world (0..{rt.world_size - 1})")
    if not isinstance(tag, (int, np.integer)) or not 0 <= tag < (1 << 31) - 1:
        raise ValueError(f"tag {tag!r} must be an integer in [0, 2**31 - 1)")
