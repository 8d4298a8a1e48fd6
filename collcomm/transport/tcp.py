"""TCP transport: one authenticated connection per (peer, group), opened lazily and kept.

The transport moves frames between ranks and knows nothing of trees or reductions.
Each :class:`Link` has a sender thread that drains a queue of frames
(``sendmsg([header, payload])``, no concatenation of large payloads) and a receiver
thread that reads a header, asks the operation registered for that sequence number
where the payload goes (a view of the user's buffer or of a preallocated scratch
chunk), receives straight into it with ``recv_into`` and hands it over. The GIL is
released inside socket calls and NumPy reductions, so sending, receiving and
reducing overlap.

Every DATA frame is acknowledged (ACK) or, when its payload checksum fails, asked for again
(NACK, at most MAX_RETRANSMITS times): a corrupted payload is never delivered (never reduced,
never forwarded). A frame that is not acknowledged within the retransmission timeout is probed
for (PROBE/ECHO) and sent again if it was lost (at most MAX_LOST_RESENDS times, then LinkFailure).
A connection that breaks between two live ranks is opened again and what was not acknowledged
is sent again (see :class:`Link`). Answers (ACK, NACK, ECHO) that cannot go out at once take a
priority lane: the sender thread writes them before its next queued frame, so a peer's operation,
which completes on them, never waits behind this rank's own bulk sends. Each link records its traffic, errors,
retransmissions and the last time its peer was heard from in the transport's
:class:`~collcomm.transport.telemetry.LinkTelemetry`, and applies the faults of
:mod:`collcomm.faults.inject` (``COLLCOMM_FAULTS``) to what it sends.

Connections are per group so that two groups with overlapping members never wait on
each other's frames; frames of an operation a rank has not started yet stay in the
socket (TCP flow control holds the sender) until it starts, and frames of finished
(or failed) operations are discarded. Of each pair, the lower rank connects and the
higher rank accepts; both prove knowledge of the job token before any frame flows.
"""

from __future__ import annotations

import logging
import os
from collections import deque
import queue
import socket
import sys
import threading
import time
from typing import Callable

from collcomm.errors import (AuthenticationError, CollectiveError, CollectiveTimeout, CorruptionError, LinkFailure,
                             PeerFailure)
from collcomm.transport import frames
from collcomm.transport.frames import (ABORT, ACK, DATA, ECHO, HEADER_SIZE, NACK, PROBE, RELAY, Header, ProtocolError,
                                       abort_text, error_from_abort)
from collcomm.transport.interface import P2P_BASE, FaultPlan
from collcomm.transport.mailbox import GroupMailbox
from collcomm.transport.telemetry import LinkTelemetry, tcp_stalled_seconds

log = logging.getLogger("collcomm.transport")

SOCKET_BUFFER = 4 << 20
HANDSHAKE_TIMEOUT = 10.0  # client side: the peer is one of ours and may be busy (never past the operation's deadline)
SERVE_HANDSHAKE_TIMEOUT = 3.0  # server side: an unknown connection gets this long to prove itself
MAX_FRAME = 1 << 31  # larger frames are refused before anything is read
MAX_HANDSHAKES = 64  # pending handshakes per listener; beyond, the oldest is cut off
SMALL_PAYLOAD = 64 << 10
CLOSE_JOIN_SECONDS = 2.0  # close() waits this long in all for the transport's threads to end
CHECK_EVERY = 0.25  # seconds between looks at failures known elsewhere while waiting for a peer
MAX_RETRANSMITS = int(os.environ.get("COLLCOMM_MAX_RETRANSMITS", "5"))  # per piece, after checksum failures
# Lost frames (sent, never read by the peer: see Link._echoed). A link that loses a frame this many
# times over is given up (LinkFailure). Random loss at rate p loses one piece that often with
# probability p ** (MAX_LOST_RESENDS + 1): 2e-6 at p = 0.3.
MAX_LOST_RESENDS = int(os.environ.get("COLLCOMM_MAX_LOST_RESENDS", "10"))
# Retransmission timeout: how long a DATA frame may wait for its ACK before the sender probes for
# it; adaptive (RFC 6298: smoothed ACK round trip + 4 x its variation), within these bounds, and
# doubled (at most RTO_BACKOFF_LIMIT times) for each time the same frame was lost already.
RTO_MIN = float(os.environ.get("COLLCOMM_RTO_MIN", "0.02"))
RTO_MAX = float(os.environ.get("COLLCOMM_RTO_MAX", "0.5"))
RTO_INITIAL = 0.1
RTO_BACKOFF_LIMIT = 2
RECONNECT = os.environ.get("COLLCOMM_RECONNECT", "1") != "0"  # re-open a broken connection to a live peer
RECONNECT_SECONDS = float(os.environ.get("COLLCOMM_RECONNECT_SECONDS", "5"))  # the connecting side tries this long
# The accepting side waits this long for the peer to come back: a live peer reconnects within
# milliseconds of the break, so a longer silence means it is gone or is not one of ours.
RECONNECT_ACCEPT_SECONDS = float(os.environ.get("COLLCOMM_RECONNECT_ACCEPT_SECONDS", "1"))
# Detours (see Link): a link that loses data, or whose kernel connection is stuck in retransmission
# timeouts while a probe waits this many seconds for its answer, sends through another member.
DETOUR = os.environ.get("COLLCOMM_DETOUR", "1") != "0"
DETOUR_AFTER = float(os.environ.get("COLLCOMM_DETOUR_AFTER", "1.0"))
RELAY_CONNECT_SECONDS = 2.0  # a relaying rank waits this long for a connection onward
# Relayed frames travel on connections of their own, "relay channels", whose group id is the
# group's with this bit set (collective groups are numbered far below it): on a connection that
# also carried the relay's own frames, a frame of the relay's next operation would hold up the
# relayed frames behind it until the receiver starts that operation, which may wait for them.
RELAY_BIT = 1 << 30
MAX_RELAY_FRAME = HEADER_SIZE + (1 << 28)  # a relay holds each frame it passes on: no larger ones


class PeerClosed(ConnectionResetError):
    """The peer closed the connection (end of stream)."""


def error_kind(e: BaseException) -> str:
    """The telemetry label of a socket error: eof, reset, refused, timeout or error."""
    if isinstance(e, PeerClosed):
        return "eof"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(e, (socket.timeout, TimeoutError, CollectiveTimeout)):
        return "timeout"
    return "error"


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise PeerClosed("connection closed by peer")
        got += r


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:  # pragma: no cover - kernel limits
            pass


_ANSWERS = (0, b"", None, None, None)  # a send-queue item that only makes the sender write the priority lane


