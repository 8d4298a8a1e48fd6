"""Point-to-point messages: send, recv, and receive from any source.

A message travels on its own connection per (pair, tag) (group id ``P2P_BASE + tag``) and is
matched by number: the sender's k-th send with a tag meets the receiver's k-th receive
(:class:`MessageNumbers`). A send returns once the message left (eager), or, for a message of
16 MiB and more read by reference on one machine (collcomm.transport.tcp.references), once the
receiver read it (a send that large waits for the receiver anyway); a receive once it
arrived whole in the caller's buffer.

Receive from any source (:func:`recv_any`, for torch's ``recv_anysource``):
The runtime matches the k-th send from a peer with a tag to the k-th receive from that peer with
that tag. To receive from whichever peer sends first, a *probe* is registered at every peer's next
receive number. The first frame to arrive claims the receive: it lands in the caller's buffer and
that peer's receive number is consumed. The other probes are withdrawn without consuming theirs;
a frame that reached a withdrawn probe meanwhile waits for the next ordinary receive from its peer
(exactly as an early frame waits for its receiver) and is handed to it.

Limitation: while a receive from any source is pending, do not also post an ordinary receive with
the same tag (both would take the same message number).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from collcomm.errors import CollectiveError, CollectiveTimeout, MismatchError, UsageError
from collcomm.runtime import arguments
from collcomm.runtime.buffers import as_buffer
from collcomm.transport import frames
from collcomm.transport.frames import Header
from collcomm.transport.interface import P2P_BASE


class MessageNumbers:
    """The numbers of point-to-point messages: per (peer, tag, direction), the sender's k-th send
    meets the receiver's k-th receive."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next: dict[tuple[int, int, bool], int] = {}

    def next(self, peer: int, tag: int, *, send: bool) -> int:
        """The number of this rank's next send to (or receive from) ``peer`` with ``tag``, taken."""
        with self._lock:
            key = (peer, tag, send)
            n = self._next.get(key, 0)
            self._next[key] = n + 1
            return n

    def peek_recv(self, peer: int, tag: int) -> int:
        """The number the next receive from ``peer`` with ``tag`` will take (not taken)."""
        with self._lock:
            return self._next.get((peer, tag, False), 0)

    def take_recv(self, peer: int, tag: int, seq: int) -> None:
        """Receive number ``seq`` from ``peer`` with ``tag`` was used (by a receive from any source)."""
        with self._lock:
            self._next[(peer, tag, False)] = seq + 1

    def forget(self, peer: int) -> None:
        """``peer`` restarted: it numbers its messages afresh, and so does this rank towards it."""
        with self._lock:
            for key in [k for k in self._next if k[0] == peer]:
                del self._next[key]


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


def send(rt, x, dst: int, tag: int, timeout: float) -> None:
    buf = as_buffer(x, "send: x", read_only=True)
    dst, tag = _check_peer(rt, dst, tag, "send: dst")
    group = P2P_BASE + tag
    seq = rt.p2p.next(dst, tag, send=True)
    view = memoryview(buf.array.view(np.uint8))
    desc = frames.describe("p2p", buf.dtype)
    msg = _PointToPoint(view, dst, seq, desc, f"send of {buf.count} {buf.dtype} to rank {dst}")
    link = rt.transport.link(dst, group, 0, timeout)
    # Checksummed, frame MACs or not: a send is eager (it returns once the message left), so
    # should the message have to be sent again after the caller reused the buffer, the MAC (taken
    # as the frame is written) would cover the new contents; the checksum, taken now, refuses them.
    # A message read by reference needs none: its send returns once the receiver read it, or it
    # is revoked below before the caller may touch the buffer (collcomm.transport.tcp.references).
    link.send(frames.data_header(group, 0, seq, 0, 0, desc, view, verified=link.sends_by_reference(view.nbytes)),
              view, msg.sent)
    try:
        msg.wait(timeout)
    except CollectiveError:
        link.revoke(seq)  # before the caller may rewrite the buffer: a late reader by reference drops it
        raise


def recv(rt, x, src: int, tag: int, timeout: float) -> None:
    buf = as_buffer(x, "recv: x")
    src, tag = _check_peer(rt, src, tag, "recv: src")
    group = P2P_BASE + tag
    seq = rt.p2p.next(src, tag, send=False)
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


