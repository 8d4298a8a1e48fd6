"""Detours: a TCP link whose path stopped carrying data sends through another member of the group.

A link whose path stopped carrying data (a frame lost MAX_LOST_RESENDS times over while the peer
answers, or the kernel's connection stuck in retransmission timeouts for DETOUR_AFTER seconds
while a probe waits) sends everything through another member of the group instead: each frame,
unchanged, inside a RELAY frame to that member, which passes it on to the peer on its own
connection (:class:`RelayForwarder`). The relay is a member with a live connection that is not
stuck, the one acknowledged most recently; what was not acknowledged is sent again through it.
The peer answers the same way once the first relayed frame reaches it (and stops reading the
direct connection, so no frame is taken twice), and the reliability of :mod:`.reliability`
(ACKs, probes, resends, the limit on losses) is end to end along the detour. A detour that
loses frames too is left for another relay; with none left, LinkFailure. The link stays on its
detour (the monitor sees the "detour" error and plans around the link).

Relayed frames travel on connections of their own, "relay channels", whose group id is the
group's with RELAY_BIT set: on a connection that also carried the relay's own frames, a frame of
the relay's next operation would hold up the relayed frames behind it until the receiver starts
that operation, which may wait for them.

:class:`LinkDetours` is the part of :class:`~collcomm.transport.tcp.link.Link` that does this; it
owns the state :meth:`LinkDetours._init_detours` sets up.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time

from collcomm.errors import CollectiveError, PeerFailure
from collcomm.transport import frames
from collcomm.transport.frames import (DATA, HEADER_SIZE, NO_CHECKSUM, RELAY, Header, ProtocolError, peek_kind,
                                       unpack_header, with_checksum)
from collcomm.transport.tcp.sockets import recv_exact
from collcomm.transport.telemetry import tcp_stalled_seconds

log = logging.getLogger("collcomm.transport")

DETOUR = os.environ.get("COLLCOMM_DETOUR", "1") != "0"
DETOUR_AFTER = float(os.environ.get("COLLCOMM_DETOUR_AFTER", "1.0"))
RELAY_CONNECT_SECONDS = 2.0  # a relaying rank waits this long for a connection onward
RELAY_BIT = 1 << 30  # collective groups are numbered far below it
MAX_RELAY_FRAME = HEADER_SIZE + (1 << 28)  # a relay holds each frame it passes on: no larger ones


class Held:
    """A relayed frame's payload, already read off the relay channel: what Link._frame reads from
    in place of a socket."""

    __slots__ = ("data", "at")

    def __init__(self, data: bytearray):
        self.data = memoryview(data)
        self.at = 0

    def recv_into(self, view, nbytes: int = 0) -> int:
        n = min(nbytes or len(view), len(self.data) - self.at)
        view[:n] = self.data[self.at:self.at + n]
        self.at += n
        return n


def relays_data(raw: bytes, payload) -> bool:
    """Whether a RELAY frame about to go out carries a DATA frame: the inner header follows the
    outer one in ``raw`` (this rank's own frame on a detour) or starts ``payload`` (one it passes on)."""
    inner = raw[HEADER_SIZE:] if len(raw) > HEADER_SIZE else payload
    return inner is not None and len(inner) >= HEADER_SIZE and frames.peek_kind(inner) == DATA


class LinkDetours:
    """Sending and answering through a relay, and relaying for others (see the module)."""

    def _init_detours(self) -> None:
        self.detour: LinkDetours | None = None  # the link (a tcp.link.Link) to the member that relays for this one
        self._relays_tried: set[int] = set()
        self._direct_stopped = False  # the direct connection is no longer read (see _arrived_by_detour)
        self._relayed_q: queue.SimpleQueue | None = None  # frames from the peer by a relay (see _relayed)
        self._relayed_lock = threading.Lock()

    def _unstick(self, rto: float) -> float | None:
        """The path is stuck (see _rto_check): the next relay, or, when the relay that carried this
        link left and no other member can, fail the link."""
        via = self.detour
        if self._try_detour("the connection is stuck: nothing acknowledged for "
                            f"{tcp_stalled_seconds((via or self).sock):.1f} s" if via is None or via.error is None
                            else f"the relay, rank {via.peer}, is gone"):
            return rto
        if via is not None and via.error is not None:
            # The member that relayed for this link left (it finished and exited, or died) and
            # no other can: as for a connection that broke, frames that left count as sent and
            # operations that still expect frames from the peer fail.
            failure = PeerFailure(f"lost the path to rank {self.peer}: its relay, rank {via.peer}, is gone "
                                  f"({via.error}) and no other member can relay", rank=self.peer)
            failure.while_receiving = True
            self._fail(failure)
            return None
        return rto

    def _path_stuck(self) -> bool:
        """Whether the path frames take now cannot carry them: the kernel's connection (this
        link's, or on a detour the relay's) has had data out and nothing acknowledged for
        DETOUR_AFTER seconds, or the relay's link failed."""
        via = self.detour
        if via is not None and via.error is not None:
            return True
        return tcp_stalled_seconds((via or self).sock) >= DETOUR_AFTER

    def _try_detour(self, why: str) -> bool:
        """Send through another member from now on (the next relay not tried yet: a live link of
        the group whose connection is not stuck, the most recently acknowledged first), sending
        again what was not acknowledged. False when there is none."""
        t = self.transport
        if self.group >= RELAY_BIT or self._closing or self.error is not None:
            return False  # point-to-point messages and relay channels do not take detours
        with t._cond:
            cands = [l for (p, g), l in t._links.items()
                     if g == self.group and p != self.peer and l.epoch == self.epoch and l.error is None
                     and not l._closing and l.detour is None and p not in self._relays_tried]
        cands = sorted((l for l in cands if tcp_stalled_seconds(l.sock) < DETOUR_AFTER),
                       key=lambda l: (-l._last_ack, l.peer))
        via = None
        for c in cands:
            self._relays_tried.add(c.peer)
            try:
                via = t.link(c.peer, self.group | RELAY_BIT, self.epoch, RELAY_CONNECT_SECONDS, relay=True)
                break
            except CollectiveError as e:
                log.info("rank %d: no relay channel to rank %d: %s", t.rank, c.peer, e)
        if via is None:
            return False
        with self._count_lock:
            self.detour = via
            self._probe = None  # it went the old way
            self._reset_rtt()  # another path, another round trip
            again = [e for e in self._pending.values() if e.tries >= 0]
            for e in again:
                e.lost = 0
        self._tx.record_error("detour")
        log.warning("rank %d: %s; sending to rank %d through rank %d from now on (%d frames again)",
                    t.rank, why, self.peer, via.peer, len(again))
        if again:
            self._tx.record_retransmit(len(again))
        for e in again:
            self._relay_entry(e)
        return True

    def _relay_entry(self, entry) -> None:
        """A DATA frame (a reliability.Pending) onto the detour (counted as written: the timer and
        probes follow it)."""
        with self._count_lock:
            if entry.tries < 0:
                return
            self._wseq += 1
            entry.written, entry.queued, entry.wseq, entry.sent_at = True, False, self._wseq, time.monotonic()
        self._relay_raw(entry.raw, entry.payload)  # collective frames only: never an eager one (see _try_detour)

    def _relay_raw(self, raw: bytes, payload) -> None:
        """A frame of this link, header and payload unchanged, inside a RELAY frame to the relay."""
        via = self.detour
        n = 0 if payload is None else len(payload)
        if len(raw) == HEADER_SIZE and peek_kind(raw) == DATA and not self.transport.auth_frames:
            if unpack_header(raw).flags & NO_CHECKSUM:  # sent unchecked on the Unix socket; a relay's hops may be wires
                raw = with_checksum(raw, payload)
        outer = Header(RELAY, via.group, via.epoch, self.peer, self.transport.rank, length=len(raw) + n).pack()
        via._enqueue_own(RELAY, outer + raw, payload)

    def _arrived_by_detour(self, via: LinkDetours) -> None:
        """A frame from the peer came through ``via``: answer the same way, and stop reading the
        direct connection first (no piece may arrive by two paths at once: a reduce-scatter piece
        lands in the peer's one scratch chunk)."""
        if self.detour is not via:
            with self._count_lock:
                first = self.detour is None
                self.detour = via
                self._probe = None
            if first:
                # The connection carries neither way now (TCP needs both): the monitor hears of it
                # from both ends and plans around the links of both directions.
                self._tx.record_error("detour")
            log.info("rank %d: rank %d sends through rank %d; answering the same way", self.transport.rank,
                     self.peer, via.peer)
        if not self._direct_stopped:
            self._direct_stopped = True
            self._break(self.sock)
            if self._receiver is not threading.current_thread():
                self._receiver.join(2.0)

    def _relay_in(self, header: Header, sock: socket.socket, heartbeat, me: int) -> None:
        """A RELAY frame read from this link: pass it on, or take the frame inside as the link to
        its origin would."""
        t = self.transport
        dst, origin, n = header.op, header.tree, header.length
        if n > MAX_RELAY_FRAME:
            raise ProtocolError(f"relay frame of {n} bytes exceeds {MAX_RELAY_FRAME}")
        # Read whole (a relay holds what it passes on; this channel carries the frames of every
        # member that relays through its peer to this rank, and must not wait on one of them, see
        # _relayed), and checked (frame MACs) before anything is done with it.
        frame = bytearray(n)
        recv_exact(sock, memoryview(frame))
        if not self._tail_ok(sock, frame):
            log.info("rank %d: a relayed frame from rank %d failed its MAC; dropped", t.rank, self.peer)
            return  # the origin's reliability layer sends it again
        if dst != me:
            t._forwarder.forward(origin, dst, self.group, self.epoch, frame)
            return
        inner = frames.unpack_header(memoryview(frame)[:HEADER_SIZE])
        if inner.kind == RELAY or inner.group != self.group & ~RELAY_BIT or inner.epoch != self.epoch or \
                inner.length != n - HEADER_SIZE:
            raise ProtocolError(f"rank {self.peer} relayed a malformed frame from rank {origin}")
        payload = memoryview(frame)[HEADER_SIZE:]
        with t._cond:
            target = t._links.get((origin, inner.group))
        if origin == me or target is None or target.epoch != self.epoch or target.error is not None:
            return  # nobody to take it: the origin's reliability layer notices
        heartbeat(origin, me)
        target._arrived_by_detour(self)
        target._relayed(inner, payload)

    def _relayed(self, header: Header, payload: bytearray) -> None:
        """A frame from the peer that came by a relay, taken in arrival order by a thread of this
        link's own, as the direct connection's receiver would: its operation may not have started
        here yet, and waiting for it on the relay channel would hold up the frames that other
        members relay through the same rank (two ranks relaying to a third through one member
        deadlocked so: each one's next operation waited behind the other's current one)."""
        with self._relayed_lock:
            if self._relayed_q is None:
                self._relayed_q = queue.SimpleQueue()
                threading.Thread(target=self._relayed_loop, args=(self._relayed_q,), daemon=True,
                                 name=f"collcomm-relayed-r{self.transport.rank}-g{self.group}-p{self.peer}").start()
        self._relayed_q.put((header, payload))

    def _relayed_loop(self, q: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            header, payload = item
            try:
                self._frame(header, Held(payload))
            except ProtocolError as e:
                self.transport.refusals.refused(f"rank {self.peer}", "malformed relayed frame",
                                                f"rank {self.transport.rank}: a frame relayed from rank "
                                                f"{self.peer}: {e}")
                self._fail(e)
            except Exception:  # pragma: no cover - a bug must not silently stop the peer's frames
                log.exception("rank %d: a frame relayed from rank %d", self.transport.rank, self.peer)


class RelayForwarder:
    """Passes relayed frames on, for the members that send through this rank."""

    def __init__(self, transport):
        self.transport = transport
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # frames this rank relays, in arrival order
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def forward(self, origin: int, dst: int, group: int, epoch: int, frame: bytearray) -> None:
        """Pass a relayed frame (``frame``: its header and payload) on to ``dst``, in arrival order,
        from a thread of its own: opening the connection onward must not hold up the receiver
        that read it (it carries this rank's own frames too)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name=f"collcomm-relay-r{self.transport.rank}")
                self._thread.start()
        self._queue.put((origin, dst, group, epoch, frame))

    def _loop(self) -> None:
        t = self.transport
        while not t._closed:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            origin, dst, group, epoch, frame = item
            try:
                link = t.link(dst, group, epoch, RELAY_CONNECT_SECONDS, relay=True)
            except CollectiveError as e:  # the origin's reliability layer finds the frame lost
                log.info("rank %d: cannot relay from rank %d to rank %d: %s", t.rank, origin, dst, e)
                continue
            outer = Header(RELAY, group, epoch, dst, origin, length=len(frame)).pack()
            link._enqueue_own(RELAY, outer, memoryview(frame))
