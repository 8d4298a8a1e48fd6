"""Socket helpers of the TCP transport: reading exactly, tuning, opening a connection to a peer."""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

from collcomm.errors import CollectiveTimeout

SOCKET_BUFFER = 4 << 20
CONNECT_TIMEOUT = 10.0  # one connection attempt (never past the caller's deadline)


class PeerClosed(ConnectionResetError):
    """The peer closed the connection (end of stream)."""


def error_kind(e: BaseException) -> str:
    """The telemetry label of a socket error: eof, reset, refused, timeout or error."""
    if isinstance(e, PeerClosed):
        return "eof"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(e, (socket.timeout, TimeoutError, CollectiveTimeout)):
        return "timeout"
    return "error"


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise PeerClosed("connection closed by peer")
        got += r


def peer_source(sock: socket.socket, addr) -> tuple[str, str]:
    """Who is at the other end of an accepted connection, for counting its refusals
    (:class:`~collcomm.refusals.RefusalLog`): ``(source, description)``. The source of a TCP peer
    is its address without the port (each connection has a port of its own), that of a Unix
    socket peer its user (SO_PEERCRED); the description adds the port or the process id."""
    if isinstance(addr, tuple) and addr:  # (host, port) or IPv6's (host, port, flow, scope)
        host = str(addr[0])
        return host, f"{host}:{addr[1]}" if len(addr) > 1 else host
    try:
        pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except (OSError, AttributeError, struct.error):  # not Linux
        return "a local process", "a local process"
    return f"a local process of uid {uid}", f"a local process of uid {uid} (pid {pid})"


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:  # pragma: no cover - kernel limits
            pass


def send_parts(sock: socket.socket, parts) -> None:
    """Write ``parts`` (bytes-like) in order as one stream, without joining them (``sendmsg``)."""
    sent = sock.sendmsg(parts)
    for part in parts:
        size = len(part)
        if sent >= size:
            sent -= size
            continue
        sock.sendall(memoryview(part)[sent:])
        sent = 0


def listen(host: str, port: int, advertise_host: str | None,
           name_prefix: str) -> tuple[socket.socket, socket.socket | None, str]:
    """A TCP listener on ``host:port`` and, on Linux unless ``COLLCOMM_TRANSPORT=tcp``, one on an
    abstract Unix socket (peers on the same machine and network namespace meet there: the same
    bytes, without the TCP/IP stack on loopback); and the address to register: ``host:port``,
    followed by ``#@name`` when there is a Unix socket."""
    listener = socket.create_server((host, port), backlog=128)
    listener.settimeout(None)
    bound = listener.getsockname()
    address = f"{advertise_host or bound[0]}:{bound[1]}"
    local = None
    if sys.platform.startswith("linux") and os.environ.get("COLLCOMM_TRANSPORT", "auto") != "tcp":
        name = name_prefix + os.urandom(8).hex()
        local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        local.bind("\0" + name)
        local.listen(128)
        address += f"#@{name}"
    return listener, local, address


def split_address(address: str) -> tuple[str, int, str | None]:
    """``(host, port, unix name or None)`` of an address made by :func:`listen`."""
    tcp, _, local = address.partition("#@")
    host, _, port = tcp.rpartition(":")
    return host.strip("[]"), int(port), local or None


def open_socket(host: str, port: int, local: str | None, deadline: float) -> socket.socket:
    """A socket to the peer: its Unix socket when it is reachable from here, else TCP."""
    wait = min(CONNECT_TIMEOUT, max(deadline - time.monotonic(), 0.1))
    if local is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(wait)
        try:
            sock.connect("\0" + local)
            return sock
        except OSError:  # another machine or network namespace
            sock.close()
    return socket.create_connection((host, port), timeout=wait)
