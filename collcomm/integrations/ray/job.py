"""Joining the collcomm job of a Ray job: the coordinator lives in a named Ray actor.

There is nothing for the user to start. The first process of a Ray job (driver, actor or task)
that calls :func:`init` creates the actor ``collcomm-coordinator-<job id>`` in the Ray namespace
``collcomm`` (``get_if_exists``, so racing first callers get the same one); it runs collcomm's
embedded coordinator with a random token on its node's IP address and hands address and token to
whoever asks through Ray's own RPC. Every process then joins an *open* collcomm job
(``cc.init(world_size=0)``): its rank is drawn from the coordinator's counter, it registers its
Ray node as its host (the object layer's box, the planner's host) and listens on its node's IP.

The actor is detached, so that killing whichever actor happened to create it (the fault tests
do) does not take the job's coordinator with it; the driver removes it when it exits
(``atexit``) or calls :func:`shutdown`, and ``ray.shutdown()`` of a local cluster ends it too.
A driver that never calls :func:`init` leaves it to the cluster's end (a few threads, one port).
"""

from __future__ import annotations

import atexit
import os
import secrets
import threading

import ray

import collcomm.api as api
from collcomm.errors import CollectiveError

NAMESPACE = "collcomm"
ACTOR_PREFIX = "collcomm-coordinator-"
DEFAULT_TIMEOUT = 60.0  # seconds for every call through this integration unless told otherwise

_LOCK = threading.Lock()
_JOINED: tuple[str, str] | None = None  # (Ray job id, node id) of the job this process joined
_CLEANUP_REGISTERED = False
_WHERE: list[str] = []  # the coordinator's address and token, once joined


class _Coordinator:
    """The job's coordinator, inside a Ray actor (wrapped by ``ray.remote`` on first use)."""

    def __init__(self) -> None:
        from collcomm.coordinator.server import CoordinatorServer

        self.token = secrets.token_hex(16)
        host = ray.util.get_node_ip_address()
        self.server = CoordinatorServer(self.token, host=host, port=0)
        self.address = self.server.start()

    def where(self) -> tuple[str, str]:
        return self.address, self.token

    def stop(self) -> None:
        self.server.stop(0.5)


_ACTOR_CLASS = None


def _actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        # num_cpus=0: it must not take a CPU from the job's actors; a few threads serve gRPC.
        _ACTOR_CLASS = ray.remote(num_cpus=0, max_concurrency=8)(_Coordinator)
    return _ACTOR_CLASS


def job_id() -> str:
    if not ray.is_initialized():
        raise CollectiveError("collcomm.integrations.ray needs Ray: call ray.init() first (or run inside a "
                              "Ray task or actor)")
    return ray.get_runtime_context().get_job_id()


def coordinator_actor(create: bool = True):
    """The job's coordinator actor (created on first use when ``create``), or None."""
    name = ACTOR_PREFIX + job_id()
    if not create:
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None
    return _actor_class().options(name=name, namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True).remote()


def init(timeout: float | None = None, *, where: tuple[str, str] | None = None) -> int:
    """Make this process part of its Ray job's collcomm job (idempotent); returns its collcomm rank.

    ``timeout`` (default 60 s, or ``COLLCOMM_TIMEOUT``) bounds finding the coordinator and becomes
    the default timeout of every collcomm call in this process. ``where``: the coordinator's
    (address, token) when the caller has them already (the tensor transport's metadata carries
    them, which saves a consumer the round trip to the coordinator actor inside Ray's transfer)."""
    global _JOINED
    with _LOCK:
        context = ray.get_runtime_context()
        me = (job_id(), context.get_node_id())
        if _JOINED is not None:
            if _JOINED == me:
                return api.rank()
            # A driver that ran ray.shutdown() and ray.init() again: its old cluster (and the
            # coordinator in it) is gone; leave that job and join this one.
            api.shutdown()
            _JOINED = None
        if api.is_initialized():
            raise CollectiveError("collcomm is already initialised in this process outside Ray; call "
                                  "collcomm.shutdown() before collcomm.integrations.ray.init()")
        timeout = _default_timeout() if timeout is None else float(timeout)
        if where is not None:
            address, token = where
        else:
            actor = coordinator_actor()
            try:
                address, token = ray.get(actor.where.remote(), timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                raise CollectiveError(f"the job's collcomm coordinator (Ray actor {ACTOR_PREFIX}{me[0]}) did not "
                                      f"answer within {timeout:g} s") from None
        _WHERE[:] = [address, token]
        api.init(world_size=0, coordinator=address, token=token, timeout=timeout,
                 host=ray.util.get_node_ip_address(), hostname=f"ray-node-{me[1][:16]}")
        _JOINED = me
        if context.worker.mode == ray.SCRIPT_MODE:  # the driver: remove the coordinator when it exits
            _register_cleanup()
        return api.rank()


def _default_timeout() -> float:
    raw = os.environ.get("COLLCOMM_TIMEOUT", "").strip()
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise ValueError(f"COLLCOMM_TIMEOUT={raw!r} is not a number") from None


def joined() -> bool:
    return _JOINED is not None


def coordinator() -> tuple[str, str]:
    """(address, token) of the job's coordinator; joins first if needed."""
    init()
    return _WHERE[0], _WHERE[1]


def _register_cleanup() -> None:
    global _CLEANUP_REGISTERED
    if not _CLEANUP_REGISTERED:
        _CLEANUP_REGISTERED = True
        atexit.register(_at_exit)


def _at_exit() -> None:
    try:
        shutdown(stop_coordinator=True)
    except Exception:  # noqa: BLE001 - Ray may be gone already at interpreter exit
        pass


def shutdown(stop_coordinator: bool = False) -> None:
    """Leave the collcomm job (this process's objects go with it); ``stop_coordinator``: also end
    the job's coordinator actor (the driver does at exit), which ends the job for everyone."""
    global _JOINED
    with _LOCK:
        api.shutdown()
        _JOINED = None
        if stop_coordinator and ray.is_initialized():
            actor = coordinator_actor(create=False)
            if actor is not None:
                ray.kill(actor, no_restart=True)
