"""The coordinator service: a gRPC thread-pool server around :class:`CoordinatorState`.

Every handler takes one lock (a :class:`threading.Condition`), asks the state, and, when the
answer is :class:`~collcomm.coordinator.state.Waiting`, waits on the condition until the state
changes, the request's ``timeout_s`` or the gRPC deadline passes, the caller goes away, or the
server shuts down (which wakes every waiter with a "shutdown" error). An interceptor refuses
calls without the job token before any handler runs; it counts them per caller and logs a summary
line per interval (:mod:`collcomm.refusals`), never a line per call.

With ``tls=`` (a certificate and its key, :mod:`.tls`) the service speaks TLS through grpc's
own ``ssl_server_credentials``; clients verify it with ``COLLCOMM_TLS_CA``. Without it the
channel is plaintext and the token is only as private as the network: fine on one machine or a
trusted network, not across machines on a shared one.

Known limits: the state lives in memory only (a restarted coordinator knows nothing); every
waiting call holds a server thread (``max_workers`` bounds them; beyond that calls are refused
with RESOURCE_EXHAUSTED); clients are authenticated by the token, not by certificates. The
program around the server (``collcomm coordinator``) is :mod:`.standalone`.
"""

from __future__ import annotations

import functools
import hmac
import logging
import math
import os
import threading
import time
from concurrent import futures
from typing import Callable

import grpc

from collcomm._version import __version__
from collcomm.coordinator import coordinator_pb2 as pb
from collcomm.coordinator import coordinator_pb2_grpc as pb_grpc
from collcomm.coordinator import objects as ob
from collcomm.coordinator import protocol
from collcomm.coordinator import state as st
from collcomm.coordinator import tls as tls_mod
from collcomm.errors import CollectiveError
from collcomm.refusals import RefusalLog

log = logging.getLogger("collcomm.coordinator")

MAX_WAIT_S = 7 * 24 * 3600.0  # a bound on any wait, whatever the request says


def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) <= 0:
        raise ValueError(f"{name}={raw!r} is not a positive number of bytes")
    return int(raw)


class _Refused(Exception):
    """Raised inside a handler to end the call with a refusal's status code."""

    def __init__(self, kind: str, message: str, rank: int | None = None):
        super().__init__(message)
        self.kind, self.message, self.rank = kind, message, rank


class _TokenCheck(grpc.ServerInterceptor):
    """Let a call through only if its ``collcomm-token`` metadata equals the job token. Refusals
    are counted per caller's address and summarized (``refusals``), never logged one line each:
    anyone who reaches the port may call."""

    def __init__(self, token: str, refusals: RefusalLog):
        self._token = token.encode("ascii")
        self._refusals = refusals
        self._deny_wrong = grpc.unary_unary_rpc_method_handler(functools.partial(self._refuse, "wrong token"))
        self._deny_missing = grpc.unary_unary_rpc_method_handler(functools.partial(self._refuse, "no token"))

    def intercept_service(self, continuation, handler_call_details):
        for key, value in handler_call_details.invocation_metadata or ():
            if key == protocol.TOKEN_KEY:
                given = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
                if hmac.compare_digest(given, self._token):
                    return continuation(handler_call_details)
                return self._deny_wrong
        return self._deny_missing

    def _refuse(self, reason: str, request, context):
        peer = context.peer()
        self._refusals.refused(caller_address(peer), reason,
                               f"refused a call from {peer}: wrong or missing job token ({reason})")
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "wrong or missing job token (metadata collcomm-token); use the job's COLLCOMM_TOKEN")


def caller_address(peer: str) -> str:
    """A gRPC peer ("ipv4:127.0.0.1:5432", "ipv6:[::1]:5432", "unix:/path") without its port:
    whom refusals are counted for (each call may come from a port of its own)."""
    family, _, rest = peer.partition(":")
    if family in ("ipv4", "ipv6") and ":" in rest:
        return rest.rpartition(":")[0].strip("[]")
    return peer


