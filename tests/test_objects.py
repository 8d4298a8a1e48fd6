"""Objects in flight with real processes: put, get, reduce_objects, delete, object_info.

Each job runs under `collcomm run` (tests/multiproc.py); ranks check bytes against NumPy inside
the job and return facts. Holders stay alive until readers are done (a barrier at the end), as
in any job: a process that exits takes its copies with it.
"""

from __future__ import annotations

import numpy as np
import pytest

import multiproc

pytestmark = pytest.mark.timeout(180)

DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
          "uint64", "bool", "complex64"]


def put_get_worker(sizes, dtypes):
    """Rank 0 puts one object per (dtype, size); the others get each, some before it exists."""
    import collcomm as cc

    rng = np.random.default_rng(7)
    objects = {}
    for dt in dtypes:
        for nbytes in sizes:
            n = nbytes // np.dtype(dt).itemsize
            raw = rng.integers(0, 256, size=n * np.dtype(dt).itemsize, dtype=np.uint8)
            objects[f"{dt}/{nbytes}"] = raw.view(dt).reshape(-1)
    if cc.rank() == 0:
        cc.barrier()  # the readers are already waiting in get: they arrived before the writer
        puts = [cc.put(key, arr, async_op=(i % 2 == 0)) for i, (key, arr) in enumerate(objects.items())]
        for work in puts[::2]:
            assert work.result(60) is None
        checked = len(objects)
    else:
        works = [(key, cc.get(key, timeout=60, async_op=True)) for key in objects]
        cc.barrier()
        checked = 0
        for key, work in works:  # the async gets' handles carry the arrays
            got = work.result(60)
            assert work.is_completed() and got.tobytes() == objects[key].tobytes(), key
        for key, arr in objects.items():
            got = cc.get(key, timeout=60)
            assert got.dtype == arr.dtype and got.shape == arr.shape, (key, got.dtype, got.shape)
            assert got.tobytes() == arr.tobytes(), key
            assert not got.flags.writeable  # a zero-copy view of the store
            out = np.empty_like(arr)
            assert cc.get(key, out=out) is out and out.tobytes() == arr.tobytes()
            checked += 1
    cc.barrier()
    return checked


def test_put_get_every_dtype_and_edge_sizes_readers_first():
    sizes = [0, 1, (64 << 10) - 8, 64 << 10, (64 << 10) + 8]
    job = multiproc.run(3, put_get_worker, kwargs={"sizes": sizes, "dtypes": DTYPES}, timeout=150)
    per_rank = len(sizes) * len(DTYPES)
    assert job.values() == [per_rank] * 3


def big_worker(nbytes):
    """100 MB from rank 0 to every other rank, along chains; bytes and chain shape checked."""
    import collcomm as cc

    n = nbytes // 4
    if cc.rank() == 0:
        src = np.arange(n, dtype=np.float32)
        cc.put("big", src)
    got = cc.get("big", timeout=90)
    assert got.shape == (n,) and got[0] == 0 and got[-1] == n - 1
    assert np.array_equal(got, np.arange(n, dtype=np.float32))
    cc.barrier()
    info = cc.object_info("big")
    # The transfer went through the link telemetry the monitor reads, like a collective's.
    links = cc.api.runtime().transport.telemetry.snapshot()["links"]
    received = sum(l["bytes"] for l in links if l["dst"] == cc.rank())
    cc.barrier()
    return {"complete": info["complete"], "ranks": sorted(l["rank"] for l in info["locations"]),
            "received": received}


def test_one_hundred_megabytes_reach_every_reader():
    job = multiproc.run(4, big_worker, kwargs={"nbytes": 100_000_000}, timeout=170)
    for r, v in enumerate(job.values()):
        assert v["complete"] and v["ranks"] == [0, 1, 2, 3]
        assert r == 0 or v["received"] >= 100_000_000, v


def reduce_first_k_worker(n_inputs, k, count, seed, prefix="g"):
    """Every rank but 0 owns some inputs and releases them at random times; rank 0 reduces the
    first k; every rank then gets the result and checks it against NumPy over the keys used."""
    import time

    import collcomm as cc

    me, world = cc.rank(), cc.world_size()
    keys = [f"{prefix}{i}" for i in range(n_inputs)]

    def value(i):
        return np.random.default_rng(seed + i).standard_normal(count).astype(np.float64)

    delays = np.random.default_rng(seed).uniform(0, 0.6, size=n_inputs)
    cc.barrier()
    start = time.monotonic()
    if me == 0:
        work = cc.reduce_objects(keys, f"{prefix}total", op="sum", num_required=k, timeout=60, async_op=True)
        used = work.result(60)
        cc.put(f"{prefix}used", np.frombuffer(",".join(used).encode(), np.uint8))
    else:
        mine = [i for i in range(n_inputs) if i % (world - 1) == me - 1]
        for i in sorted(mine, key=lambda i: delays[i]):
            time.sleep(max(0.0, start + delays[i] - time.monotonic()))
            cc.put(keys[i], value(i))
    used = bytes(cc.get(f"{prefix}used", timeout=60)).decode().split(",")
    total = cc.get(f"{prefix}total", timeout=60)
    expected = np.zeros(count)
    for key in used:
        expected += value(int(key[len(prefix):]))
    assert len(used) == k and len(set(used)) == k and set(used) <= set(keys)
    np.testing.assert_allclose(total, expected, rtol=1e-12, atol=1e-12)
    order = sorted(range(n_inputs), key=lambda i: delays[i])
    cc.barrier()
    return {"used": used, "first": [keys[i] for i in order[:k]]}


