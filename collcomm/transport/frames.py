"""The wire format between ranks: a fixed 64-byte frame header and the token handshake.

Every frame is a header followed by ``length`` payload bytes::

    magic "CCF1" | version | kind | flags | group | epoch | op | tree | chunk |
    desc | length | checksum | header crc32 | pad

``op`` is the operation's sequence number within its group, ``tree``/``chunk`` say
which piece of which tree the payload is, ``desc`` is a hash of what the operation
is (collective, dtype, size, reduction, root) so ranks that disagree find out at the
first frame, and ``checksum`` is xxh3-64 of the payload (unless the flag NO_CHECKSUM says the
connection's frame MACs cover it). A DATA frame is answered by
an ACK (payload verified) or a NACK (checksum failed: send it again) carrying the same
``op``/``tree``/``chunk``, with no payload. A PROBE (header only, ``chunk`` = the probe's
number) asks the receiver to answer with an ECHO of the same number once it has read every
byte sent before the probe: since the stream is in order, a DATA frame sent before an echoed
probe and neither acknowledged nor asked for again never reached the receiver (it was lost)
and is sent again. A RELAY frame carries a whole frame of another pair of ranks one hop on,
around a link that stopped carrying data (see :mod:`collcomm.transport.tcp.detours`). A
header is checked (magic, version, kind, crc) before anything else, and its length must be
exactly what the receiving rank expects for that piece: nothing is allocated on a peer's word.

Between two ranks of one machine that met on a Unix socket, a large DATA frame of a collective
may leave its payload where it is: flagged BY_REFERENCE, it carries the payload's address in
the sender's process and that of the sending link's revocation word (16 bytes,
:data:`REFERENCE`) instead, and the receiver copies the payload straight into its destination
with ``process_vm_readv`` (one copy instead of two through the socket), then reads the word: the
highest operation the sender gave up, which it writes before its caller can touch the buffer
again. The sender's region stays valid until the ACK, as it does for a retransmission. A receiver that may not read the sender's memory answers with a NACK
flagged SEND_INLINE, and the link sends its payloads inline from then on.

An ABORT frame's payload says why an operation failed on the sending rank
(:func:`abort_text`: "kind|culprit rank|message"); the receiving rank raises the same typed
error (:func:`error_from_abort`). The coordinator's abort records use the same text.

The handshake proves knowledge of the job token both ways (HMAC-SHA256
challenge–response over both nonces) before a connection carries any frame.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import xxhash

from collcomm.errors import (CollectiveError, CollectiveTimeout, CorruptionError, LinkFailure, MismatchError,
                             PeerFailure)

MAGIC = b"CCF1"
VERSION = 1
DATA = 1
ABORT = 2
NACK = 3  # header only: "(op, tree, chunk) failed its checksum here, send it again"
ACK = 4   # header only: "(op, tree, chunk) arrived whole here" (the sender may let go of its source)
PROBE = 5  # header only: "answer with ECHO (same chunk field) once you have read everything before this"
ECHO = 6   # header only: the answer to PROBE number ``chunk``
# A frame of another pair carried one hop further: the payload is that frame (its header and
# payload); ``op`` is the rank it is for, ``tree`` the rank it comes from (see collcomm.transport.tcp.detours).
RELAY = 7
KINDS = (DATA, ABORT, NACK, ACK, PROBE, ECHO, RELAY)
CONTROL = (NACK, ACK, PROBE, ECHO)  # header-only kinds
MAX_ABORT_BYTES = 4096

_HEADER = struct.Struct("<4sBBHIIQIIQQQI4x")
HEADER_SIZE = _HEADER.size  # 64
assert HEADER_SIZE == 64


class ProtocolError(CollectiveError):
    """A peer sent bytes that are not a valid frame or handshake; the connection is closed."""


_BODY = struct.Struct("<4sBBHIIQIIQQQ")  # the first 56 bytes
_CRC = struct.Struct("<I4x")


class Header(NamedTuple):
    kind: int
    group: int
    epoch: int
    op: int
    tree: int = 0
    chunk: int = 0
    desc: int = 0
    length: int = 0
    checksum: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        body = _BODY.pack(MAGIC, VERSION, self.kind, self.flags, self.group, self.epoch, self.op, self.tree,
                          self.chunk, self.desc, self.length, self.checksum)
        return body + _CRC.pack(zlib.crc32(body))


def peek_kind(raw: bytes | bytearray | memoryview) -> int:
    """The kind of the frame whose header ``raw`` starts with, unchecked (a frame this rank built
    or passes on; unpack_header checks what arrives)."""
    return raw[5]  # after the magic (4 bytes) and the version (1)


def unpack_header(raw: bytes | bytearray | memoryview) -> Header:
    """Parse and check a header; raises ProtocolError naming what is wrong."""
    if len(raw) != HEADER_SIZE:
        raise ProtocolError(f"frame header has {len(raw)} bytes, expected {HEADER_SIZE}")
    magic, version, kind, flags, group, epoch, op, tree, chunk, desc, length, checksum, crc = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported frame version {version}")
    if zlib.crc32(bytes(raw[:56])) != crc:
        raise ProtocolError("frame header checksum mismatch")
    if kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    if kind == ABORT and length > MAX_ABORT_BYTES:
        raise ProtocolError(f"abort frame of {length} bytes exceeds {MAX_ABORT_BYTES}")
    if kind == RELAY and length < HEADER_SIZE:
        raise ProtocolError(f"relay frame of {length} bytes cannot hold a frame")
    if kind in CONTROL and length != 0:
        name = {NACK: "NACK", ACK: "ACK", PROBE: "PROBE", ECHO: "ECHO"}[kind]
        raise ProtocolError(f"{name} frame with {length} payload bytes")
    return Header(kind, group, epoch, op, tree, chunk, desc, length, checksum, flags)


def checksum(payload) -> int:
    return xxhash.xxh3_64_intdigest(payload)


NO_CHECKSUM = 1  # header flag of a DATA frame: ``checksum`` is not set (frame MACs, or a Unix socket: see data_header)
BY_REFERENCE = 2  # header flag of a DATA frame: REFERENCE follows, not the payload
SEND_INLINE = 4  # header flag of a NACK: the payload could not be read by reference here; send it inline
REFERENCE = struct.Struct("<QQ")  # the payload's address in the sender, and the address of its link's revocation word


def with_checksum(header: bytes, payload) -> bytes:
    """A packed DATA header flagged NO_CHECKSUM, with the checksum of ``payload`` put in instead."""
    h = unpack_header(header)
    return h._replace(flags=h.flags & ~NO_CHECKSUM, checksum=checksum(payload)).pack()


def with_flags(header: bytes, flags: int) -> bytes:
    """A packed header with ``flags`` added (its crc computed again)."""
    body = bytearray(header[:56])
    struct.pack_into("<H", body, 6, struct.unpack_from("<H", body, 6)[0] | flags)
    return bytes(body) + _CRC.pack(zlib.crc32(body))


def data_header(group: int, epoch: int, op: int, tree: int, chunk: int, desc: int, payload, *,
                verified: bool = False) -> Header:
    """The header of a DATA frame carrying ``payload``: with its checksum, or, on a link that makes
    sure payloads arrive as sent (``verified``: frame MACs, which already read every byte, or a
    Unix socket of one machine), flagged NO_CHECKSUM instead (a second pass for nothing)."""
    if verified:
        return Header(DATA, group, epoch, op, tree, chunk, desc, len(payload), 0, NO_CHECKSUM)
    return Header(DATA, group, epoch, op, tree, chunk, desc, len(payload), checksum(payload))


def describe(*fields) -> int:
    """A 64-bit hash of an operation's description (what every rank must agree on)."""
    return xxhash.xxh3_64_intdigest(repr(fields).encode())


