"""Ray objects through collcomm: handles passed through levels of tasks, first-k-of-n reductions of
task outputs released at random times, and the "collcomm" Ray tensor transport, on a local Ray."""

from __future__ import annotations

import random
import time
import zlib

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
ccray = pytest.importorskip("collcomm.integrations.ray")

pytestmark = pytest.mark.timeout(240)


def data(seed: int, n: int = 300_000) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, size=n).astype(np.int64)


# ------------------------------------------------------------------ handles through tasks
@ray.remote(num_cpus=0)
def level(h, depth: int) -> dict:
    """Read the object at this level, go one level deeper, and at the bottom put a new one."""
    a = h.get()
    mine = {"depth": depth, "crc": zlib.crc32(a.tobytes()), "pid": __import__("os").getpid()}
    if depth == 3:
        return {"levels": [mine], "made": ccray.put(a * 2)}
    below = ray.get(level.remote(h, depth + 1))
    below["levels"].insert(0, mine)
    return below


def test_a_handle_travels_through_three_levels_of_tasks_and_one_comes_back(ray_local):
    x = data(1)
    h = ccray.put(x)
    assert len(__import__("pickle").dumps(h.key)) < 200     # the handle is small, whatever the array
    out = ray.get(level.remote(h, 1), timeout=120)
    assert [lv["depth"] for lv in out["levels"]] == [1, 2, 3]
    assert all(lv["crc"] == zlib.crc32(x.tobytes()) for lv in out["levels"])
    back = out["made"].get()                                  # put by the deepest task, read here
    assert np.array_equal(back, x * 2) and not back.flags.writeable
    assert h.delete() and out["made"].delete()


# ------------------------------------------------------------------ first k of n
@ray.remote(num_cpus=0)
def produce(h, seed: int, delay: float, go=None) -> float:
    """A task's output, released after ``delay`` seconds, or (``go``) once the driver says so."""
    if go is not None:
        go.get(timeout=60)  # the late producers wait for the driver's word (an object of its own)
    else:
        time.sleep(delay)   # the task's "work": releases at random times
    h.put(data(seed))
    return time.time()


@pytest.mark.parametrize("op", ["sum", "max"])
def test_first_k_of_n_reduce_of_task_outputs_released_at_random_times_is_exact(ray_local, op):
    n, k = 6, 4
    rng = random.Random(7)
    handles = [ccray.handle() for _ in range(n)]
    late = {1, 4}                       # these two release only after the reduction returned
    go = ccray.handle()
    refs = [produce.remote(handles[i], 100 + i, rng.uniform(0.0, 1.5), go if i in late else None)
            for i in range(n)]
    result = ccray.reduce(handles, op=op, num_required=k, timeout=90)
    go.put(np.zeros(1))
    used = list(result.sources)
    assert len(used) == k and len(set(used)) == k
    assert not {handles[i].key for i in late} & set(used)   # only outputs released in time
    index = {h.key: i for i, h in enumerate(handles)}
    want = getattr(np, {"sum": "sum", "max": "max"}[op])(np.stack([data(100 + index[u]) for u in used]), axis=0)
    got = result.get()
    assert got.dtype == np.int64 and np.array_equal(got, want)
    ray.get(refs, timeout=60)
    for h in handles + [go, result]:
        h.delete()


def test_reduce_of_task_object_refs_takes_the_first_tasks_to_finish(ray_local):
    @ray.remote(num_cpus=0)
    def made(seed: int, delay: float):
        time.sleep(delay)
        return ccray.put(data(seed, 1000))

    refs = [made.remote(s, d) for s, d in ((1, 0.0), (2, 8.0), (3, 0.2))]
    result = ccray.reduce(refs, num_required=2, timeout=60)
    assert np.array_equal(result.get(), data(1, 1000) + data(3, 1000))
    ray.cancel(refs[1], force=True)


def test_a_get_of_a_handle_never_put_is_a_bounded_typed_error(ray_local):
    from collcomm.errors import CollectiveError

    t0 = time.monotonic()
    with pytest.raises(CollectiveError):
        ccray.handle().get(timeout=1.0)
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------ the tensor transport
@ray.remote(num_cpus=0)
class Producer:
    def __init__(self):
        import torch

        self.weights = torch.arange(1 << 20, dtype=torch.float32) * 0.5

    @ray.method(tensor_transport="collcomm")
    def publish(self):
        return self.weights

    def where(self) -> list:
        import collcomm.api as api

        return sorted(api._objects().stats()["copies"])


@ray.remote(num_cpus=0, enable_tensor_transport=True)  # Ray's rule: a consumer needs it (or an RDT method)
class Consumer:
    def read(self, t) -> dict:
        import collcomm.api as api

        return {"sum": float(t.double().sum()), "n": t.numel(), "dtype": str(t.dtype),
                "writable": bool(t.numpy().flags.writeable),
                "pulled": sorted(api._objects().stats()["copies"]) if api.is_initialized() else []}


def test_the_tensor_transport_moves_actor_outputs_through_collcomm(ray_local):
    import torch

    producer = Producer.remote()
    consumers = [Consumer.remote() for _ in range(3)]
    ref = producer.publish.remote()
    got = ray.get([c.read.remote(ref) for c in consumers], timeout=120)
    want = float((torch.arange(1 << 20, dtype=torch.float64) * 0.5).sum())
    assert all(g["sum"] == want and g["n"] == 1 << 20 and g["dtype"] == "torch.float32" for g in got)
    assert all(g["writable"] for g in got)
    keys = ray.get(producer.where.remote())
    assert len(keys) == 1 and keys[0].startswith("rdt/")            # the producer's store holds it ...
    assert all(keys[0] in g["pulled"] for g in got)                  # ... and each consumer pulled it
    for a in [producer] + consumers:
        ray.kill(a)
