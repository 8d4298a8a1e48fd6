"""alltoall against a NumPy reference, run as real processes over TCP (`collcomm run`).

World sizes 1-5; int8/uint8/int32/uint32/int64/uint64/float16/float32/float64 NumPy arrays
and bfloat16/float32 CPU torch tensors; 0 elements, one element per block, uneven-looking
block sizes, and blocks spanning many chunks (a small chunk size); out-of-place, in place
(output is the input) and asynchronous; a subgroup. Refusals: a size that does not split into
equal blocks (ValueError naming the group size), sizes or dtypes that differ between input
and output. Failures: ranks that disagree on the size get MismatchError on every rank; a
rank that dies before the exchange makes every survivor raise PeerFailure naming it, well
before the timeout.
"""

from __future__ import annotations

import numpy as np
import pytest

import multiproc

import collcomm as cc

NUMPY_DTYPES = ("int8", "uint8", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64")


def block_values(sender: int, receiver: int, block: int, dtype: str) -> np.ndarray:
    """What ``sender`` puts in block ``receiver`` of its input: distinct per (sender, receiver, index)."""
    i = np.arange(block, dtype=np.int64)
    values = (sender * 7919 + receiver * 104729 + i * 31) % (100 if dtype in ("int8", "float16") else 250)
    return values.astype(dtype if dtype != "bfloat16" else "float32")


def alltoall_worker(blocks: list[int]) -> dict:
    import torch

    n, me = cc.world_size(), cc.rank()
    checks, failures = 0, []

    def check(what, got, want):
        nonlocal checks
        checks += 1
        got = np.asarray(got)
        if got.shape != want.shape or not np.array_equal(got, want):
            bad = np.flatnonzero(got != want) if got.shape == want.shape else []
            failures.append(f"rank {me}: {what}: {len(bad)} wrong" + (f", first [{bad[0]}]: {got[bad[0]]} "
                                                                        f"!= {want[bad[0]]}" if len(bad) else ""))

    for block in blocks:
        for dtype in NUMPY_DTYPES:
            x = np.concatenate([block_values(me, j, block, dtype) for j in range(n)])
            want = np.concatenate([block_values(i, me, block, dtype) for i in range(n)])
            out = np.full(n * block, 1, dtype)
            cc.alltoall(out, x)
            check(f"alltoall {block} x {n} {dtype}", out, want)
            check(f"alltoall {block} x {n} {dtype}: input unchanged", x,
                  np.concatenate([block_values(me, j, block, dtype) for j in range(n)]))
            y = x.copy()
            cc.alltoall(y, y)
            check(f"in-place alltoall {block} x {n} {dtype}", y, want)
        for tdtype in (torch.bfloat16, torch.float32):
            src = np.concatenate([block_values(me, j, block, "bfloat16") for j in range(n)])
            want = np.concatenate([block_values(i, me, block, "bfloat16") for i in range(n)])
            t_in = torch.from_numpy(src).to(tdtype)
            t_out = torch.zeros(n * block, dtype=tdtype)
            w = cc.alltoall(t_out, t_in, async_op=True)
            w.wait(timeout=30)
            check(f"async torch alltoall {block} x {n} {tdtype}", t_out.to(torch.float32).numpy(), want)
    # a subgroup of the even ranks
    evens = list(range(0, n, 2))
    if me in evens and len(evens) > 1:
        g = cc.new_group(evens)
        k, block = len(evens), 5
        x = np.concatenate([block_values(me, evens[j], block, "int32") for j in range(k)])
        out = np.zeros_like(x)
        cc.alltoall(out, x, group=g)
        check("group alltoall", out, np.concatenate([block_values(r, me, block, "int32") for r in evens]))
    # refusals: one-line errors, nothing sent
    refusals = {}
    for name, fn in {
        "uneven": lambda: cc.alltoall(np.zeros(n + 1, np.float32), np.zeros(n + 1, np.float32)),
        "sizes": lambda: cc.alltoall(np.zeros(2 * n, np.float32), np.zeros(n, np.float32)),
        "dtypes": lambda: cc.alltoall(np.zeros(n, np.float64), np.zeros(n, np.float32)),
    }.items():
        try:
            fn()
            refusals[name] = "accepted"
        except (ValueError, TypeError) as e:
            refusals[name] = f"{type(e).__name__}: {e}"
    # the group still works after the refusals
    x = np.full(n, me, np.int64)
    cc.alltoall(x, x)
    check("alltoall after refusals", x, np.arange(n, dtype=np.int64))
    return {"checks": checks, "failures": failures, "refusals": refusals}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("n", [1, 2, 3, 4, pytest.param(5, marks=pytest.mark.slow)])  # 5: slow (CI time)
def test_alltoall_matches_numpy(n):
    blocks = [0, 1, 3, 1000]
    job = multiproc.run(n, alltoall_worker, timeout=120, chunk_bytes=512 if n in (2, 3) else None,
                        kwargs=dict(blocks=blocks))  # 512-byte chunks: blocks of 1000 span many
    for r, v in enumerate(job.values()):
        assert v["failures"] == [], "\n".join(v["failures"])
        assert v["checks"] >= len(blocks) * len(NUMPY_DTYPES) * 3
        uneven = v["refusals"]["uneven"]
        if n == 1:
            assert uneven == "accepted"  # any size splits into one block
        else:
            # the library's own usage errors (issue 20): UsageError is a ValueError, UsageTypeError a TypeError
            assert uneven.startswith("UsageError") and f"{n} equal blocks" in uneven, uneven
        assert v["refusals"]["sizes"].startswith("UsageError"), v["refusals"]
        assert v["refusals"]["dtypes"].startswith("UsageTypeError"), v["refusals"]


DISAGREE = """
n = world_size
count = 2 * n if rank == 0 else 3 * n
x = np.zeros(count, np.float32)
try:
    cc.alltoall(x.copy(), x, timeout=20)
    report("returned")
except cc.CollectiveError as e:
    report(type(e).__name__ + ": " + str(e))
# the group works again afterwards
y = np.full(n, rank, np.int32)
cc.alltoall(y, y, timeout=20)
assert (y == np.arange(n)).all(), y
"""


@pytest.mark.timeout(90)
def test_ranks_that_disagree_on_the_size_all_raise_mismatch_error():
    job = multiproc.run(3, DISAGREE, timeout=60, collective_timeout=20)
    for r, v in enumerate(job.values()):
        assert v.startswith("MismatchError"), f"rank {r}: {v}"


DIES = """
import os, time
n = world_size
cc.barrier()
if rank == n - 1:
    os._exit(3)
x = np.arange(4 * n, dtype=np.float64)
t0 = time.monotonic()
try:
    cc.alltoall(np.zeros_like(x), x, timeout=25)
    report({"result": "returned"})
except cc.CollectiveError as e:
    report({"result": type(e).__name__, "rank": getattr(e, "rank", None), "seconds": time.monotonic() - t0})
"""


@pytest.mark.timeout(90)
def test_a_dead_peer_makes_every_survivor_raise_peer_failure_naming_it():
    n = 4
    job = multiproc.run(n, DIES, timeout=60, collective_timeout=25)
    assert job.returncode != 0  # the launcher reports the dead rank
    for r in job.ranks[:-1]:
        assert r.ok, f"rank {r.rank} wrote no result: {r.error}\n" + "\n".join(r.output[-20:])
        assert r.value["result"] == "PeerFailure" and r.value["rank"] == n - 1, r.value
        assert r.value["seconds"] < 12, r.value  # well before the 25 s timeout
