"""Groups: a set of ranks that run operations together, one at a time, in the same order.

A :class:`Group` numbers its operations; every member runs them in the same order, so an
operation's frames are recognised by (group, epoch, sequence number). Operations issued with
``async_op=True`` run in the group's worker thread, in order (:class:`Work` is their handle).
:meth:`Group.run_schedule` runs a collective's plan with the executor; :meth:`Group.execute`
runs any operation (the executor's, alltoall's) and turns its failure into the typed error every
member raises (see :mod:`collcomm.runtime.failures`).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from typing import Callable

import numpy as np

from collcomm.errors import CollectiveError, CollectiveTimeout, MismatchError, PeerFailure
from collcomm.runtime import failures
from collcomm.runtime.buffers import Buffer
from collcomm.runtime.executor import ExecutionPlan, Operation
from collcomm.runtime.operation import describe_fields
from collcomm.schedules.planner import Planner
from collcomm.topology.model import Topology
from collcomm.transport import frames

POLL_SECONDS = 0.25  # how often a waiting operation asks the coordinator about failures elsewhere


class Work:
    """The handle of an asynchronous operation."""

    def __init__(self, future: concurrent.futures.Future, what: str):
        self._future = future
        self._what = what

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the operation completes (or ``timeout`` s pass: CollectiveTimeout); re-raise its error.
        None waits as long as the operation takes (it ends at its own timeout); 0 only looks (as
        concurrent.futures does); else a finite number of seconds above 0 (collcomm.runtime.arguments.timeout)."""
        if timeout is not None:
            if type(timeout) in (int, float) and timeout == 0:
                timeout = 0.0
            else:
                from collcomm.runtime import arguments

                timeout = arguments.timeout(timeout, 0.0, "wait: timeout")
        try:
            self._future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise CollectiveTimeout(f"{self._what} did not complete within {timeout:g} s") from None
        return True

    def is_completed(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None):
        """What the operation returned once it completed (``get``: the array, ``reduce_objects``:
        the keys used; collectives: None); re-raises its error like :meth:`wait`."""
        self.wait(timeout)
        return self._future.result(timeout=0)

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None


