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
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from typing import Callable, Sequence

import grpc

from collcomm.coordinator import coordinator_pb2 as pb
from collcomm.coordinator import coordinator_pb2_grpc as pb_grpc
from collcomm.coordinator import protocol
from collcomm.coordinator import state as st
from collcomm.errors import (AuthenticationError, CollectiveError, CollectiveTimeout, MismatchError,
                             PeerFailure)


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


def _slack(wait_s: float) -> float:
    """Extra gRPC deadline beyond a server-side wait, so the server's own timeout message (which
    names what was missing) arrives before the client gives up on its own."""
    return min(5.0, 0.5 + 0.25 * wait_s)


class CoordinatorClient:
    """A connection to the coordinator at ``address`` ("host:port"), proving ``token``.

    Thread-safe: one client may serve several threads of a rank.
    """

    def __init__(self, address: str, token: str, timeout: float = 300.0):
        if st.parse_address(address) is None:
            raise ValueError(f"coordinator address {address!r} is not host:port")
        self.address = address
        self.timeout = self._check_timeout(timeout)
        self._metadata = ((protocol.TOKEN_KEY, protocol.check_token(token)),)
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._connected = False
        self._closed = False
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------- calls
    def register(self, rank: int, world_size: int, address: str, *, hostname: str | None = None,
                 pid: int | None = None, timeout: float | None = None) -> st.PeerTable:
        """Announce this rank's data listener ``address``; wait until every rank has registered.

        Returns the peer table (``table[r].address``, ``.hostname``, ``.pid``) and the world's
        epoch. Registering again from the same process is a no-op; another process may take the
        rank only after the old one was reported dead.
        """
        self._check_rank("rank", rank)
        if self._check_rank("world size", world_size) == 0:
            raise ValueError("world size must be at least 1")
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
              request: Callable[[float], object], waits: bool = True):
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
            raise self._error(err, what, budget) from None
        except ValueError as err:  # the channel was closed under us
            if self._closed:
                raise CoordinatorUnavailable(f"{what}: the coordinator client was closed") from None
            raise

    def _connect(self, deadline: float, budget: float, what: str) -> None:
        """Wait (within the budget) until the channel is connected; gRPC retries with backoff."""
        if self._closed:
            raise CoordinatorUnavailable(f"{what}: the coordinator client was closed")
        if self._connected:
            return
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=max(deadline - time.monotonic(), 0.0))
        except grpc.FutureTimeoutError:
            ready.cancel()
            raise CoordinatorUnavailable(f"cannot reach coordinator at {self.address} "
                                         f"({what} gave up after {st.seconds(budget)})") from None
        except grpc.FutureCancelledError:
            raise CoordinatorUnavailable(f"{what}: the coordinator client was closed") from None
        self._connected = True

    def _error(self, err: grpc.RpcError, what: str, budget: float) -> CollectiveError:
        code = err.code()
        details = st.one_line(err.details() or "", 2000)
        trailing = dict(err.trailing_metadata() or ())
        kind = trailing.get(protocol.ERROR_KIND_KEY)
        rank = trailing.get(protocol.ERROR_RANK_KEY)
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