def _handled(method):
    """Turn a _Refused raised by ``method`` into the status code and trailing metadata."""

    @functools.wraps(method)
    def handler(self, request, context):
        try:
            return method(self, request, context)
        except _Refused as refusal:
            metadata = [(protocol.ERROR_KIND_KEY, refusal.kind)]
            if refusal.rank is not None:
                metadata.append((protocol.ERROR_RANK_KEY, str(refusal.rank)))
            context.set_trailing_metadata(tuple(metadata))
            context.abort(protocol.STATUS_OF_KIND[refusal.kind], st.one_line(refusal.message, 2000))

    return handler


class _Servicer(pb_grpc.CoordinatorServicer):
    """The RPC handlers; all state access goes through ``owner._cond``."""

    def __init__(self, owner: "CoordinatorServer"):
        self._owner = owner
        self._cond = owner._cond
        self._state = owner._state
        self._objects = owner._objects

    # ----------------------------------------------------------------------- plumbing
    def _locked(self, action: Callable[[], object], notify: bool = False):
        """Run ``action`` on the state under the lock; a Refusal result ends the call."""
        with self._cond:
            self._refuse_if_closed()
            result = action()
            if notify:
                self._cond.notify_all()
        if isinstance(result, st.Refusal):
            raise _Refused(result.kind, result.message, result.rank)
        return result

    def _refuse_if_closed(self) -> None:
        if self._owner._closed:
            raise _Refused(protocol.SHUTDOWN, "the coordinator is shutting down")

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _await(self, context, timeout_s: float, check: Callable[[], object], what: str,
               give_up: Callable[[], None] | None = None):
        """Wait until ``check()`` (called under the lock) stops returning Waiting.

        The wait ends at the request's ``timeout_s`` or the gRPC deadline, whichever is first;
        then ``give_up`` runs under the same lock and the call fails with a timeout that says
        what was still missing.
        """
        limit = min(max(0.0, timeout_s), MAX_WAIT_S) if not math.isnan(timeout_s) else 0.0
        rpc_left = context.time_remaining()
        if rpc_left is not None:
            limit = min(limit, max(0.0, rpc_left))
        deadline = time.monotonic() + limit
        context.add_callback(self._wake)  # a caller that goes away wakes us
        with self._cond:
            while True:
                outcome = check()
                if not isinstance(outcome, st.Waiting):
                    break
                self._refuse_if_closed()
                left = deadline - time.monotonic()
                if left <= 0 or not context.is_active():
                    if give_up is not None:
                        give_up()
                    raise _Refused(protocol.TIMEOUT,
                                   f"{what} timed out after {st.seconds(limit)}: {outcome.reason}")
                self._cond.wait(left)
        if isinstance(outcome, st.Refusal):
            raise _Refused(outcome.kind, outcome.message, outcome.rank)
        return outcome

    # ----------------------------------------------------------------------- handlers
    @_handled
    def Register(self, request, context):
        self._locked(lambda: self._state.register(request.rank, request.world_size, request.address,
                                                  request.hostname, request.pid), notify=True)
        table = self._await(context, request.timeout_s, self._state.peer_table,
                            f"register of rank {request.rank}")
        return protocol.peer_table_to_pb(table)

    @_handled
    def FormGroup(self, request, context):
        members = tuple(request.members)
        ticket = self._locked(lambda: self._state.join_group(request.name, members, request.rank),
                              notify=True)
        info = self._await(context, request.timeout_s, lambda: self._state.formation_outcome(ticket),
                           f"form_group '{request.name}' by rank {request.rank}",
                           give_up=lambda: self._state.leave_group(ticket))
        return pb.FormGroupResponse(group_id=info.group_id, epoch=info.epoch, members=info.members)

    @_handled
    def ReportFailure(self, request, context):
        def report():
            outcome = self._state.report_failure(request.group_id, request.failed_rank,
                                                 request.reporter_rank, request.reason)
            if not isinstance(outcome, st.Refusal):
                self._objects.drop_rank(request.failed_rank)  # its copies are gone
            return outcome

        outcome = self._locked(report, notify=True)
        if outcome.newly_dead:
            log.warning("rank %d reported dead by %s: %s", request.failed_rank,
                        "the launcher" if request.reporter_rank < 0 else f"rank {request.reporter_rank}",
                        st.one_line(request.reason) or "no reason given")
        return protocol.failure_to_pb(outcome)

    @_handled
    def GroupStatus(self, request, context):
        return protocol.group_to_pb(self._locked(lambda: self._state.group_status(request.group_id)))

    @_handled
    def KvSet(self, request, context):
        self._locked(lambda: self._state.kv_set(request.key, request.value), notify=True)
        return pb.KvSetResponse()

    @_handled
    def KvGet(self, request, context):
        value = self._await(context, request.timeout_s, lambda: self._state.kv_get(request.key),
                            f"kv_get of key '{request.key}'")
        return pb.KvGetResponse(value=value)

    @_handled
    def KvDelete(self, request, context):
        return pb.KvDeleteResponse(existed=self._locked(lambda: self._state.kv_delete(request.key)))

    @_handled
    def KvAdd(self, request, context):
        value = self._locked(lambda: self._state.kv_add(request.key, request.delta), notify=True)
        return pb.KvAddResponse(value=value)

    @_handled
    def Ping(self, request, context):
        summary = self._locked(self._state.summary)
        return pb.PingResponse(world_size=summary.world_size, registered=summary.registered,
                               pid=os.getpid(), version=__version__)

    # ----------------------------------------------------------------------- objects
    @_handled
    def ObjectPut(self, request, context):
        meta = protocol.meta_from_pb(request.meta)
        holder = protocol.holder_from_pb(request.holder) if request.HasField("holder") else None
        self._locked(lambda: self._objects.put(request.key, meta, holder, complete=request.complete,
                                               inline=bytes(request.data) if request.inline else None),
                     notify=True)
        return pb.ObjectPutResponse()

    @_handled
    def ObjectLocate(self, request, context):
        reader = protocol.holder_from_pb(request.reader)
        lost = [None if request.lost_source < 0 else request.lost_source]

        def locate():
            outcome = self._objects.locate(request.key, reader, register=request.register, lost_source=lost[0])
            lost[0] = None  # dropped once; a wait goes on without it
            return outcome

        found = self._await(context, request.timeout_s, locate, f"get of object '{request.key}'")
        self._wake()  # a registration changed the directory
        return protocol.source_to_pb(found)

    @_handled
    def ObjectUpdate(self, request, context):
        if request.event not in ("complete", "abandon"):
            raise _Refused(st.INVALID, f"unknown object event {request.event!r}")
        action = self._objects.complete if request.event == "complete" else self._objects.abandon
        self._locked(lambda: action(request.key, request.rank), notify=True)
        return pb.ObjectUpdateResponse()

    @_handled
    def ObjectDelete(self, request, context):
        existed, holders = self._locked(lambda: self._objects.delete(request.key), notify=True)
        return pb.ObjectDeleteResponse(existed=existed, holders=[protocol.holder_to_pb(h) for h in holders])

    @_handled
    def ObjectInfo(self, request, context):
        return protocol.info_to_pb(self._locked(lambda: self._objects.info(request.key)))

    @_handled
    def ObjectReady(self, request, context):
        keys = list(request.keys)
        ready = self._await(context, request.timeout_s, lambda: self._objects.ready(keys, request.known),
                            f"wait for {len(keys)} objects")
        return pb.ObjectReadyResponse(ready=[protocol.info_to_pb(i) for i in ready])

    @_handled
    def Shutdown(self, request, context):
        reason = st.one_line(request.reason) or "no reason given"
        log.warning("shutdown requested by %s: %s", context.peer(), reason)
        self._owner._close()
        threading.Thread(target=self._owner.stop, name="collcomm-coordinator-stop", daemon=True).start()
        return pb.ShutdownResponse()



