"""Pulling a copy from another process: the reader's end of an object stream.

:func:`pull` fills a :class:`~collcomm.objects.store.Copy` from a holder's object server,
starting at the bytes it already has (a reader re-pointed to another source resumes where it
was), advancing the copy as each chunk lands, so that this copy can be streamed on while it is
still arriving. It ends when the copy is whole, or raises:

- :class:`SourceLost` (``rank``): the holder is gone, unreachable, or no longer has the copy;
  the caller asks the directory for another source and pulls again;
- :class:`UpstreamFailed` (``rank``): the holder's copy itself failed (a reduce stage whose
  input was lost): ``rank`` names the process whose loss failed it;
- CollectiveTimeout at the deadline; ProtocolError for a stream that is not one.

Each chunk is recorded in the link telemetry (holder -> this rank), like the collectives' frames.
"""

from __future__ import annotations

import socket
import time

from collcomm.errors import AuthenticationError, CollectiveError, CollectiveTimeout
from collcomm.objects import wire
from collcomm.objects.store import Copy
from collcomm.transport import frames
from collcomm.transport.frames import ProtocolError
from collcomm.transport.tcp.sockets import recv_exact


class SourceLost(CollectiveError):
    """The holder of a copy is gone or no longer has it."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


class UpstreamFailed(CollectiveError):
    """The copy being pulled failed at its holder; ``rank`` is the process whose loss failed it."""

    def __init__(self, message: str, rank: int | None):
        super().__init__(message)
        self.rank = rank


def pull(copy: Copy, address: str, peer: int, name: str, *, token: bytes, me: int, deadline: float,
         telemetry=None, cancelled=None, opened=None) -> int:
    """Fill ``copy`` from ``peer``'s copy ``name``; return the payload bytes received.
    ``cancelled()``, looked at before each chunk, ends the pull early (CollectiveError);
    ``opened(sock)`` is told the connection (whoever cancels may shut it down to end a wait)."""
    try:
        sock = wire.connect(address, token, me, peer, deadline)
    except AuthenticationError:
        raise
    except (OSError, ProtocolError, CollectiveTimeout) as e:
        if time.monotonic() >= deadline:
            raise CollectiveTimeout(f"pull of object '{name}' from rank {peer}: no connection in time") from None
        raise SourceLost(f"rank {peer} cannot be reached for object '{name}': {e}", peer) from None
    if opened is not None:
        opened(sock)
    rx = telemetry.link(peer, me) if telemetry is not None else None
    received = 0
    try:
        wire.bounded(sock, deadline)
        with copy.cond:
            offset, generation = copy.progress, copy.generation
        wire.send_request(sock, {"op": "read", "name": name, "offset": offset})
        while True:
            wire.bounded(sock, deadline)
            kind, gen, at, length, digest = wire.read_header(sock)
            if cancelled is not None and cancelled():
                raise CollectiveError(f"pull of object '{name}' from rank {peer} was cancelled")
            if kind == wire.DATA:
                if at != offset or at + length > copy.size:
                    raise ProtocolError(f"rank {peer} sent bytes {at}-{at + length} of object '{name}' where "
                                        f"{offset} was next")
                t0 = time.perf_counter()
                view = copy.view[at:at + length]
                recv_exact(sock, view)
                if frames.checksum(view) != digest:
                    raise ProtocolError(f"a chunk of object '{name}' from rank {peer} failed its checksum")
                if rx is not None:
                    rx.record_transfer(length, time.perf_counter() - t0)
                received += length
                offset += length
                copy.advance(offset, generation)
            elif kind == wire.META:
                meta = wire.read_json(sock, length, digest)
                if meta.get("size") != copy.size:
                    raise ProtocolError(f"rank {peer} holds object '{name}' of {meta.get('size')} bytes, "
                                        f"not {copy.size}")
            elif kind == wire.RESTART:
                wire.read_json(sock, length, digest) if length else None
                generation = copy.restart()  # our readers start again too
                offset = 0
            elif kind == wire.END:
                if offset != copy.size:
                    raise ProtocolError(f"rank {peer} ended object '{name}' at {offset} of {copy.size} bytes")
                return received
            elif kind == wire.ERROR:
                why = wire.read_json(sock, length, digest)
                message = str(why.get("message", ""))[:500]
                if why.get("kind") == "failed":
                    rank = why.get("rank")
                    raise UpstreamFailed(message, rank if isinstance(rank, int) else None)
                raise SourceLost(f"rank {peer}: {message}", peer)
            else:
                raise ProtocolError(f"rank {peer} sent frame kind {kind} on an object stream")
    except (socket.timeout, TimeoutError):
        if time.monotonic() >= deadline:
            raise CollectiveTimeout(f"object '{name}': {copy.progress} of {copy.size} bytes from rank {peer} "
                                    f"arrived in time") from None
        raise SourceLost(f"rank {peer} stopped answering for object '{name}'", peer) from None
    except OSError as e:
        if rx is not None:
            rx.record_error("eof" if isinstance(e, ConnectionResetError) else "error")
        raise SourceLost(f"lost rank {peer} while pulling object '{name}' ({e})", peer) from None
    finally:
        copy.received += received
        sock.close()
