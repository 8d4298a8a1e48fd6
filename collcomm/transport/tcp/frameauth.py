"""Per-frame authentication on the data plane (``COLLCOMM_AUTH_FRAMES=1``).

The handshake proves the job token once per connection; without more, whoever can write into an
established TCP stream (anyone on the path) could inject frames after it. With frame
authentication every frame carries a keyed MAC, so nothing that did not come from the peer that
completed the handshake is ever used.

Keys: each connection derives two AES-128 keys from the job token and both handshake nonces
(HMAC-SHA256; one key per direction, fresh for every connection and every reconnection). The MAC
is GMAC (AES-GCM with the frame as associated data and no plaintext), keyed per direction, with
a 96-bit nonce made of the frame's number on the connection and the part it covers, so that a
frame replayed, reordered or dropped by someone on the path fails too. Each frame carries:

    header (64 bytes) | tag of the header (16) | payload | tag of the payload (16, if any payload)

The header is checked before anything is done with it (a forged header could point the payload
at any piece of the user's buffer); a header that fails breaks the connection, which the
reliability layer re-opens (new keys) and sends again what was not acknowledged. A payload that
fails is discarded before anyone uses it and asked for again (NACK), like one whose checksum
failed: never reduced, never forwarded. Both ends must agree on the setting (the handshake
refuses a peer that differs). GMAC runs in OpenSSL through ``cryptography`` (AES-NI and
carry-less multiplication: several GB/s), the payload's own checksum (xxh3) stays as it is.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ENV = "COLLCOMM_AUTH_FRAMES"
TAG_SIZE = 16
_NONCE = struct.Struct("<QI")  # frame number on the connection, part (0: header, 1: payload)
_EMPTY = b""


class ForgedFrame(ConnectionError):
    """A frame header (or an abort) failed its MAC: nothing more read from that connection can be
    trusted. The link breaks it and connects again, with new keys."""


def enabled() -> bool:
    """Whether this process authenticates frames (``COLLCOMM_AUTH_FRAMES``)."""
    raw = os.environ.get(ENV, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV}={raw!r}: use 1 (authenticate every frame) or 0")


def session_keys(token: bytes, hello: bytes, server_nonce: bytes) -> tuple[bytes, bytes]:
    """(client-to-server key, server-to-client key) of one connection."""
    def key(direction: bytes) -> bytes:
        return hmac.new(token, b"collcomm frames " + direction + hello + server_nonce, hashlib.sha256).digest()[:16]

    return key(b"c>s"), key(b"s>c")


class FrameAuth:
    """The MACs of one connection, seen from one end: :meth:`seal` what this end writes (in the
    order it writes them: the caller holds the connection's send lock) and check what it reads
    (:meth:`check_header`, then :meth:`check_payload` of the same frame; one reader)."""

    def __init__(self, send_key: bytes, recv_key: bytes):
        self._send = AESGCM(send_key)
        self._recv = AESGCM(recv_key)
        self._sent = 0  # frames sealed so far
        self._read = 0  # headers checked so far
        self._current = -1  # the number of the frame whose header was checked last

    @classmethod
    def for_client(cls, keys: tuple[bytes, bytes]) -> "FrameAuth":
        return cls(keys[0], keys[1])

    @classmethod
    def for_server(cls, keys: tuple[bytes, bytes]) -> "FrameAuth":
        return cls(keys[1], keys[0])

    def seal(self, head: bytes, body) -> tuple[bytes, bytes]:
        """The tags of the next frame written: its 64-byte header ``head`` and its payload ``body``
        (empty: no payload tag, b"")."""
        n = self._sent
        self._sent += 1
        tag_head = self._send.encrypt(_NONCE.pack(n, 0), _EMPTY, head)
        if not len(body):
            return tag_head, _EMPTY
        return tag_head, self._send.encrypt(_NONCE.pack(n, 1), _EMPTY, body)

    def unseal(self) -> None:
        """The frame sealed last did not go out at all (a full socket): its number is used again."""
        self._sent -= 1

    def check_header(self, head, tag) -> bool:
        """Whether ``tag`` is the peer's tag of the next frame's header ``head``."""
        n = self._read
        self._read += 1
        self._current = n
        return _valid(self._recv, _NONCE.pack(n, 0), head, tag)

    def check_payload(self, body, tag) -> bool:
        """Whether ``tag`` is the peer's tag of the payload of the frame whose header was checked last."""
        return _valid(self._recv, _NONCE.pack(self._current, 1), body, tag)


def _valid(aead: AESGCM, nonce: bytes, data, tag) -> bool:
    try:
        aead.decrypt(nonce, bytes(tag), data)
    except InvalidTag:
        return False
    return True