class _Pending:
    """A DATA frame sent and not yet acknowledged: what it takes to send it again. ``payload`` is
    a view of the operation's source region, never a copy (see :meth:`Link._nack` for why it is
    still valid when a retransmission is asked for)."""

    __slots__ = ("header", "raw", "payload", "done", "tries", "written", "eager", "queued", "wseq", "sent_at",
                 "lost")

    def __init__(self, header: Header, raw: bytes, payload, done, eager: bool = False):
        self.header, self.raw, self.payload, self.done = header, raw, payload, done
        self.tries = 0  # NACKs so far (checksum failures); -1: acknowledged or given up
        self.written = False  # handed to a socket at least once
        self.eager = eager  # ``done`` runs when it first left (point-to-point), not on its ACK
        self.queued = False  # waiting in the sender thread's queue (sent again, or not yet sent)
        self.wseq = 0  # the link's count of DATA writes when this one was last written
        self.sent_at = 0.0  # monotonic time of its last write
        self.lost = 0  # times the peer's ECHO showed it never arrived

    def left(self) -> None:
        """The frame went out whole: an eager frame's ``done`` runs now."""
        if self.eager and self.done is not None:
            done, self.done = self.done, None
            done()


class _Held:
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


def _relays_data(raw: bytes, payload) -> bool:
    """Whether a RELAY frame about to go out carries a DATA frame: the inner header follows the
    outer one in ``raw`` (this rank's own frame on a detour) or starts ``payload`` (one it passes on)."""
    inner = raw[HEADER_SIZE:] if len(raw) > HEADER_SIZE else payload
    return inner is not None and len(inner) >= HEADER_SIZE and frames.peek_kind(inner) == DATA


