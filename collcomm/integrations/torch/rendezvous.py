"""Rendezvous through the c10d store PyTorch hands to the backend's creator.

The first process group (the default one) joins a collcomm job through the c10d store: rank 0
starts an embedded coordinator (random token) unless ``COLLCOMM_COORDINATOR`` names one, and
publishes address and token under ``collcomm/<generation>/coordinator``; every rank then calls
``collcomm.init``. Later groups (``new_group``, DeviceMesh dimensions) become collcomm groups: each
member writes its world rank into the group's (prefix) store, reads the others', and forms the
group under a name rank 0 of the group drew at random.

A job this module joined is left (``collcomm.shutdown``) by :func:`leave`, when the default process
group shuts down; a job the user started with ``collcomm.init()`` stays.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import threading
from typing import TYPE_CHECKING

import torch.distributed as dist

import collcomm as cc
from collcomm import api

if TYPE_CHECKING:
    from collcomm.runtime.group import Group

_STATE_LOCK = threading.Lock()
_OWNED = False  # this module initialised collcomm (and shuts it down with the default group)


def _store_get(store, key: str, seconds: float) -> bytes:
    store.wait([key], datetime.timedelta(seconds=seconds))
    return store.get(key)


def _generation(store, size: int) -> int:
    """How many times a group of this size rendezvoused in this store before (a store may outlive a
    destroyed process group: a FileStore, a re-created group of the same name)."""
    return (int(store.add("collcomm/joined", 1)) - 1) // size


def _coordinator_host() -> tuple[str, str]:
    """(address to bind the embedded coordinator to, address to publish)."""
    host = os.environ.get("COLLCOMM_HOST")
    master = os.environ.get("MASTER_ADDR")
    if host and host not in ("0.0.0.0", ""):
        return host, host
    if host or (master and master not in ("127.0.0.1", "localhost", "::1")):
        from collcomm.runtime import own_address

        return "0.0.0.0", own_address(f"{master or '8.8.8.8'}:{os.environ.get('MASTER_PORT') or 29500}")
    return "127.0.0.1", "127.0.0.1"


def _join(store, rank: int, size: int, seconds: float) -> None:
    """Join (or, on rank 0, start) the collcomm job of this default process group."""
    global _OWNED
    key = f"collcomm/{_generation(store, size)}/coordinator"
    server = None
    if rank == 0:
        address, token = os.environ.get("COLLCOMM_COORDINATOR"), os.environ.get("COLLCOMM_TOKEN")
        if not address:
            from collcomm.coordinator.server import CoordinatorServer

            token = secrets.token_hex(16)
            bind, publish = _coordinator_host()
            server = CoordinatorServer(token, host=bind, port=0)
            bound = server.start()
            address = f"{publish}:{bound.rpartition(':')[2]}"
        elif not token:
            raise RuntimeError("collcomm: COLLCOMM_COORDINATOR is set but COLLCOMM_TOKEN is not")
        store.set(key, json.dumps({"address": address, "token": token}))
    else:
        info = json.loads(_store_get(store, key, seconds))
        address, token = info["address"], info["token"]
    try:
        cc.init(rank=rank, world_size=size, coordinator=address, token=token, timeout=seconds)
    except BaseException:
        if server is not None:
            server.stop(0)
        raise
    if server is not None:
        with api._LOCK:
            api._EMBEDDED = server  # cc.shutdown() stops it
    _OWNED = True


def _subgroup(store, rank: int, size: int, seconds: float) -> Group:
    """The collcomm group of a torch subgroup: members learn each other's world ranks from the store."""
    rt = api.runtime()
    base = f"collcomm/{_generation(store, size)}"
    store.set(f"{base}/member/{rank}", str(rt.rank))
    if rank == 0:
        store.set(f"{base}/name", "torch-" + secrets.token_hex(8))
    members = [int(_store_get(store, f"{base}/member/{r}", seconds)) for r in range(size)]
    name = _store_get(store, f"{base}/name", seconds).decode()
    return rt.new_group(members, name, seconds)


def collcomm_group(store, group_rank: int, group_size: int, seconds: float) -> tuple[Group, bool]:
    """(the collcomm group of a new torch process group, whether it is the default group): the
    default group joins the collcomm job (or checks the one ``collcomm.init()`` joined), a later
    group forms a collcomm group of its members."""
    with _STATE_LOCK:
        default = not dist.is_initialized()  # PyTorch records the default group after its creation
        if not cc.is_initialized():
            if not default:
                raise RuntimeError("collcomm: a 'collcomm' subgroup needs collcomm as the default backend "
                                   "(init_process_group(backend='collcomm')) or collcomm.init() first")
            _join(store, group_rank, group_size, seconds)
            group = api.runtime().world
        elif default:
            rt = api.runtime()  # the user called collcomm.init() (or a re-created default group)
            if (rt.rank, rt.world_size) != (group_rank, group_size):
                raise RuntimeError(f"collcomm: this process is rank {rt.rank} of {rt.world_size} in collcomm but "
                                   f"rank {group_rank} of {group_size} in torch.distributed")
            group = rt.world
        else:
            group = _subgroup(store, group_rank, group_size, seconds)
        return group, default


def leave() -> None:
    """The default process group shut down: leave the collcomm job if this module joined it."""
    global _OWNED
    with _STATE_LOCK:
        if _OWNED:
            _OWNED = False
            cc.shutdown()
