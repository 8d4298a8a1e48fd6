"""Reliability of a TCP link on top of the byte stream: acknowledgements, lost frames, reconnection.

Every DATA frame is answered by the receiver with an ACK (its checksum held) or a NACK (it did
not: the payload was discarded before anyone used it). The sender keeps each DATA frame (header
and a view of its source, no copy: :class:`Pending`) until it is acknowledged, resends it on a
NACK (at most MAX_RETRANSMITS times, then the operation fails with CorruptionError on every
rank), and reports the frame's ``done`` only on its ACK.

Lost frames (a frame that was written and never reached the peer: ``drop`` fault injection, or
any layer below that loses data without breaking the connection) are found without waiting for
the operation's timeout: when the oldest unacknowledged frame has waited longer than the
retransmission timeout (adaptive, RFC 6298, within RTO_MIN and RTO_MAX), the transport's
:class:`RetransmitTimer` sends a PROBE behind it; the peer answers with an ECHO once it has read
everything before the probe. The stream is in order and every DATA frame read is answered (ACK
or NACK) before the probe is, so a frame written before the probe that is still neither
acknowledged nor asked for again when the ECHO arrives was lost: it is sent again at once. A
peer that is slow (it has not started the operation yet: its frames wait in the socket) or
stopped simply answers late or never: nothing is resent, nothing fails, and the operation's own
deadline rules (at most one probe is outstanding per link, so a stopped peer costs one 64-byte
frame). A frame lost more than MAX_LOST_RESENDS times takes a detour (:mod:`.detours`) or, with
none left, fails its operation with LinkFailure on every rank.

When the connection breaks (reset, EOF) while both processes live, the lower rank connects again
(the same handshake), the higher rank accepts, and every frame not yet acknowledged is sent
again; the receiver drops what it already has (and acknowledges it again). A peer whose listener
refuses connections is dead: PeerFailure.

:class:`LinkReliability` is the part of :class:`~collcomm.transport.tcp.link.Link` that does this;
it owns the state :meth:`LinkReliability._init_reliability` sets up.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

from collcomm.errors import CollectiveError, CollectiveTimeout, CorruptionError, LinkFailure, PeerFailure
from collcomm.transport.frames import DATA, PROBE, SEND_INLINE, Header
from collcomm.transport.tcp.detours import DETOUR, DETOUR_AFTER
from collcomm.transport.tcp.sockets import open_socket, tune

log = logging.getLogger("collcomm.transport")

MAX_RETRANSMITS = int(os.environ.get("COLLCOMM_MAX_RETRANSMITS", "5"))  # per piece, after checksum failures
# Lost frames (sent, never read by the peer: see LinkReliability._echoed). A link that loses a frame
# this many times over is given up (LinkFailure). Random loss at rate p loses one piece that often
# with probability p ** (MAX_LOST_RESENDS + 1): 2e-6 at p = 0.3.
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


class Pending:
    """A DATA frame sent and not yet acknowledged: what it takes to send it again. ``payload`` is
    a view of the operation's source region, never a copy (see :meth:`LinkReliability._nack` for why it is
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


class LinkReliability:
    """ACKs and NACKs, the retransmission timeout and PROBE/ECHO, reconnection (see the module)."""

    def _init_reliability(self) -> None:
        self._pending: dict[tuple[int, int, int], Pending] = {}  # (op, tree, chunk) -> unacknowledged
        self.reconnects = 0
        self._wseq = 0  # DATA frames written so far (a frame's place in the stream)
        self._probe_seq = 0
        self._probe: tuple[int, int, float] | None = None  # outstanding PROBE: (number, _wseq when sent, time)
        self._srtt: float | None = None  # smoothed ACK round trip (RFC 6298)
        self._rttvar = 0.0
        self.rto = RTO_INITIAL
        self.lost_resends = 0
        self._last_ack = 0.0

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
        if header.flags & SEND_INLINE:  # not a checksum failure: the peer may not read this process's memory
            self._inline_asked()
            with self._count_lock:
                entry = self._pending.get(key)
            if entry is not None and not self.revoked(header.op):  # (given up: its buffer may be rewritten)
                self._enqueue(DATA, entry.raw, entry.payload, entry)
            return
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

    def _reset_rtt(self) -> None:
        """(Count lock held.) Another path, another round trip: the estimator starts afresh."""
        self._srtt, self._rttvar, self.rto = None, 0.0, RTO_INITIAL

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

    def _count_lost(self, lost: list[Pending], give_up: list[Pending]) -> None:
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
        give_up: list[Pending] = []
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

    # ------------------------------------------------------------------ broken connections
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
                sock, auth = t._connect(self.peer, self.group, self.epoch, deadline, reconnect=True)
            else:
                sock, auth = t._wait_accepted(self.peer, self.group, self.epoch, deadline, check=self._peer_gone)
        except CollectiveError as e:
            if isinstance(e, CollectiveTimeout):
                self._tx.record_error("timeout")
            log.info("rank %d: could not reconnect to rank %d: %s", t.rank, self.peer, e)
            return PeerFailure(f"lost connection to rank {self.peer} ({cause.__class__.__name__}) and could not "
                               f"reconnect: {e}", rank=self.peer)
        tune(sock)
        sock.settimeout(None)
        with self._send_lock:
            with self._lock:
                if self._closing or self.error is not None:
                    sock.close()
                    return lost
                self.sock, self._auth = sock, auth  # a new connection has keys of its own
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
            probe = open_socket(host, port, local, time.monotonic() + 1.0)
        except ConnectionRefusedError:
            self._tx.record_error("refused")
            return PeerFailure(f"rank {self.peer} is gone (nothing listens at {host}:{port})", rank=self.peer)
        except OSError:
            return None
        probe.close()
        return None


class RetransmitTimer:
    """One thread for all of a transport's links: looks at every link's oldest unacknowledged frame
    when its retransmission timeout is due (:meth:`LinkReliability._rto_check`), and sleeps while
    no link has one (a frame sent wakes it)."""

    def __init__(self, rank: int, links: Callable[[], list]):
        self.rank = rank
        self._links = links
        self.active = False  # the timer is looking at the links (a new frame need not wake it)
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"collcomm-rto-r{rank}")
        self._thread.start()

    def wake(self) -> None:
        """A frame now awaits its ACK: make sure the timer looks."""
        if not self.active:
            self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def join(self, deadline: float) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            self.active = True
            idle_checks = 0
            while not self._closed:
                links = self._links()
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
                        self.active = False
                        continue
                    break
                idle_checks = 0
                self.active = True
                if self._wake.wait(min(max(wait, 0.002), RTO_MAX)):
                    self._wake.clear()
