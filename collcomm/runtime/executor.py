"""The executor: runs the phases of a schedule over the transport. It is the only code
that walks a schedule.

The work buffer is split into shards, one per root (uneven shards allowed); each
root's shard is split among that root's trees by their exact shares, and each tree's
part is pipelined in chunks. For every chunk this rank knows its parent and children
in that tree, so the whole operation is a fixed set of events: frames to receive and
frames to send. All trees and chunks run at once:

* allgather (out-trees): the root sends its chunk to its children; a rank receives a
  chunk straight into the buffer (``recv_into``) and forwards that same view to its
  children;
* reduce-scatter (in-trees): a rank receives each child's chunk into a per-peer
  scratch chunk, reduces it into the buffer in place (NumPy ``out=``, GIL released),
  and once every child has arrived sends the chunk to its parent; at the root the
  chunk is final;
* allreduce: reduce-scatter, and as soon as a part of a rank's own shard is final
  the allgather pieces that carry it start.

The operation completes when every expected frame has arrived and every send has
left the buffer. Failures (a lost peer, a mismatch, a timeout) fail the operation on
this rank and are told to the peers.
"""

from __future__ import annotations

import heapq
import os
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np

from collcomm.errors import CollectiveError, MismatchError
from collcomm.runtime.operation import OperationEvents
from collcomm.schedules.ir import ALLGATHER, REDUCE_SCATTER, Schedule
from collcomm.transport import frames
from collcomm.transport.frames import Header

# DATA frames of one operation to one peer handed to the link and not yet acknowledged (see
# Operation._send): enough to keep the link busy (the ACK comes back one round trip after the
# frame arrived), few enough that a frame to forward is not queued behind many.
SEND_WINDOW = int(os.environ.get("COLLCOMM_SEND_WINDOW", "16"))
DEFAULT_CHUNK_BYTES = 1 << 20
_PHASE_SHIFT = 24
# Children of one piece reduce into the same slice from different receiver threads.
_STRIPES = [threading.Lock() for _ in range(64)]


@dataclass(frozen=True)
class Piece:
    """One chunk of one tree as this rank sees it (member indices, element offsets)."""

    phase: int
    tree: int
    chunk: int
    start: int
    stop: int
    root: int
    parent: int | None
    children: tuple[int, ...]

    @property
    def frame_tree(self) -> int:
        return (self.phase << _PHASE_SHIFT) | self.tree


def shard_layout(count: int, n: int) -> list[tuple[int, int]]:
    """(offset, size) of each member's shard of ``count`` elements: sizes differ by at most one."""
    base, extra = divmod(count, n)
    out, off = [], 0
    for r in range(n):
        size = base + (1 if r < extra else 0)
        out.append((off, size))
        off += size
    return out


def _progress(pieces: list[Piece]) -> dict[tuple[int, int], Fraction]:
    """How far into its tree each piece is: chunk c of a tree of n chunks at (c + 1/2) / n."""
    chunks: dict[int, int] = {}
    for pc in pieces:
        chunks[pc.frame_tree] = max(chunks.get(pc.frame_tree, 0), pc.chunk + 1)
    return {(pc.frame_tree, pc.chunk): Fraction(2 * pc.chunk + 1, 2 * chunks[pc.frame_tree]) for pc in pieces}


