"""The TCP transport's handshake: both ends prove knowledge of the job token before any frame flows.

The client sends a hello (its rank, the server's, the group, the epoch, a nonce, flags); the
server answers with its own nonce and an HMAC-SHA256 over both, proving the token; the client
answers with its own HMAC; the server accepts (one byte) or refuses. Wire format:
:mod:`collcomm.transport.frames`. Nothing is allocated or trusted on a peer's word before its
proof checked. With frame authentication (:mod:`.frameauth`) both ends must have it on (a flag of
the hello), and the connection's keys come from the token and both nonces.
"""

from __future__ import annotations

import os
import socket
import time

from collcomm.errors import AuthenticationError
from collcomm.transport import frames
from collcomm.transport.frames import Hello, ProtocolError
from collcomm.transport.tcp.frameauth import FrameAuth, session_keys
from collcomm.transport.tcp.sockets import recv_exact

HANDSHAKE_TIMEOUT = 10.0  # client side: the peer is one of ours and may be busy (never past the operation's deadline)
SERVE_HANDSHAKE_TIMEOUT = 3.0  # server side: an unknown connection gets this long to prove itself
REFUSED = b"\x00"
REFUSED_AUTH_FRAMES = b"\x02"  # the two ends differ on frame authentication


class FrameAuthDiffers(AuthenticationError):
    """A peer that proved the token authenticates frames where this end does not, or the reverse."""


def client_handshake(sock: socket.socket, token: bytes, rank: int, peer: int, group: int, epoch: int, *,
                     reconnect: bool = False, relay: bool = False, auth_frames: bool = False,
                     deadline: float | None = None) -> FrameAuth | None:
    """Prove the token both ways, as the connecting side; the connection's frame MACs when
    ``auth_frames``. Each socket call waits at most HANDSHAKE_TIMEOUT, and never past ``deadline``
    (the operation's): a stopped peer's kernel accepts the connection, then nothing answers."""
    end = time.monotonic() + HANDSHAKE_TIMEOUT
    if deadline is not None:
        end = min(end, deadline)

    def bounded() -> None:  # before each blocking step: what is left of the handshake's time
        sock.settimeout(max(end - time.monotonic(), 0.05))

    bounded()
    flags = (frames.HELLO_RECONNECT if reconnect else 0) | (frames.HELLO_RELAY if relay else 0) | \
        (frames.HELLO_AUTH_FRAMES if auth_frames else 0)
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
    if bytes(ok) == REFUSED_AUTH_FRAMES:
        raise AuthenticationError(f"rank {peer} refused the connection: {_differ(auth_frames)}")
    if bytes(ok) != frames.ACCEPTED:
        raise AuthenticationError(f"rank {peer} refused the connection")
    return FrameAuth.for_client(session_keys(token, raw_hello, server_nonce)) if auth_frames else None


def server_handshake(sock: socket.socket, token: bytes, rank: int,
                     auth_frames: bool = False) -> tuple[Hello, FrameAuth | None]:
    """The accepting side, up to the verdict: read the hello (addressed to ``rank``), prove the
    token, check the client's proof and that it authenticates frames exactly when this end does
    (``auth_frames``); the caller then accepts (:func:`accept`) or refuses (:func:`refuse`).
    Returns the hello and the connection's frame MACs (None without frame authentication).
    Raises AuthenticationError, ProtocolError or OSError."""
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
    if bool(hello.flags & frames.HELLO_AUTH_FRAMES) != auth_frames:
        sock.sendall(REFUSED_AUTH_FRAMES)
        raise FrameAuthDiffers(f"rank {hello.client}: {_differ(auth_frames)}")
    keys = session_keys(token, bytes(raw), server_nonce) if auth_frames else None
    return hello, (FrameAuth.for_server(keys) if keys else None)


def _differ(mine: bool) -> str:
    return ("this rank authenticates frames (COLLCOMM_AUTH_FRAMES=1) and that one does not" if mine else
            "that rank authenticates frames (COLLCOMM_AUTH_FRAMES=1) and this one does not") + \
        "; set it alike on every rank"


def accept(sock: socket.socket) -> None:
    sock.sendall(frames.ACCEPTED)


def refuse(sock: socket.socket) -> None:
    sock.sendall(REFUSED)
