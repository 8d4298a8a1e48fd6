"""The process group behind the torch.distributed backend "collcomm" (registered by
:mod:`collcomm.integrations.torch`).

* Rendezvous: the first process group (the default one) joins a collcomm job through the c10d
  store: rank 0 starts an embedded coordinator (random token) unless ``COLLCOMM_COORDINATOR``
  names one, and publishes address and token under ``collcomm/<generation>/coordinator``; every
  rank then calls ``collcomm.init``. Later groups (``new_group``, DeviceMesh dimensions) become
  collcomm groups: each member writes its world rank into the group's (prefix) store, reads the
  others', and forms the group under a name rank 0 of the group drew at random.
* Every collective returns at once with a :class:`_Work`; the operation runs in the group's
  lane, which runs the group's operations one at a time in issue order (every rank issues a
  group's collectives in the same order) on daemon threads. The work completes its future with
  the list of output tensors, or with the error (``wait()`` raises it; the future's ``wait()``
  raises a RuntimeError that carries it); callbacks run after the lane moved on, so they may
  wait for further collectives. Point-to-point messages run in lanes of their own, one per
  direction and peer, so a send never waits behind a receive.
* Timeouts: the group's timeout (``init_process_group(timeout=...)``), or ``opts.timeout`` where
  set, bounds every operation inside the runtime.
* Types: reductions on float16/bfloat16/float32/float64, int8..int64, uint8 (also uint32/64),
  bool (as uint8: SUM/MAX/BOR = or, PRODUCT/MIN/BAND = and, BXOR = xor) and complex (as real
  pairs: SUM, AVG, PREMUL_SUM only). Data movement (broadcast, gathers, scatters, all-to-all,
  send/recv) takes any dtype (as bytes when NumPy has no such type). Non-contiguous tensors are
  copied to a contiguous buffer and back.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import json
import os
import secrets
import threading
import time

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as _c10d

import collcomm as cc
from collcomm import api
from collcomm.errors import CollectiveError, CollectiveTimeout, MismatchError

DEFAULT_TIMEOUT = 1800.0  # torch's default process-group timeout
_RedOpType = dist.ReduceOp.RedOpType
_REDUCIBLE = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
              torch.int64, torch.uint8, torch.uint32, torch.uint64}
_MOVABLE = _REDUCIBLE  # dtypes that travel as themselves (others as bytes)
_OP_NAMES = {_RedOpType.SUM: "sum", _RedOpType.PRODUCT: "prod", _RedOpType.MIN: "min", _RedOpType.MAX: "max",
             _RedOpType.AVG: "avg", _RedOpType.BAND: "band", _RedOpType.BOR: "bor", _RedOpType.BXOR: "bxor",
             _RedOpType.PREMUL_SUM: "premul_sum"}
_BOOL_OPS = {"sum": "max", "prod": "min", "min": "min", "max": "max", "band": "band", "bor": "bor", "bxor": "bxor"}
_BITWISE = ("band", "bor", "bxor")

_STATE_LOCK = threading.Lock()
_OWNED = False  # this module initialised collcomm (and shuts it down with the default group)


# ============================================================================ errors
class CollcommError(dist.DistBackendError):
    """A collective of the "collcomm" backend failed; ``cause`` is the collcomm error (PeerFailure,
    MismatchError, ...)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


class CollcommTimeout(CollcommError):
    """A collective of the "collcomm" backend did not complete within its timeout."""


def _torch_error(e: BaseException, what: str, pg: "ProcessGroupCollcomm") -> BaseException:
    where = f"collcomm {what} on rank {pg.rank()} of group {pg.group_name or '?'} (size {pg.size()})"
    if isinstance(e, CollectiveTimeout):
        # " Timed out " between spaces, as gloo words it: PyTorch's suite matches " (Timed out|closed|timeout) "
        err: BaseException = CollcommTimeout(f"{where}: Timed out ({e})", e)
    elif isinstance(e, CollectiveError):
        err = CollcommError(f"{where} failed: {type(e).__name__}: {e}", e)
    elif isinstance(e, (ValueError, TypeError, RuntimeError)):
        return e
    else:
        err = CollcommError(f"{where} failed: {type(e).__name__}: {e}", e)
    err.__cause__ = e
    return err


# ============================================================================ rendezvous
def _seconds(timeout, default: float | None) -> float | None:
    if timeout is None:
        return default
    secs = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)
    return secs if secs > 0 else default


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


