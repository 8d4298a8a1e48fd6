"""The public collective API (see ARCHITECTURE.md): ``init``, the collectives, groups, ``shutdown``.

Buffers are NumPy arrays or CPU torch tensors, used in place. Every blocking call
takes ``timeout`` (seconds; default from ``init(timeout=...)``, ``COLLCOMM_TIMEOUT``
or 300). With ``async_op=True`` a call returns a :class:`~collcomm.runtime.group.Work`
handle with ``wait(timeout)`` and ``is_completed()``.
"""

from __future__ import annotations

import hashlib
import os
import threading

from collcomm.errors import CollectiveError, UsageError

_RUNTIME = None
_EMBEDDED = None  # a coordinator this process started (torchrun without COLLCOMM_COORDINATOR)
_LOCK = threading.Lock()


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not an integer", name) from None


def init(rank: int | None = None, world_size: int | None = None, coordinator: str | None = None,
         token: str | None = None, *, timeout: float | None = None, topology=None, host: str | None = None,
         algorithm: str | None = None, chunk_bytes: int | None = None, auto_shrink: bool | None = None,
         monitor_every: int | None = None, hostname: str | None = None) -> None:
    """Join the job: from explicit arguments, ``COLLCOMM_*`` variables (set by ``collcomm run``),
    or torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (rank 0 then starts
    the coordinator on MASTER_PORT + 1 unless ``COLLCOMM_COORDINATOR`` names one).

    ``auto_shrink`` (or ``COLLCOMM_AUTO_SHRINK=1``): a collective that fails on a dead or hung
    member still raises, but leaves its group (the world included) shrunk to the survivors for
    the next call. ``monitor_every`` (or ``COLLCOMM_MONITOR_EVERY``): every that many operations
    the members report link telemetry and the group re-plans around bad links (0: off).

    ``world_size=0`` joins an *open* job (what the Ray integration does): no rank is given, the
    coordinator's counter draws one, other processes join whenever they start, and collectives
    run on groups (``new_group``) and objects, not on a world. ``hostname`` (or
    ``COLLCOMM_HOSTNAME``): the host this process registers as (default: the machine's name)."""
    global _RUNTIME, _EMBEDDED
    from collcomm.runtime import Runtime

    with _LOCK:
        if _RUNTIME is not None:
            raise CollectiveError("collcomm is already initialised in this process; call shutdown() first")
        world_size = world_size if world_size is not None else _env_int("COLLCOMM_WORLD_SIZE")
        open_job = world_size == 0  # ranks drawn by the coordinator: no rank from the environment
        rank = rank if rank is not None or open_job else _env_int("COLLCOMM_RANK")
        coordinator = coordinator or os.environ.get("COLLCOMM_COORDINATOR") or None
        token = token or os.environ.get("COLLCOMM_TOKEN") or None
        if rank is None and not open_job and _env_int("RANK") is not None:  # torchrun
            rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
            master = os.environ.get("MASTER_ADDR", "127.0.0.1")
            port = (_env_int("MASTER_PORT") or 29500) + 1
            token = token or _torchrun_token(master, port)
            if coordinator is None:
                coordinator = f"{master}:{port}"
                if rank == 0:
                    from collcomm.coordinator.server import CoordinatorServer

                    _EMBEDDED = CoordinatorServer(token, host="0.0.0.0" if master not in (
                        "127.0.0.1", "localhost") else "127.0.0.1", port=port)
                    _EMBEDDED.start()
        missing = [name for name, v in (("rank", rank), ("world_size", world_size), ("coordinator", coordinator),
                                        ("token", token)) if v is None and not (name == "rank" and open_job)]
        if missing:
            raise CollectiveError(f"init: {', '.join(missing)} unknown; run under `collcomm run`, set COLLCOMM_* "
                                  f"variables, run under torchrun, or pass them to init()")
        try:
            rt = Runtime(rank, world_size, coordinator, token, timeout=timeout, topology=topology, host=host,
                         algorithm=algorithm, chunk_bytes=chunk_bytes, auto_shrink=auto_shrink,
                         monitor_every=monitor_every, hostname=hostname)
            if rt.probe_at_init:  # COLLCOMM_TOPOLOGY=probe: measure the fabric before the first collective
                from collcomm.probing import probe_at_init

                try:
                    rt.set_world_topology(probe_at_init(rt))
                except BaseException:
                    rt.close()
                    raise
            _RUNTIME = rt
        except BaseException:
            if _EMBEDDED is not None:
                _EMBEDDED.stop(0)
                _EMBEDDED = None
            raise


def _torchrun_token(master: str, port: int) -> str:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return hashlib.sha256(f"collcomm/{master}/{port}/{run_id}".encode()).hexdigest()