class CoordinatorServer:
    """The coordinator service on ``host:port`` (port 0: any free port).

    ::

        with CoordinatorServer(token) as server:   # start() on entry, stop() on exit
            address = server.address               # "127.0.0.1:41234"
    """

    def __init__(self, token: str, host: str = "127.0.0.1", port: int = 0, *, max_workers: int = 1024,
                 tls: "tls_mod.ServerTLS | tuple[bytes, bytes] | None" = None,
                 directory_bytes: int | None = None):
        """``tls``: serve TLS with this certificate (chain) and private key, PEM bytes as a
        ``(cert_pem, key_pem)`` pair or a checked :class:`~collcomm.coordinator.tls.ServerTLS`
        (:func:`~collcomm.coordinator.tls.load_server_files` reads the files); None: plaintext.
        A pair that does not parse, has expired or does not match raises TLSConfigError.
        ``directory_bytes``: the object directory's memory bound (default
        ``COLLCOMM_DIRECTORY_BYTES``, else 1 GiB)."""
        self._token = protocol.check_token(token)
        if not 0 <= int(port) < 65536:
            raise ValueError(f"port {port} is out of range 0-65535")
        self._host, self._port, self._max_workers = host, int(port), max_workers
        self.tls: tls_mod.ServerTLS | None = tls_mod.as_server_tls(tls)
        self._cond = threading.Condition()
        self._state = st.CoordinatorState()
        self._objects = ob.ObjectDirectory(directory_bytes if directory_bytes is not None else
                                           _env_bytes("COLLCOMM_DIRECTORY_BYTES", ob.DEFAULT_MAX_BYTES),
                                           ob.inline_limit())
        self._closed = False
        self._refusals = RefusalLog(log, "calls")  # calls without the token (see _TokenCheck)
        self._stopped = threading.Event()
        self._server: grpc.Server | None = None
        self.address: str | None = None

    def start(self) -> str:
        """Bind and serve; return the bound ``host:port``."""
        if self._server is not None:
            raise RuntimeError("the coordinator server was already started")
        server = grpc.server(
            futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="collcomm-coordinator"),
            interceptors=[_TokenCheck(self._token, self._refusals)],
            options=[("grpc.so_reuseport", 0)],  # a second coordinator must not share the port
            maximum_concurrent_rpcs=self._max_workers)
        pb_grpc.add_CoordinatorServicer_to_server(_Servicer(self), server)
        host = f"[{self._host}]" if ":" in self._host and not self._host.startswith("[") else self._host
        try:
            if self.tls is None:
                port = server.add_insecure_port(f"{host}:{self._port}")
            else:
                port = server.add_secure_port(f"{host}:{self._port}", self.tls.credentials())
        except RuntimeError:
            port = 0
        if not port:
            raise CollectiveError(f"cannot listen on {host}:{self._port} for the coordinator "
                                  "(port in use or address not local)")
        server.start()
        self._server = server
        self.address = f"{host}:{port}"
        log.info("coordinator listening on %s%s", self.address, " with TLS" if self.tls else "")
        return self.address

    def __repr__(self) -> str:
        where = self.address or f"{self._host}:{self._port}, not started"
        return f"CoordinatorServer({where}, {'TLS' if self.tls else 'plaintext'})"

    def _close(self) -> None:
        """Refuse new calls and wake every waiter (they end with a "shutdown" error)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stop(self, grace: float = 1.0) -> None:
        """Wake every waiter with an error, then stop serving (after at most ``grace`` s)."""
        self._close()
        server = self._server
        if server is not None:
            server.stop(grace).wait(grace + 5.0)
        self._refusals.flush()
        self._stopped.set()

    def wait_stopped(self, timeout: float) -> bool:
        """True once the server has stopped (by ``stop`` or a Shutdown call)."""
        return self._stopped.wait(timeout)

    def wait_until(self, predicate: Callable[[st.CoordinatorState], bool], timeout: float) -> bool:
        """Wait until ``predicate(state)`` (evaluated under the lock) holds; False on timeout.

        For launchers that embed the coordinator and for tests: e.g. wait until some ranks
        have registered, without sleeping.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._state):
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._cond.wait(left)
            return True

    def __enter__(self) -> "CoordinatorServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