def _subgroup(store, rank: int, size: int, seconds: float):
    """The collcomm group of a torch subgroup: members learn each other's world ranks from the store."""
    rt = api.runtime()
    base = f"collcomm/{_generation(store, size)}"
    store.set(f"{base}/member/{rank}", str(rt.rank))
    if rank == 0:
        store.set(f"{base}/name", "torch-" + secrets.token_hex(8))
    members = [int(_store_get(store, f"{base}/member/{r}", seconds)) for r in range(size)]
    name = _store_get(store, f"{base}/name", seconds).decode()
    return rt.new_group(members, name, seconds)


def create_process_group(store, group_rank: int, group_size: int, timeout) -> "ProcessGroupCollcomm":
    """The backend's creator: ``(store, group_rank, group_size, timeout)`` -> a ProcessGroup."""
    seconds = _seconds(timeout, DEFAULT_TIMEOUT)
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
        return ProcessGroupCollcomm(group, group_rank, group_size, seconds, default=default)


# ============================================================================ lanes and work
class _Lane:
    """Runs operations one at a time, in the order they were put, on daemon threads.

    An operation's completion (its future's callbacks: DDP's, a comm hook's) runs after the lane
    is released, so a callback may issue another operation and wait for it (PowerSGD does): that
    operation runs on another thread of the lane. Threads park when idle and end after a while."""

    IDLE_SECONDS = 30.0

    def __init__(self, name: str):
        self._name = name
        self._cond = threading.Condition()
        self._jobs: collections.deque = collections.deque()
        self._busy = False  # a thread runs an operation (the lane's order is held)
        self._idle = 0      # threads parked, waiting for operations
        self._closed = False

    def put(self, job) -> None:
        """``job()`` runs the operation and returns its completion (a callable)."""
        with self._cond:
            self._jobs.append(job)
            if self._busy:
                return  # the running thread takes it next (or hands it over)
            if self._idle:
                self._cond.notify()
            else:
                self._spawn()

    def _spawn(self) -> None:
        threading.Thread(target=self._run, name=self._name, daemon=True).start()

    def _run(self) -> None:
        with self._cond:
            while True:
                while not self._jobs or self._busy:
                    if self._closed:
                        return
                    self._idle += 1
                    woken = self._cond.wait(self.IDLE_SECONDS)
                    self._idle -= 1
                    if not woken and not self._jobs:
                        return
                job = self._jobs.popleft()
                self._busy = True
                self._cond.release()
                try:
                    finish = job()
                finally:
                    self._cond.acquire()
                    self._busy = False
                if self._jobs:  # the next operation must not wait for this one's callbacks
                    if self._idle:
                        self._cond.notify()
                    else:
                        self._spawn()
                self._cond.release()
                try:
                    finish()
                finally:
                    self._cond.acquire()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Failed:
    """A failed operation's future value (unwrapped into an error by ``_unwrap``)."""

    def __init__(self, error: BaseException):
        self.error = error


def _unwrap(fut):
    value = fut.value()
    if isinstance(value, _Failed):
        raise value.error
    return value


class _Work(dist.Work):
    """The handle of one operation: ``wait()`` raises its error; ``get_future()`` gives a future whose
    value is the list of output tensors (an error in it makes the future's ``wait()`` raise)."""

    def __init__(self, what: str, outputs: list):
        super().__init__()
        self._what = what
        self._outputs = outputs
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._source = -1
        self._base = torch.futures.Future()
        self._future = self._base.then(_unwrap)  # a C++-level error: DDP's reducer sees it too

    # -- completion (the lane's thread)
    def _complete(self) -> None:
        try:
            self._base.set_result(self._outputs)  # runs the callbacks chained on the future (DDP's)
        finally:
            self._done.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        try:
            self._base.set_result(_Failed(error))
        finally:
            self._done.set()

    # -- the Work interface
    def wait(self, timeout=None) -> bool:
        secs = _seconds(timeout, None)
        if not self._done.wait(secs):
            raise CollcommTimeout(f"collcomm {self._what}: Timed out waiting {secs:g} s, the time given to wait()")
        if self._error is not None:
            raise self._error
        return True

    def get_future(self):
        return self._future

    def is_completed(self) -> bool:
        return self._done.is_set() or self._base.done()

    def is_success(self) -> bool:
        return self.is_completed() and self._error is None

    def exception(self):
        return self._error

    def result(self) -> list:
        self.wait()
        return self._outputs

    def source_rank(self) -> int:
        return self._source

    def _source_rank(self) -> int:
        return self._source

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        state = "failed" if self._error is not None else "done" if self._done.is_set() else "pending"
        return f"<collcomm work {self._what} ({state})>"