def is_initialized() -> bool:
    return _RUNTIME is not None


def _rt():
    if _RUNTIME is None:
        raise CollectiveError("collcomm is not initialised: call collcomm.init() first")
    return _RUNTIME


def runtime():
    """The process's Runtime (for integrations)."""
    return _rt()


def rank() -> int:
    return _rt().rank


def world_size() -> int:
    """The number of ranks of the world (0 in an open job)."""
    return _rt().world_size


def _group(group):
    rt = _rt()
    if group is None:
        if rt.world is None:
            raise CollectiveError("this process joined an open job, which has no world: pass group= (cc.new_group)")
        g = rt.world
    else:
        g = _modules()[1].group(group)
    while g.successor is not None:  # a shrunk group: its survivors' group
        g = g.successor
    return g


_MODULES = None


def _modules():
    """(collcomm.runtime.collectives, collcomm.runtime.arguments), imported at the first collective
    (a function-level import costs a microsecond per call, a fair share of a small collective on
    shared memory)."""
    global _MODULES
    if _MODULES is None:
        from collcomm.runtime import arguments, collectives

        _MODULES = (collectives, arguments)
    return _MODULES


def _lane(group, async_op):
    """The group's small-message lane (collcomm.runtime.lane) for a blocking call, or None.
    The lane runs a call only when it is one of a shape the full path below prepared for it, and
    otherwise leaves it to that path, which checks every argument."""
    rt = _RUNTIME
    if rt is None or async_op is not False:
        return None
    if group is None:
        group = rt.world
        if group is None:
            return None
    elif type(group) is not _modules()[1].Group:  # (anything else: the full path says what is wrong)
        return None
    while group.successor is not None:  # a shrunk group: its survivors' group (as _group)
        group = group.successor
    return group.lane


# Every call checks its arguments (collcomm.runtime.arguments, and the buffers and reductions in
# collcomm.runtime.buffers) before it is submitted: a mistake is a UsageError (a ValueError) or a
# UsageTypeError (also a TypeError) raised here, on the calling rank, at the call (async_op too),
# before anything is sent.
def allreduce(x, op: str = "sum", *, out=None, group=None, async_op: bool = False,
              timeout: float | None = None):
    """Reduce ``x`` across the group: in place on every rank, or into ``out`` (the same dtype and
    number of elements, no memory shared with ``x``; ``x`` is then only read), as MPI_Allreduce
    with a send and a receive buffer. ``out=x`` is in place."""
    lane = _lane(group, async_op)
    if lane is not None and lane.allreduce(x, op, timeout, out):
        return None
    c, a = _modules()
    rt, g = _rt(), _group(group)
    buf, dst = a.reduced(out, x, op, "allreduce")
    t = a.timeout(timeout, rt.timeout)
    return g.submit(lambda: c.allreduce(rt, g, buf, op, t, out=dst), "allreduce", a.flag(async_op, "async_op"))


def allgather(out, x, *, group=None, async_op: bool = False, timeout: float | None = None):
    """Gather every rank's ``x`` into ``out`` (group size x x.size elements, in rank order)."""
    lane = _lane(group, async_op)
    if lane is not None and lane.allgather(out, x, timeout):
        return None
    c, a = _modules()
    rt, g = _rt(), _group(group)
    dst, src = a.gathered(out, x, g.size, g.me)
    t = a.timeout(timeout, rt.timeout)
    return g.submit(lambda: c.allgather(rt, g, dst, src, t), "allgather", a.flag(async_op, "async_op"))


def reduce_scatter(out, x, op: str = "sum", *, group=None, async_op: bool = False, timeout: float | None = None):
    """Reduce ``x`` (group size x out.size elements) and leave this rank's part in ``out``."""
    lane = _lane(group, async_op)
    if lane is not None and lane.reduce_scatter(out, x, op, timeout):
        return None
    c, a = _modules()
    rt, g = _rt(), _group(group)
    dst, src = a.scattered(out, x, op, g.size)
    t = a.timeout(timeout, rt.timeout)
    return g.submit(lambda: c.reduce_scatter(rt, g, dst, src, op, t), "reduce_scatter",
                    a.flag(async_op, "async_op"))


def alltoall(out, x, *, group=None, async_op: bool = False, timeout: float | None = None):
    """Exchange blocks: ``x`` and ``out`` hold the same number of elements, a multiple of the group
    size n; block j of ``x`` goes to group rank j and lands there as block i (this rank's group
    rank) of ``out``. ``out`` may be ``x`` (in place)."""
    from collcomm.runtime.alltoall import alltoall as run

    _, a = _modules()
    rt, g = _rt(), _group(group)
    dst, src = a.exchanged(out, x, g.size)
    t = a.timeout(timeout, rt.timeout)
    return g.submit(lambda: run(rt, g, dst, src, t), "alltoall", a.flag(async_op, "async_op"))


