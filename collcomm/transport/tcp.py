"""TCP transport: one authenticated connection per (peer, group), opened lazily and kept.

The transport moves frames between ranks and knows nothing of trees or reductions.
Each :class:`Link` has a sender thread that drains a queue of frames
(``sendmsg([header, payload])``, no concatenation of large payloads) and a receiver
thread that reads a header, asks the operation registered for that sequence number
where the payload goes (a view of the user's buffer or of a preallocated scratch
chunk), receives straight into it with ``recv_into`` and hands it over. The GIL is
released inside socket calls and NumPy reductions, so sending, receiving and
reducing overlap.

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
from typing import Callable, Protocol

from collcomm.errors import AuthenticationError, CollectiveError, CollectiveTimeout, MismatchError, PeerFailure
from collcomm.transport import frames
from collcomm.transport.frames import ABORT, DATA, HEADER_SIZE, Header, ProtocolError

log = logging.getLogger("collcomm.transport")

SOCKET_BUFFER = 4 << 20
HANDSHAKE_TIMEOUT = 10.0  # client side: the peer is one of ours and may be busy
SERVE_HANDSHAKE_TIMEOUT = 3.0  # server side: an unknown connection gets this long to prove itself
MAX_FRAME = 1 << 31  # larger frames are refused before anything is read
MAX_HANDSHAKES = 64  # pending handshakes per listener; beyond, the oldest is cut off
SMALL_PAYLOAD = 64 << 10
CLOSE_JOIN_SECONDS = 2.0  # close() waits this long in all for the transport's threads to end
CHECK_EVERY = 0.25  # seconds between looks at failures known elsewhere while waiting for a peer
P2P_BASE = 1 << 31  # group ids from here on carry point-to-point messages (tag = id - P2P_BASE)


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionResetError("connection closed by peer")
        got += r


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:  # pragma: no cover - kernel limits
            pass


class Receiver(Protocol):
    """What an operation gives the transport so frames can land in place."""

    def destination(self, header: Header, peer: int) -> memoryview: ...

    def delivered(self, header: Header, view: memoryview, peer: int) -> None: ...

    def failed(self, error: BaseException) -> None: ...


class GroupMailbox:
    """Which receiver takes the frames of each operation of one group."""

    def __init__(self, group: int):
        self.group = group
        self._cond = threading.Condition()
        self._receivers: dict[int, Receiver] = {}
        self._aborts: dict[int, BaseException] = {}
        self._floor = 0  # operations below are finished; their frames are stale
        self._closed = False

    def register(self, op: int, receiver: Receiver) -> None:
        with self._cond:
            self._receivers[op] = receiver
            early = self._aborts.pop(op, None)
            self._cond.notify_all()
        if early is not None:
            receiver.failed(early)

    def finish(self, op: int) -> None:
        with self._cond:
            self._receivers.pop(op, None)
            self._floor = max(self._floor, op + 1)
            for stale in [o for o in self._aborts if o < self._floor]:
                del self._aborts[stale]

    def receiver_for(self, op: int) -> Receiver | None:
        """Wait until ``op`` is registered; None when its frames are stale or the mailbox closed."""
        with self._cond:
            while True:
                if self._closed or op < self._floor:
                    return None
                r = self._receivers.get(op)
                if r is not None:
                    return r
                self._cond.wait(1.0)

    def abort(self, op: int, error: BaseException) -> None:
        with self._cond:
            r = self._receivers.get(op)
            if r is None and op >= self._floor:
                self._aborts[op] = error
        if r is not None:
            r.failed(error)

    def fail_all(self, error: BaseException) -> None:
        with self._cond:
            receivers = list(self._receivers.values())
        for r in receivers:
            r.failed(error)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def abort_text(error: BaseException) -> str:
    """How a failure travels to other ranks: "kind|culprit rank|message" (culprit -1: unknown)."""
    kind = "mismatch" if isinstance(error, MismatchError) else (
        "timeout" if isinstance(error, CollectiveTimeout) else "failure")
    culprit = getattr(error, "rank", None)
    return f"{kind}|{-1 if culprit is None else culprit}|{error}"


def error_from_abort(text: str, reporter: int) -> CollectiveError:
    """The typed error a rank raises for a failure another rank (``reporter``) told it about."""
    kind, _, rest = text.partition("|")
    culprit_text, _, message = rest.partition("|")
    try:
        culprit = int(culprit_text)
    except ValueError:
        culprit, message = -1, rest
    if kind == "mismatch":
        return MismatchError(message)
    if kind == "timeout":
        return CollectiveTimeout(message)
    rank = culprit if culprit >= 0 else reporter
    return PeerFailure(message or f"rank {rank} failed", rank=rank)


class Link:
    """One authenticated connection to ``peer`` for ``group``, with its sender and receiver threads."""

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
        """Send a frame; ``done`` runs once the payload has left the buffer.

        Small frames go out at once from the calling thread when nothing is queued (no
        thread hand-off on the latency path); the rest are queued for the sender thread."""
        if self.error is not None:
            raise self.error
        raw = header.pack()
        small = payload is None or len(payload) <= SMALL_PAYLOAD
        if small and self._queued == 0 and self._send_lock.acquire(blocking=False):
            try:
                self.sock.sendall(raw if payload is None else raw + bytes(payload))
            except OSError as e:
                self._send_lock.release()
                self._fail(PeerFailure(f"lost connection to rank {self.peer} while sending: "
                                       f"{e.__class__.__name__}", rank=self.peer))
                raise self.error from None
            self._send_lock.release()
            if done is not None:
                done()
            return
        with self._count_lock:
            self._queued += 1
        self._sendq.put((raw, payload, done))

    def _send_loop(self) -> None:
        sock = self.sock
        while True:
            item = self._sendq.get()
            if item is None:
                return
            raw, payload, done = item
            try:
                with self._send_lock:
                    if payload is None or len(payload) == 0:
                        sock.sendall(raw)
                    elif len(payload) <= SMALL_PAYLOAD:
                        sock.sendall(raw + bytes(payload))
                    else:
                        sent = sock.sendmsg([raw, payload])
                        if sent < len(raw):
                            sock.sendall(raw[sent:])
                            sent = len(raw)
                        if sent - len(raw) < len(payload):
                            sock.sendall(payload[sent - len(raw):])
                with self._count_lock:
                    self._queued -= 1
                if done is not None:
                    done()
            except OSError as e:
                self._fail(PeerFailure(f"lost connection to rank {self.peer} while sending: "
                                       f"{e.__class__.__name__}", rank=self.peer))
                return
            except BaseException as e:  # a callback failed: the operation reports it
                self._fail(e)
                return

    # ------------------------------------------------------------------ receiving
    def _recv_loop(self) -> None:
        sock = self.sock
        raw = bytearray(HEADER_SIZE)
        view = memoryview(raw)
        discard = None
        try:
            while True:
                recv_exact(sock, view)
                header = frames.unpack_header(view)
                if header.group != self.group or header.epoch != self.epoch:
                    raise ProtocolError(f"frame for group {header.group} epoch {header.epoch} on a connection of "
                                        f"group {self.group} epoch {self.epoch}")
                if header.length > MAX_FRAME:
                    raise ProtocolError(f"frame of {header.length} bytes exceeds {MAX_FRAME}")
                if header.kind == ABORT:
                    text = bytearray(header.length)
                    recv_exact(sock, memoryview(text))
                    self.mailbox.abort(header.op, error_from_abort(text.decode(errors="replace"), self.peer))
                    continue
                receiver = self.mailbox.receiver_for(header.op)
                if receiver is None:  # stale frame of a finished or failed operation
                    discard = discard or bytearray(1 << 16)
                    self._skip(header.length, discard)
                    continue
                try:
                    dest = receiver.destination(header, self.peer)
                except CollectiveError as e:  # ranks disagree: fail the operation, keep the stream whole
                    receiver.failed(e)
                    self.abort(header.op, e)
                    discard = discard or bytearray(1 << 16)
                    self._skip(header.length, discard)
                    continue
                recv_exact(sock, dest)
                if frames.checksum(dest) != header.checksum:
                    raise ProtocolError(f"payload checksum mismatch from rank {self.peer} "
                                        f"(op {header.op}, tree {header.tree}, chunk {header.chunk})")
                receiver.delivered(header, dest, self.peer)
        except ProtocolError as e:
            log.warning("rank %d: closing connection from rank %d: %s", self.transport.rank, self.peer, e)
            self._fail(e)
        except CollectiveError as e:
            self._fail(e)
        except OSError as e:
            error = PeerFailure(f"lost connection to rank {self.peer}: {e.__class__.__name__}: {e}", rank=self.peer)
            error.while_receiving = True  # operations that expect nothing more from this peer carry on
            self._fail(error)
        except BaseException as e:  # pragma: no cover - a bug in a receiver callback
            log.exception("rank %d: receiver for rank %d failed", self.transport.rank, self.peer)
            self._fail(e)

    def _skip(self, length: int, scratch: bytearray) -> None:
        """Read and drop ``length`` payload bytes (a frame nobody takes)."""
        left = length
        while left:
            part = memoryview(scratch)[:min(left, len(scratch))]
            recv_exact(self.sock, part)
            left -= len(part)

    # ------------------------------------------------------------------ failure
    def abort(self, op: int, error: BaseException) -> None:
        """Tell the peer that operation ``op`` failed here: an abort frame, queued behind whatever
        is being sent (so the stream stays whole), never blocking the caller."""
        if self.error is not None:
            return
        text = abort_text(error).encode()[:frames.MAX_ABORT_BYTES]
        with self._count_lock:
            self._queued += 1
        self._sendq.put((Header(ABORT, self.group, self.epoch, op, length=len(text)).pack(), memoryview(text), None))

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = error
        self.transport._forget(self)
        self.mailbox.fail_all(error)
        self.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._sendq.put(None)
        if self.error is None:
            self.error = PeerFailure(f"connection to rank {self.peer} was closed", rank=self.peer)

    def join(self, deadline: float) -> None:
        """Wait (until the monotonic ``deadline``) for this link's threads to end after close()."""
        for t in (self._sender, self._receiver):
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))


