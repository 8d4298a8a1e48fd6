"""The ranks' side of the coordinator: one object, one method per call, typed errors.

::

    client = CoordinatorClient("10.0.0.1:29400", token, timeout=60.0)
    table = client.register(rank, world_size, "10.0.0.7:40001")      # waits for the world
    group = client.form_group("tp0", [0, 1], rank)                     # only members call
    client.group_status(group.group_id).dead_ranks                     # poll while waiting on data

Every call has a timeout: its ``timeout`` argument, else the constructor's. The timeout covers
the whole call: reaching the coordinator (retried with backoff while it is starting) and waiting
on the server. ``timeout=0`` asks once without waiting (``kv_get(key, timeout=0)`` raises
``CollectiveTimeout`` at once when the key is not set); the round trip itself then gets
``ROUND_TRIP_S``. Errors are one line and typed:

================================  ==========================================================
``CollectiveTimeout``             what was awaited never came (names the missing ranks/key)
``AuthenticationError``           the coordinator refused the job token
``MismatchError``                 ranks disagree (world size, member list of a group)
``PeerFailure``                   a rank the call needs was reported dead (``.rank``)
``CoordinatorUnavailable``        cannot reach the coordinator, lost it, or it shut down
``CoordinatorError``              any other refusal (bad argument, rank taken, unknown group)
================================  ==========================================================

``AuthenticationError`` also covers TLS: with ``COLLCOMM_TLS_CA`` set (:mod:`.tls`) the client
verifies the coordinator's certificate, and a certificate that CA did not sign, one that does not
name the host, or a coordinator without TLS fails the call at the first handshake, not at its
timeout (grpc alone would retry a failed handshake until the deadline); so does a plaintext
client whose connections a TLS coordinator closes (three in a row, within about a second). A
``COLLCOMM_TLS_CA`` that names a missing or malformed file fails the constructor
(:class:`~collcomm.coordinator.tls.TLSConfigError`, naming the variable and the path).

The token travels only in the call's metadata; neither ``repr()`` nor any error shows it.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from typing import Callable, Literal, Sequence

import grpc

from collcomm.coordinator import coordinator_pb2 as pb
from collcomm.coordinator import coordinator_pb2_grpc as pb_grpc
from collcomm.coordinator import objects as ob
from collcomm.coordinator import protocol
from collcomm.coordinator import state as st
from collcomm.coordinator import tls as tls_mod
from collcomm.errors import (AuthenticationError, CollectiveError, CollectiveTimeout, MismatchError,
                             ObjectDeleted, ObjectExists, ObjectLost, ObjectStoreFull, PeerFailure)

_OBJECT_ERRORS = {ob.EXISTS: ObjectExists, ob.DELETED: ObjectDeleted, ob.NOT_FOUND: ObjectDeleted,
                  ob.LOST: ObjectLost, ob.FULL: ObjectStoreFull}


class CoordinatorError(CollectiveError):
    """The coordinator refused a request (bad argument, rank already taken, unknown group)."""


class CoordinatorUnavailable(CoordinatorError, ConnectionError):
    """The coordinator cannot be reached, the connection to it was lost, or it shut down."""


_CHANNEL_OPTIONS = (
    ("grpc.enable_http_proxy", 0),               # never route the control plane through a proxy
    ("grpc.initial_reconnect_backoff_ms", 100),  # retry quickly while the coordinator starts
    ("grpc.max_reconnect_backoff_ms", 1000),
)


ROUND_TRIP_S = 0.5  # what a call with timeout 0 ("ask once, do not wait") allows the network
PROBE_S = 2.0       # at most this long to learn why a connection attempt failed (one fail-fast Ping)
UNCERTAIN_FAILURES = 3  # "socket closed" seen this many times in a row (over ~0.7 s): the server wants TLS


def _slack(wait_s: float) -> float:
    """Extra gRPC deadline beyond a server-side wait, so the server's own timeout message (which
    names what was missing) arrives before the client gives up on its own."""
    return min(5.0, 0.5 + 0.25 * wait_s)


class CoordinatorClient:
    """A connection to the coordinator at ``address`` ("host:port"), proving ``token``.

    Thread-safe: one client may serve several threads of a rank.
    """

    def __init__(self, address: str, token: str, timeout: float = 300.0, *,
                 tls: tls_mod.ClientTLS | Literal[False] | None = None):
        """``tls``: None (default) verifies the coordinator with ``$COLLCOMM_TLS_CA`` when it is
        set and connects in plaintext when not; False always connects in plaintext (a launcher's
        own coordinator on this machine); a :class:`~collcomm.coordinator.tls.ClientTLS` uses that."""
        if st.parse_address(address) is None:
            raise ValueError(f"coordinator address {address!r} is not host:port")
        self.address = address
        self.timeout = self._check_timeout(timeout)
        self._metadata = ((protocol.TOKEN_KEY, protocol.check_token(token)),)
        if tls is None:
            tls = tls_mod.client_tls_from_env()
        elif tls is not False and not isinstance(tls, tls_mod.ClientTLS):
            raise TypeError("tls must be None (from COLLCOMM_TLS_CA), False (plaintext) or a ClientTLS")
        self.tls: tls_mod.ClientTLS | None = tls or None
        if self.tls is None:
            self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(address, self.tls.credentials(),
                                                options=_CHANNEL_OPTIONS + self.tls.channel_options())
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._connected = False
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        scheme = f"TLS, CA {self.tls.ca_path}" if self.tls else "plaintext"
        return f"CoordinatorClient({self.address!r}, {scheme}, timeout={self.timeout:g})"

    # -------------------------------------------------------------------------- calls
    def register(self, rank: int, world_size: int, address: str, *, hostname: str | None = None,
                 pid: int | None = None, timeout: float | None = None) -> st.PeerTable:
        """Announce this rank's data listener ``address``; wait until every rank has registered.

        Returns the peer table (``table[r].address``, ``.hostname``, ``.pid``) and the world's
        epoch. Registering again from the same process is a no-op; another process may take the
        rank only after the old one was reported dead. ``world_size`` 0 joins an open job: the
        call returns at once with whoever has joined so far (epoch 0).
        """
        self._check_rank("rank", rank)
        self._check_rank("world size", world_size)
        hostname = socket.gethostname() if hostname is None else hostname
        pid = os.getpid() if pid is None else pid
        reply = self._call("Register", f"register of rank {rank}", timeout, lambda wait: pb.RegisterRequest(
            rank=rank, world_size=world_size, address=address, hostname=hostname, pid=pid,
            timeout_s=wait))
        return protocol.peer_table_from_pb(reply)

    def form_group(self, name: str, members: Sequence[int], rank: int, *,
                   timeout: float | None = None) -> st.GroupInfo:
        """Form the group ``name`` of world ranks ``members`` (in group-rank order).

        Only the members call, each with the same list; the call returns when all have called.
        """
        members = [self._check_rank("member", m) for m in members]
        self._check_rank("rank", rank)
        reply = self._call("FormGroup", f"form_group '{name}' by rank {rank}", timeout,
                           lambda wait: pb.FormGroupRequest(name=name, members=members, rank=rank,
                                                            timeout_s=wait))
        return st.GroupInfo(reply.group_id, name, reply.epoch, tuple(reply.members))

    def report_failure(self, group_id: int, failed_rank: int, reporter: int = st.EXTERNAL_REPORTER,
                       reason: str = "", *, timeout: float | None = None) -> st.FailureOutcome:
        """Mark ``failed_rank`` dead (idempotent) and bump the epoch of every group it is in.

        ``group_id`` 0 is the world; ``reporter`` is the reporting rank, or -1 for a launcher.
        """
        self._check_rank("failed rank", failed_rank)
        reply = self._call("ReportFailure", f"report_failure of rank {failed_rank}", timeout,
                           lambda wait: pb.ReportFailureRequest(group_id=group_id, failed_rank=failed_rank,
                                                                reporter_rank=reporter, reason=reason),
                           waits=False)
        return protocol.failure_from_pb(reply)

    def group_status(self, group_id: int, *, timeout: float | None = None) -> st.GroupInfo:
        """The group's current epoch, members and dead members (with reasons). Does not wait."""
        reply = self._call("GroupStatus", f"group_status of group {group_id}", timeout,
                           lambda wait: pb.GroupStatusRequest(group_id=group_id), waits=False)
        return protocol.group_from_pb(reply)

    def kv_set(self, key: str, value: bytes, *, timeout: float | None = None) -> None:
        value = self._check_bytes(value)
        self._call("KvSet", f"kv_set of key '{key}'", timeout,
                   lambda wait: pb.KvSetRequest(key=key, value=value), waits=False)

    def kv_get(self, key: str, *, timeout: float | None = None) -> bytes:
        """The value at ``key``, waiting until some rank sets it."""
        reply = self._call("KvGet", f"kv_get of key '{key}'", timeout,
                           lambda wait: pb.KvGetRequest(key=key, timeout_s=wait))
        return reply.value

    def kv_add(self, key: str, delta: int = 1, *, timeout: float | None = None) -> int:
        """Atomically add ``delta`` to the counter at ``key`` (absent: 0); return the new value."""
        reply = self._call("KvAdd", f"kv_add of key '{key}'", timeout,
                           lambda wait: pb.KvAddRequest(key=key, delta=delta), waits=False)
        return reply.value

    def kv_delete(self, key: str, *, timeout: float | None = None) -> bool:
        """Delete ``key``; True if it existed."""
        reply = self._call("KvDelete", f"kv_delete of key '{key}'", timeout,
                           lambda wait: pb.KvDeleteRequest(key=key), waits=False)
        return reply.existed

    def ping(self, *, timeout: float | None = None) -> st.Summary:
        """Health check: the world size (0 before any registration) and how many registered."""
        reply = self._call("Ping", "ping", timeout, lambda wait: pb.PingRequest(), waits=False)
        return st.Summary(reply.world_size, reply.registered)

    def shutdown(self, reason: str = "", *, timeout: float | None = None) -> None:
        """Ask the coordinator to wake every waiter with an error and stop."""
        self._call("Shutdown", "shutdown", timeout, lambda wait: pb.ShutdownRequest(reason=reason),
                   waits=False)

    # -------------------------------------------------------------------------- objects
    def object_put(self, key: str, meta: ob.Meta, holder: ob.Holder | None, *, complete: bool = False,
                   inline: bytes | None = None, timeout: float | None = None) -> None:
        """Publish object ``key``: its bytes (``inline``) or ``holder``'s copy (see objects.py)."""
        self._call("ObjectPut", f"put of object '{key}'", timeout, lambda wait: pb.ObjectPutRequest(
            key=key, meta=protocol.meta_to_pb(meta), holder=protocol.holder_to_pb(holder) if holder else None,
            complete=complete, inline=inline is not None, data=inline or b""), waits=False, key=key)

    def object_locate(self, key: str, reader: ob.Holder, *, register: bool = True, lost_source: int | None = None,
                      timeout: float | None = None) -> ob.Source:
        """Wait until ``key`` exists; its bytes or the source ``reader`` pulls from."""
        reply = self._call("ObjectLocate", f"get of object '{key}'", timeout, lambda wait: pb.ObjectLocateRequest(
            key=key, reader=protocol.holder_to_pb(reader), timeout_s=wait, register=register,
            lost_source=-1 if lost_source is None else lost_source), key=key)
        return protocol.source_from_pb(reply)

    def object_update(self, key: str, rank: int, event: str, *, timeout: float | None = None) -> None:
        """``event``: "complete" (``rank``'s copy is whole) or "abandon" (it gave the copy up)."""
        self._call("ObjectUpdate", f"{event} of object '{key}'", timeout,
                   lambda wait: pb.ObjectUpdateRequest(key=key, rank=rank, event=event), waits=False, key=key)

    def object_delete(self, key: str, *, timeout: float | None = None) -> tuple[bool, tuple[ob.Holder, ...]]:
        reply = self._call("ObjectDelete", f"delete of object '{key}'", timeout,
                           lambda wait: pb.ObjectDeleteRequest(key=key), waits=False, key=key)
        return reply.existed, tuple(protocol.holder_from_pb(h) for h in reply.holders)

    def object_info(self, key: str, *, timeout: float | None = None) -> ob.Info:
        reply = self._call("ObjectInfo", f"object_info of '{key}'", timeout,
                           lambda wait: pb.ObjectInfoRequest(key=key), waits=False, key=key)
        return protocol.info_from_pb(reply)

    def object_ready(self, keys: Sequence[str], known: int = 0, *, timeout: float | None = None) -> list[ob.Info]:
        """Wait until more than ``known`` of ``keys`` exist (or all do); those that exist."""
        reply = self._call("ObjectReady", f"wait for objects {', '.join(keys[:3])}", timeout,
                           lambda wait: pb.ObjectReadyRequest(keys=list(keys), known=known, timeout_s=wait))
        return [protocol.info_from_pb(i) for i in reply.ready]

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._channel.close()

    def __enter__(self) -> "CoordinatorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------- plumbing
    @staticmethod
    def _check_timeout(timeout: float, zero_ok: bool = False) -> float:
        timeout = float(timeout)
        if not ((timeout > 0 or (zero_ok and timeout == 0)) and math.isfinite(timeout)):
            allowed = "zero or more" if zero_ok else "a positive number of"
            raise ValueError(f"timeout must be {allowed} seconds, not {timeout}")
        return timeout

    @staticmethod
    def _check_rank(what: str, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < (1 << 32):
            raise ValueError(f"{what} {rank!r} is not a rank (a non-negative integer)")
        return rank

    @staticmethod
    def _check_bytes(value) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"kv values are bytes, not {type(value).__name__}")
        return bytes(value)

    def _call(self, method: str, what: str, timeout: float | None,
              request: Callable[[float], object], waits: bool = True, key: str | None = None):
        """Send one RPC within the budget ``timeout``; ``request(wait_s)`` builds the message.

        ``waits``: the server may wait up to ``wait_s``, so the gRPC deadline gets some slack.
        """
        budget = self.timeout if timeout is None else self._check_timeout(timeout, zero_ok=True)
        window = budget if budget > 0 else ROUND_TRIP_S  # timeout 0: ask once, do not wait
        deadline = time.monotonic() + window
        self._connect(deadline, window, what)
        left = max(deadline - time.monotonic(), 0.0)
        wait = left if budget > 0 else 0.0
        rpc_timeout = wait + _slack(wait) if waits else max(left, 0.001)
        try:
            return getattr(self._stub, method)(request(wait), timeout=rpc_timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise self._error(err, what, budget, key) from None
        except ValueError:  # the channel was closed under us
            if self._closed:
                raise CoordinatorUnavailable(f"{what}: the coordinator client was closed") from None
            raise

    def _connect(self, deadline: float, budget: float, what: str) -> None:
        """Wait (within the budget) until the channel is connected; gRPC retries with backoff.

        Each failed connection attempt is looked at (:meth:`_why_not_connected`): a refused
        connection is waited out (the coordinator may be starting), a TLS failure ends the wait
        with AuthenticationError, since retrying cannot mend a certificate."""
        if self._closed:
            raise CoordinatorUnavailable(f"{what}: the coordinator client was closed")
        if self._connected:
            return
        changed = threading.Event()
        ready = grpc.channel_ready_future(self._channel)
        ready.add_done_callback(lambda _: changed.set())

        def watch(state: grpc.ChannelConnectivity) -> None:
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                changed.set()

        self._channel.subscribe(watch)
        # grpc reports TRANSIENT_FAILURE once and stays there while it keeps retrying, so after a
        # first failure the channel is looked at again every `poll` seconds (0.1 s, doubling to 1 s).
        poll = None
        doubts = 0  # plaintext connections closed before the server spoke, in a row: a TLS coordinator?
        try:
            while not ready.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CoordinatorUnavailable(f"cannot reach coordinator at {self.address} "
                                                 f"({what} gave up after {st.seconds(budget)})")
                fired = changed.wait(left if poll is None else min(left, poll))
                changed.clear()
                if ready.done() or (not fired and poll is None):
                    continue
                problem = self._why_not_connected(deadline)
                if problem is not None and (problem[1] or doubts + 1 >= UNCERTAIN_FAILURES):
                    raise AuthenticationError(problem[0])
                doubts = 0 if problem is None else doubts + 1
                poll = 0.1 if poll is None else min(2 * poll, 1.0)
            ready.result(timeout=0)
        except grpc.FutureCancelledError:
            raise CoordinatorUnavailable(f"{what}: the coordinator client was closed") from None
        finally:
            self._channel.unsubscribe(watch)
            if not ready.done():
                ready.cancel()
        self._connected = True

    def _why_not_connected(self, deadline: float) -> tuple[str, bool] | None:
        """After a failed connection attempt: what grpc's last error says about TLS (see
        :func:`~collcomm.coordinator.tls.explain_connect_failure`), learnt from one Ping that does
        not wait for the channel (it fails at once with that error, or, while the next attempt is
        under way, with the next one's; at most PROBE_S)."""
        timeout = min(PROBE_S, deadline - time.monotonic())
        if timeout <= 0:
            return None
        try:
            self._stub.Ping(pb.PingRequest(), timeout=timeout, metadata=self._metadata, wait_for_ready=False)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                return tls_mod.explain_connect_failure(err.details() or "", self.address, self.tls)
        except ValueError:  # the channel was closed under us; the ready future says so next
            pass
        return None

    def _error(self, err: grpc.RpcError, what: str, budget: float, key: str | None = None) -> CollectiveError:
        code = err.code()
        details = st.one_line(err.details() or "", 2000)
        trailing = dict(err.trailing_metadata() or ())
        kind = trailing.get(protocol.ERROR_KIND_KEY)
        rank = trailing.get(protocol.ERROR_RANK_KEY)
        if kind in _OBJECT_ERRORS:
            return _OBJECT_ERRORS[kind](details, key)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return AuthenticationError(f"coordinator at {self.address} refused the job token during "
                                       f"{what}; check COLLCOMM_TOKEN")
        if kind == st.MISMATCH:
            return MismatchError(details)
        if kind == st.PEER_FAILURE:
            return PeerFailure(details, rank=int(rank) if rank and rank.isdigit() else None)
        if kind == protocol.SHUTDOWN:
            return CoordinatorUnavailable(f"coordinator at {self.address} shut down during {what}")
        if kind == protocol.TIMEOUT:
            return CollectiveTimeout(details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CollectiveTimeout(f"{what} got no answer from the coordinator at {self.address} "
                                     f"within {st.seconds(budget)}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            self._connected = False  # the next call waits for the coordinator again
            problem = tls_mod.explain_connect_failure(details, self.address, self.tls)
            if problem is not None and problem[1]:  # e.g. a coordinator restarted with another certificate
                return AuthenticationError(problem[0])
            if self._closed:
                return CoordinatorUnavailable(f"{what}: the coordinator client was closed")
            return CoordinatorUnavailable(f"lost the coordinator at {self.address} during {what}: "
                                          f"{details or code.name}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return CoordinatorError(f"coordinator at {self.address} is overloaded or the message is "
                                    f"too large ({what}): {details}")
        if kind is None and code == grpc.StatusCode.UNIMPLEMENTED:
            return CoordinatorError(f"{self.address} does not serve the collcomm coordinator "
                                    f"protocol ({what}): {details}")
        return CoordinatorError(details or f"{what} failed at the coordinator: {code.name}")