def broadcast(x, root: int = 0, *, out=None, group=None, async_op: bool = False, timeout: float | None = None):
    """Copy the root's ``x`` to every rank of the group (``root`` is a group rank): into ``x``, or
    into ``out`` on every rank (the same dtype and number of elements, no memory shared with
    ``x``; ``x`` is then only read, and only the root's), as ncclBroadcast's send and receive
    buffers. ``out=x`` is in place."""
    lane = _lane(group, async_op)
    if lane is not None and lane.broadcast(x, root, timeout, out):
        return None
    c, a = _modules()
    rt, g = _rt(), _group(group)
    buf, dst = a.into(out, x, "broadcast")
    root = a.root(root, g, "broadcast")
    t = a.timeout(timeout, rt.timeout)
    return g.submit(lambda: c.broadcast(rt, g, buf, root, t, out=dst), "broadcast", a.flag(async_op, "async_op"))


def reduce(x, root: int = 0, op: str = "sum", *, out=None, group=None, async_op: bool = False,
           timeout: float | None = None):
    """Reduce ``x`` across the group into the root's ``x``, or into the root's ``out`` (checked as
    allreduce's; the root's ``x`` is then only read; other ranks' ``out`` is left alone). Other
    ranks' buffers are unchanged."""
    c, a = _modules()
    rt, g = _rt(), _group(group)
    buf, dst = a.reduced(out, x, op, "reduce")
    root = a.root(root, g, "reduce")
    t = a.timeout(timeout, rt.timeout)
    return g.submit(lambda: c.reduce(rt, g, buf, root, op, t, out=dst), "reduce", a.flag(async_op, "async_op"))


def barrier(*, group=None, async_op: bool = False, timeout: float | None = None):
    """Return once every member of the group has entered the barrier."""
    lane = _lane(group, async_op)
    if lane is not None and lane.barrier(timeout):
        return None
    c, a = _modules()
    rt, g = _rt(), _group(group)
    t = a.timeout(timeout, rt.timeout)
    return g.submit(lambda: c.barrier(rt, g, t), "barrier", a.flag(async_op, "async_op"))


def send(x, dst: int, *, tag: int = 0, timeout: float | None = None) -> None:
    """Send ``x`` to world rank ``dst`` (matched in order with that rank's ``recv`` of the same tag).
    Returns once the message left; a message of 16 MiB and more to a rank of this machine, once
    that rank received it (it is read out of ``x`` in place)."""
    from collcomm.runtime import p2p

    rt = _rt()
    p2p.send(rt, x, dst, tag, _modules()[1].timeout(timeout, rt.timeout))


def recv(x, src: int, *, tag: int = 0, timeout: float | None = None) -> None:
    """Receive into ``x`` from world rank ``src``."""
    from collcomm.runtime import p2p

    rt = _rt()
    p2p.recv(rt, x, src, tag, _modules()[1].timeout(timeout, rt.timeout))


def probe_topology(*, group=None, seconds_per_pair: float | None = None, timeout: float | None = None):
    """Measure the fabric (latency, pairwise bandwidth, shared links) and return the inferred
    Topology; every member of the group (default: the world) calls it and gets the same one."""
    from collcomm.probing import probe_runtime

    a = _modules()[1]
    members = None if group is None else _group(group).members
    seconds = a.optional_timeout(seconds_per_pair, "probe_topology: seconds_per_pair")
    topo, _ = probe_runtime(_rt(), members, seconds_per_pair=seconds,
                            timeout=a.optional_timeout(timeout, "probe_topology: timeout"))
    return topo


def new_group(ranks, name: str | None = None, *, timeout: float | None = None):
    """Form a group of world ranks; only the members call it (no world-wide barrier)."""
    return _rt().new_group(ranks, name, timeout)


def shrink(group=None, *, timeout: float | None = None):
    """After a failure (PeerFailure, CollectiveTimeout), re-form ``group`` (default: the world)
    without its dead or hung members at a new epoch and return it; the default group of the
    collectives becomes the shrunk world. Every survivor calls it; a member that does not
    call within ``timeout`` is declared failed. A rank that was declared failed raises
    :class:`~collcomm.errors.EvictedError`. Ranks keep their world numbers (``cc.rank()``);
    ``group.rank``/``group.size`` are the ranks within the new group."""
    rt = _rt()
    return rt.shrink(_group(group), timeout=_modules()[1].optional_timeout(timeout, "shrink: timeout"))