class TcpTransport:
    """Listens for peers, authenticates them, and hands out one :class:`Link` per (peer, group)."""

    def __init__(self, rank: int, token: bytes | str, host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None):
        self.rank = rank
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
        self._closed = False
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
             check: Callable[[], BaseException | None] | None = None) -> Link:
        """The connection to ``peer`` for ``group``: kept, or opened now (the lower rank connects).

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
            sock = self._connect(peer, group, epoch, deadline, check) if self.rank < peer else \
                self._wait_accepted(peer, group, epoch, deadline, check)
            link = Link(self, peer, group, epoch, sock)
            with self._cond:
                old = self._links.get(key)
                self._links[key] = link
            if old is not None and old is not link:
                old.close()
            return link

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

    def _connect(self, peer: int, group: int, epoch: int, deadline: float, check=None) -> socket.socket:
        if peer not in self._peers:
            raise PeerFailure(f"rank {peer} has no known address", rank=peer)
        host, port, local = self._peers[peer]
        last: Exception | None = None
        next_check = time.monotonic() + CHECK_EVERY
        while time.monotonic() < deadline:
            if check is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + CHECK_EVERY
                known = check()
                if known is not None:
                    raise known
            try:
                sock = self._open(host, port, local, deadline)
            except ConnectionRefusedError:
                # Ranks listen before they register, so nobody listening means the process is gone.
                raise PeerFailure(f"rank {peer} is gone (nothing listens at {host}:{port})", rank=peer) from None
            except OSError as e:
                last = e
                time.sleep(0.05)
                continue
            try:
                self._client_handshake(sock, peer, group, epoch)
                return sock
            except AuthenticationError:
                sock.close()
                raise
            except (OSError, ProtocolError) as e:
                sock.close()
                last = e
                time.sleep(0.05)
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

    def _client_handshake(self, sock: socket.socket, peer: int, group: int, epoch: int) -> None:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        hello = frames.new_hello(self.rank, peer, group, epoch)
        raw_hello = hello.pack()
        sock.sendall(raw_hello)
        challenge = bytearray(frames.CHALLENGE_SIZE)
        recv_exact(sock, memoryview(challenge))
        server_nonce, server_mac = bytes(challenge[:16]), bytes(challenge[16:])
        if not frames.mac_ok(frames.mac(self.token, b"S", raw_hello, server_nonce), server_mac):
            raise AuthenticationError(f"rank {peer} could not prove knowledge of the job token")
        sock.sendall(frames.mac(self.token, b"C", raw_hello, server_nonce))
        ok = bytearray(1)
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
            sock.sendall(frames.ACCEPTED)
            with self._cond:
                old = self._accepted.get((hello.client, hello.group))
                self._accepted[(hello.client, hello.group)] = (hello.epoch, sock)
                self._cond.notify_all()
            if old is not None:
                old[1].close()
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
        for t in self._acceptors:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