def reduce_first_k_both_sizes(n_inputs, k, seed):
    """8 KB objects (reduced at the root, a star) and 4.8 MB ones (chains), in one job."""
    import collcomm as cc

    small = reduce_first_k_worker(n_inputs, k, 1000, seed, prefix="s")
    cc.barrier()
    return [small, reduce_first_k_worker(n_inputs, k, 600_000, seed + 1, prefix="b")]


def test_reduce_first_k_of_n_with_inputs_released_at_random_times():
    job = multiproc.run(5, reduce_first_k_both_sizes, kwargs={"n_inputs": 8, "k": 5, "seed": 11}, timeout=170)
    for size in range(2):
        values = [v[size] for v in job.values()]
        assert all(v["used"] == values[0]["used"] for v in values)
        # The inputs used are the first to become ready, give or take the ones released within a
        # few milliseconds of each other (the readiness the directory sees, not the drawn delays).
        assert len(set(values[0]["used"]) & set(values[0]["first"])) >= 4


def reduce_ops_worker(count, prefix):
    import collcomm as cc

    me, world = cc.rank(), cc.world_size()
    cases = {"sum": np.float32, "max": np.float64, "min": np.int32, "prod": np.float64, "avg": np.float32,
             "bxor": np.int64}
    for op, dt in cases.items():
        x = (np.arange(count) % 7 + me + 1).astype(dt)
        cc.put(f"{prefix}{op}/{me}", x)
    results = {}
    for op, dt in cases.items():
        if me == 1:
            used = cc.reduce_objects([f"{prefix}{op}/{r}" for r in range(world)], f"{prefix}{op}/out", op=op,
                                     timeout=60)
            assert sorted(used) == sorted(f"{prefix}{op}/{r}" for r in range(world))
        got = cc.get(f"{prefix}{op}/out", timeout=60)
        xs = [(np.arange(count) % 7 + r + 1).astype(dt) for r in range(world)]
        if op == "avg":
            ref = (np.sum(np.stack(xs).astype(np.float64), axis=0) / world).astype(dt)
            np.testing.assert_allclose(got, ref, rtol=1e-6)
        else:
            ufunc = {"sum": np.add, "max": np.maximum, "min": np.minimum, "prod": np.multiply,
                     "bxor": np.bitwise_xor}[op]
            ref = xs[0].copy()
            for x in xs[1:]:
                ufunc(ref, x, out=ref)
            assert got.dtype == ref.dtype and np.array_equal(got, ref), op
        results[op] = True
    cc.barrier()
    return sorted(results)


def reduce_ops_both_sizes():
    return [reduce_ops_worker(100, "s"), reduce_ops_worker(400_000, "b")]


def test_reduce_every_op_streaming_and_small():
    job = multiproc.run(4, reduce_ops_both_sizes, timeout=120)
    assert all(len(small) == 6 and len(big) == 6 for small, big in job.values())


def bad_use_worker():
    """Each misuse: a typed error naming the key, on the calling rank; nothing else disturbed."""
    import collcomm as cc

    me = cc.rank()
    facts = {}
    if me == 0:
        cc.put("a", np.ones(100_000, np.float32))
        cc.put("b", np.ones(200_000, np.float32))
        cc.put("c", np.ones(100_000, np.float64))
        cc.put("small", np.ones(10, np.float32))
        for key in ("a", "small"):
            try:
                cc.put(key, np.zeros(3))
            except cc.ObjectExists as e:
                facts[f"exists/{key}"] = e.key == key and key in str(e)
        try:
            cc.reduce_objects(["a", "b"], "ab", timeout=20)
        except cc.MismatchError as e:
            facts["size"] = "'b'" in str(e) and "'a'" in str(e)
        try:
            cc.reduce_objects(["a", "c"], "ac", timeout=20)
        except cc.MismatchError as e:
            facts["dtype"] = "float64" in str(e)
        cc.put("gone", np.ones(100_000, np.float32))
        assert cc.delete("gone") and not cc.delete("gone")
    cc.barrier()
    if me == 1:
        try:
            cc.get("gone", timeout=20)
        except cc.ObjectDeleted as e:
            facts["deleted"] = e.key == "gone" and "gone" in str(e)
        try:
            cc.object_info("never")
        except cc.ObjectDeleted as e:
            facts["info"] = e.key == "never"
        try:
            cc.get("never", timeout=0.5)
        except cc.CollectiveTimeout as e:
            facts["timeout"] = "never" in str(e)
    # Nothing else was disturbed: the good objects still read back whole, the failed reductions
    # left no object behind, and a deleted key can be put again.
    assert np.array_equal(cc.get("a", timeout=20), np.ones(100_000, np.float32))
    assert np.array_equal(cc.get("small", timeout=20), np.ones(10, np.float32))
    cc.barrier()
    if me == 0:
        for key in ("ab", "ac"):
            try:
                cc.object_info(key)
                facts[f"left/{key}"] = False
            except cc.ObjectDeleted:
                facts[f"left/{key}"] = True
        cc.put("gone", np.full(5, 2.0))
    cc.barrier()
    assert np.array_equal(cc.get("gone", timeout=20), np.full(5, 2.0))
    cc.barrier()
    return facts


