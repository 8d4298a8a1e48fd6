"""One TCP link: an authenticated connection to a peer for one group, with its sender and receiver.

Each :class:`Link` has a sender thread that drains a queue of frames (``sendmsg([header,
payload])``, no concatenation of large payloads) and a receiver thread that reads a header,
asks the operation registered for that sequence number where the payload goes (a view of the
user's buffer or of a preallocated scratch chunk), receives straight into it with ``recv_into``
and hands it over. The GIL is released inside socket calls and NumPy reductions, so sending,
receiving and reducing overlap. Small frames go out from the calling thread when nothing is
queued (no thread hand-off on the latency path). Answers (ACK, NACK, ECHO) that cannot go out at
once take a priority lane: the sender thread writes them before its next queued frame, so a
peer's operation, which completes on them, never waits behind this rank's own bulk sends.

Each link records its traffic, errors, retransmissions and the last time its peer was heard
from in the transport's :class:`~collcomm.transport.telemetry.LinkTelemetry`, and applies the
injected faults of its transport's plan (:class:`~collcomm.transport.interface.FaultPlan`) to
what it sends. Reliability (ACK/NACK, lost frames, reconnection) is :mod:`.reliability`;
detours through relays are :mod:`.detours`.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections import deque
from typing import Callable

from collcomm.errors import CollectiveError, PeerFailure
from collcomm.transport import frames
from collcomm.transport.frames import (ABORT, ACK, DATA, ECHO, HEADER_SIZE, NACK, PROBE, RELAY, Header, ProtocolError,
                                       abort_text, error_from_abort)
from collcomm.transport.interface import P2P_BASE
from collcomm.transport.tcp.detours import RELAY_BIT, Held, LinkDetours, relays_data
from collcomm.transport.tcp.frameauth import TAG_SIZE, FrameAuth, ForgedFrame
from collcomm.transport.tcp.references import REVOKE_ALL, LinkReferences, wire_length
from collcomm.transport.tcp.reliability import LinkReliability, Pending
from collcomm.transport.tcp.sockets import error_kind, recv_exact, send_parts, tune

log = logging.getLogger("collcomm.transport")

MAX_FRAME = 1 << 31  # larger frames are refused before anything is read
SMALL_PAYLOAD = 64 << 10
_ANSWERS = (0, b"", None, None, None)  # a send-queue item that only makes the sender write the priority lane


class Link(LinkReliability, LinkDetours, LinkReferences):
    """One authenticated connection to ``peer`` for ``group``, with its sender and receiver threads
    (see the module; reliability, detours and payloads by reference are the mixins' own)."""

    def __init__(self, transport, peer: int, group: int, epoch: int, sock: socket.socket,
                 auth: FrameAuth | None = None):
        self.transport = transport
        self.peer, self.group, self.epoch = peer, group, epoch
        self.sock = sock
        self._auth = auth  # the connection's frame MACs (COLLCOMM_AUTH_FRAMES); replaced with the socket
        tune(sock)
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
        self._answers: deque = deque()  # ACK/NACK/ECHO frames waiting for the sender thread (see _control)
        self._resume: dict[tuple[int, int, int], tuple] = {}  # pieces to receive again -> (receiver, view)
        self._got: dict[int, set] = {}  # op -> (tree, chunk) received whole (duplicates after a reconnect)
        self._got_lock = threading.Lock()  # a piece is taken once, whichever path it came by
        self._discard: bytearray | None = None
        self._init_reliability()
        self._init_detours()
        self._init_references()
        name = f"r{transport.rank}-g{group}-p{peer}"
        self._sender = threading.Thread(target=self._send_loop, name=f"collcomm-send-{name}", daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name=f"collcomm-recv-{name}", daemon=True)
        self._sender.start()
        self._receiver.start()

    @property
    def alive(self) -> bool:
        return self.error is None

    def payload_verified(self, n: int) -> bool:
        """Frame MACs; or a collective's link on a Unix socket of one machine without injected
        faults, not on a detour (a relayed frame carries its checksum: see _relay_raw)."""
        return self.transport.auth_frames or (self.same_machine and self.detour is None)

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
            entry = Pending(header, raw, payload, done, eager=self.group >= P2P_BASE)
            with self._count_lock:
                self._pending[(header.op, header.tree, header.chunk)] = entry
            done = None
            self.transport._timer.wake()
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

    def _enqueue(self, kind: int, raw: bytes, payload=None, entry: Pending | None = None) -> None:
        if self.detour is not None:
            if entry is not None:
                self._relay_entry(entry)
            else:
                self._relay_raw(raw, payload)
            return
        self._enqueue_own(kind, raw, payload, entry)

    def _enqueue_own(self, kind: int, raw: bytes, payload=None, entry: Pending | None = None) -> None:
        """Onto this link's own connection, detour or not (a relay's frames)."""
        with self._count_lock:
            self._queued += 1
            if entry is not None:
                entry.queued = True
        self._sendq.put((kind, raw, payload, None, entry))

    def _control(self, kind: int, header: Header, flags: int = 0) -> None:
        """An ACK, NACK or ECHO for ``header``, from the receiver thread: never blocks on a full
        socket (two receivers blocked sending to each other would deadlock). When it cannot go out
        at once it takes the priority lane: the sender thread writes it before its next queued
        frame, not behind every DATA frame queued before it (the peer's operation completes on
        these ACKs). Answers keep their order among themselves, which is all PROBE/ECHO needs."""
        raw = Header(kind, self.group, self.epoch, header.op, header.tree, header.chunk, flags=flags).pack()
        if self.detour is not None:
            self._relay_raw(raw, None)
            return
        if self._faults is None and self._queued == 0 and self._send_lock.acquire(blocking=False):
            try:
                auth = self._auth
                data = raw if auth is None else raw + auth.seal(raw, b"")[0]
                try:
                    sent = self.sock.send(data, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                if sent == len(data):
                    return
                if sent:  # rare: part of the frame fitted; the rest must follow at once
                    self.sock.sendall(data[sent:])
                    return
                if auth is not None:
                    auth.unseal()  # nothing went out: the frame is sealed again when the lane is written
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

    def _write(self, sock: socket.socket, kind: int, raw: bytes, payload, entry: Pending | None = None) -> None:
        """The frame onto the socket (the send lock held), with injected faults and telemetry. On a
        connection with frame MACs the frame is sealed as it leaves, before a fault alters it."""
        if self.detour is not None and kind != RELAY:  # queued before the detour: it goes that way now
            self._relay_raw(raw, payload)
            return
        n = 0 if payload is None else len(payload)
        if kind == DATA and n > SMALL_PAYLOAD:
            if self._write_reference(sock, raw, payload, n, entry):
                return
            raw = self._checked(raw, payload, entry)
        f = self._faults
        action = None
        if f is not None and (kind == DATA or (kind == RELAY and relays_data(raw, payload))):
            action = f.before_data(n, corrupt=kind == DATA)
            if action == "drop":  # lost before it left: it takes no place in the sealed stream either
                return
        tail = b""
        if self._auth is not None:
            head_tag, tail = self._auth.seal(raw[:HEADER_SIZE], _body(raw, payload))
            raw = raw[:HEADER_SIZE] + head_tag + raw[HEADER_SIZE:]
        if f is not None:
            if action == "corrupt":  # altered in flight, after it was sealed
                payload = memoryview(f.corrupted(payload))
            cut = f.cut_after(HEADER_SIZE + n)
            if cut is not None:
                sock.sendall((raw + (bytes(payload) if n else b"") + tail)[:cut])
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise ConnectionResetError("connection cut by fault injection")
        if n == 0:
            sock.sendall(raw + tail)
        elif n <= SMALL_PAYLOAD:
            sock.sendall(raw + bytes(payload) + tail)
            self._tx.record_bytes(n, sock if kind in (DATA, RELAY) else None)
        else:
            t0 = time.perf_counter()
            send_parts(sock, (raw, payload, tail) if tail else (raw, payload))
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
                        self._write(sock, kind, raw, payload, entry)
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
                # Counted with the refused connections (the peer may repeat it on every new one).
                self.transport.refusals.refused(f"rank {self.peer}", "malformed frame",
                                                f"rank {self.transport.rank}: closing connection from rank "
                                                f"{self.peer}: {e}")
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
        auth = self._auth  # this connection's (a reconnection brings new ones)
        tag = memoryview(bytearray(TAG_SIZE))
        while True:
            recv_exact(sock, view)
            if auth is not None:
                recv_exact(sock, tag)
                if not auth.check_header(view, tag):  # before anything is done with it
                    raise ForgedFrame(f"a frame header from rank {self.peer} failed its MAC")
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
            if not self._tail_ok(sock, text):
                raise ForgedFrame(f"an abort frame from rank {self.peer} failed its MAC")
            for key in [k for k in self._resume if k[0] == header.op]:
                del self._resume[key]
            self.mailbox.abort(header.op, error_from_abort(text.decode(errors="replace"), self.peer),
                               source=f"rank {self.peer}")
            return
        if header.flags & frames.NO_CHECKSUM and not self.transport.auth_frames and not (
                (self.group < P2P_BASE or header.flags & frames.BY_REFERENCE)
                and isinstance(sock, socket.socket) and sock.family == socket.AF_UNIX):
            raise ProtocolError(f"rank {self.peer} sent a DATA frame without a checksum on a connection without "
                                f"frame MACs (only a collective's Unix socket, or a message by reference, may "
                                f"leave it out)")
        op = header.op
        key = (op, header.tree, header.chunk)
        again = self._resume.pop(key, None)
        if again is not None and self.mailbox.current(op) is again[0] and len(again[1]) == header.length:
            receiver, dest = again
        else:
            got = self._got.get(op)
            if got is not None and (header.tree, header.chunk) in got:  # a duplicate (reconnect, detour)
                self._skip(sock, wire_length(header))
                self._control(ACK, header)
                return
            receiver = self.mailbox.receiver_for(op)
            if receiver is None:  # stale frame of a finished or failed operation
                self._skip(sock, wire_length(header))
                self._control(ACK, header)
                return
            try:
                dest = receiver.destination(header, self.peer)
            except CollectiveError as e:  # ranks disagree: fail the operation, keep the stream whole
                receiver.failed(e)
                self.abort(op, e)
                self._skip(sock, wire_length(header))
                self._control(ACK, header)
                return
        n = header.length
        try:
            if header.flags & frames.BY_REFERENCE:
                read = self._read_reference(sock, header, dest)
                if read is False:  # the peer was asked to send it inline
                    self._resume[key] = (receiver, dest)
                    return
                if read is None:  # the peer gave the operation up: never delivered (see references)
                    self._dropped(receiver, header)
                    return
            elif n > SMALL_PAYLOAD and not isinstance(sock, Held):  # (a relayed one was read already)
                t0 = time.perf_counter()
                recv_exact(sock, dest)
                rx.record_transfer(n, time.perf_counter() - t0)
            else:
                recv_exact(sock, dest)
                rx.record_bytes(n)
            sealed = self._tail_ok(sock, dest)
        except OSError:
            self._resume[key] = (receiver, dest)  # the piece comes again after a reconnect
            raise
        if not sealed or (not header.flags & frames.NO_CHECKSUM and frames.checksum(dest) != header.checksum):
            # Never used: not delivered (so never reduced, never forwarded); where it landed in
            # the user's buffer (a copy), the retransmission overwrites it.
            what = "checksum" if sealed else "mac"
            log.info("rank %d: payload %s mismatch from rank %d (op %d, tree %d, chunk %d); asking for it again",
                     self.transport.rank, what, self.peer, op, header.tree, header.chunk)
            rx.record_error(what)
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
        """Read and drop ``length`` payload bytes (a frame nobody takes), and its MAC."""
        scratch = self._discard
        if scratch is None:
            scratch = self._discard = bytearray(1 << 16)
        left = length + (TAG_SIZE if length and self._auth is not None and not isinstance(sock, Held) else 0)
        while left:
            part = memoryview(scratch)[:min(left, len(scratch))]
            recv_exact(sock, part)
            left -= len(part)

    def _tail_ok(self, sock, data) -> bool:
        """On a connection with frame MACs: read the tag of the payload ``data`` just read and check
        it (a relayed frame's, read off a relay channel, was checked there). True without MACs."""
        if self._auth is None or isinstance(sock, Held) or not len(data):
            return True
        tag = bytearray(TAG_SIZE)
        recv_exact(sock, memoryview(tag))
        return self._auth.check_payload(data, tag)

    # ------------------------------------------------------------------ broken connections and failure
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

    def abort(self, op: int, error: BaseException) -> None:
        """Tell the peer that operation ``op`` failed here: an abort frame, queued behind whatever
        is being sent (so the stream stays whole), never blocking the caller. Payloads of ``op``
        the peer has yet to read by reference are revoked first."""
        self.revoke(op)
        if self.error is not None:
            return
        text = abort_text(error).encode()[:frames.MAX_ABORT_BYTES]
        with self._count_lock:
            for key in [k for k in self._pending if k[0] == op]:
                self._pending.pop(key).tries = -1
        self._enqueue(ABORT, Header(ABORT, self.group, self.epoch, op, length=len(text)).pack(), memoryview(text))

    def _fail(self, error: BaseException) -> None:
        self.revoke(REVOKE_ALL)  # whatever the peer still reads by reference belongs to failed operations
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
        self.revoke(REVOKE_ALL)  # (an operation that completed had every payload read)
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


def _body(raw: bytes, payload) -> bytes | memoryview:
    """What follows a frame's 64-byte header: its payload, or on a relayed frame of this rank's own
    (``raw`` holds the RELAY header and the frame inside) the inner frame's header and payload."""
    if len(raw) == HEADER_SIZE:
        return b"" if payload is None else payload
    return bytes(raw[HEADER_SIZE:]) + (b"" if payload is None else bytes(payload))