class Group:
    """A set of ranks that run collectives together (``new_group`` / the world)."""

    def __init__(self, runtime, group_id: int, name: str, members: list[int], epoch: int):
        self.runtime = runtime
        self.id, self.name, self.epoch = group_id, name, epoch
        self.members = list(members)
        self.lineage = list(members)  # the members it was formed with; shrink keeps it, grow re-admits from it
        self.grows = 0  # grow() rounds on this group so far
        self.me = self.members.index(runtime.rank) if runtime.rank in self.members else None
        self._index = {r: i for i, r in enumerate(self.members)}
        self.size = len(self.members)
        self._seq = itertools.count()
        self.last_seq = -1  # the number of the operation started last
        self._lock = threading.Lock()  # one operation at a time, in order
        self._pending = 0
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._planner: Planner | None = None
        self._plans: dict = {}
        self.successor: "Group | None" = None  # set by shrink(): the survivors' group
        self.monitor = None  # collcomm.runtime.monitor.GroupMonitor, when monitoring is on
        self.failed_operations = 0  # operations that raised here (the monitor reports the count)
        self.chunk_override: int | None = None  # the monitor's chunk size (collcomm.faults.chunks)
        self._local = None  # None: not decided yet; False: sockets; else a collcomm.runtime.local.LocalGroup
        self.lane = None  # that LocalGroup's small-message lane (collcomm.runtime.lane), which the API calls first
        self._local_generation = 0  # arenas formed so far (a failed operation drops its arena)
        self._hierarchy = None  # the same for a group spanning machines (collcomm.runtime.hierarchy)
        self._scratch: np.ndarray | None = None  # (Group.scratch)

    def __repr__(self) -> str:
        return f"Group({self.name!r}, members={self.members})"

    @property
    def rank(self) -> int:
        """This process's rank within the group."""
        return self.me

    def member_index(self, world_rank: int) -> int:
        """The group rank of a member, from its world rank (KeyError: not a member)."""
        return self._index[world_rank]

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
        seq = self.last_seq = next(self._seq)
        if self.monitor is None and self.runtime.monitor_every > 0 and self.size > 1:
            from collcomm.runtime.monitor import GroupMonitor

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
                     watch_previous: bool = False, root: int | None = None) -> None:
        """Run the collective ``kind`` (allgather/reduce_scatter/allreduce schedule) on ``work``.
        ``watch_previous``: also fail when the previous operation was aborted elsewhere; ``root``
        (a group rank): only its trees run (broadcast, reduce), and the plan is chosen for them."""
        seq = self.next_seq()
        watch = (seq - 1,) if watch_previous and seq > 0 else ()
        rt = self.runtime
        schedule = self.planner.schedule(kind, nbytes, algorithm or rt.algorithm, root=root)
        itemsize = work.dtype.itemsize
        chunk_elems = max(1, self.chunk_bytes // itemsize)
        plan = self._plan(schedule, shards, chunk_elems)
        describe = describe_fields(desc_fields)
        desc = frames.describe(self.id, self.epoch, *desc_fields)
        links: dict[int, object] = {}
        op = Operation(links=links.__getitem__, member_of=self.member_index, me=self.me, group=self.id,
                       epoch=self.epoch, op_seq=seq, desc=desc, describe=describe, work=work, plan=plan,
                       reducer=reducer, chained=chained, max_chunk_bytes=chunk_elems * itemsize)
        # (an agreement that watches the previous operation is not what a disagreement is about:
        # the rooted collective explains it, collectives._rooted)
        self.execute(op, seq, plan.peers, links, timeout, watch, explain=not watch_previous)

    def execute(self, op, seq: int, peers, links: dict, timeout: float, watch: tuple = (), *,
                explain: bool = True) -> None:
        """Run ``op`` (operation number ``seq``) with the members ``peers`` (group ranks), filling
        ``links`` (member -> link) as the connections open: register it in the group's mailbox,
        start it and wait for it; on failure tell the members why and raise the typed error
        (``explain``: a MismatchError names this rank's operation and a peer's that differs)."""
        rt = self.runtime
        mailbox = rt.transport.mailbox(self.id)
        check = lambda: failures.outside_failure(rt, self, seq, op.desc, op.describe, watch)  # noqa: E731
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
            self.raise_failure(seq, e, (op.desc, op.describe) if explain else None)
        finally:
            mailbox.finish(seq)

    def raise_failure(self, seq: int, e: CollectiveError, operation: tuple[int, str] | None = None) -> None:
        """Operation ``seq`` failed here with ``e``: tell the members, and raise the error every
        member raises (the first cause recorded, or EvictedError when this rank was declared failed).
        ``operation`` (its hash and words, over sockets): a MismatchError is told in this rank's
        terms, its own operation and a differing peer's (failures.explain_mismatch)."""
        rt = self.runtime
        error = failures.first_cause(rt, self, seq, e)
        disagree = operation is not None and isinstance(error, MismatchError)
        if disagree:  # before the record: a member that reads it finds this rank's words
            failures.publish_operation(rt, self, seq, *operation)
        self._failed(seq, error)
        evicted = failures.evicted(rt, self)
        if evicted is not None:
            raise evicted from e
        if disagree:
            error = failures.explain_mismatch(rt, self, seq, error, *operation)
        if rt.auto_shrink and isinstance(error, (PeerFailure, CollectiveTimeout)):
            try:  # leave the group shrunk for the next call; this call still raises
                rt.shrink(self)
            except CollectiveError:
                pass
        if error is e:
            raise e
        raise error from e

    def _failed(self, seq: int, error: CollectiveError) -> None:
        """Tell the other members why: the coordinator's record (read by members that wait) and
        abort frames on every connection of the group (for members that are mid-operation)."""
        self.failed_operations += 1
        rt = self.runtime
        failures.record_abort(rt, self, seq, error)
        rt.transport.abort_group(self.id, seq, error)

    def scratch(self, count: int, dtype) -> np.ndarray:
        """A work array of ``count`` elements, kept for the next operation of the same shape (the
        group runs one operation at a time)."""
        s = self._scratch
        if s is None or s.size != count or s.dtype != dtype:
            s = self._scratch = np.empty(count, dtype)
        return s

    # ------------------------------------------------------------------ shared memory
    def local_path(self, timeout: float):
        """The group's shared-memory collectives (:class:`collcomm.runtime.local.LocalGroup`) when
        every member is on this machine, formed at the first call; None: the group runs over sockets."""
        if self._local is None:
            from collcomm.runtime import local

            if not local.eligible(self.runtime, self):
                self._local = False
                return None
            self._local = False  # while it forms, the group's own agreement runs over sockets
            self._local_generation += 1
            self._local = local.LocalGroup.form(self, self._local_generation, timeout) or False
            self.lane = self._local.lane if self._local else None
        return self._local or None

    def hierarchy_path(self, timeout: float):
        """For a group spanning machines with several members on some: its subgroups
        (:class:`collcomm.runtime.hierarchy.Hierarchy`), formed at the first allreduce; else None."""
        if self._hierarchy is None:
            from collcomm.runtime import hierarchy

            self._hierarchy = False
            if hierarchy.eligible(self.runtime, self):
                try:
                    self._hierarchy = hierarchy.Hierarchy.form(self.runtime, self, timeout)
                except BaseException:
                    self._hierarchy = None
                    raise
        return self._hierarchy or None

    def drop_local(self, local) -> None:
        """A shared-memory operation failed: its arena is dropped and the group goes on over
        sockets. (Members may disagree on whether the last operation failed, e.g. one timed out as
        the other finished; over sockets they agree again by the next failure at the latest. A
        group re-formed by shrink or grow gets an arena of its own.)"""
        if self._local is local:
            self._local = False
            self.lane = None
        local.close()

    def close(self) -> None:
        if self._local:
            self._local.close()
        self._local = False
        self.lane = None
        if self._hierarchy:
            self._hierarchy.close()
        self._hierarchy = False
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