def test_bad_use_is_a_typed_error_naming_the_key():
    job = multiproc.run(2, bad_use_worker, timeout=120)
    v0, v1 = job.values()
    assert v0 == {"exists/a": True, "exists/small": True, "size": True, "dtype": True, "left/ab": True,
                  "left/ac": True}
    assert v1 == {"deleted": True, "info": True, "timeout": True}


def memory_worker(nbytes, rounds):
    """Put, get and delete big objects: VmRSS returns to within 10% of where it started; then
    1,000 small put/get pairs leave fds, threads and memory where they were."""
    import os
    import threading

    import collcomm as cc

    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    me = cc.rank()
    cc.put(f"warm/{me}", np.ones(200_000))  # the layer's threads and buffers exist before we measure
    cc.get(f"warm/{(me + 1) % cc.world_size()}", timeout=30)
    cc.barrier()
    base = rss()
    peaks = []
    for r in range(rounds):
        if me == 0:
            cc.put(f"big{r}", np.full(nbytes // 8, float(r)))
        got = cc.get(f"big{r}", timeout=60)
        assert got[0] == r and got[-1] == r
        del got
        cc.barrier()
        peaks.append(rss())
        cc.barrier()
        if me == 1:
            cc.delete(f"big{r}")
        cc.barrier()
    after_delete = rss()

    def counts():
        return len(os.listdir("/proc/self/fd")), threading.active_count(), rss()

    def pairs(n, tag):
        for i in range(n):
            key = f"s/{tag}/{me}/{i}"
            cc.put(key, np.full(16, i, np.int32))
            assert cc.get(key)[0] == i
            cc.delete(key)

    pairs(100, "warm")
    before = counts()
    pairs(1000, "run")
    after = counts()
    cc.barrier()
    return {"base": base, "peak": max(peaks), "after_delete": after_delete, "before": before, "after": after}


def test_delete_frees_memory_and_small_pairs_do_not_leak():
    nbytes = 100_000_000
    job = multiproc.run(2, memory_worker, kwargs={"nbytes": nbytes, "rounds": 1}, timeout=170)
    for v in job.values():
        assert v["peak"] >= v["base"] + nbytes * 0.9, v  # the object really was held
        assert v["after_delete"] <= v["base"] * 1.10, v  # and really freed
        (fd0, th0, m0), (fd1, th1, m1) = v["before"], v["after"]
        assert fd1 <= fd0 + 2 and th1 <= th0 + 2, v
        assert m1 <= m0 * 1.10, v


def store_bound_worker(count):
    """A store of 10 MB, objects of 4 MB: the third put is refused naming the key, nothing is
    evicted from under it; a reader's idle replica makes room for a newer one (and the
    directory stops naming it)."""
    import collcomm as cc

    me = cc.rank()
    facts = {}
    if me == 0:
        cc.put("a", np.ones(count))
        cc.put("b", np.ones(count))
        try:
            cc.put("c", np.ones(count))
        except cc.ObjectStoreFull as e:
            facts["full"] = e.key == "c" and "COLLCOMM_OBJECT_STORE_BYTES" in str(e)
        facts["kept"] = bool(cc.get("a")[0] == 1 and cc.get("b")[-1] == 1)
        try:
            cc.object_info("c")
            facts["c"] = "registered"
        except cc.ObjectDeleted:
            facts["c"] = "absent"
        cc.delete("a")
        cc.put("c", np.full(count, 3.0))          # room again after the delete
        cc.put("d", np.full(count, 4.0), copy=False)  # shares the caller's array: costs the store nothing
    cc.barrier()
    if me == 1:
        assert cc.get("b", timeout=20)[0] == 1 and cc.get("c", timeout=20)[0] == 3
        facts["d"] = float(cc.get("d", timeout=20)[0])  # evicts the idle replica of b
        facts["b_holders"] = sorted(l["rank"] for l in cc.object_info("b")["locations"])
        facts["used"] = cc.api.runtime().objects.store.used
    cc.barrier()
    return facts


def test_the_store_is_bounded_and_never_evicts_what_is_put_or_read():
    count = 500_000  # 4 MB of float64
    job = multiproc.run(2, store_bound_worker, kwargs={"count": count}, timeout=90,
                        env={"COLLCOMM_OBJECT_STORE_BYTES": str(10_000_000)})
    v0, v1 = job.values()
    assert v0 == {"full": True, "kept": True, "c": "absent"}
    assert v1 == {"d": 4.0, "b_holders": [0], "used": 2 * count * 8}