class ExecutionPlan:
    """The pieces of a schedule for one rank, one buffer layout and one chunk size."""

    def __init__(self, schedule: Schedule, me: int, shards: dict[int, tuple[int, int]], chunk_elems: int):
        index = {nid: i for i, nid in enumerate(schedule.compute_nodes)}
        self.phases: list[list[Piece]] = []
        self.kinds: list[str] = []
        self.peers: set[int] = set()
        self.priority: dict[tuple[int, int], tuple[Fraction, int]] = {}  # piece -> (progress, phase)
        for p, phase in enumerate(schedule.phases):
            pieces: list[Piece] = []
            cum: dict[int, Fraction] = {}
            for t, tree in enumerate(phase.trees):
                root = index[tree.root]
                if root not in shards:
                    continue
                off, size = shards[root]
                lo_frac = cum.get(root, Fraction(0))
                hi_frac = lo_frac + tree.share
                cum[root] = hi_frac
                lo = off + (lo_frac.numerator * size) // lo_frac.denominator
                hi = off + (hi_frac.numerator * size) // hi_frac.denominator
                if hi <= lo:
                    continue
                parent, children = None, []
                for e in tree.edges:
                    a, b = index[e.src], index[e.dst]
                    if phase.collective == ALLGATHER:
                        if b == me:
                            parent = a
                        if a == me:
                            children.append(b)
                    else:
                        if a == me:
                            parent = b
                        if b == me:
                            children.append(a)
                if parent is None and not children:
                    continue  # this rank is not in the tree (cannot happen for spanning trees)
                self.peers.update(children)
                if parent is not None:
                    self.peers.add(parent)
                for c, start in enumerate(range(lo, hi, chunk_elems)):
                    pieces.append(Piece(p, t, c, start, min(start + chunk_elems, hi), root, parent,
                                        tuple(children)))
            # Sends start, and wait for a free slot of a peer's window, in the order of how far
            # into its tree each piece is, not tree after tree: see Operation._send.
            progress = _progress(pieces)
            pieces.sort(key=lambda pc: (progress[(pc.frame_tree, pc.chunk)], pc.frame_tree))
            self.priority.update({k: (f, p) for k, f in progress.items()})
            self.phases.append(pieces)
            self.kinds.append(phase.collective)
        self.by_key = {(pc.frame_tree, pc.chunk): pc for phase in self.phases for pc in phase}
        self._count_events()
        self._link_phases()

    def _count_events(self) -> None:
        """What every operation on this plan waits for: frames in and out, per peer and per piece."""
        self.events = 0
        self.from_peer: dict[int, int] = {}  # frames to receive from each peer
        self.children_left: dict[tuple[int, int], int] = {}  # reduce-scatter pieces: children to hear from
        for kind, pieces in zip(self.kinds, self.phases):
            for pc in pieces:
                self.events += len(pc.children) + (0 if pc.parent is None else 1)
                senders = ([pc.parent] if pc.parent is not None else []) if kind == ALLGATHER else pc.children
                for peer in senders:
                    self.from_peer[peer] = self.from_peer.get(peer, 0) + 1
                if kind == REDUCE_SCATTER and pc.children:
                    self.children_left[(pc.frame_tree, pc.chunk)] = len(pc.children)

    def _link_phases(self) -> None:
        """For an allreduce: which final reduce-scatter pieces of this rank's shard each of its
        allgather pieces waits for (the two phases split the shard differently), so every
        allgather piece starts as soon as the part of the shard it carries is final."""
        rs = sorted((pc for kind, phase in zip(self.kinds, self.phases) if kind == REDUCE_SCATTER
                     for pc in phase if pc.parent is None), key=lambda pc: pc.start)
        ag = [pc for kind, phase in zip(self.kinds, self.phases) if kind == ALLGATHER
              for pc in phase if pc.parent is None]
        self.gates: dict[tuple[int, int], list[Piece]] = {}  # final RS piece -> AG pieces it opens
        self.gated: dict[tuple[int, int], int] = {}  # AG piece -> RS pieces it waits for
        starts = [pc.start for pc in rs]
        import bisect

        for a in ag:
            i = max(bisect.bisect_right(starts, a.start) - 1, 0)
            waits = 0
            while i < len(rs) and rs[i].start < a.stop:
                r = rs[i]
                if r.stop > a.start:
                    self.gates.setdefault((r.frame_tree, r.chunk), []).append(a)
                    waits += 1
                i += 1
            self.gated[(a.frame_tree, a.chunk)] = waits


