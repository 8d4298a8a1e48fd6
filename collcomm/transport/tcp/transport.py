"""The TCP transport: one authenticated connection per (peer, group), opened lazily and kept.

:class:`TcpTransport` implements :class:`collcomm.transport.interface.Transport`. It listens on a
TCP port and, for ranks on the same machine and network namespace, on an abstract Unix socket
(the same frames and handshake, without the TCP/IP stack on loopback, and large collective
payloads read straight out of the sender's memory: :mod:`.references`), and hands out one
:class:`~collcomm.transport.tcp.link.Link` per (peer, group). Connections are per group so that
two groups with overlapping members never wait on each other's frames; frames of an operation a
rank has not started yet stay in the socket (TCP flow control holds the sender) until it starts,
and frames of finished (or failed) operations are discarded. Every connection proves the job
token in its handshake; with ``COLLCOMM_AUTH_FRAMES=1`` every frame carries MACs as well
(:mod:`.frameauth`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

from collcomm.refusals import RefusalLog
from collcomm.transport.interface import P2P_BASE, FaultPlan
from collcomm.transport.mailbox import GroupMailbox
from collcomm.transport.tcp.connections import Connections
from collcomm.transport.shm import cma
from collcomm.transport.tcp import frameauth, references
from collcomm.transport.tcp.detours import RELAY_BIT, RelayForwarder
from collcomm.transport.tcp.frameauth import FrameAuth
from collcomm.transport.tcp.link import Link
from collcomm.transport.tcp.reliability import RetransmitTimer
from collcomm.transport.tcp.sockets import listen, split_address
from collcomm.transport.telemetry import LinkTelemetry

CLOSE_JOIN_SECONDS = 2.0  # close() waits this long in all for the transport's threads to end


class TcpTransport(Connections):
    """Listens for peers, authenticates them, and hands out one :class:`Link` per (peer, group)."""

    def __init__(self, rank: int, token: bytes | str, host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None, telemetry: LinkTelemetry | None = None,
                 faults: FaultPlan | None = None, auth_frames: bool | None = None, by_reference: bool | None = None):
        self.rank = rank
        self.telemetry = telemetry if telemetry is not None else LinkTelemetry(rank)
        self.faults = faults  # injected faults (the runtime passes collcomm.faults.inject's active plan)
        self.token = token.encode() if isinstance(token, str) else bytes(token)
        # A MAC on every frame (COLLCOMM_AUTH_FRAMES=1, see frameauth); every rank must agree.
        self.auth_frames = frameauth.enabled() if auth_frames is None else bool(auth_frames)
        # Large collective payloads to a rank met on the Unix socket go by reference (see references).
        self.by_reference = references.enabled() if by_reference is None else bool(by_reference) and cma.AVAILABLE
        # Ranks on the same machine (and network namespace) also meet on an abstract Unix socket:
        # the same frames and handshake, without the TCP/IP stack on loopback.
        self._listener, self._local_listener, self.address = listen(host, port, advertise_host, "collcomm-")
        self._peers: dict[int, tuple[str, int, str | None]] = {}
        self._cond = threading.Condition()
        self._accepted: dict[tuple[int, int], tuple[int, socket.socket, FrameAuth | None]] = {}
        self._links: dict[tuple[int, int], Link] = {}
        self._opening: dict[tuple[int, int], threading.Lock] = {}
        self._mailboxes: dict[tuple[int, int | None], GroupMailbox] = {}
        self._closed = False
        # Refused connections (and connections closed on a peer's malformed frames): counted per
        # source, summarized once per interval, since anyone may knock (collcomm.refusals).
        self.refusals = RefusalLog(logging.getLogger("collcomm.transport"), "connections", f"rank {rank}: ")
        self._forwarder = RelayForwarder(self)
        self._timer = RetransmitTimer(rank, self._all_links)  # idle while no frame awaits an ACK
        self._acceptors = [threading.Thread(target=self._accept_loop, args=(listener,), daemon=True,
                                            name=f"collcomm-accept-r{rank}")
                           for listener in filter(None, (self._listener, self._local_listener))]
        for t in self._acceptors:
            t.start()

    # ------------------------------------------------------------------ peers and mailboxes
    def set_peers(self, table: dict[int, str]) -> None:
        """Peer addresses as registered: "host:port", optionally followed by "#@unix-name"."""
        for r, addr in table.items():
            self._peers[int(r)] = split_address(addr)

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
                sock, auth = self._connect(peer, group, epoch, deadline, check, relay=True)
            elif self.rank < peer:
                sock, auth = self._connect(peer, group, epoch, deadline, check)
            else:
                sock, auth = self._wait_accepted(peer, group, epoch, deadline, check)
            return self._adopt(peer, group, epoch, sock, auth)

    def _adopt(self, peer: int, group: int, epoch: int, sock: socket.socket, auth: FrameAuth | None) -> Link:
        link = Link(self, peer, group, epoch, sock, auth)
        with self._cond:
            old = self._links.get((peer, group))
            self._links[(peer, group)] = link
            self._cond.notify_all()
        if old is not None and old is not link:
            old.close()
        return link

    def _all_links(self) -> list[Link]:
        with self._cond:
            return list(self._links.values())

    def _forget(self, link: Link) -> None:
        with self._cond:
            if self._links.get((link.peer, link.group)) is link:
                del self._links[(link.peer, link.group)]

    # ------------------------------------------------------------------ groups
    def abort_group(self, group: int, op: int, error: BaseException) -> None:
        """After operation ``op`` of ``group`` failed here: tell every connected member why. The
        connections stay: frames of the failed operation that still arrive are read and dropped."""
        with self._cond:
            links = [l for (p, g), l in self._links.items() if g == group]
        for l in links:
            l.abort(op, error)

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
        for _, sock, _ in accepted:
            try:
                sock.close()
            except OSError:
                pass
        self.mailbox(group).fail_all(error)

    def close(self) -> None:
        self._closed = True
        self._timer.close()
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
        for _, s, _ in pending:
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
        self._timer.join(deadline)
        self.refusals.flush()