# ---------------------------------------------------------------------------- handshake
_HELLO = struct.Struct("<4sBB2xIIII16s")  # magic, version, flags, client rank, server rank, group, epoch, nonce
HELLO_RECONNECT = 1  # flag: the client re-opens a connection that broke (the server must still hold its link)
HELLO_RELAY = 2  # flag: opened to relay frames (either rank may open it; the server takes it at once)
HELLO_AUTH_FRAMES = 4  # flag: every frame carries MACs (see collcomm.transport.tcp.frameauth)
HELLO_SIZE = _HELLO.size
HANDSHAKE_MAGIC = b"CCH1"
MAC_SIZE = 32
CHALLENGE_SIZE = 16 + MAC_SIZE
ACCEPTED = b"\x01"


@dataclass(frozen=True)
class Hello:
    client: int
    server: int
    group: int
    epoch: int
    nonce: bytes
    flags: int = 0

    def pack(self) -> bytes:
        return _HELLO.pack(HANDSHAKE_MAGIC, VERSION, self.flags, self.client, self.server, self.group, self.epoch,
                           self.nonce)


def new_hello(client: int, server: int, group: int, epoch: int, flags: int = 0) -> Hello:
    return Hello(client, server, group, epoch, os.urandom(16), flags)


def unpack_hello(raw: bytes) -> Hello:
    if len(raw) != HELLO_SIZE:
        raise ProtocolError("short handshake")
    magic, version, flags, client, server, group, epoch, nonce = _HELLO.unpack(raw)
    if magic != HANDSHAKE_MAGIC or version != VERSION:
        raise ProtocolError("not a collcomm handshake")
    return Hello(client, server, group, epoch, nonce, flags)


def mac(token: bytes, role: bytes, hello: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(token, role + hello + server_nonce, hashlib.sha256).digest()


def mac_ok(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


# ---------------------------------------------------------------------------- failures
def abort_text(error: BaseException) -> str:
    """How a failure travels to other ranks: "kind|culprit rank|message" (culprit -1: unknown)."""
    kind = "mismatch" if isinstance(error, MismatchError) else (
        "timeout" if isinstance(error, CollectiveTimeout) else (
            "corrupt" if isinstance(error, CorruptionError) else (
                "link" if isinstance(error, LinkFailure) else "failure")))
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
    if kind == "corrupt":
        return CorruptionError(message, rank=culprit if culprit >= 0 else reporter)
    if kind == "link":
        return LinkFailure(message, rank=culprit if culprit >= 0 else reporter)
    rank = culprit if culprit >= 0 else reporter
    return PeerFailure(message or f"rank {rank} failed", rank=rank)