class Operation(OperationEvents):
    """One collective on one group, as a set of frame events; implements the transport's Receiver."""

    def __init__(self, *, links: Callable[[int], object], member_of: Callable[[int], int], me: int, group: int,
                 epoch: int, op_seq: int,
                 desc: int, describe: str, work: np.ndarray, plan: ExecutionPlan,
                 reducer: Callable[[np.ndarray, np.ndarray], None] | None,
                 chained: bool, max_chunk_bytes: int):
        super().__init__(links=links, member_of=member_of, me=me, group=group, epoch=epoch, op_seq=op_seq,
                         desc=desc, describe=describe, events=plan.events, from_peer=plan.from_peer)
        self.work = work
        self.bytes = work.view(np.uint8)
        self.itemsize = work.dtype.itemsize
        self.plan = plan
        self.reducer = reducer
        self.chained = chained  # allreduce: allgather of a shard starts when its reduce-scatter is final
        self._scratch: dict[int, np.ndarray] = {}
        self._max_chunk = max_chunk_bytes
        self._children_left = dict(plan.children_left)
        self._gated = dict(plan.gated) if chained else {}
        self._window: dict[int, int] = {}  # peer -> frames handed to its link and not yet acknowledged
        self._backlog: dict[int, list] = {}  # peer -> heap of (priority, piece key, piece) waiting for a slot

    # ------------------------------------------------------------------ driving
    def start(self) -> None:
        """Send everything that needs no input; the rest follows from arriving frames."""
        if self._events == 0:
            self._done.set()
            return
        for kind, pieces in zip(self.plan.kinds, self.plan.phases):
            for pc in pieces:
                if kind == REDUCE_SCATTER and not pc.children and pc.parent is not None:
                    self._send(pc, pc.parent)
                elif kind == ALLGATHER and pc.parent is None and not (
                        self.chained and self.plan.gated.get((pc.frame_tree, pc.chunk))):
                    # Gated pieces go when their data is final (see delivered), which may be before start().
                    for child in pc.children:
                        self._send(pc, child)

    def _send(self, pc: Piece, peer: int) -> None:
        """Send ``pc`` to ``peer`` now if fewer than SEND_WINDOW of this operation's frames to that
        peer wait for their acknowledgement, else once a slot frees, pieces least far into their
        trees first.

        Why a window: the link is a FIFO (its queue, then the socket buffer), and a rank that
        both starts trees and forwards others' would put the chunks it forwards behind every
        chunk it queued at the start. When one connection carries several trees (a plan routed
        around a slow link shares every NIC between two to four), the forwarded trees then stall
        at the start and make the tail at the end. With a few frames in flight per peer and the
        rest ordered by progress, every tree advances at about the rate the plan gives it."""
        if self.error is not None:
            return  # a failed operation sends nothing more
        key = (pc.frame_tree, pc.chunk)
        with self._lock:
            if self._window.get(peer, 0) >= SEND_WINDOW:
                heapq.heappush(self._backlog.setdefault(peer, []), (self.plan.priority[key], key, pc))
                return
            self._window[peer] = self._window.get(peer, 0) + 1
        self._transmit(pc, peer)

    def _transmit(self, pc: Piece, peer: int) -> None:
        view = memoryview(self.bytes[pc.start * self.itemsize:pc.stop * self.itemsize])
        try:
            link = self._links(peer)
            header = frames.data_header(self.group, self.epoch, self.op_seq, pc.frame_tree, pc.chunk, self.desc,
                                        view, verified=link.payload_verified(view.nbytes))
            link.send(header, view, lambda: self._sent(peer))
        except CollectiveError as e:
            self.failed(e)

    def _sent(self, peer: int) -> None:
        """A frame to ``peer`` was acknowledged: its slot goes to the next piece waiting for one."""
        nxt = None
        with self._lock:
            heap = self._backlog.get(peer)
            if heap and self.error is None:
                nxt = heapq.heappop(heap)[2]
            else:
                self._window[peer] -= 1
        self._event_done()
        if nxt is not None:
            self._transmit(nxt, peer)

    # ------------------------------------------------------------------ receiving (transport calls these)
    def destination(self, header: Header, world_peer: int) -> memoryview:
        peer = self._member_of(world_peer)
        if header.desc != self.desc:  # (its words come from the coordinator: failures.explain_mismatch)
            raise MismatchError(f"rank {world_peer} runs another operation #{self.op_seq} than {self.describe}",
                                rank=world_peer)
        pc = self.plan.by_key.get((header.tree, header.chunk))
        nbytes = 0 if pc is None else (pc.stop - pc.start) * self.itemsize
        kind = None if pc is None else self.plan.kinds[pc.phase]
        expected_from = None if pc is None else (pc.parent if kind == ALLGATHER else pc.children)
        if pc is None or header.length != nbytes or \
                (peer != expected_from if kind == ALLGATHER else peer not in expected_from):
            raise MismatchError(f"rank {world_peer} sent an unexpected piece (tree {header.tree}, chunk "
                                f"{header.chunk}, {header.length} bytes) for {self.describe} #{self.op_seq}",
                                rank=world_peer)
        if kind == ALLGATHER:
            return memoryview(self.bytes[pc.start * self.itemsize:pc.stop * self.itemsize])
        scratch = self._scratch.get(peer)
        if scratch is None:
            scratch = self._scratch[peer] = np.empty(self._max_chunk, dtype=np.uint8)
        return memoryview(scratch[:nbytes])

    def delivered(self, header: Header, view: memoryview, world_peer: int) -> None:
        pc = self.plan.by_key[(header.tree, header.chunk)]
        if self.plan.kinds[pc.phase] == ALLGATHER:
            for child in pc.children:
                self._send(pc, child)
            self._event_done(pc.parent)
            return
        incoming = np.frombuffer(view, dtype=self.work.dtype)
        target = self.work[pc.start:pc.stop]
        key = (pc.frame_tree, pc.chunk)
        with _STRIPES[hash(key) % len(_STRIPES)]:
            self.reducer(target, incoming)
        opened: list[Piece] = []
        with self._lock:
            self._children_left[key] -= 1
            complete = self._children_left[key] == 0
            if complete and pc.parent is None:
                for a in self.plan.gates.get(key, ()) if self._gated else ():
                    akey = (a.frame_tree, a.chunk)
                    self._gated[akey] -= 1
                    if self._gated[akey] == 0:
                        opened.append(a)
        if complete and pc.parent is not None:
            self._send(pc, pc.parent)
        for a in opened:
            for child in a.children:
                self._send(a, child)
        self._event_done(self._member_of(world_peer))