class Link:
    """One authenticated connection to ``peer`` for ``group``, with its sender and receiver threads.

    Reliability on top of the byte stream: every DATA frame is answered by the receiver with an
    ACK (its checksum held) or a NACK (it did not: the payload was discarded before anyone used
    it). The sender keeps each DATA frame (header and a view of its source, no copy) until it is
    acknowledged, resends it on a NACK (at most MAX_RETRANSMITS times, then the operation fails
    with CorruptionError on every rank), and reports the frame's ``done`` only on its ACK. When the
    connection breaks (reset, EOF) while both processes live, the lower rank connects again
    (the same handshake), the higher rank accepts, and every frame not yet acknowledged is sent
    again; the receiver drops what it already has (and acknowledges it again). A peer whose
    listener refuses connections is dead: PeerFailure, as before.

    Lost frames (a frame that was written and never reached the peer: ``drop`` fault injection,
    or any layer below that loses data without breaking the connection) are found without
    waiting for the operation's timeout: when the oldest unacknowledged frame has waited longer
    than the retransmission timeout (adaptive, see RTO_MIN), the transport's timer thread sends a
    PROBE behind it; the peer answers with an ECHO once it has read everything before the probe.
    The stream is in order and every DATA frame read is answered (ACK or NACK) before the probe
    is, so a frame written before the probe that is still neither acknowledged nor asked for again
    when the ECHO arrives was lost: it is sent again at once. A peer that is slow (it has not
    started the operation yet: its frames wait in the socket) or stopped simply answers late or
    never: nothing is resent, nothing fails, and the operation's own deadline rules (at most one
    probe is outstanding per link, so a stopped peer costs one 64-byte frame). A frame lost more
    than MAX_LOST_RESENDS times fails its operation with LinkFailure on every rank.

    Detours: before that, a link whose path stopped carrying data (a frame lost that many times
    while the peer answers, or the kernel's connection stuck in retransmission timeouts for
    DETOUR_AFTER seconds while a probe waits) sends everything through another member of the
    group instead: each frame, unchanged, inside a RELAY frame to that member, which passes it on
    to the peer on its own connection. The relay is a member with a live connection that is not
    stuck, the one acknowledged most recently; what was not acknowledged is sent again through
    it. The peer answers the same way once the first relayed frame reaches it (and stops reading
    the direct connection, so no frame is taken twice), and the reliability above (ACKs, probes,
    resends, the limit on losses) is end to end along the detour. A detour that loses frames too
    is left for another relay; with none left, LinkFailure as before. The link stays on its
    detour (the monitor sees the "detour" error and plans around the link)."""

    def __init__(self, transport: "TcpTransport", peer: int, group: int, epoch: int, sock: socket.socket):
        self.transport = transport
        self.peer, self.group, self.epoch = peer, group, epoch
        self.sock = sock
        _tune(sock)
        sock.settimeout(None)
        self.mailbox = transport.mailbox(group, peer)
        self._sendq: queue.SimpleQueue = queue.SimpleQueue()
        self._send_lock = threading.Lock()  # one frame at a time on the socket
        self._count_lock = threading.Lock()
        self._queued = 0  # frames handed to the sender thread and not yet sent
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._swapped = threading.Condition(self._lock)  # a new socket replaced a broken one
        self._closing = False
        me = transport.rank
        self._tx = transport.telemetry.link(me, peer)  # handles: no lookup on the hot path
        self._rx = transport.telemetry.link(peer, me)
        self._faults = transport.faults.for_link(me, peer) if transport.faults else None
        self._pending: dict[tuple[int, int, int], _Pending] = {}  # (op, tree, chunk) -> unacknowledged
        self._answers: deque = deque()  # ACK/NACK/ECHO frames waiting for the sender thread (see _control)
        self._resume: dict[tuple[int, int, int], tuple] = {}  # pieces to receive again -> (receiver, view)
        self._got: dict[int, set] = {}  # op -> (tree, chunk) received whole (duplicates after a reconnect)
        self.reconnects = 0
        self._wseq = 0  # DATA frames written so far (a frame's place in the stream)
        self._probe_seq = 0
        self._probe: tuple[int, int, float] | None = None  # outstanding PROBE: (number, _wseq when sent, time)
        self._srtt: float | None = None  # smoothed ACK round trip (RFC 6298)
        self._rttvar = 0.0
        self.rto = RTO_INITIAL
        self.lost_resends = 0
        self.detour: "Link | None" = None  # the link to the member that relays for this one
        self._relays_tried: set[int] = set()
        self._direct_stopped = False  # the direct connection is no longer read (see _arrived_by_detour)
        self._relayed_q: queue.SimpleQueue | None = None  # frames from the peer by a relay (see _relayed)
        self._relayed_lock = threading.Lock()
        self._got_lock = threading.Lock()  # a piece is taken once, whichever path it came by
        self._discard: bytearray | None = None
        self._last_ack = 0.0
        name = f"r{transport.rank}-g{group}-p{peer}"
        self._sender = threading.Thread(target=self._send_loop, name=f"collcomm-send-{name}", daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name=f"collcomm-recv-{name}", daemon=True)
        self._sender.start()
        self._receiver.start()

    @property
    def alive(self) -> bool:
        return self.error is None

    # ------------------------------------------------------------------ sending
    def send(self, header: Header, payload: memoryview | None = None,
             done: Callable[[], None] | None = None) -> None:
        """Send a frame; for a DATA frame of a collective ``done`` runs once the peer acknowledged
        it (its payload arrived whole: the source buffer is free again); for a point-to-point
        message once it left (the old eager semantics: a send does not wait for the matching
        receive to be posted; should it have to be sent again after the caller reused the buffer,
        the checksum of the first copy fails and the message is refused, never taken wrong).

        Small frames go out at once from the calling thread when nothing is queued (no
        thread hand-off on the latency path); the rest are queued for the sender thread."""
        if self.error is not None:
            raise self.error
        raw = header.pack()
        entry = None
        if header.kind == DATA:
            entry = _Pending(header, raw, payload, done, eager=self.group >= P2P_BASE)
            with self._count_lock:
                self._pending[(header.op, header.tree, header.chunk)] = entry
            done = None
            if not self.transport._rto_active:
                self.transport._rto_wake.set()
        if self.detour is not None:
            if entry is not None:
                self._relay_entry(entry)
                entry.left()
            else:
                self._relay_raw(raw, payload)
                if done is not None:
                    done()
            return
        small = payload is None or len(payload) <= SMALL_PAYLOAD
        if small and self._faults is None and self._queued == 0 and self._send_lock.acquire(blocking=False):
            sock = self.sock
            try:
                if entry is not None:
                    self._wseq += 1
                    entry.written, entry.wseq, entry.sent_at = True, self._wseq, time.monotonic()
                self._write(sock, header.kind, raw, payload)
            except OSError as e:
                self._send_lock.release()
                self._rx_error(e)
                self._break(sock)  # the receiver thread reconnects (or fails the link)
                return
            self._send_lock.release()
            if entry is not None:
                entry.left()
            elif done is not None:
                done()
            return
        with self._count_lock:
            self._queued += 1
            if entry is not None:
                entry.queued = True
        self._sendq.put((header.kind, raw, payload, done, entry))

    def _enqueue(self, kind: int, raw: bytes, payload=None, entry: _Pending | None = None) -> None:
        if self.detour is not None:
            if entry is not None:
                self._relay_entry(entry)
            else:
                self._relay_raw(raw, payload)
            return
        self._enqueue_own(kind, raw, payload, entry)

    def _enqueue_own(self, kind: int, raw: bytes, payload=None, entry: _Pending | None = None) -> None:
        """Onto this link's own connection, detour or not (a relay's frames)."""
        with self._count_lock:
            self._queued += 1
            if entry is not None:
                entry.queued = True
        self._sendq.put((kind, raw, payload, None, entry))

    def _control(self, kind: int, header: Header) -> None:
        """An ACK, NACK or ECHO for ``header``, from the receiver thread: never blocks on a full
        socket (two receivers blocked sending to each other would deadlock). When it cannot go out
        at once it takes the priority lane: the sender thread writes it before its next queued
        frame, not behind every DATA frame queued before it (the peer's operation completes on
        these ACKs). Answers keep their order among themselves, which is all PROBE/ECHO needs."""
        raw = Header(kind, self.group, self.epoch, header.op, header.tree, header.chunk).pack()
        if self.detour is not None:
            self._relay_raw(raw, None)
            return
        if self._faults is None and self._queued == 0 and self._send_lock.acquire(blocking=False):
            try:
                try:
                    sent = self.sock.send(raw, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                if sent == len(raw):
                    return
                if sent:  # rare: part of 64 bytes fitted; the rest must follow at once
                    self.sock.sendall(raw[sent:])
                    return
            except OSError:
                return  # the receiver thread finds the broken socket; the peer resends what it lacks
            finally:
                self._send_lock.release()
        self._answers.append(raw)
        with self._count_lock:
            self._queued += 1
        self._sendq.put(_ANSWERS)  # wakes the sender thread; it may find the lane emptied already

    def _write_answers(self, sock: socket.socket) -> None:
        """The priority lane onto the socket (the send lock held)."""
        answers = self._answers
        while answers:
            self._write(sock, ACK, answers.popleft(), None)

    def _write(self, sock: socket.socket, kind: int, raw: bytes, payload) -> None:
        """The frame onto the socket (the send lock held), with injected faults and telemetry."""
        if self.detour is not None and kind != RELAY:  # queued before the detour: it goes that way now
            self._relay_raw(raw, payload)
            return
        n = 0 if payload is None else len(payload)
        f = self._faults
        if f is not None:
            if kind == DATA or (kind == RELAY and _relays_data(raw, payload)):
                action = f.before_data(n, corrupt=kind == DATA)
                if action == "drop":
                    return
                if action == "corrupt":
                    payload = memoryview(f.corrupted(payload))
            cut = f.cut_after(HEADER_SIZE + n)
            if cut is not None:
                sock.sendall((raw + (bytes(payload) if n else b""))[:cut])
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise ConnectionResetError("connection cut by fault injection")
        if n == 0:
            sock.sendall(raw)
        elif n <= SMALL_PAYLOAD:
            sock.sendall(raw + bytes(payload))
            self._tx.record_bytes(n, sock if kind in (DATA, RELAY) else None)
        else:
            t0 = time.perf_counter()
            sent = sock.sendmsg([raw, payload])
            if sent < len(raw):
                sock.sendall(raw[sent:])
                sent = len(raw)
            if sent - len(raw) < n:
                sock.sendall(payload[sent - len(raw):])
            self._tx.record_transfer(n, time.perf_counter() - t0, sock)

    def _send_loop(self) -> None:
        while True:
            item = self._sendq.get()
            if item is None:
                return
            kind, raw, payload, done, entry = item
            with self._send_lock:
                sock = self.sock
                try:
                    write = kind != 0  # _ANSWERS: only the priority lane
                    if entry is not None:
                        # Counted as written before anything goes out: should the connection break
                        # (here or while the lane is written), a reconnect sends it again.
                        entry.queued = False
                        if entry.tries < 0:  # acknowledged or given up meanwhile
                            write = False
                        else:
                            self._wseq += 1
                            entry.written, entry.wseq, entry.sent_at = True, self._wseq, time.monotonic()
                    if self._answers:
                        self._write_answers(sock)
                    if write:
                        self._write(sock, kind, raw, payload)
                    ok = True
                except OSError as e:
                    ok = False
                    error = e
            with self._count_lock:
                self._queued -= 1
            if not ok:
                if self.detour is not None:
                    continue  # the direct connection was given up; what did not make it goes the detour
                self._rx_error(error)
                self._break(sock)
                if not self._await_new_socket(sock):
                    return
                continue  # a DATA frame that did not make it is resent with the other unacknowledged ones
            if done is not None or entry is not None:
                try:
                    if entry is not None:
                        entry.left()
                    else:
                        done()
                except BaseException as e:  # a callback failed: the operation reports it
                    self._fail(e)
                    return

    # ------------------------------------------------------------------ acknowledgements
    def _acked(self, header: Header) -> None:
        with self._count_lock:
            entry = self._pending.pop((header.op, header.tree, header.chunk), None)
        self._last_ack = time.monotonic()
        if entry is None:
            return
        if entry.tries == 0 and entry.lost == 0 and entry.written:  # Karn: only frames sent once
            self._rtt_sample(time.monotonic() - entry.sent_at)
        entry.tries = -1
        if entry.done is not None:
            entry.done()

    def _nack(self, header: Header) -> None:
        """The peer's copy of a piece failed its checksum: send it again from the same source.

        The source region is still valid: a DATA frame's ``done`` (which lets the operation finish
        and the user reuse the buffer) waits for its ACK, and within an allreduce the region a
        reduce-scatter piece was sent from is overwritten by the allgather only after the final
        value arrived, which needs this piece accepted by the parent first (the parent NACKs
        before it reduces, and reduces before it sends anything on); allgather pieces are
        written once and then only read (forwarded)."""
        key = (header.op, header.tree, header.chunk)
        with self._count_lock:
            entry = self._pending.get(key)
            if entry is not None:
                entry.tries += 1
                give_up = entry.tries > MAX_RETRANSMITS
                if give_up:
                    del self._pending[key]
        if entry is None:
            return  # acknowledged or abandoned meanwhile
        if give_up:
            entry.tries = -1
            self._give_up(header.op, CorruptionError(
                f"a piece of operation #{header.op} (tree {header.tree}, chunk {header.chunk}) sent to rank "
                f"{self.peer} failed its checksum {MAX_RETRANSMITS + 1} times", rank=self.peer))
            return
        self._tx.record_retransmit()
        self._enqueue(DATA, entry.raw, entry.payload, entry)

    def _give_up(self, op: int, error: CollectiveError) -> None:
        """Fail operation ``op`` here and on the peer (and through them, on every member)."""
        receiver = self.mailbox.current(op)
        if receiver is not None:
            receiver.failed(error)
        self.abort(op, error)

    # ------------------------------------------------------------------ lost frames
    def _rtt_sample(self, rtt: float) -> None:
        """RFC 6298's estimator, from an ACK (or ECHO) round trip; sets the retransmission timeout."""
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar += 0.25 * (abs(self._srtt - rtt) - self._rttvar)
            self._srtt += 0.125 * (rtt - self._srtt)
        self.rto = min(max(self._srtt + 4 * self._rttvar, RTO_MIN), RTO_MAX)

    def _rto_check(self, now: float) -> float | None:
        """From the transport's timer thread: probe when the oldest frame sent and not acknowledged
        has waited longer than the retransmission timeout. Returns how long until the next look
        (None: nothing is waiting for an acknowledgement). Never blocks."""
        if not self._pending or self.error is not None or self._closing:
            return None
        rto = self.rto
        with self._count_lock:
            if not self._pending:
                return None
            probe = self._probe
            if probe is None:
                due = None
                for e in self._pending.values():
                    if e.written and not e.queued and e.tries >= 0:
                        d = e.sent_at + rto * (1 << min(e.lost, RTO_BACKOFF_LIMIT))
                        if due is None or d < due:
                            due = d
                if due is None:
                    return rto  # everything still waits for the sender thread
                if now < due:
                    return due - now
                self._probe_seq = (self._probe_seq + 1) & 0xFFFFFFFF
                self._probe = (self._probe_seq, self._wseq, now)
                number = self._probe_seq
        if probe is not None:
            # An answer is due; a peer that is slow or stopped gets no more probes. But when the
            # path itself is stuck (the kernel retransmits into the void, or the relay is gone),
            # the frames take a detour.
            if DETOUR and now - probe[2] >= DETOUR_AFTER and self._path_stuck():
                return self._unstick(rto)
            return rto
        # Every frame counted in _wseq now was written before this probe is (it is queued behind).
        self._enqueue(PROBE, Header(PROBE, self.group, self.epoch, 0, 0, number).pack())
        return rto

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

    def _count_lost(self, lost: list[_Pending], give_up: list[_Pending]) -> None:
        """(Count lock held.) One more loss for each of ``lost``: sent again, or, past
        MAX_LOST_RESENDS, given up (into ``give_up``). Frames settled meanwhile are skipped."""
        for e in lost:
            if e.tries < 0:
                continue
            e.lost += 1
            if e.lost > MAX_LOST_RESENDS:
                give_up.append(e)
                self._pending.pop((e.header.op, e.header.tree, e.header.chunk), None)
                e.tries = -1
            else:
                e.queued = True

    def _echoed(self, header: Header) -> None:
        """The peer read everything sent before our probe: what it has not answered was lost."""
        give_up: list[_Pending] = []
        with self._count_lock:
            probe = self._probe
            if probe is None or probe[0] != header.chunk:
                return  # a probe of a connection that was replaced
            self._probe = None
            _, mark, sent = probe
            lost = [e for e in self._pending.values()
                    if e.written and not e.queued and e.tries >= 0 and e.wseq <= mark]
            detour = DETOUR and any(e.lost + 1 > MAX_LOST_RESENDS for e in lost)
            if not detour:
                self._count_lost(lost, give_up)
        if detour:
            # The path loses what it is given while the peer answers: another path, if there is
            # one, before giving up (a frame over the limit gets MAX_LOST_RESENDS more tries there).
            if self._try_detour(f"a frame to rank {self.peer} was lost {MAX_LOST_RESENDS + 1} times"):
                return
            with self._count_lock:
                self._count_lost(lost, give_up)
        self._rtt_sample(time.monotonic() - sent)
        failed_ops: set[int] = set()
        for e in give_up:
            h = e.header
            if h.op not in failed_ops:
                failed_ops.add(h.op)
                self._give_up(h.op, LinkFailure(
                    f"the link from rank {self.transport.rank} to rank {self.peer} loses data: a piece of operation "
                    f"#{h.op} (tree {h.tree}, chunk {h.chunk}) was lost {MAX_LOST_RESENDS + 1} times while rank "
                    f"{self.peer} kept answering; check that link (and COLLCOMM_FAULTS)", rank=self.peer))
        resend = [e for e in lost if e.tries >= 0]
        if resend:
            self.lost_resends += len(resend)
            self._tx.record_retransmit(len(resend))
            log.debug("rank %d: %d frames to rank %d were lost; sending them again", self.transport.rank,
                      len(resend), self.peer)
        for e in resend:
            if self.detour is not None:
                self._relay_entry(e)
                continue
            with self._count_lock:
                self._queued += 1
            self._sendq.put((DATA, e.raw, e.payload, None, e))

    # ------------------------------------------------------------------ detours
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
            self._srtt, self._rttvar, self.rto = None, 0.0, RTO_INITIAL  # another path, another round trip
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

    def _relay_entry(self, entry: _Pending) -> None:
        """A DATA frame onto the detour (counted as written: the timer and probes follow it)."""
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
        outer = Header(RELAY, via.group, via.epoch, self.peer, self.transport.rank, length=len(raw) + n).pack()
        via._enqueue_own(RELAY, outer + raw, payload)

    def _arrived_by_detour(self, via: "Link") -> None:
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
        if dst != me:
            buf = bytearray(n)
            recv_exact(sock, memoryview(buf))
            t._forward(origin, dst, self.group, self.epoch, buf)
            return
        raw = bytearray(HEADER_SIZE)
        recv_exact(sock, memoryview(raw))
        inner = frames.unpack_header(raw)
        if inner.kind == RELAY or inner.group != self.group & ~RELAY_BIT or inner.epoch != self.epoch or \
                inner.length != n - HEADER_SIZE:
            raise ProtocolError(f"rank {self.peer} relayed a malformed frame from rank {origin}")
        # Read whole: this channel carries the frames of every member that relays through its
        # peer to this rank, and must not wait on one of them (see Link._relayed).
        payload = bytearray(inner.length)
        recv_exact(sock, memoryview(payload))
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
                self._frame(header, _Held(payload))
            except ProtocolError as e:
                log.warning("rank %d: a frame relayed from rank %d: %s", self.transport.rank, self.peer, e)
                self._fail(e)
            except Exception:  # pragma: no cover - a bug must not silently stop the peer's frames
                log.exception("rank %d: a frame relayed from rank %d", self.transport.rank, self.peer)

    # ------------------------------------------------------------------ receiving
    def _recv_loop(self) -> None:
        raw = bytearray(HEADER_SIZE)
        view = memoryview(raw)
        heartbeat = self.transport.telemetry.heartbeat
        me = self.transport.rank
        while True:
            sock = self.sock
            try:
                self._receive(sock, view, raw, heartbeat, me)
                return
            except ProtocolError as e:
                log.warning("rank %d: closing connection from rank %d: %s", self.transport.rank, self.peer, e)
                self._fail(e)
                return
            except CollectiveError as e:
                self._fail(e)
                return
            except OSError as e:
                if self.detour is not None:
                    return  # the direct connection was given up for a detour (see _arrived_by_detour)
                self._rx_error(e, receiving=True)
                failure = self._reconnect(sock, e)
                if failure is None:
                    continue
                failure.while_receiving = True  # operations that expect nothing more from this peer carry on
                self._fail(failure)
                return
            except BaseException as e:  # pragma: no cover - a bug in a receiver callback
                log.exception("rank %d: receiver for rank %d failed", self.transport.rank, self.peer)
                self._fail(e)
                return

    def _receive(self, sock: socket.socket, view: memoryview, raw: bytearray, heartbeat, me: int) -> None:
        while True:
            recv_exact(sock, view)
            header = frames.unpack_header(view)
            if header.group != self.group or header.epoch != self.epoch:
                raise ProtocolError(f"frame for group {header.group} epoch {header.epoch} on a connection of "
                                    f"group {self.group} epoch {self.epoch}")
            if header.length > MAX_FRAME:
                raise ProtocolError(f"frame of {header.length} bytes exceeds {MAX_FRAME}")
            heartbeat(self.peer, me)
            if (header.kind == RELAY) != (self.group >= RELAY_BIT and self.group < P2P_BASE):
                raise ProtocolError(f"{'relay' if header.kind == RELAY else 'kind'} {header.kind} frame on a "
                                    f"{'relay channel' if self.group >= RELAY_BIT else 'connection'} of group "
                                    f"{self.group}")
            if header.kind == RELAY:
                self._relay_in(header, sock, heartbeat, me)
            else:
                self._frame(header, sock)

    def _frame(self, header: Header, sock: socket.socket) -> None:
        """One frame from the peer, its payload still to read from ``sock`` (this link's
        connection, or a relay's: see _relay_in)."""
        kind = header.kind
        rx = self._rx
        if kind == ACK:
            self._acked(header)
            return
        if kind == NACK:
            self._nack(header)
            return
        if kind == PROBE:
            self._control(ECHO, header)
            return
        if kind == ECHO:
            self._echoed(header)
            return
        if kind == ABORT:
            text = bytearray(header.length)
            recv_exact(sock, memoryview(text))
            for key in [k for k in self._resume if k[0] == header.op]:
                del self._resume[key]
            self.mailbox.abort(header.op, error_from_abort(text.decode(errors="replace"), self.peer))
            return
        op = header.op
        key = (op, header.tree, header.chunk)
        again = self._resume.pop(key, None)
        if again is not None and self.mailbox.current(op) is again[0] and len(again[1]) == header.length:
            receiver, dest = again
        else:
            got = self._got.get(op)
            if got is not None and (header.tree, header.chunk) in got:  # a duplicate (reconnect, detour)
                self._skip(sock, header.length)
                self._control(ACK, header)
                return
            receiver = self.mailbox.receiver_for(op)
            if receiver is None:  # stale frame of a finished or failed operation
                self._skip(sock, header.length)
                self._control(ACK, header)
                return
            try:
                dest = receiver.destination(header, self.peer)
            except CollectiveError as e:  # ranks disagree: fail the operation, keep the stream whole
                receiver.failed(e)
                self.abort(op, e)
                self._skip(sock, header.length)
                self._control(ACK, header)
                return
        n = header.length
        try:
            if n > SMALL_PAYLOAD and not isinstance(sock, _Held):  # (a relayed one was read already)
                t0 = time.perf_counter()
                recv_exact(sock, dest)
                rx.record_transfer(n, time.perf_counter() - t0)
            else:
                recv_exact(sock, dest)
                rx.record_bytes(n)
        except OSError:
            self._resume[key] = (receiver, dest)  # the piece comes again after a reconnect
            raise
        if frames.checksum(dest) != header.checksum:
            # Never used: not delivered (so never reduced, never forwarded); where it landed in
            # the user's buffer (a copy), the retransmission overwrites it.
            log.info("rank %d: payload checksum mismatch from rank %d (op %d, tree %d, chunk %d); "
                     "asking for it again", self.transport.rank, self.peer, op, header.tree, header.chunk)
            rx.record_error("checksum")
            self._resume[key] = (receiver, dest)
            self._control(NACK, header)
            return
        with self._got_lock:
            got = self._got.get(op)
            if got is None:
                got = self._got[op] = set()
                if len(self._got) > 64:  # forget finished operations
                    floor = self.mailbox.floor
                    for old in [o for o in self._got if o < floor]:
                        del self._got[old]
                    for old in [k for k in self._resume if k[0] < floor]:
                        del self._resume[old]
            duplicate = (header.tree, header.chunk) in got
            got.add((header.tree, header.chunk))
        self._control(ACK, header)
        if not duplicate:
            receiver.delivered(header, dest, self.peer)

    def _skip(self, sock: socket.socket, length: int) -> None:
        """Read and drop ``length`` payload bytes (a frame nobody takes)."""
        scratch = self._discard
        if scratch is None:
            scratch = self._discard = bytearray(1 << 16)
        left = length
        while left:
            part = memoryview(scratch)[:min(left, len(scratch))]
            recv_exact(sock, part)
            left -= len(part)

    # ------------------------------------------------------------------ broken connections
    def _rx_error(self, e: BaseException, receiving: bool = False) -> None:
        """Count a socket error on the link (the receiving direction when it broke while reading)."""
        if not self._closing:
            (self._rx if receiving else self._tx).record_error(error_kind(e))

    def _break(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # the receiver thread wakes up and reconnects
        except OSError:
            pass

    def _await_new_socket(self, old: socket.socket | None) -> bool:
        """The sender thread after a failed write: wait until the receiver thread replaced the
        socket (True) or gave the link up (False)."""
        with self._swapped:
            while self.sock is old and self.error is None and not self._closing:
                self._swapped.wait(0.5)
            return self.error is None and not self._closing

    def _reconnect(self, old: socket.socket, cause: BaseException) -> CollectiveError | None:
        """After the connection broke: a new one (None) or the failure to report."""
        lost = PeerFailure(f"lost connection to rank {self.peer}: {cause.__class__.__name__}: {cause}",
                           rank=self.peer)
        if self._closing or self.transport._closed or not RECONNECT or self.error is not None:
            return lost
        with self.transport._cond:
            if self.transport._links.get((self.peer, self.group)) is not self:
                return lost
        self._break(old)
        t = self.transport
        deadline = time.monotonic() + (RECONNECT_SECONDS if t.rank < self.peer else RECONNECT_ACCEPT_SECONDS)
        try:
            if t.rank < self.peer:
                sock = t._connect(self.peer, self.group, self.epoch, deadline, reconnect=True)
            else:
                sock = t._wait_accepted(self.peer, self.group, self.epoch, deadline, check=self._peer_gone)
        except CollectiveError as e:
            if isinstance(e, CollectiveTimeout):
                self._tx.record_error("timeout")
            log.info("rank %d: could not reconnect to rank %d: %s", t.rank, self.peer, e)
            return PeerFailure(f"lost connection to rank {self.peer} ({cause.__class__.__name__}) and could not "
                               f"reconnect: {e}", rank=self.peer)
        _tune(sock)
        sock.settimeout(None)
        with self._send_lock:
            with self._lock:
                if self._closing or self.error is not None:
                    sock.close()
                    return lost
                self.sock = sock
                self.reconnects += 1
                self._swapped.notify_all()
            try:
                old.close()
            except OSError:
                pass
            with self._count_lock:
                again = [e for e in self._pending.values() if e.written and e.tries >= 0]
                self._probe = None  # it went out on the old connection
        log.info("rank %d: reconnected to rank %d; sending %d unacknowledged frames again", t.rank, self.peer,
                 len(again))
        if again:
            self._tx.record_retransmit(len(again))
        for e in again:
            self._enqueue(DATA, e.raw, e.payload, e)
        return None

    def _peer_gone(self) -> BaseException | None:
        """While waiting to be connected again: is anything still listening where the peer did?"""
        peer = self.transport._peers.get(self.peer)
        if peer is None:
            return None
        host, port, local = peer
        try:
            probe = TcpTransport._open(host, port, local, time.monotonic() + 1.0)
        except ConnectionRefusedError:
            self._tx.record_error("refused")
            return PeerFailure(f"rank {self.peer} is gone (nothing listens at {host}:{port})", rank=self.peer)
        except OSError:
            return None
        probe.close()
        return None

    # ------------------------------------------------------------------ failure
    def abort(self, op: int, error: BaseException) -> None:
        """Tell the peer that operation ``op`` failed here: an abort frame, queued behind whatever
        is being sent (so the stream stays whole), never blocking the caller."""
        if self.error is not None:
            return
        text = abort_text(error).encode()[:frames.MAX_ABORT_BYTES]
        with self._count_lock:
            for key in [k for k in self._pending if k[0] == op]:
                self._pending.pop(key).tries = -1
        self._enqueue(ABORT, Header(ABORT, self.group, self.epoch, op, length=len(text)).pack(), memoryview(text))

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = error
            self._swapped.notify_all()
        self.transport._forget(self)
        # Frames that left in full count as sent, as they did before acknowledgements existed: a
        # peer that finished and closed may not have had the time to acknowledge them.
        with self._count_lock:
            written = [e for e in self._pending.values() if e.written and e.tries >= 0]
            self._pending.clear()
        for e in written:
            e.tries = -1
            if e.done is not None:
                try:
                    e.done()
                except BaseException:  # pragma: no cover - the operation fails below anyway
                    pass
        self.mailbox.fail_all(error)
        self.close()

    def close(self) -> None:
        self._closing = True
        sock = self.sock
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        self._sendq.put(None)
        with self._relayed_lock:
            if self._relayed_q is not None:
                self._relayed_q.put(None)
        if self.error is None:
            self.error = PeerFailure(f"connection to rank {self.peer} was closed", rank=self.peer)
        with self._lock:
            self._swapped.notify_all()

    def join(self, deadline: float) -> None:
        """Wait (until the monotonic ``deadline``) for this link's threads to end after close()."""
        for t in (self._sender, self._receiver):
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))


