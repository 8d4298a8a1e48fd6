"""Receive from any source on collcomm's point-to-point channels (for torch's ``recv_anysource``).

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

import itertools
import threading
import time

import numpy as np

from collcomm.buffers import as_buffer
from collcomm.errors import CollectiveError, CollectiveTimeout, MismatchError
from collcomm.transport import frames
from collcomm.transport.tcp import P2P_BASE


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
        box = self.mailbox
        with box._cond:
            if box._receivers.get(self.seq) is self:
                del box._receivers[self.seq]

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
    buf = as_buffer(x)
    if not peers:
        raise ValueError("recv from any source: no other rank in the group")
    if not 0 <= tag < (1 << 31) - 1:
        raise ValueError(f"tag {tag!r} must be an integer in [0, 2**31 - 1)")
    group = P2P_BASE + tag
    state = _State(memoryview(buf.array.view(np.uint8)), frames.describe("p2p", buf.dtype),
                   f"recv of {buf.count} {buf.dtype} from any rank")
    seqs: dict[int, int] = {}
    with rt._p2p_lock:  # the next receive number of every peer, not consumed
        for p in peers:
            key = (p, tag, False)
            s = next(rt._p2p_seq.setdefault(key, itertools.count()))
            rt._p2p_seq[key] = itertools.count(s)
            seqs[p] = s
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
            with rt._p2p_lock:  # the winner's message number is taken
                rt._p2p_seq[(winner, tag, False)] = itertools.count(seqs[winner] + 1)
            if state.done.is_set():
                probes[winner].mailbox.finish(seqs[winner])
    return winner
