"""Large payloads by reference between ranks of one machine: one copy instead of two.

A frame's payload through a socket is copied twice (into the kernel, out of it). Two ranks that
met on a Unix socket are on one machine, so the receiver can instead copy the payload straight
out of the sender's memory into its destination with ``process_vm_readv``
(:mod:`collcomm.transport.shm.cma`), as Open MPI's single-copy transports do. A DATA frame of a
collective over :data:`REFERENCE_MIN_BYTES` then carries the payload's address (flag
BY_REFERENCE, see :mod:`collcomm.transport.frames`) instead of the payload. Everything else is
the link's as before: the same header, ACK (after which the sender may reuse the region, so the
region is still there when the receiver reads it), NACK and retransmission, aborts,
reconnection and detours (a frame that goes a detour goes inline).

But an operation that fails here returns to its caller, who may rewrite the buffer, while a
slow receiver has yet to read it. So each link keeps a revocation word, the highest operation
it gave up (:meth:`LinkReferences.revoke`, called by ``abort``, a failed send, a failed or
closed link, before the caller hears of the failure), whose address travels with the payload's;
the receiver reads it after the payload and drops the payload of an operation given up. That is
why such payloads need no checksum (``Link.payload_verified``).

A point-to-point message's ``done`` runs when it left (eager semantics), so its region may be
reused as soon as it did: only messages of :data:`P2P_REFERENCE_MIN_BYTES` and more go by
reference, and their ``done`` waits for the ACK (a send that large already waits for the
receiver: the socket cannot hold it). Not with frame MACs (they cover the bytes
on the wire) or injected faults (they alter the bytes on the wire). The receiver learns the
sender's process from the socket (``SO_PEERCRED``, as the kernel sees it from this process's pid
namespace). When the kernel refuses the read (another user, Yama ``ptrace_scope``, a container
without ptrace), the receiver answers with a NACK flagged SEND_INLINE and the sender's link goes
inline for good; a process that is gone (ESRCH) is a broken connection, as when its socket
closes. ``COLLCOMM_BY_REFERENCE=0`` keeps every payload inline.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time

import numpy as np

from collcomm.transport import frames
from collcomm.errors import PeerFailure
from collcomm.transport.frames import ACK, BY_REFERENCE, NACK, NO_CHECKSUM, REFERENCE, SEND_INLINE, Header, ProtocolError
from collcomm.transport.interface import P2P_BASE
from collcomm.transport.shm import cma
from collcomm.transport.tcp.sockets import SOCKET_BUFFER, recv_exact

log = logging.getLogger("collcomm.transport")

# Payloads of at most this many bytes go inline (a syscall and a page walk cost more than the copy
# saved); the link calls the by-reference path for those over SMALL_PAYLOAD, the same 64 KiB.
REFERENCE_MIN_BYTES = 64 << 10
# A point-to-point send returns once its message left (eager), and a payload read by reference
# has not left before the receiver read it: such a send returns on the ACK, once the receiver
# posted its receive and read the message. From this size on a send waits for that anyway (the
# socket's buffers, SOCKET_BUFFER doubled by the kernel, cannot hold the message), so no program
# that works inline waits for ever by reference.
P2P_REFERENCE_MIN_BYTES = 4 * SOCKET_BUFFER
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
REVOKE_ALL = 1 << 62  # revoke(): every operation (the link failed or closed)


def enabled() -> bool:
    """Whether this process sends large collective payloads by reference (COLLCOMM_BY_REFERENCE)."""
    raw = os.environ.get("COLLCOMM_BY_REFERENCE", "").strip().lower()
    if raw in ("", "1", "true", "yes", "on"):
        return cma.AVAILABLE
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"COLLCOMM_BY_REFERENCE={raw!r}: use 1 (large collective payloads by reference, the "
                     f"default) or 0 (inline)")


class LinkReferences:
    """The by-reference path of a :class:`~collcomm.transport.tcp.link.Link` (see the module)."""

    def _init_references(self) -> None:
        # A link on a Unix socket without injected faults: payloads cannot be altered between the
        # processes (no wire), so a collective's travel without a checksum (Link.payload_verified).
        # Point-to-point messages keep theirs, but for those read by reference (see collcomm.runtime.p2p.send).
        unix = self._faults is None and self.sock.family == socket.AF_UNIX
        self.same_machine = unix and self.group < P2P_BASE
        self.by_reference = unix and self._auth is None and self.transport.by_reference
        self.reference_reads = 0  # payloads this side read out of the peer's memory
        self.reference_refusals = 0  # payloads it could not read so (answered SEND_INLINE)
        self.reference_revoked = 0  # payloads read after the peer gave their operation up (dropped)
        self._creds: tuple[socket.socket | None, int] = (None, 0)  # the socket the peer's pid was read from
        # The revocation word: the highest operation this side gave up (revoke). A receiver reads
        # it after it read a payload by reference, and drops the payload of an operation given up:
        # once an operation failed here, its caller may rewrite the buffer before a slow receiver
        # read it, and what it read then is not what was sent. (An operation that completed here
        # had every payload acknowledged, so read, before it returned.)
        self._revoked = np.full(1, -1, np.int64)
        self._revoked_at = cma.address(self._revoked)
        self._word = np.empty(1, np.int64)  # the peer's word, as read here

    def sends_by_reference(self, n: int) -> bool:
        """Whether a point-to-point message of ``n`` bytes is to go by reference: its send then
        returns once the receiver read it (or gave up: revoke), so it needs no checksum. Should it
        go inline after all, it gets one as it is written (:meth:`_checked`)."""
        return self.by_reference and self.group >= P2P_BASE and n >= P2P_REFERENCE_MIN_BYTES

    def _checked(self, raw: bytes, payload, entry) -> bytes:
        """A point-to-point DATA frame without a checksum (it was to go by reference) that goes
        inline: with the checksum of this first copy, kept in ``entry`` for any retransmission (an
        eager message's buffer may be rewritten once it left; a copy of new contents is refused)."""
        if self.group < P2P_BASE or not raw[6] & NO_CHECKSUM or self.transport.auth_frames:
            return raw
        raw = frames.with_checksum(raw, payload)
        if entry is not None:
            entry.raw = raw
        return raw

    def revoked(self, op: int) -> bool:
        """Whether operation (message) ``op`` was given up here."""
        return op <= self._revoked[0]

    def revoke(self, op: int) -> None:
        """Operation ``op`` failed here (before its caller is told): payloads of it that the peer
        still reads by reference are dropped there."""
        if op > self._revoked[0]:
            self._revoked[0] = op

    def _write_reference(self, sock: socket.socket, raw: bytes, payload, n: int, entry) -> bool:
        """Write a DATA frame (the send lock held) as its header and the payload's address, when
        this link may (False: write it inline). A point-to-point message goes so only from
        P2P_REFERENCE_MIN_BYTES on, and its ``done`` then waits for the ACK (``entry``, its
        reliability.Pending, is no longer eager)."""
        if not self.by_reference or n <= REFERENCE_MIN_BYTES or sock.family != socket.AF_UNIX:
            return False
        if self.group >= P2P_BASE:
            if n < P2P_REFERENCE_MIN_BYTES or entry is None:
                return False
            entry.eager = False  # before it can be acknowledged: its done runs on the ACK
        where = cma.address(np.frombuffer(payload, np.uint8))
        sock.sendall(frames.with_flags(raw, BY_REFERENCE) + REFERENCE.pack(where, self._revoked_at))
        self._tx.record_bytes(n, sock)
        return True

    def _read_reference(self, sock, header: Header, dest: memoryview) -> bool | None:
        """Read the payload of ``header`` (flagged BY_REFERENCE; its address still in ``sock``)
        into ``dest``. False when the kernel refused: the peer was asked to send it inline. None
        when the peer had given the operation up by the time it was read: what was read is not
        the payload (the caller drops it)."""
        if not (isinstance(sock, socket.socket) and sock.family == socket.AF_UNIX and self._auth is None):
            raise ProtocolError(f"rank {self.peer} sent a payload by reference on a connection that cannot carry one")
        where = bytearray(REFERENCE.size)
        recv_exact(sock, memoryview(where))
        t0 = time.perf_counter()
        pid = self._peer_pid(sock)
        try:
            if pid <= 0:  # the peer's process is not visible from this pid namespace
                raise OSError(errno.EPERM, "its process is not visible from this pid namespace")
            payload_at, revoked_at = REFERENCE.unpack(where)
            cma.read(pid, payload_at, np.frombuffer(dest, np.uint8))
            cma.read(pid, revoked_at, self._word)  # after the payload (x86-64: loads stay in order)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise ConnectionResetError(f"rank {self.peer}'s process {pid} is gone") from e
            self.reference_refusals += 1
            if self.reference_refusals == 1:
                log.info("rank %d: cannot read rank %d's memory (%s); asking it to send payloads inline",
                         self.transport.rank, self.peer, e)
            self._control(NACK, header, SEND_INLINE)
            return False
        if self._word[0] >= header.op:
            self.reference_revoked += 1
            return None
        self._rx.record_transfer(dest.nbytes, time.perf_counter() - t0)
        self.reference_reads += 1
        return True

    def _dropped(self, receiver, header: Header) -> None:
        """A payload read after the peer gave its operation up: acknowledged (the stream goes on),
        never delivered. A collective's ABORT frame follows it on this connection with the cause;
        a point-to-point receive has none to wait for, so it fails now."""
        self._control(ACK, header)
        if self.group >= P2P_BASE:
            receiver.failed(PeerFailure(f"rank {self.peer} gave up sending message #{header.op} (its send failed) "
                                        f"before it was read here", rank=self.peer))

    def _peer_pid(self, sock: socket.socket) -> int:
        known, pid = self._creds
        if known is not sock:
            pid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[0]
            self._creds = (sock, pid)
        return pid

    def _inline_asked(self) -> None:
        """The peer could not read a payload by reference (a NACK flagged SEND_INLINE): from now
        on this link sends payloads inline."""
        if self.by_reference:
            self.by_reference = False
            log.info("rank %d: rank %d cannot read this process's memory; sending payloads inline",
                     self.transport.rank, self.peer)


def wire_length(header: Header) -> int:
    """How many payload bytes follow ``header`` on the connection."""
    return REFERENCE.size if header.flags & BY_REFERENCE else header.length
