"""This process's object server: streams its copies to readers, runs reduce stages, frees copies.

One listener (TCP, and an abstract Unix socket for processes of the same machine and network
namespace, as the transport does), one thread per connection, at most :data:`MAX_CONNECTIONS` at
once (beyond that a connection is refused at once). Every connection proves the job token first
(:mod:`collcomm.transport.tcp.handshake`); refused connections are counted per source and
summarized (:mod:`collcomm.refusals`), never logged one line each. Requests and frames:
:mod:`collcomm.objects.wire`.

A read of a copy that is announced but not made yet (a reader registered with the directory an
instant before its copy exists) waits up to :data:`ANNOUNCE_WAIT_S` for it. A stream waits for
bytes as long as its reader is there: a reader that closes its end ends the stream within a
second, and a stream idle for :data:`IDLE_S` ends too.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time

from collcomm.errors import AuthenticationError, CollectiveError, CollectiveTimeout
from collcomm.objects import wire
from collcomm.objects.store import ObjectStore, Restarted
from collcomm.refusals import RefusalLog
from collcomm.transport.frames import ProtocolError
from collcomm.transport.tcp.connections import refusal_reason
from collcomm.transport.tcp.handshake import accept, server_handshake
from collcomm.transport.tcp.sockets import listen, peer_source, tune

log = logging.getLogger("collcomm.objects")

MAX_CONNECTIONS = 256
ANNOUNCE_WAIT_S = 10.0
IDLE_S = 600.0


class ObjectServer:
    """Serves ``store`` to the other processes of the job (see the module)."""

    def __init__(self, rank: int, token: bytes, store: ObjectStore, *, host: str = "127.0.0.1",
                 advertise_host: str | None = None, telemetry=None, stages=None, faults=None):
        self.rank, self.token, self.store = rank, token, store
        self.telemetry = telemetry
        self.faults = faults          # injected faults (COLLCOMM_FAULTS): delay and throttle apply here too
        self.stages = stages          # runs "stage" requests (collcomm.objects.stage.Stages)
        self._listener, self._local, self.address = listen(host, 0, advertise_host, "collcomm-obj-")
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        # Refused connections: counted per source and summarized, since anyone may knock.
        self.refusals = RefusalLog(log, "connections", f"rank {rank}: object server ")
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept_loop, args=(l,), daemon=True,
                                          name=f"collcomm-objects-accept-r{rank}")
                         for l in filter(None, (self._listener, self._local))]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ connections
    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                conn, addr = listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                self._refused(conn, addr, "too many connections", f"more than {MAX_CONNECTIONS} at once")
                conn.close()  # too many at once: the reader retries or picks another source
                continue
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                             name=f"collcomm-objects-serve-r{self.rank}").start()

    def _refused(self, conn: socket.socket, addr, reason: str, why) -> None:
        source, who = peer_source(conn, addr)
        self.refusals.refused(source, reason, f"rank {self.rank}: object server refused a connection from {who}: "
                                              f"{why}")

    def _serve(self, conn: socket.socket, addr=None) -> None:
        try:
            tune(conn)  # (socket buffers of 4 MiB: the default ones cut every chunk into pieces)
            try:
                hello, _ = server_handshake(conn, self.token, self.rank)
                if hello.group != wire.OBJECT_CHANNEL:
                    raise ProtocolError(f"connection for group {hello.group} at the object server")
            except (OSError, ProtocolError, AuthenticationError) as e:
                reason = refusal_reason(e)
                if reason is not None:  # (None: closed without a word)
                    self._refused(conn, addr, reason, e)
                return
            accept(conn)
            conn.settimeout(30.0)
            request = wire.read_request(conn)
            op = request["op"]
            if op == "read":
                self._stream(conn, request, hello.client)
            elif op == "stage":
                if self.stages is None:
                    wire.send_json(conn, wire.ERROR, {"kind": "refused", "message": "no reduce stages here"})
                else:
                    try:
                        self.stages.start(request)
                    except (ValueError, TypeError, CollectiveError) as e:  # malformed, no input here, store full
                        wire.send_json(conn, wire.ERROR, {"kind": "refused", "message": str(e)[:500]})
                        return
                    wire.send_json(conn, wire.OK, {})
            elif op == "drop":
                names = request.get("names")
                if not isinstance(names, list):
                    raise ProtocolError("drop request without names")
                dropped = [n for n in names if isinstance(n, str) and self.store.drop(n)]
                if self.stages is not None:
                    self.stages.forget(names)
                wire.send_json(conn, wire.OK, {"dropped": dropped})
            else:
                wire.send_json(conn, wire.ERROR, {"kind": "refused", "message": f"unknown request {op!r}"})
        except (OSError, ProtocolError, CollectiveError, ValueError) as e:
            log.debug("rank %d: object connection ended: %s", self.rank, e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            self._slots.release()

    # ------------------------------------------------------------------ streaming a copy
    def _stream(self, conn: socket.socket, request: dict, peer: int) -> None:
        name, offset = request.get("name"), request.get("offset", 0)
        if not isinstance(name, str) or not isinstance(offset, int) or offset < 0:
            raise ProtocolError("read request needs a name and an offset")
        copy = self.store.lookup(name, ANNOUNCE_WAIT_S)
        if copy is None:
            wire.send_json(conn, wire.ERROR, {"kind": "missing", "message": f"rank {self.rank} holds no copy "
                                                                           f"of object '{name}'"})
            return
        tx = self.telemetry.link(self.rank, peer) if self.telemetry is not None else None
        injected = self.faults.for_link(self.rank, peer) if self.faults is not None else None
        with copy.cond:
            copy.streams += 1
            generation = copy.generation
        try:
            offset = min(offset, copy.size)
            wire.send_json(conn, wire.META, {"size": copy.size, "dtype": copy.meta.dtype,
                                             "shape": list(copy.meta.shape)})
            gone = _closed_by_peer(conn)
            while offset < copy.size:
                try:
                    avail = copy.wait_beyond(offset, generation, time.monotonic() + IDLE_S, give_up=gone)
                except Restarted as r:
                    generation, offset = r.generation, 0
                    wire.send_frame(conn, wire.RESTART, generation=generation)
                    continue
                except CollectiveTimeout:
                    return
                except BaseException as e:  # the copy failed (a stage lost its input)
                    wire.send_json(conn, wire.ERROR, {"kind": "failed", "message": str(e)[:500],
                                                      "rank": getattr(e, "rank", None)})
                    return
                while offset < avail:
                    n = min(wire.MAX_CHUNK, avail - offset)
                    if injected is not None:
                        injected.before_data(n, corrupt=False)  # (delay, throttle)
                    t0 = time.perf_counter()
                    wire.send_frame(conn, wire.DATA, copy.view[offset:offset + n], offset=offset,
                                    generation=generation)
                    if tx is not None:
                        tx.record_transfer(n, time.perf_counter() - t0)
                    offset += n
            wire.send_frame(conn, wire.END, generation=generation)
            # The reader closes after END; wait for it, so the last bytes are not cut off by a reset.
            conn.settimeout(5.0)
            try:
                conn.recv(1)
            except OSError:
                pass
        finally:
            with copy.cond:
                copy.streams -= 1

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self._closed = True
        for l in filter(None, (self._listener, self._local)):
            try:
                l.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            l.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(2.0)
        self.refusals.flush()


def _closed_by_peer(conn: socket.socket):
    """A check that the reader went away (its end readable with nothing to read)."""

    def gone() -> bool:
        try:
            readable, _, _ = select.select([conn], [], [], 0)
            if not readable:
                return False
            return conn.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    return gone