# ============================================================================ tensors
def _contig(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a contiguous tensor to work on, the user's tensor to copy the result back into or None)."""
    t = t.detach()
    if t.is_contiguous() and not t.is_conj() and not t.is_neg():
        return t, None
    return t.resolve_conj().resolve_neg().contiguous(), t


def _copy_back(work: torch.Tensor, orig: torch.Tensor | None) -> None:
    if orig is not None:
        orig.copy_(work)


def _reduce_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of contiguous ``t`` that the runtime reduces (bool as uint8, complex as real pairs)."""
    flat = t.reshape(-1)
    if flat.is_complex():
        return torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    return flat


def _move_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of contiguous ``t`` for data movement (as bytes when NumPy has no such type)."""
    flat = t.reshape(-1)
    if flat.dtype in _MOVABLE:
        return flat
    if flat.is_complex():
        return torch.view_as_real(flat).reshape(-1)
    return flat.view(torch.uint8)


def _op_name(op) -> str:
    kind = getattr(op, "op", op)
    for key, name in _OP_NAMES.items():
        if kind == key:
            return name
    raise ValueError(f"collcomm: unsupported reduction {op!r}")


def _reduction(op, dtype: torch.dtype, what: str):
    """(collcomm reduction name, PREMUL_SUM factor or None) for ``op`` on ``dtype``; raises for
    what cannot be done, naming the op and the dtype."""
    name = _op_name(op)
    label = f"ReduceOp.{name.upper() if name != 'prod' else 'PRODUCT'}"
    factor = None
    if name == "premul_sum":
        state = op.__getstate__() if hasattr(op, "__getstate__") else None
        factor = state[1] if isinstance(state, tuple) and len(state) > 1 else getattr(op, "factor", None)
        if factor is None:
            raise ValueError(f"collcomm: {what}: ReduceOp.PREMUL_SUM without a factor")
        name = "sum"
    if dtype.is_complex:
        if name not in ("sum", "avg"):
            raise ValueError(f"collcomm: {what} does not support {label} on complex tensors ({dtype})")
    elif dtype == torch.bool:
        if name not in _BOOL_OPS or factor is not None:
            raise ValueError(f"collcomm: {what} does not support {label if factor is None else 'PREMUL_SUM'} on "
                             f"{dtype} tensors")
        name = _BOOL_OPS[name]
    elif dtype not in _REDUCIBLE:
        raise TypeError(f"collcomm: {what} does not support dtype {dtype}")
    elif dtype.is_floating_point:
        if name in _BITWISE:
            raise ValueError(f"collcomm: {what} does not support {label} on floating-point tensors ({dtype})")
    elif name == "avg" or factor is not None:
        raise ValueError(f"collcomm: {what} does not support {'AVG' if name == 'avg' else 'PREMUL_SUM'} on "
                         f"integer tensors ({dtype})")
    return name, factor


def _scale(t: torch.Tensor, factor) -> None:
    """``t *= factor`` (PREMUL_SUM), for a float or a one-element tensor factor."""
    if isinstance(factor, torch.Tensor):
        factor = factor.to(device="cpu").reshape(-1)[0].item()
    if t.is_complex():
        torch.view_as_real(t).mul_(factor)
    else:
        t.mul_(factor)


def _check_cpu(tensors, what: str) -> None:
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"collcomm: {what} expects tensors, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"collcomm: {what} supports CPU tensors only, got a tensor on {t.device}")
        if t.layout != torch.strided:
            raise ValueError(f"collcomm: {what} does not support {t.layout} tensors")


def _one(tensors, what: str) -> torch.Tensor:
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    if len(tensors) != 1:
        raise ValueError(f"collcomm: {what} takes exactly one tensor per call (CPU, one device), got {len(tensors)}")
    _check_cpu(tensors, what)
    return tensors[0]


def _same_dtype(tensors, dtype: torch.dtype, what: str) -> None:
    for t in tensors:
        if t.dtype != dtype:
            raise TypeError(f"collcomm: {what}: tensors of dtype {t.dtype} and {dtype} mixed")


def _options(opts, cls):
    if opts is None:
        return cls()
    if isinstance(opts, (dist.ReduceOp, _RedOpType)):
        o = cls()
        o.reduceOp = opts
        return o
    return opts


# p2p lanes are per process (not per group): collcomm numbers messages per peer and tag, so
# messages to one peer must leave in issue order whichever group issued them.
_P2P_LANES: dict[tuple[str, int], _Lane] = {}
_P2P_LOCK = threading.Lock()


def _p2p_lane(direction: str, peer: int) -> _Lane:
    with _P2P_LOCK:
        lane = _P2P_LANES.get((direction, peer))
        if lane is None:
            lane = _P2P_LANES[(direction, peer)] = _Lane(f"collcomm-torch-{direction}-{peer}")
        return lane


# ============================================================================ the process group
class ProcessGroupCollcomm(dist.ProcessGroup):
    """A torch.distributed process group whose collectives run on a collcomm group."""

    _ids = itertools.count()

    def __init__(self, group, rank: int, size: int, timeout: float, *, default: bool = False):
        super().__init__(rank, size)
        self._group = group
        self._members = list(group.members)
        self._timeout = float(timeout)
        self._default = default
        self._name = ""
        self._desc = ""
        self._closed = False
        self._lane = _Lane(f"collcomm-torch-pg{next(self._ids)}")

    # ------------------------------------------------------------------ identity
    def getBackendName(self) -> str:
        return "collcomm"

    def name(self) -> str:
        return "collcomm"

    def _set_group_name(self, name: str) -> None:
        self._name = name
        try:
            super()._set_group_name(name)
        except Exception:  # noqa: BLE001 - older bindings
            pass

    def setGroupName(self, name: str) -> None:
        self._name = name

    def getGroupName(self) -> str:
        return self._name

    @property
    def group_name(self) -> str:
        return self._name

    def _set_group_desc(self, desc: str) -> None:
        self._desc = desc
        try:
            super()._set_group_desc(desc)
        except Exception:  # noqa: BLE001
            pass

    def setGroupDesc(self, desc: str) -> None:
        self._desc = desc

    def getGroupDesc(self) -> str:
        return self._desc

    @property
    def group_desc(self) -> str:
        return self._desc

    @property
    def collcomm_group(self):
        """The collcomm Group underneath (usable with the collcomm API)."""
        return self._group

    def __repr__(self) -> str:
        return f"ProcessGroupCollcomm(rank={self.rank()}, size={self.size()}, members={self._members})"

    # ------------------------------------------------------------------ running
    def _op_timeout(self, opts) -> float:
        return _seconds(getattr(opts, "timeout", None), self._timeout)

    def _submit(self, what: str, outputs: list, fn, lane: _Lane | None = None) -> _Work:
        if self._closed:
            raise RuntimeError(f"collcomm: {what} on a process group that was shut down")
        work = _Work(what, outputs)

        def job():
            try:
                fn(work)
            except BaseException as e:  # noqa: BLE001 - every failure reaches the waiter
                error = _torch_error(e, what, self)
                return lambda: work._fail(error)
            return work._complete

        (lane or self._lane).put(job)
        return work

    def _check_root(self, root: int, what: str) -> int:
        if not 0 <= root < self.size():
            raise ValueError(f"collcomm: {what}: root rank {root} is not in a group of size {self.size()}")
        return root

    def _check_peer(self, peer: int, what: str) -> int:
        if not 0 <= peer < self.size() or peer == self.rank():
            raise ValueError(f"collcomm: {what}: peer {peer} must be another rank of the group (size {self.size()})")
        return self._members[peer]

    def _max(self, value: int, timeout: float) -> int:
        """The maximum of ``value`` over the group (for padded uneven exchanges)."""
        x = torch.tensor([value], dtype=torch.int64)
        cc.allreduce(x, "max", group=self._group, timeout=timeout)
        return int(x[0])

    # ------------------------------------------------------------------ reductions
    def allreduce(self, tensors, opts=None):
        opts = _options(opts, _c10d.AllreduceOptions)
        t = _one(tensors, "allreduce")
        name, factor = _reduction(opts.reduceOp, t.dtype, "allreduce")
        timeout = self._op_timeout(opts)

        def run(_):
            work, orig = _contig(t)
            if factor is not None:
                _scale(work, factor)
            cc.allreduce(_reduce_view(work), name, group=self._group, timeout=timeout)
            _copy_back(work, orig)

        return self._submit("allreduce", [t], run)

    def allreduce_coalesced(self, tensors, opts=None):
        opts = _options(opts, _c10d.AllreduceCoalescedOptions)
        tensors = list(tensors)
        _check_cpu(tensors, "allreduce_coalesced")
        for t in tensors:
            _reduction(opts.reduceOp, t.dtype, "allreduce_coalesced")
        timeout = self._op_timeout(opts)

        def run(_):
            deadline = time.monotonic() + timeout
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for t in tensors:  # one flat buffer per dtype, in order of first appearance
                by_dtype.setdefault(t.dtype, []).append(t)
            for dtype, ts in by_dtype.items():
                name, factor = _reduction(opts.reduceOp, dtype, "allreduce_coalesced")
                flat = torch.cat([t.detach().reshape(-1) for t in ts]) if ts else torch.empty(0, dtype=dtype)
                if factor is not None:
                    _scale(flat, factor)
                cc.allreduce(_reduce_view(flat), name, group=self._group,
                             timeout=max(deadline - time.monotonic(), 0.001))
                offset = 0
                for t in ts:
                    n = t.numel()
                    t.detach().copy_(flat[offset:offset + n].view(t.shape))
                    offset += n

        return self._submit("allreduce_coalesced", tensors, run)

    def reduce(self, tensors, opts=None):
        opts = _options(opts, _c10d.ReduceOptions)
        t = _one(tensors, "reduce")
        root = self._check_root(opts.rootRank, "reduce")
        name, factor = _reduction(opts.reduceOp, t.dtype, "reduce")
        timeout = self._op_timeout(opts)

        def run(_):
            work, orig = _contig(t)
            if factor is not None:
                if self.rank() != root:
                    work, orig = work.clone(), None  # only the root's tensor changes
                _scale(work, factor)
            cc.reduce(_reduce_view(work), root, name, group=self._group, timeout=timeout)
            if self.rank() == root:
                _copy_back(work, orig)

        return self._submit("reduce", [t], run)

    def _reduce_scatter_flat(self, out: torch.Tensor, flat_in: torch.Tensor, name: str, factor, timeout: float,
                             copied: bool) -> None:
        """``out`` = this rank's block of the reduction of ``flat_in`` (group size x out.numel())."""
        if factor is not None:
            flat_in = flat_in if copied else flat_in.clone()
            _scale(flat_in, factor)
        work, orig = _contig(out)
        cc.reduce_scatter(_reduce_view(work), _reduce_view(flat_in), name, group=self._group, timeout=timeout)
        _copy_back(work, orig)

    def reduce_scatter(self, outputs, input_lists, opts=None):
        opts = _options(opts, _c10d.ReduceScatterOptions)
        out = _one(outputs, "reduce_scatter")
        if len(input_lists) != 1 or len(input_lists[0]) != self.size():
            raise ValueError(f"collcomm: reduce_scatter needs one list of {self.size()} input tensors")
        ins = list(input_lists[0])
        _check_cpu(ins, "reduce_scatter")
        _same_dtype(ins, out.dtype, "reduce_scatter")
        name, factor = _reduction(opts.reduceOp, out.dtype, "reduce_scatter")
        timeout = self._op_timeout(opts)
        even = all(i.numel() == out.numel() for i in ins)

        def run(_):
            flat = torch.cat([i.detach().reshape(-1) for i in ins])
            if even:
                self._reduce_scatter_flat(out, flat, name, factor, timeout, copied=True)
                return
            if factor is not None:  # uneven blocks: allreduce everything, keep this rank's block
                _scale(flat, factor)
            cc.allreduce(_reduce_view(flat), name, group=self._group, timeout=timeout)
            offset = sum(i.numel() for i in ins[:self.rank()])
            out.detach().copy_(flat[offset:offset + out.numel()].view(out.shape))

        return self._submit("reduce_scatter", [out], run)

    def _check_rs_single(self, out, inp, what):
        _check_cpu([out, inp], what)
        _same_dtype([inp], out.dtype, what)
        if inp.numel() != out.numel() * self.size():
            raise ValueError(f"collcomm: {what}: input has {inp.numel()} elements, needs group size "
                             f"{self.size()} x output's {out.numel()}")

    def reduce_scatter_single(self, output, input, opts=None):
        opts = _options(opts, _c10d.ReduceScatterOptions)
        self._check_rs_single(output, input, "reduce_scatter_tensor")
        name, factor = _reduction(opts.reduceOp, output.dtype, "reduce_scatter_tensor")
        timeout = self._op_timeout(opts)

        def run(_):
            src, copied = _contig(input)
            self._reduce_scatter_flat(output, src, name, factor, timeout, copied=copied is not None)

        return self._submit("reduce_scatter_tensor", [output], run)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        opts = _options(opts, _c10d.ReduceScatterOptions)
        outputs, inputs = list(outputs), list(inputs)
        if len(outputs) != len(inputs):
            raise ValueError(f"collcomm: reduce_scatter_tensor_coalesced: {len(outputs)} outputs, {len(inputs)} inputs")
        for o, i in zip(outputs, inputs):
            self._check_rs_single(o, i, "reduce_scatter_tensor_coalesced")
            _reduction(opts.reduceOp, o.dtype, "reduce_scatter_tensor_coalesced")
        timeout = self._op_timeout(opts)

        def run(_):
            deadline = time.monotonic() + timeout
            for o, i in zip(outputs, inputs):
                name, factor = _reduction(opts.reduceOp, o.dtype, "reduce_scatter_tensor_coalesced")
                src, copied = _contig(i)
                self._reduce_scatter_flat(o, src, name, factor, max(deadline - time.monotonic(), 0.001),
                                          copied=copied is not None)

        return self._submit("reduce_scatter_tensor_coalesced", outputs, run)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    # ------------------------------------------------------------------ data movement
    def broadcast(self, tensors, opts=None):
        opts = _options(opts, _c10d.BroadcastOptions)
        t = _one(tensors, "broadcast")
        root = self._check_root(opts.rootRank, "broadcast")
        timeout = self._op_timeout(opts)

        def run(_):
            work, orig = _contig(t)
            cc.broadcast(_move_view(work), root, group=self._group, timeout=timeout)
            _copy_back(work, orig)

        return self._submit("broadcast", [t], run)

    def _gather_into(self, inp: torch.Tensor, sizes: list[int], timeout: float) -> tuple[torch.Tensor, int]:
        """Every rank's ``inp`` (rank r's holds sizes[r] elements) in one buffer, block r at r x block."""
        block = max(sizes) if sizes else 0
        src, _ = _contig(inp)
        if inp.numel() != block:  # uneven: pad to the largest
            padded = torch.zeros(block, dtype=inp.dtype)
            padded[:inp.numel()] = src.reshape(-1)
            src = padded
        buf = torch.empty(block * self.size(), dtype=inp.dtype)
        cc.allgather(_move_view(buf), _move_view(src), group=self._group, timeout=timeout)
        return buf, block

    def allgather(self, output_lists, inputs, opts=None):
        opts = _options(opts, _c10d.AllgatherOptions)
        inp = _one(inputs, "allgather")
        if len(output_lists) != 1 or len(output_lists[0]) != self.size():
            raise ValueError(f"collcomm: allgather needs one list of {self.size()} output tensors")
        outs = list(output_lists[0])
        _check_cpu(outs, "allgather")
        _same_dtype(outs, inp.dtype, "allgather")
        if outs[self.rank()].numel() != inp.numel():
            raise ValueError(f"collcomm: allgather: output {self.rank()} has {outs[self.rank()].numel()} elements, "
                             f"the input {inp.numel()}")
        timeout = self._op_timeout(opts)

        def run(_):
            sizes = [o.numel() for o in outs]
            buf, block = self._gather_into(inp, sizes, timeout)
            for r, o in enumerate(outs):
                o.detach().copy_(buf[r * block:r * block + sizes[r]].view(o.shape))

        return self._submit("allgather", outs, run)

    def _check_ag_single(self, out, inp, what):
        _check_cpu([out, inp], what)
        _same_dtype([inp], out.dtype, what)
        if out.numel() != inp.numel() * self.size():
            raise ValueError(f"collcomm: {what}: output has {out.numel()} elements, needs group size "
                             f"{self.size()} x input's {inp.numel()}")

    def _allgather_flat(self, out, inp, timeout):
        src, _ = _contig(inp)
        work, orig = _contig(out)
        cc.allgather(_move_view(work), _move_view(src), group=self._group, timeout=timeout)
        _copy_back(work, orig)

    def all_gather_single(self, output, input, opts=None):
        opts = _options(opts, _c10d.AllgatherOptions)
        self._check_ag_single(output, input, "all_gather_into_tensor")
        timeout = self._op_timeout(opts)
        return self._submit("all_gather_into_tensor", [output],
                            lambda _: self._allgather_flat(output, input, timeout))

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        opts = _options(opts, _c10d.AllgatherOptions)
        outputs, inputs = list(outputs), list(inputs)
        if len(outputs) != len(inputs):
            raise ValueError(f"collcomm: all_gather_into_tensor_coalesced: {len(outputs)} outputs, "
                             f"{len(inputs)} inputs")
        for o, i in zip(outputs, inputs):
            self._check_ag_single(o, i, "all_gather_into_tensor_coalesced")
        timeout = self._op_timeout(opts)

        def run(_):
            deadline = time.monotonic() + timeout
            for o, i in zip(outputs, inputs):
                self._allgather_flat(o, i, max(deadline - time.monotonic(), 0.001))

        return self._submit("all_gather_into_tensor_coalesced", outputs, run)

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def allgather_coalesced(self, output_lists, inputs, opts=None):
        """output_lists[r][j] receives rank r's inputs[j]; travels as one byte buffer per rank."""
        opts = _options(opts, _c10d.AllgatherOptions)
        inputs = list(inputs)
        _check_cpu(inputs, "allgather_coalesced")
        if len(output_lists) != self.size() or any(len(row) != len(inputs) for row in output_lists):
            raise ValueError(f"collcomm: allgather_coalesced needs {self.size()} output lists of {len(inputs)} "
                             "tensors each")
        for row in output_lists:
            _check_cpu(row, "allgather_coalesced")
            for o, i in zip(row, inputs):
                if o.dtype != i.dtype:
                    raise TypeError(f"collcomm: allgather_coalesced: output dtype {o.dtype} for input {i.dtype}")
        timeout = self._op_timeout(opts)
        flat_outs = [o for row in output_lists for o in row]

        def nbytes(t):
            return t.numel() * t.element_size()

        def run(_):
            mine = torch.cat([_contig(i)[0].reshape(-1).view(torch.uint8) for i in inputs]) if inputs else \
                torch.empty(0, dtype=torch.uint8)
            sizes = [sum(nbytes(o) for o in row) for row in output_lists]
            buf, block = self._gather_into(mine, sizes, timeout)
            for r, row in enumerate(output_lists):
                offset = r * block
                for o in row:
                    n = nbytes(o)
                    o.detach().copy_(buf[offset:offset + n].view(o.dtype).view(o.shape))
                    offset += n

        return self._submit("allgather_coalesced", flat_outs, run)

    def _root_list(self, lists, root: int, mine: torch.Tensor, what: str, role: str, other: str) -> list:
        """The root's list of one tensor per rank for gather (outputs) or scatter (inputs),
        checked against this rank's own tensor ``mine``; [] on the other ranks."""
        if self.rank() != root:
            if lists and any(len(row) for row in lists):
                raise ValueError(f"collcomm: {what}: only the root passes {role} tensors")
            return []
        if len(lists) != 1 or len(lists[0]) != self.size():
            raise ValueError(f"collcomm: {what} needs one list of {self.size()} {role} tensors on the root")
        tensors = list(lists[0])
        _check_cpu(tensors, what)
        _same_dtype(tensors, mine.dtype, what)
        for t in tensors:
            if t.numel() != mine.numel():
                raise ValueError(f"collcomm: {what}: {role} tensors must have the {other}'s {mine.numel()} elements, "
                                 f"got {t.numel()}")
        return tensors

    def gather(self, output_lists, inputs, opts=None):
        opts = _options(opts, _c10d.GatherOptions)
        inp = _one(inputs, "gather")
        root = self._check_root(opts.rootRank, "gather")
        outs = self._root_list(output_lists, root, inp, "gather", "output", "input")
        timeout = self._op_timeout(opts)

        def run(_):
            buf, block = self._gather_into(inp, [inp.numel()] * self.size(), timeout)
            for r, o in enumerate(outs):
                o.detach().copy_(buf[r * block:(r + 1) * block].view(o.shape))

        return self._submit("gather", outs, run)

    def scatter(self, outputs, input_lists, opts=None):
        opts = _options(opts, _c10d.ScatterOptions)
        out = _one(outputs, "scatter")
        root = self._check_root(opts.rootRank, "scatter")
        ins = self._root_list(input_lists, root, out, "scatter", "input", "output")
        timeout = self._op_timeout(opts)

        def run(_):
            m = out.numel()
            buf = torch.cat([i.detach().reshape(-1) for i in ins]) if ins else \
                torch.empty(m * self.size(), dtype=out.dtype)
            cc.broadcast(_move_view(buf), root, group=self._group, timeout=timeout)
            me = self.rank()
            out.detach().copy_(buf[me * m:(me + 1) * m].view(out.shape))

        return self._submit("scatter", [out], run)

    def _alltoall_padded(self, blocks_in: list[torch.Tensor], sizes_out: list[int], dtype: torch.dtype,
                         timeout: float) -> tuple[torch.Tensor, int]:
        """Block j of ``blocks_in`` (1-D) goes to group rank j; every block padded to the group's largest.
        Returns (received buffer, block size): rank j's block starts at j x block."""
        deadline = time.monotonic() + timeout
        n = self.size()
        block = self._max(max([b.numel() for b in blocks_in] + sizes_out + [0]), timeout)
        send = torch.zeros(n * block, dtype=dtype)
        for j, b in enumerate(blocks_in):
            send[j * block:j * block + b.numel()] = b
        recv = torch.empty(n * block, dtype=dtype)
        if block:
            cc.alltoall(_move_view(recv), _move_view(send), group=self._group,
                        timeout=max(deadline - time.monotonic(), 0.001))
        return recv, block

    def alltoall(self, output_tensors, input_tensors, opts=None):
        opts = _options(opts, _c10d.AllToAllOptions)
        outs, ins = list(output_tensors), list(input_tensors)
        n = self.size()
        if len(outs) != n or len(ins) != n:
            raise ValueError(f"collcomm: alltoall needs {n} input and {n} output tensors")
        _check_cpu(outs + ins, "alltoall")
        _same_dtype(outs + ins, ins[0].dtype, "alltoall")
        timeout = self._op_timeout(opts)

        def run(_):
            blocks = [_contig(i)[0].reshape(-1) for i in ins]
            recv, block = self._alltoall_padded(blocks, [o.numel() for o in outs], ins[0].dtype, timeout)
            for j, o in enumerate(outs):
                o.detach().copy_(recv[j * block:j * block + o.numel()].view(o.shape))

        return self._submit("alltoall", outs, run)

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, opts=None):
        opts = _options(opts, _c10d.AllToAllOptions)
        _check_cpu([output, input], "all_to_all_single")
        _same_dtype([input], output.dtype, "all_to_all_single")
        n = self.size()
        out_splits, in_splits = list(output_split_sizes or []), list(input_split_sizes or [])
        timeout = self._op_timeout(opts)
        if not out_splits and not in_splits:
            if input.numel() != output.numel() or input.numel() % n:
                raise ValueError(f"collcomm: all_to_all_single: input ({input.numel()} elements) and output "
                                 f"({output.numel()}) must be equal and divisible by the group size {n}")

            def even(_):
                src, _ = _contig(input)
                work, orig = _contig(output)
                cc.alltoall(_move_view(work), _move_view(src), group=self._group, timeout=timeout)
                _copy_back(work, orig)

            return self._submit("all_to_all_single", [output], even)

        def splits(given, t, what):
            rows = t.shape[0] if t.dim() else 1
            if not given:
                if rows % n:
                    raise ValueError(f"collcomm: all_to_all_single: {what} has {rows} rows, not divisible by {n}")
                return [rows // n] * n
            if len(given) != n or sum(given) != rows or min(given) < 0:
                raise ValueError(f"collcomm: all_to_all_single: {what} split sizes {given} do not split {rows} rows "
                                 f"into {n} parts")
            return [int(s) for s in given]

        in_splits, out_splits = splits(in_splits, input, "input"), splits(out_splits, output, "output")
        row_in = input.numel() // max(input.shape[0], 1) if input.dim() else 1
        row_out = output.numel() // max(output.shape[0], 1) if output.dim() else 1
        if input.dim() and output.dim() and input.shape[1:] != output.shape[1:]:
            raise ValueError(f"collcomm: all_to_all_single: input rows {tuple(input.shape[1:])} and output rows "
                             f"{tuple(output.shape[1:])} differ")

        def uneven(_):
            src = _contig(input)[0].reshape(-1)
            blocks, offset = [], 0
            for s in in_splits:
                blocks.append(src[offset:offset + s * row_in])
                offset += s * row_in
            recv, block = self._alltoall_padded(blocks, [s * row_out for s in out_splits], input.dtype, timeout)
            work, orig = _contig(output)
            flat, offset = work.reshape(-1), 0
            for j, s in enumerate(out_splits):
                flat[offset:offset + s * row_out] = recv[j * block:j * block + s * row_out]
                offset += s * row_out
            _copy_back(work, orig)

        return self._submit("all_to_all_single", [output], uneven)

    alltoall_base = all_to_all_single

    def barrier(self, opts=None):
        opts = _options(opts, _c10d.BarrierOptions)
        timeout = self._op_timeout(opts)
        return self._submit("barrier", [], lambda _: cc.barrier(group=self._group, timeout=timeout))

    # ------------------------------------------------------------------ point to point
    def send(self, tensors, dstRank: int, tag: int = 0):
        t = _one(tensors, "send")
        dst = self._check_peer(dstRank, "send")
        timeout = self._timeout

        def run(_):
            work, _ = _contig(t)
            cc.send(_move_view(work), dst, tag=tag, timeout=timeout)

        return self._submit("send", [t], run, lane=_p2p_lane("send", dst))

    def recv(self, tensors, srcRank: int, tag: int = 0):
        t = _one(tensors, "recv")
        src = self._check_peer(srcRank, "recv")
        timeout = self._timeout

        def run(work_handle):
            work, orig = _contig(t)
            cc.recv(_move_view(work), src, tag=tag, timeout=timeout)
            _copy_back(work, orig)
            work_handle._source = srcRank

        return self._submit("recv", [t], run, lane=_p2p_lane("recv", src))

    def recv_anysource(self, tensors, tag: int = 0):
        t = _one(tensors, "recv_anysource")
        peers = [(r, self._members[r]) for r in range(self.size()) if r != self.rank()]
        timeout = self._timeout

        def run(work_handle):
            from collcomm.runtime.p2p import recv_any

            work, orig = _contig(t)
            world_src = recv_any(api.runtime(), _move_view(work), [g for _, g in peers], tag, timeout)
            _copy_back(work, orig)
            work_handle._source = self._members.index(world_src)

        return self._submit("recv_anysource", [t], run, lane=_p2p_lane("recv", -1))

    # ------------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        """Called by destroy_process_group: stop the lane; the default group also leaves the collcomm
        job when this module joined it."""
        global _OWNED
        if self._closed:
            return
        self._closed = True
        self._lane.close()
        if self._default:
            with _STATE_LOCK:
                if _OWNED:
                    _OWNED = False
                    cc.shutdown()

    def abort(self) -> None:
        self.shutdown()