def _check_peer(rt, peer: int, tag: int, what: str) -> tuple[int, int]:
    """(peer, tag) checked: the peer another rank of the job (UsageError naming ``what``)."""
    size = arguments.MAX_RANK if rt.open else rt.world_size
    peer = arguments.rank(peer, size, what, "peers (the ranks of the job)" if rt.open else
                          f"peers (the other ranks of the world of {rt.world_size})")
    if peer == rt.rank:
        raise UsageError(f"{what}={peer} is this rank; a peer is another rank", arguments.argument(what))
    if rt.open:  # an open job: any rank that has joined
        rt.know([peer])
    return peer, _check_tag(tag)


def _check_tag(tag: int) -> int:
    return tag if type(tag) is int and 0 <= tag < arguments.MAX_TAG else arguments.tag(tag)


# ---------------------------------------------------------------------------- from any source
class _State:
    def __init__(self, view: memoryview, desc: int, what: str):
        self.view, self.desc, self.what = view, desc, what
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.winner: int | None = None
        self.closed = False
        self.error: BaseException | None = None

    def claim(self, peer: int) -> bool:
        with self.lock:
            if self.winner is None and not self.closed:
                self.winner = peer
                return True
            return False


class _Probe:
    """Registered at ``seq`` in ``peer``'s point-to-point mailbox for the tag."""

    def __init__(self, state: _State, peer: int, seq: int, mailbox):
        self.state, self.peer, self.seq, self.mailbox = state, peer, seq, mailbox
        self.delegate = None

    def withdraw(self) -> None:
        self.mailbox.withdraw(self.seq, self)

    def destination(self, header, peer: int) -> memoryview:
        if self.state.claim(self.peer):
            s = self.state
            if header.desc != s.desc or header.length != len(s.view):
                raise MismatchError(f"rank {peer} sent {header.length} bytes for this rank's {s.what} of "
                                    f"{len(s.view)} bytes (or a different dtype)")
            return s.view
        # Lost the race: the frame belongs to the next ordinary receive from this peer.
        self.withdraw()
        real = self.mailbox.receiver_for(self.seq)
        if real is None:  # the transport closed: read and drop the frame
            return memoryview(bytearray(header.length))
        self.delegate = real
        return real.destination(header, peer)

    def delivered(self, header, view: memoryview, peer: int) -> None:
        if self.delegate is not None:
            self.delegate.delivered(header, view, peer)
        elif self.state.winner == self.peer:
            self.state.done.set()

    def failed(self, error: BaseException) -> None:
        if self.delegate is not None:
            self.delegate.failed(error)
            return
        s = self.state
        with s.lock:
            if s.winner not in (None, self.peer) or s.done.is_set():
                return
            if s.error is None:
                s.error = error
        s.done.set()


def _open_link(rt, peer: int, group: int, timeout: float) -> None:
    try:
        rt.transport.link(peer, group, 0, timeout)
    except (CollectiveError, OSError):
        pass  # a peer that never sends (or died): the receive fails or succeeds on its own


def recv_any(rt, x, peers: list[int], tag: int, timeout: float) -> int:
    """Receive ``x`` from whichever of ``peers`` (world ranks) sends first with ``tag``; return it."""
    buf = as_buffer(x, "recv: x")
    if not peers:
        raise UsageError("recv from any source: no other rank in the group", "src")
    tag = _check_tag(tag)
    group = P2P_BASE + tag
    state = _State(memoryview(buf.array.view(np.uint8)), frames.describe("p2p", buf.dtype),
                   f"recv of {buf.count} {buf.dtype} from any rank")
    seqs = {p: rt.p2p.peek_recv(p, tag) for p in peers}  # the next receive number of each, not consumed
    probes = {p: _Probe(state, p, seqs[p], rt.transport.mailbox(group, p)) for p in peers}
    for p, probe in probes.items():
        probe.mailbox.register(seqs[p], probe)
    for p in peers:
        threading.Thread(target=_open_link, args=(rt, p, group, timeout), daemon=True,
                         name=f"collcomm-anysource-link-{p}").start()
    deadline = time.monotonic() + timeout
    try:
        if not state.done.wait(max(deadline - time.monotonic(), 0.0)):
            raise CollectiveTimeout(f"{state.what} did not complete within {timeout:g} s")
        if state.error is not None:
            raise state.error
    finally:
        with state.lock:
            state.closed = True
            winner = state.winner
        for p, probe in probes.items():
            if p != winner:
                probe.withdraw()
        if winner is not None:
            rt.p2p.take_recv(winner, tag, seqs[winner])  # the winner's message number is taken
            if state.done.is_set():
                probes[winner].mailbox.finish(seqs[winner])
    return winner