def grow(group=None, *, timeout: float | None = None):
    """Admit restarted ranks at the next epoch: after a shrink, a new process started with a failed
    rank's number (``init`` with the same rank, coordinator and token) calls ``grow()``, and so
    does every survivor (once the newcomer's ``init`` returned); together they form ``group``
    (default: the world) again, with the newcomer, at a new epoch, and return it (it becomes the
    default group when it is the world). With nobody to admit, survivors get the group unchanged."""
    rt = _rt()
    return rt.grow(_group(group), timeout=_modules()[1].optional_timeout(timeout, "grow: timeout"))


def link_health(*, group=None, format: str = "dict"):
    """The monitor's view of the group's links (default: the world): the verdicts of the last
    round, the current plan's epoch and fabric changes, and this rank's telemetry snapshot;
    ``format="prometheus"``: the same as Prometheus text exposition."""
    from collcomm.runtime.monitor import link_health as health

    return health(_rt(), _group(group), format=format)


# ---------------------------------------------------------------------------- objects in flight
def _objects():
    """This process's object layer (collcomm.objects), started on the first object call."""
    rt = _rt()
    if rt.objects is None:
        with _LOCK:
            if rt.objects is None:
                from collcomm.objects import ObjectLayer

                rt.objects = ObjectLayer(rt)
    return rt.objects


def _object_checks():
    """collcomm.objects.layer, whose argument checks run at the call (loaded by _objects())."""
    from collcomm.objects import layer

    return layer


def put(key: str, buf, copy: bool = True, *, async_op: bool = False, timeout: float | None = None):
    """Publish ``buf`` (NumPy array or CPU torch tensor) under ``key`` for any process to get.
    The copy is registered before it is made, so readers start while it is; ``copy=False``
    shares ``buf`` itself (do not change it until ``delete``). A key put twice before ``delete``
    raises ObjectExists. The call returns once the copy is made (a 64 MiB copy: tens of ms);
    with ``async_op=True`` it returns at once, and ``buf`` must not change until the Work is done."""
    layer, a = _objects(), _modules()[1]
    key = _object_checks().put_arguments(key, buf, copy)  # at the call, async_op too
    t = a.timeout(timeout, layer.runtime.timeout, "put: timeout")
    return layer.submit(lambda: layer.put(key, buf, copy, t), f"put of '{key}'", a.flag(async_op, "async_op"))


def get(key: str, out=None, *, timeout: float | None = None, async_op: bool = False):
    """The object ``key``, as soon as it exists anywhere: a read-only array (zero copy), or
    copied into ``out``. Waits up to ``timeout`` for the object to be put."""
    layer, a = _objects(), _modules()[1]
    key = _object_checks().get_arguments(key, out)  # before it waits
    t = a.timeout(timeout, layer.runtime.timeout, "get: timeout")
    return layer.submit(lambda: layer.get(key, out, t), f"get of '{key}'", a.flag(async_op, "async_op"))


def reduce_objects(keys, out_key: str, op: str = "sum", num_required: int | None = None, *,
                   timeout: float | None = None, async_op: bool = False):
    """Reduce the objects ``keys`` into a new object ``out_key`` using the first ``num_required``
    to become ready (all when None); returns the keys used. Any rank may then ``get(out_key)``,
    pipelined behind the reduction."""
    layer, a = _objects(), _modules()[1]
    keys, out_key, op, num_required = _object_checks().reduce_arguments(keys, out_key, op, num_required)
    t = a.timeout(timeout, layer.runtime.timeout, "reduce_objects: timeout")
    return layer.submit(lambda: layer.reduce_objects(keys, out_key, op, num_required, t),
                        f"reduce_objects into '{out_key}'", a.flag(async_op, "async_op"))


def delete(key: str, *, timeout: float | None = None) -> bool:
    """Forget ``key`` and free every copy of it; False if there was none."""
    layer = _objects()
    return layer.delete(key, _modules()[1].timeout(timeout, layer.runtime.timeout, "delete: timeout"))


def object_info(key: str, *, timeout: float | None = None) -> dict:
    """What the directory knows of ``key``: size, dtype, shape, complete, and its copies."""
    layer = _objects()
    return layer.info(key, _modules()[1].timeout(timeout, layer.runtime.timeout, "object_info: timeout"))


def shutdown() -> None:
    """Leave the job: close connections and the coordinator client (idempotent)."""
    global _RUNTIME, _EMBEDDED
    with _LOCK:
        if _RUNTIME is not None:
            _RUNTIME.close()
            _RUNTIME = None
        if _EMBEDDED is not None:
            _EMBEDDED.stop(1.0)
            _EMBEDDED = None
