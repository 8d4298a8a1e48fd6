"""The object streams' wire format: how one process pulls bytes of a copy from another.

Objects move by *pull*: a reader asks a holder for a copy by name from a byte offset, and the
holder streams whatever of it is there, as it arrives (a holder may itself still be receiving
the copy: that is what makes chains pipeline). This is a different shape from the collectives'
frames (pushed pieces of an operation both sides planned), so object streams have their own small
protocol, on connections authenticated with the same handshake as the transport's
(:mod:`collcomm.transport.tcp.handshake`, channel :data:`OBJECT_CHANNEL`): both ends prove the
job token before a byte moves.

After the handshake the client sends one request: ``u32 length | JSON``. Requests:

- ``{"op": "read", "name", "offset", "generation"}``: stream the copy ``name`` from ``offset``;
- ``{"op": "stage", ...}``: run a reduce stage here (:mod:`collcomm.objects.stage`);
- ``{"op": "drop", "names"}``: free these copies (a delete, the end of a reduction).

Every answer is a sequence of frames, a 32-byte header and a payload::

    kind u8 | pad 3 | generation u32 | offset u64 | length u64 | checksum u64 (xxh3-64 of the payload)

Kinds: META (JSON ``{"size", "dtype", "shape"}``: the copy exists; the stream follows), DATA
(``length`` bytes of the copy at ``offset``), END (the copy was sent whole), RESTART (the copy
started again from byte 0 at ``generation``: read from 0 again), ERROR (JSON ``{"kind",
"message", "rank"}``; kinds ``missing`` (no such copy here), ``failed`` (it failed: ``rank`` is
the process whose loss failed it), ``refused``), OK (JSON: the answer to stage and drop).
A DATA frame carries at most :data:`MAX_CHUNK` bytes, so a copy is forwarded at most that far
behind its arrival.

Limits: no per-frame MACs (``COLLCOMM_AUTH_FRAMES`` covers the collectives' frames, not object
streams; the handshake still authenticates every connection), and one request per connection.
"""

from __future__ import annotations

import json
import socket
import struct
import time

from collcomm.errors import CollectiveError
from collcomm.transport import frames
from collcomm.transport.frames import ProtocolError
from collcomm.transport.tcp.handshake import client_handshake
from collcomm.transport.tcp.sockets import open_socket, recv_exact, split_address, tune

OBJECT_CHANNEL = (1 << 32) - 1  # the handshake's "group" for object streams (no group has this id)
MAX_CHUNK = 256 << 10
MAX_REQUEST = 1 << 20

META, DATA, END, RESTART, ERROR, OK = 1, 2, 3, 4, 5, 6
KINDS = {META, DATA, END, RESTART, ERROR, OK}
_HEADER = struct.Struct("<B3xIQQQ")
HEADER_SIZE = _HEADER.size
MAX_CONTROL = 1 << 20  # bytes of a META, ERROR or OK payload


def connect(address: str, token: bytes, me: int, peer: int, deadline: float) -> socket.socket:
    """An authenticated connection to ``peer``'s object server at ``address``."""
    host, port, local = split_address(address)
    sock = open_socket(host, port, local, deadline)
    try:
        tune(sock)
        client_handshake(sock, token, me, peer, OBJECT_CHANNEL, 0, deadline=deadline)
    except BaseException:
        sock.close()
        raise
    return sock


def send_request(sock: socket.socket, request: dict) -> None:
    body = json.dumps(request, separators=(",", ":")).encode()
    sock.sendall(struct.pack("<I", len(body)) + body)


def read_request(sock: socket.socket) -> dict:
    raw = bytearray(4)
    recv_exact(sock, memoryview(raw))
    (n,) = struct.unpack("<I", raw)
    if n > MAX_REQUEST:
        raise ProtocolError(f"object request of {n} bytes exceeds {MAX_REQUEST}")
    body = bytearray(n)
    recv_exact(sock, memoryview(body))
    try:
        request = json.loads(body)
    except ValueError:
        raise ProtocolError("object request is not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise ProtocolError("object request has no op")
    return request


def send_frame(sock: socket.socket, kind: int, payload=b"", *, offset: int = 0, generation: int = 0,
               checksum: bool = True) -> None:
    n = len(payload)
    digest = frames.checksum(payload) if checksum and n else 0
    header = _HEADER.pack(kind, generation & 0xFFFFFFFF, offset, n, digest)
    if n and n > 4096:
        sock.sendall(header)
        sock.sendall(payload)
    else:
        sock.sendall(header + bytes(payload))


def send_json(sock: socket.socket, kind: int, value: dict) -> None:
    send_frame(sock, kind, json.dumps(value, separators=(",", ":")).encode())


def read_header(sock: socket.socket) -> tuple[int, int, int, int, int]:
    raw = bytearray(HEADER_SIZE)
    recv_exact(sock, memoryview(raw))
    kind, generation, offset, length, digest = _HEADER.unpack(raw)
    if kind not in KINDS:
        raise ProtocolError(f"object stream frame of unknown kind {kind}")
    if kind != DATA and length > MAX_CONTROL:
        raise ProtocolError(f"object stream control frame of {length} bytes")
    if kind == DATA and length > MAX_CHUNK:
        raise ProtocolError(f"object stream frame of {length} bytes exceeds {MAX_CHUNK}")
    return kind, generation, offset, length, digest


def read_json(sock: socket.socket, length: int, digest: int) -> dict:
    body = bytearray(length)
    recv_exact(sock, memoryview(body))
    if length and frames.checksum(body) != digest:
        raise ProtocolError("object stream control frame failed its checksum")
    try:
        value = json.loads(body)
    except ValueError:
        raise ProtocolError("object stream control frame is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError("object stream control frame is not a JSON object")
    return value


def bounded(sock: socket.socket, deadline: float, step: float = 30.0) -> None:
    """The socket's timeout for the next blocking call: what is left, at most ``step``."""
    sock.settimeout(max(0.05, min(step, deadline - time.monotonic())))


class Refused(CollectiveError):
    """The object server refused a request (an ERROR frame of kind "refused"); a live peer's no."""


def call(address: str, token: bytes, me: int, peer: int, request: dict, deadline: float) -> dict:
    """One request answered by an OK frame (stage, drop); :class:`Refused` when refused."""
    sock = connect(address, token, me, peer, deadline)
    try:
        bounded(sock, deadline)
        send_request(sock, request)
        kind, _, _, length, digest = read_header(sock)
        answer = read_json(sock, length, digest)
        if kind == ERROR:
            raise Refused(f"rank {peer} refused: {str(answer.get('message', ''))[:500]}")
        if kind != OK:
            raise ProtocolError(f"rank {peer} answered an object request with frame kind {kind}")
        return answer
    finally:
        sock.close()
