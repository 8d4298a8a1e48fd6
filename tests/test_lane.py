"""The small-message lane (collcomm/runtime/lane.py) in real jobs.

After the first call of a shape, the API hands small collectives of NumPy arrays on a
shared-memory group straight to the lane. These jobs check, inside every rank against NumPy:
that the lane really takes the repeated calls (the full path's entry points, counted, see none of
them) and nothing else (async_op, an explicit timeout of another type, a torch tensor, a shrunk
group: the full path, counted); every collective, dtype and op through it, with fresh data each
call, 2-D arrays and in-place variants; that every usage error it could meet is still raised,
word for word the same before and after the shape was prepared, and costs no operation; that a
blocking call behind an asynchronous one keeps its order; that ranks running different
operations through the lane get a MismatchError naming both. Faults (a rank killed or stopped in
a loop of small allreduces) are in the fault matrix (sigkill-small, sigstop-small).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import multiproc

import collcomm as cc
from collcomm.transport.shm import arena as shm_arena

pytestmark = [pytest.mark.skipif(not shm_arena.SUPPORTED or not os.path.isdir("/dev/shm"),
                                 reason="shared-memory collectives run on x86-64 Linux with /dev/shm"),
              pytest.mark.timeout(200)]

DTYPES = ("float32", "float64", "int32", "int64", "int8", "uint8", "float16")
OPS = ("sum", "prod", "min", "max", "avg")
KINDS = ("allreduce", "allgather", "reduce_scatter", "broadcast", "barrier")


# ---------------------------------------------------------------------------- inside the ranks
def _count_full_path() -> dict:
    """Count the calls that reach the full path's collectives (collcomm.runtime.collectives):
    each entry point is wrapped in place by a function that counts and calls it."""
    from collcomm.runtime import collectives

    counts = dict.fromkeys(KINDS, 0)
    for kind in KINDS:
        real = getattr(collectives, kind)

        def counted(*a, _real=real, _kind=kind, **k):
            counts[_kind] += 1
            return _real(*a, **k)

        setattr(collectives, kind, counted)
    return counts


def _data(n: int, shape, dtype: str, op: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        lo, hi = (1, 3) if op == "prod" else (-8, 9)
        return rng.integers(lo, hi, (n, *shape)).astype(dtype)  # small integers: every order is exact
    return rng.integers(-3 if np.dtype(dtype).kind == "i" else 0, 4, (n, *shape)).astype(dtype)


def _reduced(x: np.ndarray, op: str) -> np.ndarray:
    f = {"sum": np.sum, "prod": np.prod, "min": np.min, "max": np.max, "avg": np.sum}[op]
    out = f(x, axis=0).astype(x.dtype)
    if op == "avg":  # divided in the buffer's own dtype, as a reduction of that dtype is
        np.divide(out, x.shape[0], out=out, casting="unsafe")
    return out


def every_kind_through_the_lane(calls: int) -> dict:
    """Every collective x dtype x op, ``calls`` times per shape with fresh data; all but the
    first of each shape must take the lane (the full path counts them)."""
    n, me = cc.world_size(), cc.rank()
    cc.barrier()  # the shared memory forms (its agreement runs over sockets) and the barrier is prepared
    counts = _count_full_path()
    wrong, shapes = [], 0
    for di, dtype in enumerate(DTYPES):
        for oi, op in enumerate(OPS):
            if op == "avg" and np.dtype(dtype).kind != "f":
                continue
            shape = (3, 4 * n) if (di + oi) % 2 else (4 * n * (3 + di % 3),)  # 2-D and 1-D buffers
            shapes += 1
            for call in range(calls):
                seed = di * 1000 + oi * 10 + call
                x = _data(n, shape, dtype, op, seed)
                a = x[me].copy()
                cc.allreduce(a, op)
                if not np.array_equal(a, _reduced(x, op)):
                    wrong.append(f"allreduce {op} {dtype} call {call}")
                # reduce_scatter, out of place and in place (out a view of x)
                flat = x.reshape(n, -1)
                m = flat.shape[1] // n
                inp, out = flat[me].copy(), np.empty(m, dtype)
                cc.reduce_scatter(out, inp, op)
                ref = _reduced(flat, op)[me * m:(me + 1) * m]
                if not np.array_equal(out, ref):
                    wrong.append(f"reduce_scatter {op} {dtype} call {call}")
                inp = flat[me].copy()
                own = inp[me * m:(me + 1) * m]
                cc.reduce_scatter(own, inp, op)
                if not np.array_equal(own, ref):
                    wrong.append(f"reduce_scatter in place {op} {dtype} call {call}")
                if op == "sum":  # (no op: once per dtype)
                    gathered = np.zeros((n, *shape), dtype)
                    cc.allgather(gathered, x[me])
                    if not np.array_equal(gathered, x):
                        wrong.append(f"allgather {dtype} call {call}")
                    inplace = np.zeros(n * x[me].size, dtype)
                    inplace[me * x[me].size:(me + 1) * x[me].size] = x[me].reshape(-1)
                    cc.allgather(inplace, inplace[me * x[me].size:(me + 1) * x[me].size])
                    if not np.array_equal(inplace, x.reshape(-1)):
                        wrong.append(f"allgather in place {dtype} call {call}")
                    for root in range(n):
                        b = x[me].copy()
                        cc.broadcast(b, root)
                        if not np.array_equal(b, x[root]):
                            wrong.append(f"broadcast root {root} {dtype} call {call}")
                    cc.barrier()
    return {"wrong": wrong, "full": counts, "shapes": shapes}


def _refusals(n: int, me: int) -> list[tuple[str, str]]:
    """Every call below is refused; (exception class, message) of each, in order."""
    x = np.ones(8 * n, np.float32)
    out = np.empty(8 * n * n, np.float32)
    scattered = np.empty(8, np.float32)
    readonly = x.copy()
    readonly.flags.writeable = False
    strided = np.ones(16 * n, np.float32)[::2]
    readonly_out = out.copy()
    readonly_out.flags.writeable = False
    shifted = 8 * n * me + (1 if me == 0 else -1)  # one element off this rank's block of out
    calls = [
        lambda: cc.allreduce(readonly),
        lambda: cc.allreduce(strided),
        lambda: cc.allreduce(np.asfortranarray(np.ones((2, 4 * n), np.float32))),
        lambda: cc.allreduce(x, "band"),
        lambda: cc.allreduce(x, 3),
        lambda: cc.allreduce(x, timeout=float("nan")),
        lambda: cc.allreduce(x, timeout=True),
        lambda: cc.allreduce(x, timeout=0),
        lambda: cc.allreduce(x, timeout=float("inf")),
        lambda: cc.allreduce(x, async_op=2),
        lambda: cc.allreduce(x, group="world"),
        lambda: cc.allreduce(x.astype(">f4")),
        lambda: cc.allgather(out[:-1], x),
        lambda: cc.allgather(out.astype(np.float64), x),
        lambda: cc.allgather(readonly_out, x),
        lambda: cc.allgather(out, out[shifted:shifted + 8 * n]),  # x overlaps out, not as its own block
        lambda: cc.reduce_scatter(scattered, readonly, "sum"),
        lambda: cc.reduce_scatter(scattered[:-1], x, "sum"),
        lambda: cc.reduce_scatter(scattered.astype(np.int32), x, "sum"),
        lambda: cc.reduce_scatter(scattered, x, "bxor"),
        lambda: cc.broadcast(x, True),
        lambda: cc.broadcast(x, n),
        lambda: cc.broadcast(x, -1),
        lambda: cc.broadcast(x, 0.0),
        lambda: cc.broadcast(readonly, 0),
        lambda: cc.barrier(timeout=-1),
        lambda: cc.barrier(timeout="1"),
    ]
    said = []
    for call in calls:
        try:
            call()
        except (ValueError, TypeError) as e:
            said.append((type(e).__name__, str(e)))
        else:
            said.append(("nothing", "accepted"))
    return said


def refusals_before_and_after() -> dict:
    """The same bad calls on cold shapes and after each shape ran (is prepared for the lane);
    a good call after each round is exact (a refusal takes no operation number)."""
    n, me = cc.world_size(), cc.rank()
    before = _refusals(n, me)
    x = np.full(8 * n, me + 1.0, np.float32)
    cc.allreduce(x)  # prepare the shapes the refusals use
    cc.allreduce(x.copy(), timeout=5.0)
    cc.allgather(np.empty(8 * n * n, np.float32), x)
    cc.reduce_scatter(np.empty(8, np.float32), x.copy(), "sum")
    for root in range(n):
        cc.broadcast(x.copy(), root)
    cc.barrier()
    seq = cc.api._group(None).last_seq
    after = _refusals(n, me)
    unchanged = cc.api._group(None).last_seq == seq
    y = np.full(8 * n, me + 1.0, np.float32)
    cc.allreduce(y)
    exact = bool((y == n * (n + 1) / 2).all())
    return {"before": before, "after": after, "no_operation_taken": unchanged, "exact_after": exact}


def what_the_lane_leaves_alone() -> dict:
    """Calls of a prepared shape that must take the full path: each is counted there and exact."""
    import torch

    n, me = cc.world_size(), cc.rank()
    x = np.full(64, me + 1.0, np.float32)
    cc.allreduce(x)  # prepared
    counts = _count_full_path()
    total = n * (n + 1) / 2
    results = {}

    def check(name, run, value):
        before = counts["allreduce"]
        run()
        results[name] = [counts["allreduce"] - before, bool((np.asarray(value) == total).all())]

    a = np.full(64, me + 1.0, np.float32)
    check("async_op", lambda: cc.allreduce(a, async_op=True).wait(), a)
    b = np.full(64, me + 1.0, np.float32)
    check("numpy float timeout", lambda: cc.allreduce(b, timeout=np.float64(5.0)), b)
    t = torch.full((64,), me + 1.0, dtype=torch.float32)
    check("torch tensor", lambda: cc.allreduce(t), t.numpy())
    everyone = cc.new_group(list(range(n)), "everyone")
    cc.allreduce(np.ones(64, np.float32), group=everyone)  # prepared there too
    c = np.full(64, me + 1.0, np.float32)
    check("explicit group", lambda: cc.allreduce(c, group=everyone), c)
    d = np.full(64, me + 1.0, np.float32)
    lane = lambda: cc.allreduce(d)  # noqa: E731 - the lane (nothing counted)
    check("the lane", lane, d)
    return results


def async_then_blocking(ops: int) -> dict:
    """An asynchronous allreduce (sum), then a blocking one (max) of the same prepared shape:
    rank 0 issues the blocking call at once, the others after waiting for the first. Every rank
    must run them in the order they were issued (one out of order: wrong results or a mismatch)."""
    n, me = cc.world_size(), cc.rank()
    warm = np.ones(32, np.float32)
    cc.allreduce(warm, "sum")
    cc.allreduce(warm, "max")
    wrong = 0
    for i in range(ops):
        a = np.full(32, (me + 1.0) * (i + 1), np.float32)
        b = np.full(32, (me + 1.0) * 1000 * (i + 1), np.float32)
        work = cc.allreduce(a, "sum", async_op=True)
        if me != 0:
            work.wait()
        cc.allreduce(b, "max")
        work.wait()
        wrong += not ((a == n * (n + 1) / 2 * (i + 1)).all() and (b == n * 1000 * (i + 1)).all())
    return {"wrong": wrong}


def mismatched_through_the_lane() -> dict:
    me = cc.rank()
    x = np.ones(16, np.float32)
    cc.allreduce(x, "sum")
    cc.allreduce(x, "max")  # both shapes prepared on every rank
    try:
        cc.allreduce(np.ones(16, np.float32), "sum" if me == 0 else "max")
    except cc.MismatchError as e:
        return {"error": "MismatchError", "msg": str(e)}
    return {"error": None}


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("n", [2, 3])
def test_every_collective_dtype_and_op_through_the_lane(n):
    calls = 3
    values = multiproc.run(n, every_kind_through_the_lane, kwargs={"calls": calls}, timeout=180).check().values()
    for v in values:
        assert v["wrong"] == [], v["wrong"]
        # only the first call of each shape takes the full path: allreduce and reduce_scatter
        # (out of place and in place: one shape) once per shape; allgather once per dtype (in
        # place too), broadcast once per dtype and root; the barrier was prepared before
        dtypes = len(DTYPES)
        assert v["full"] == {"allreduce": v["shapes"], "reduce_scatter": v["shapes"], "allgather": dtypes,
                             "broadcast": dtypes * n, "barrier": 0}, v["full"]


def test_a_refused_call_is_refused_the_same_before_and_after_its_shape_is_prepared():
    for v in multiproc.run(2, refusals_before_and_after, timeout=60).check().values():
        before, after = v["before"], v["after"]
        assert ("nothing", "accepted") not in before, before
        assert after == before
        assert v["no_operation_taken"] and v["exact_after"], v


def test_what_the_lane_leaves_to_the_full_path():
    pytest.importorskip("torch")
    for v in multiproc.run(2, what_the_lane_leaves_alone, timeout=60).check().values():
        assert v == {"async_op": [1, True], "numpy float timeout": [1, True], "torch tensor": [1, True],
                     "explicit group": [0, True], "the lane": [0, True]}, v


def test_a_blocking_call_behind_an_asynchronous_one_keeps_its_order():
    for v in multiproc.run(2, async_then_blocking, kwargs={"ops": 200}, timeout=60).check().values():
        assert v["wrong"] == 0


def test_ranks_running_different_operations_through_the_lane_are_told_both():
    values = list(multiproc.run(2, mismatched_through_the_lane, timeout=60, collective_timeout=10).check().values())
    for v in values:
        assert v["error"] == "MismatchError", v
        assert "allreduce of 16 float32 (sum)" in v["msg"] and "allreduce of 16 float32 (max)" in v["msg"], v
