"""The TCP transport's handshake: both ends prove knowledge of the job token before any frame flows.

The client sends a hello (its rank, the server's, the group, the epoch, a nonce, flags); the
server answers with its own nonce and an HMAC-SHA256 over both, proving the token; the client
answers with its own HMAC; the server accepts (one byte) or refuses. Wire format:
:mod:`collcomm.transport.frames`. Nothing is allocated or trusted on a peer's word before its
proof checked.
"""

from __future__ import annotations

import os
import socket
import time

from collcomm.errors import AuthenticationError
from collcomm.transport import frames
from collcomm.transport.frames import Hello, ProtocolError
from collcomm.transport.tcp.sockets import recv_exact

HANDSHAKE_TIMEOUT = 10.0  # client side: the peer is one of ours and may be busy (never past the operation's deadline)
SERVE_HANDSHAKE_TIMEOUT = 3.0  # server side: an unknown connection gets this long to prove itself
REFUSED = b"\x00"


def client_handshake(sock: socket.socket, token: bytes, rank: int, peer: int, group: int, epoch: int, *,
                     reconnect: bool = False, relay: bool = False, deadline: float | None = None) -> None:
    """Prove the token both ways, as the connecting side. Each socket call waits at most
    HANDSHAKE_TIMEOUT, and never past ``deadline`` (the operation's): a stopped peer's kernel
    accepts the connection, then nothing answers."""
    end = time.monotonic() + HANDSHAKE_TIMEOUT
    if deadline is not None:
        end = min(end, deadline)

    def bounded() -> None:  # before each blocking step: what is left of the handshake's time
        sock.settimeout(max(end - time.monotonic(), 0.05))

    bounded()
    flags = (frames.HELLO_RECONNECT if reconnect else 0) | (frames.HELLO_RELAY if relay else 0)
    hello = frames.new_hello(rank, peer, group, epoch, flags)
    raw_hello = hello.pack()
    sock.sendall(raw_hello)
    challenge = bytearray(frames.CHALLENGE_SIZE)
    bounded()
    recv_exact(sock, memoryview(challenge))
    server_nonce, server_mac = bytes(challenge[:16]), bytes(challenge[16:])
    if not frames.mac_ok(frames.mac(token, b"S", raw_hello, server_nonce), server_mac):
        raise AuthenticationError(f"rank {peer} could not prove knowledge of the job token")
    bounded()
    sock.sendall(frames.mac(token, b"C", raw_hello, server_nonce))
    ok = bytearray(1)
    bounded()
    recv_exact(sock, memoryview(ok))
    if bytes(ok) != frames.ACCEPTED:
        raise AuthenticationError(f"rank {peer} refused the connection")


def server_handshake(sock: socket.socket, token: bytes, rank: int) -> Hello:
    """The accepting side, up to the verdict: read the hello (addressed to ``rank``), prove the
    token, check the client's proof; the caller then accepts (:func:`accept`) or refuses
    (:func:`refuse`). Raises AuthenticationError, ProtocolError or OSError."""
    sock.settimeout(SERVE_HANDSHAKE_TIMEOUT)
    raw = bytearray(frames.HELLO_SIZE)
    recv_exact(sock, memoryview(raw))
    hello = frames.unpack_hello(bytes(raw))
    if hello.server != rank:
        raise ProtocolError(f"handshake addressed to rank {hello.server}")
    server_nonce = os.urandom(16)
    sock.sendall(server_nonce + frames.mac(token, b"S", bytes(raw), server_nonce))
    answer = bytearray(frames.MAC_SIZE)
    recv_exact(sock, memoryview(answer))
    if not frames.mac_ok(frames.mac(token, b"C", bytes(raw), server_nonce), bytes(answer)):
        raise AuthenticationError("client could not prove knowledge of the job token")
    return hello


def accept(sock: socket.socket) -> None:
    sock.sendall(frames.ACCEPTED)


def refuse(sock: socket.socket) -> None:
    sock.sendall(REFUSED)