class TcpTransport:
    """Listens for peers, authenticates them, and hands out one :class:`Link` per (peer, group)."""

    def __init__(self, rank: int, token: bytes | str, host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None, telemetry: LinkTelemetry | None = None,
                 faults: FaultPlan | None = None):
        self.rank = rank
        self.telemetry = telemetry if telemetry is not None else LinkTelemetry(rank)
        self.faults = faults  # injected faults (the runtime passes collcomm.faults.inject's active plan)
        self.token = token.encode() if isinstance(token, str) else bytes(token)
        self._listener = socket.create_server((host, port), backlog=128)
        self._listener.settimeout(None)
        bound = self._listener.getsockname()
        self.address = f"{advertise_host or bound[0]}:{bound[1]}"
        # Ranks on the same machine (and network namespace) also meet on an abstract Unix socket:
        # the same frames and handshake, without the TCP/IP stack on loopback.
        self._local_listener = None
        if sys.platform.startswith("linux") and os.environ.get("COLLCOMM_TRANSPORT", "auto") != "tcp":
            name = "collcomm-" + os.urandom(8).hex()
            local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            local.bind("\0" + name)
            local.listen(128)
            self._local_listener = local
            self.address += f"#@{name}"
        self._peers: dict[int, tuple[str, int, str | None]] = {}
        self._cond = threading.Condition()
        self._accepted: dict[tuple[int, int], tuple[int, socket.socket]] = {}
        self._links: dict[tuple[int, int], Link] = {}
        self._opening: dict[tuple[int, int], threading.Lock] = {}
        self._mailboxes: dict[tuple[int, int | None], GroupMailbox] = {}
        self._forwards: queue.SimpleQueue = queue.SimpleQueue()  # frames this rank relays, in arrival order
        self._forwarder: threading.Thread | None = None
        self._closed = False
        # The retransmission timer: one thread for all links, idle while no frame awaits an ACK.
        self._rto_active = False  # the timer is looking at the links (a new frame need not wake it)
        self._rto_wake = threading.Event()
        self._rto_thread = threading.Thread(target=self._rto_loop, daemon=True, name=f"collcomm-rto-r{rank}")
        self._rto_thread.start()
        self._acceptors = [threading.Thread(target=self._accept_loop, args=(listener,), daemon=True,
                                            name=f"collcomm-accept-r{rank}")
                           for listener in filter(None, (self._listener, self._local_listener))]
        for t in self._acceptors:
            t.start()

    # ------------------------------------------------------------------ peers and mailboxes
    def set_peers(self, table: dict[int, str]) -> None:
        """Peer addresses as registered: "host:port", optionally followed by "#@unix-name"."""
        for r, addr in table.items():
            tcp, _, local = addr.partition("#@")
            host, _, port = tcp.rpartition(":")
            self._peers[int(r)] = (host, int(port), local or None)

    def mailbox(self, group: int, peer: int | None = None) -> GroupMailbox:
        """The mailbox of a group; point-to-point groups (>= P2P_BASE) have one per peer, since each
        pair of ranks numbers its messages on its own."""
        key = (group, peer if group >= P2P_BASE else None)
        with self._cond:
            box = self._mailboxes.get(key)
            if box is None:
                box = self._mailboxes[key] = GroupMailbox(group)
            return box

    # ------------------------------------------------------------------ links
    def link(self, peer: int, group: int, epoch: int, timeout: float,
             check: Callable[[], BaseException | None] | None = None, relay: bool = False) -> Link:
        """The connection to ``peer`` for ``group``: kept, or opened now (the lower rank connects;
        ``relay``: a relay channel, opened by this rank whichever is lower, and taken by the peer
        at once, see _serve_handshake).

        While it waits for the peer, ``check`` (called about every quarter second) may report a
        failure known elsewhere (a dead member), which is then raised at once."""
        if peer == self.rank:
            raise ValueError("a rank does not link to itself")
        key = (peer, group)
        with self._cond:
            existing = self._links.get(key)
            if existing is not None and existing.alive and existing.epoch == epoch:
                return existing
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:  # one thread opens a link; the others wait for it
            with self._cond:
                existing = self._links.get(key)
                if existing is not None and existing.alive and existing.epoch == epoch:
                    return existing
            deadline = time.monotonic() + timeout
            if relay:
                sock = self._connect(peer, group, epoch, deadline, check, relay=True)
            elif self.rank < peer:
                sock = self._connect(peer, group, epoch, deadline, check)
            else:
                sock = self._wait_accepted(peer, group, epoch, deadline, check)
            return self._adopt(peer, group, epoch, sock)

    # ------------------------------------------------------------------ relaying for others
    def _forward(self, origin: int, dst: int, group: int, epoch: int, frame: bytearray) -> None:
        """Pass a relayed frame (``frame``: its header and payload) on to ``dst``, in arrival order,
        from a thread of its own: opening the connection onward must not hold up the receiver
        that read it (it carries this rank's own frames too)."""
        with self._cond:
            if self._forwarder is None or not self._forwarder.is_alive():
                self._forwarder = threading.Thread(target=self._forward_loop, daemon=True,
                                                   name=f"collcomm-relay-r{self.rank}")
                self._forwarder.start()
        self._forwards.put((origin, dst, group, epoch, frame))

    def _forward_loop(self) -> None:
        while not self._closed:
            try:
                item = self._forwards.get(timeout=1.0)
            except queue.Empty:
                continue
            origin, dst, group, epoch, frame = item
            try:
                link = self.link(dst, group, epoch, RELAY_CONNECT_SECONDS, relay=True)
            except CollectiveError as e:  # the origin's reliability layer finds the frame lost
                log.info("rank %d: cannot relay from rank %d to rank %d: %s", self.rank, origin, dst, e)
                continue
            outer = Header(RELAY, group, epoch, dst, origin, length=len(frame)).pack()
            link._enqueue_own(RELAY, outer, memoryview(frame))

    def _adopt(self, peer: int, group: int, epoch: int, sock: socket.socket) -> Link:
        link = Link(self, peer, group, epoch, sock)
        with self._cond:
            old = self._links.get((peer, group))
            self._links[(peer, group)] = link
            self._cond.notify_all()
        if old is not None and old is not link:
            old.close()
        return link

    def _rto_loop(self) -> None:
        """Look at every link's oldest unacknowledged frame when its retransmission timeout is due
        (Link._rto_check); sleep on ``_rto_wake`` while no link has one."""
        while not self._closed:
            self._rto_wake.wait()
            self._rto_wake.clear()
            self._rto_active = True
            idle_checks = 0
            while not self._closed:
                with self._cond:
                    links = list(self._links.values())
                now = time.monotonic()
                wait = None
                for link in links:
                    try:
                        w = link._rto_check(now)
                    except Exception:  # pragma: no cover - a bug must not stop the timer of every link
                        log.exception("rank %d: retransmission timer of the link to rank %d", self.rank, link.peer)
                        w = None
                    if w is not None and (wait is None or w < wait):
                        wait = w
                if wait is None:
                    # Nothing awaits an ACK. Go idle, then look once more: a frame sent just before
                    # the flag dropped did not wake us.
                    idle_checks += 1
                    if idle_checks == 1:
                        self._rto_active = False
                        continue
                    break
                idle_checks = 0
                self._rto_active = True
                if self._rto_wake.wait(min(max(wait, 0.002), RTO_MAX)):
                    self._rto_wake.clear()

    def close_group(self, group: int, error: BaseException) -> None:
        """Close every connection of ``group`` (kept or accepted and not yet taken) and fail what
        still waits in its mailbox with ``error``: the group is gone (it was shrunk), so a frame
        of its epoch from a member that wakes up late meets a closed connection, never a newer
        group."""
        with self._cond:
            links = [l for (p, g), l in self._links.items() if g in (group, group | RELAY_BIT)]
            accepted = [self._accepted.pop(k) for k in [k for k in self._accepted if k[1] == group]]
        for l in links:
            l.close()
        for _, sock in accepted:
            try:
                sock.close()
            except OSError:
                pass
        self.mailbox(group).fail_all(error)

    def _forget(self, link: Link) -> None:
        with self._cond:
            if self._links.get((link.peer, link.group)) is link:
                del self._links[(link.peer, link.group)]

    def abort_group(self, group: int, op: int, error: BaseException) -> None:
        """After operation ``op`` of ``group`` failed here: tell every connected member why. The
        connections stay: frames of the failed operation that still arrive are read and dropped."""
        with self._cond:
            links = [l for (p, g), l in self._links.items() if g == group]
        for l in links:
            l.abort(op, error)

    def _connect(self, peer: int, group: int, epoch: int, deadline: float, check=None,
                 reconnect: bool = False, relay: bool = False) -> socket.socket:
        if peer not in self._peers:
            raise PeerFailure(f"rank {peer} has no known address", rank=peer)
        host, port, local = self._peers[peer]
        last: Exception | None = None
        next_check = time.monotonic() + CHECK_EVERY
        while time.monotonic() < deadline and not self._closed:
            if check is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + CHECK_EVERY
                known = check()
                if known is not None:
                    raise known
            try:
                sock = self._open(host, port, local, deadline)
            except ConnectionRefusedError:
                self.telemetry.record_error(self.rank, peer, "refused")
                # Ranks listen before they register, so nobody listening means the process is gone.
                raise PeerFailure(f"rank {peer} is gone (nothing listens at {host}:{port})", rank=peer) from None
            except OSError as e:
                last = e
                time.sleep(0.05)
                continue
            try:
                self._client_handshake(sock, peer, group, epoch, reconnect, deadline, relay)
                return sock
            except AuthenticationError:
                sock.close()
                raise
            except (OSError, ProtocolError) as e:
                sock.close()
                last = e
                time.sleep(min(0.05, max(deadline - time.monotonic(), 0.0)))
        if isinstance(last, (socket.timeout, TimeoutError)):
            # The peer's process is there (its listener accepted) but it does not answer: hung or
            # stopped; only the timeout can tell, as for an operation that waits for it.
            what = f"tag {group - P2P_BASE}" if group >= P2P_BASE else f"group {group}"
            raise CollectiveTimeout(f"rank {peer} did not answer the handshake for {what} in time")
        raise PeerFailure(f"cannot connect to rank {peer} at {host}:{port}: {last}", rank=peer)

    @staticmethod
    def _open(host: str, port: int, local: str | None, deadline: float) -> socket.socket:
        """A socket to the peer: its Unix socket when it is reachable from here, else TCP."""
        wait = min(HANDSHAKE_TIMEOUT, max(deadline - time.monotonic(), 0.1))
        if local is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(wait)
            try:
                sock.connect("\0" + local)
                return sock
            except OSError:  # another machine or network namespace
                sock.close()
        return socket.create_connection((host, port), timeout=wait)

    def _client_handshake(self, sock: socket.socket, peer: int, group: int, epoch: int,
                          reconnect: bool = False, deadline: float | None = None, relay: bool = False) -> None:
        """Prove the token both ways. Each socket call waits at most HANDSHAKE_TIMEOUT, and never past
        ``deadline`` (the operation's): a stopped peer's kernel accepts the connection, then nothing
        answers."""
        end = time.monotonic() + HANDSHAKE_TIMEOUT
        if deadline is not None:
            end = min(end, deadline)

        def bounded() -> None:  # before each blocking step: what is left of the handshake's time
            sock.settimeout(max(end - time.monotonic(), 0.05))

        bounded()
        flags = (frames.HELLO_RECONNECT if reconnect else 0) | (frames.HELLO_RELAY if relay else 0)
        hello = frames.new_hello(self.rank, peer, group, epoch, flags)
        raw_hello = hello.pack()
        sock.sendall(raw_hello)
        challenge = bytearray(frames.CHALLENGE_SIZE)
        bounded()
        recv_exact(sock, memoryview(challenge))
        server_nonce, server_mac = bytes(challenge[:16]), bytes(challenge[16:])
        if not frames.mac_ok(frames.mac(self.token, b"S", raw_hello, server_nonce), server_mac):
            raise AuthenticationError(f"rank {peer} could not prove knowledge of the job token")
        bounded()
        sock.sendall(frames.mac(self.token, b"C", raw_hello, server_nonce))
        ok = bytearray(1)
        bounded()
        recv_exact(sock, memoryview(ok))
        if bytes(ok) != frames.ACCEPTED:
            raise AuthenticationError(f"rank {peer} refused the connection")

    def _wait_accepted(self, peer: int, group: int, epoch: int, deadline: float, check=None) -> socket.socket:
        while True:
            with self._cond:
                got = self._accepted.get((peer, group))
                if got is not None and got[0] == epoch:
                    del self._accepted[(peer, group)]
                    return got[1]
                left = deadline - time.monotonic()
                if self._closed:
                    raise PeerFailure(f"the transport of rank {self.rank} is closed", rank=peer)
                if left <= 0:
                    what = f"tag {group - P2P_BASE}" if group >= P2P_BASE else f"group {group}"
                    raise CollectiveTimeout(f"rank {peer} did not connect for {what} in time")
                self._cond.wait(min(left, CHECK_EVERY))
            if check is not None:
                known = check()
                if known is not None:
                    raise known

    def _accept_loop(self, listener: socket.socket) -> None:
        """Accept connections and authenticate each in a thread of its own. When MAX_HANDSHAKES are
        already pending, the oldest pending one (a port scanner, a stuck client: ours complete in
        milliseconds) is cut off to make room, so idle connections can never lock the job out."""
        pending: deque = deque()
        lock = threading.Lock()
        while not self._closed:
            try:
                sock, addr = listener.accept()
            except OSError:
                return
            with lock:
                while len(pending) >= MAX_HANDSHAKES:
                    oldest = pending.popleft()
                    log.warning("rank %d: too many handshakes in progress; dropping the oldest", self.rank)
                    try:
                        oldest.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                pending.append(sock)
            threading.Thread(target=self._serve_handshake, args=(sock, addr, pending, lock), daemon=True,
                             name=f"collcomm-handshake-r{self.rank}").start()

    def _serve_handshake(self, sock: socket.socket, addr, pending: deque, lock: threading.Lock) -> None:
        try:
            sock.settimeout(SERVE_HANDSHAKE_TIMEOUT)
            raw = bytearray(frames.HELLO_SIZE)
            recv_exact(sock, memoryview(raw))
            hello = frames.unpack_hello(bytes(raw))
            if hello.server != self.rank:
                raise ProtocolError(f"handshake addressed to rank {hello.server}")
            server_nonce = os.urandom(16)
            sock.sendall(server_nonce + frames.mac(self.token, b"S", bytes(raw), server_nonce))
            answer = bytearray(frames.MAC_SIZE)
            recv_exact(sock, memoryview(answer))
            if not frames.mac_ok(frames.mac(self.token, b"C", bytes(raw), server_nonce), bytes(answer)):
                raise AuthenticationError("client could not prove knowledge of the job token")
            if hello.flags & frames.HELLO_RECONNECT:
                # Only a connection this rank still holds may be re-opened (not one it closed on
                # purpose: a shrunk group's, a replaced epoch's), or one accepted and not yet taken
                # (what was sent on it is sent again on the new one).
                # A link being opened right now is neither: give it a moment.
                key = (hello.client, hello.group)
                patience = time.monotonic() + 2.0
                with self._cond:
                    while True:
                        mine, waiting = self._links.get(key), self._accepted.get(key)
                        if mine is not None and mine.epoch == hello.epoch:
                            ok = not mine._closing and mine.error is None
                            state = "closed" if mine._closing else f"failed: {mine.error}"
                            break
                        if mine is None and waiting is not None and waiting[0] == hello.epoch:
                            ok, state = True, ""
                            break
                        if time.monotonic() >= patience or self._closed:
                            ok, state = False, "no such connection"
                            break
                        self._cond.wait(0.05)
                if not ok:
                    sock.sendall(b"\x00")
                    raise ProtocolError(f"rank {hello.client} asked to reconnect group {hello.group} epoch "
                                        f"{hello.epoch}, which this rank no longer holds ({state})")
            sock.sendall(frames.ACCEPTED)
            if hello.flags & frames.HELLO_RELAY:  # a relaying rank's: taken now, nobody asks for it
                sock.settimeout(None)
                self._adopt(hello.client, hello.group, hello.epoch, sock)
                return
            with self._cond:
                old = self._accepted.get((hello.client, hello.group))
                self._accepted[(hello.client, hello.group)] = (hello.epoch, sock)
                self._cond.notify_all()
            if old is not None:
                old[1].close()
        except PeerClosed:  # connected and left without a word: a liveness probe (Link._peer_gone)
            sock.close()
        except (OSError, ProtocolError, AuthenticationError) as e:
            origin = addr[0] if isinstance(addr, tuple) and addr else "a local process"
            log.warning("rank %d: refused connection from %s: %s", self.rank, origin, e)
            sock.close()
        finally:
            with lock:
                try:
                    pending.remove(sock)
                except ValueError:  # already cut off
                    pass

    def close(self) -> None:
        self._closed = True
        self._rto_wake.set()
        for listener in filter(None, (self._listener, self._local_listener)):
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop on Linux
            except OSError:
                pass
            try:
                listener.close()
            except OSError:
                pass
        with self._cond:
            links = list(self._links.values())
            pending = list(self._accepted.values())
            self._accepted.clear()
            boxes = list(self._mailboxes.values())
            self._cond.notify_all()
        for l in links:
            l.close()
        for _, s in pending:
            s.close()
        for b in boxes:
            b.close()
        # Our threads must be gone before the interpreter finalizes: a daemon thread that wakes
        # up then is unwound by pthread_exit, which aborts the process inside C++ frames (torch).
        deadline = time.monotonic() + CLOSE_JOIN_SECONDS
        for l in links:
            l.join(deadline)
        for t in self._acceptors + [self._rto_thread]:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
