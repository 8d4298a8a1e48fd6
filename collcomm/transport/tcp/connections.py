"""The TCP transport's listener and connector: how a connection to a peer is opened or accepted.

Of each pair of ranks the lower connects and the higher accepts (a relay channel is opened by
the relaying rank, whichever is lower). Every accepted connection is authenticated in a thread
of its own (:mod:`.handshake`); at most MAX_HANDSHAKES are pending per listener, beyond which the
oldest is cut off, so idle connections can never lock the job out. An accepted connection waits
until the link that asks for it takes it (:meth:`Connections._wait_accepted`). A connection that
asks to be re-opened after a break is admitted only while this rank still holds its link.
Refused connections are counted per source and summarized, never logged one line each
(:mod:`collcomm.refusals`: anyone may knock).

:class:`Connections` is the part of :class:`~collcomm.transport.tcp.transport.TcpTransport` that
does this.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque

from collcomm.errors import AuthenticationError, CollectiveTimeout, PeerFailure
from collcomm.transport import frames
from collcomm.transport.frames import ProtocolError
from collcomm.transport.interface import P2P_BASE
from collcomm.transport.tcp.frameauth import FrameAuth
from collcomm.transport.tcp.handshake import FrameAuthDiffers, accept, client_handshake, refuse, server_handshake
from collcomm.transport.tcp.sockets import PeerClosed, open_socket, peer_source

log = logging.getLogger("collcomm.transport")

MAX_HANDSHAKES = 64  # pending handshakes per listener; beyond, the oldest is cut off
CHECK_EVERY = 0.25  # seconds between looks at failures known elsewhere while waiting for a peer


class StaleReconnect(ProtocolError):
    """A rank asked to re-open a connection this rank no longer holds."""


def refusal_reason(e: BaseException, cut_off: bool = False) -> str | None:
    """The few words a refused connection is counted under (see collcomm.refusals); None for one
    its peer closed without a word before the handshake ended (a liveness probe,
    LinkReliability._peer_gone, does so), which is not logged."""
    if cut_off:
        return "too many handshakes"
    if isinstance(e, PeerClosed):
        return None
    if isinstance(e, FrameAuthDiffers):
        return "frame authentication differs"
    if isinstance(e, AuthenticationError):
        return "wrong token"
    if isinstance(e, StaleReconnect):
        return "reconnect to a closed link"
    if isinstance(e, ProtocolError):
        return "bad handshake"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "handshake timed out"
    return "connection error"


class Connections:
    """Opening connections to peers and accepting theirs (see the module)."""

    def _connect(self, peer: int, group: int, epoch: int, deadline: float, check=None,
                 reconnect: bool = False, relay: bool = False) -> tuple[socket.socket, FrameAuth | None]:
        """A new authenticated connection to ``peer`` (and its frame MACs, when on)."""
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
                sock = open_socket(host, port, local, deadline)
            except ConnectionRefusedError:
                self.telemetry.record_error(self.rank, peer, "refused")
                # Ranks listen before they register, so nobody listening means the process is gone.
                raise PeerFailure(f"rank {peer} is gone (nothing listens at {host}:{port})", rank=peer) from None
            except OSError as e:
                last = e
                time.sleep(0.05)
                continue
            try:
                auth = client_handshake(sock, self.token, self.rank, peer, group, epoch, reconnect=reconnect,
                                        relay=relay, auth_frames=self.auth_frames, deadline=deadline)
                return sock, auth
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

    def _wait_accepted(self, peer: int, group: int, epoch: int, deadline: float,
                       check=None) -> tuple[socket.socket, FrameAuth | None]:
        """The connection ``peer`` opens for ``group`` at ``epoch`` (and its frame MACs, when on)."""
        while True:
            with self._cond:
                got = self._accepted.get((peer, group))
                if got is not None and got[0] == epoch:
                    del self._accepted[(peer, group)]
                    return got[1], got[2]
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
                    oldest = pending.popleft()  # its handshake's thread counts the refusal
                    try:
                        oldest.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                pending.append(sock)
            threading.Thread(target=self._serve_handshake, args=(sock, addr, pending, lock), daemon=True,
                             name=f"collcomm-handshake-r{self.rank}").start()

    def _serve_handshake(self, sock: socket.socket, addr, pending: deque, lock: threading.Lock) -> None:
        try:
            hello, auth = server_handshake(sock, self.token, self.rank, self.auth_frames)
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
                    refuse(sock)
                    raise StaleReconnect(f"rank {hello.client} asked to reconnect group {hello.group} epoch "
                                        f"{hello.epoch}, which this rank no longer holds ({state})")
            accept(sock)
            if hello.flags & frames.HELLO_RELAY:  # a relaying rank's: taken now, nobody asks for it
                sock.settimeout(None)
                self._adopt(hello.client, hello.group, hello.epoch, sock, auth)
                return
            with self._cond:
                old = self._accepted.get((hello.client, hello.group))
                self._accepted[(hello.client, hello.group)] = (hello.epoch, sock, auth)
                self._cond.notify_all()
            if old is not None:
                old[1].close()
        except (OSError, ProtocolError, AuthenticationError) as e:
            with lock:
                cut_off = sock not in pending
            reason = refusal_reason(e, cut_off)
            if reason is not None:  # (None: connected and left without a word, as a liveness probe does)
                # Counted, and written at most once per source and interval: anyone may knock.
                source, who = peer_source(sock, addr)
                self.refusals.refused(source, reason, f"rank {self.rank}: refused a connection from {who}: "
                                                      f"{'too many handshakes in progress' if cut_off else e}")
            sock.close()  # after counting: a peer that sees the end knows it was counted
        finally:
            with lock:
                try:
                    pending.remove(sock)
                except ValueError:  # already cut off
                    pass
