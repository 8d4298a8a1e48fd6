"""collcomm as a ray.util.collective backend, on a local Ray with real actors.

Every call of ray.util.collective with backend "collcomm" is checked exactly against NumPy, for
several dtypes and sizes, NumPy arrays and torch tensors, world sizes 2 to 4; groups are formed
by subsets of actors at different times, from inside the actors and from the driver."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
col = pytest.importorskip("ray.util.collective")
from ray.util.collective.types import ReduceOp  # noqa: E402

pytestmark = pytest.mark.timeout(240)

DTYPES = ("float32", "float64", "int32", "int64")
SIZES = (1, 1000, 65_537)


def inputs(rank: int, size: int, dtype: str, salt: int = 0) -> np.ndarray:
    """Small integers (exact in every dtype, products of 4 included), different per rank."""
    return ((np.arange(size, dtype=np.int64) * (rank + 2) + rank + salt) % 7 + 1).astype(dtype)


@ray.remote(num_cpus=0)
class Member:
    """One actor: joins groups and runs the matrix of collectives against its own NumPy reference."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def join(self, n: int, rank: int, name: str) -> tuple[int, int]:
        col.init_collective_group(n, rank, backend="collcomm", group_name=name)
        return col.get_rank(name), col.get_collective_group_size(name)

    def rank_in(self, name: str) -> int:
        return col.get_rank(name)

    def allreduce_argument(self, x: np.ndarray, name: str) -> dict:
        """``x`` arrived as an argument: read-only, in Ray's object store (gloo writes into it; so do we)."""
        was_writable = bool(x.flags.writeable)
        col.allreduce(x, name)
        return {"was_writable": was_writable, "x": x.tolist()}

    def allgather_argument(self, x: np.ndarray, name: str) -> list:
        """A read-only input is only read: gathered as it is, no warning needed."""
        outs = [np.zeros_like(x) for _ in range(col.get_collective_group_size(name))]
        col.allgather(outs, x, name)
        return [o[:3].tolist() for o in outs]

    def mismatched_allgather(self, name: str) -> list:
        try:
            col.allgather([np.zeros(20), np.zeros(20)], np.ones(10), name)
        except Exception as e:  # noqa: BLE001 - the test asserts on the type
            return [c.__name__ for c in type(e).__mro__]
        return []

    def destroy(self, name: str) -> None:
        col.destroy_collective_group(name)

    def matrix(self, name: str, use_torch: bool = False) -> dict:
        """Every collective on every dtype and size; returns the checks made and the failures."""
        import torch

        col.barrier(name)  # a group the driver declared is built on its first call (get_rank says -1 before)
        r, n = col.get_rank(name), col.get_collective_group_size(name)
        wrap = (lambda a: torch.from_numpy(a)) if use_torch else (lambda a: a)
        unwrap = (lambda t: t.numpy()) if use_torch else (lambda a: a)
        checks, failures = 0, []

        def check(what, got, want):
            nonlocal checks
            checks += 1
            if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
                failures.append(f"{what}: got {got[:4]} ({got.dtype}, {got.shape}), want {want[:4]}")

        everyone = lambda size, dtype, salt=0: [inputs(q, size, dtype, salt) for q in range(n)]  # noqa: E731
        for dtype in DTYPES:
            for size in SIZES:
                tag = f"{dtype}[{size}]"
                for op, ref in ((ReduceOp.SUM, np.sum), (ReduceOp.PRODUCT, np.prod),
                                (ReduceOp.MIN, np.min), (ReduceOp.MAX, np.max)):
                    x = wrap(inputs(r, size, dtype))
                    col.allreduce(x, name, op)
                    check(f"allreduce {op.name} {tag}", unwrap(x),
                          ref(np.stack(everyone(size, dtype)), axis=0).astype(dtype))
                outs = [wrap(np.zeros(size, dtype)) for _ in range(n)]
                col.allgather(outs, wrap(inputs(r, size, dtype, 1)), name)
                for q in range(n):
                    check(f"allgather {tag} from {q}", unwrap(outs[q]), inputs(q, size, dtype, 1))
                out = wrap(np.zeros(size, dtype))
                col.reducescatter(out, [wrap(inputs(r, size, dtype, 10 + q)) for q in range(n)], name)
                check(f"reducescatter {tag}", unwrap(out),
                      np.sum([inputs(q, size, dtype, 10 + r) for q in range(n)], axis=0).astype(dtype))
                root = n - 1
                x = wrap(inputs(r, size, dtype, 2))
                col.broadcast(x, root, name)
                check(f"broadcast from {root} {tag}", unwrap(x), inputs(root, size, dtype, 2))
                root = 1 % n
                x = wrap(inputs(r, size, dtype, 3))
                col.reduce(x, root, name, ReduceOp.SUM)
                want = np.sum(everyone(size, dtype, 3), axis=0).astype(dtype) if r == root \
                    else inputs(r, size, dtype, 3)
                check(f"reduce to {root} {tag}", unwrap(x), want)
                # A ring of send/recv, rank r -> r+1 (rank 0 sends first, the others receive first).
                mine, got = wrap(inputs(r, size, dtype, 4)), wrap(np.zeros(size, dtype))
                if r == 0:
                    col.send(mine, (r + 1) % n, name)
                    col.recv(got, (r - 1) % n, name)
                else:
                    col.recv(got, (r - 1) % n, name)
                    col.send(mine, (r + 1) % n, name)
                check(f"recv from {(r - 1) % n} {tag}", unwrap(got), inputs((r - 1) % n, size, dtype, 4))
        col.barrier(name)
        return {"checks": checks, "failures": failures}


@pytest.fixture(scope="module")
def members(ray_local):
    actors = [Member.remote() for _ in range(4)]
    ray.get([a.node.remote() for a in actors], timeout=120)
    yield actors
    for a in actors:
        ray.kill(a)


def per_op_checks(n: int) -> int:
    return len(DTYPES) * len(SIZES) * (4 + n + 4)  # + the barrier, unchecked


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_call_is_exact_against_numpy(members, n):
    actors = members[:n]
    name = f"matrix{n}"
    assert ray.get([a.join.remote(n, i, name) for i, a in enumerate(actors)], timeout=120) == \
        [(i, n) for i in range(n)]
    results = ray.get([a.matrix.remote(name) for a in actors], timeout=180)
    for i, res in enumerate(results):
        assert res["failures"] == [], f"rank {i}: {res['failures'][:5]}"
        assert res["checks"] == per_op_checks(n)
    ray.get([a.destroy.remote(name) for a in actors], timeout=60)


def test_torch_tensors_are_exact_too(members):
    actors = members[1:4]
    ray.get([a.join.remote(3, i, "torch3") for i, a in enumerate(actors)], timeout=120)
    results = ray.get([a.matrix.remote("torch3", True) for a in actors], timeout=180)
    assert all(res["failures"] == [] for res in results), [res["failures"][:3] for res in results]
    assert [res["checks"] for res in results] == [per_op_checks(3)] * 3


def test_groups_of_subsets_formed_at_different_times_from_actors_and_the_driver(members):
    a, b, c, d = members
    # {a, b} first, from inside the actors, in reversed rank order...
    assert ray.get([b.join.remote(2, 0, "early"), a.join.remote(2, 1, "early")], timeout=60) == [(0, 2), (1, 2)]
    # ... later {b, c, d}, declared by the driver (Ray creates it lazily on the first call) ...
    col.create_collective_group([d, b, c], 3, [0, 1, 2], backend="collcomm", group_name="late")
    # ... and both run at once, with b in both.
    late = [x.matrix.remote("late") for x in (d, b, c)]
    early = [x.matrix.remote("early") for x in (b, a)]
    for res in ray.get(late + early, timeout=200):
        assert res["failures"] == []
    assert ray.get([x.rank_in.remote("late") for x in (d, b, c)]) == [0, 1, 2]
    assert ray.get([x.rank_in.remote("early") for x in (b, a)]) == [0, 1]


def test_a_group_destroyed_and_created_again_under_the_same_name_works(members):
    a, b = members[2], members[3]
    for _ in range(2):
        assert ray.get([a.join.remote(2, 0, "again"), b.join.remote(2, 1, "again")], timeout=60) == [(0, 2), (1, 2)]
        assert all(res["failures"] == [] for res in ray.get([a.matrix.remote("again"), b.matrix.remote("again")],
                                                            timeout=120))
        ray.get([a.destroy.remote("again"), b.destroy.remote("again")], timeout=60)


def test_read_only_argument_arrays_are_reduced_in_place_as_with_gloo(members):
    a, b = members[0], members[1]
    ray.get([a.join.remote(2, 0, "ro"), b.join.remote(2, 1, "ro")], timeout=60)
    big = [np.full(200_000, float(i + 1)) for i in range(2)]   # large enough to live in Ray's object store
    got = ray.get([a.allreduce_argument.remote(big[0], "ro"), b.allreduce_argument.remote(big[1], "ro")],
                  timeout=60)
    assert [g["was_writable"] for g in got] == [False, False]
    assert all(g["x"] == [3.0] * 200_000 for g in got)
    gathered = ray.get([a.allgather_argument.remote(big[0], "ro"), b.allgather_argument.remote(big[1], "ro")],
                       timeout=60)
    assert gathered == [[[1.0] * 3, [2.0] * 3]] * 2
    # a local mistake fails at once on each member, as both Ray's gloo (RuntimeError) and Python expect
    assert all({"RuntimeError", "ValueError"} <= set(m)
               for m in ray.get([a.mismatched_allgather.remote("ro"), b.mismatched_allgather.remote("ro")],
                                timeout=60))
    ray.get([a.destroy.remote("ro"), b.destroy.remote("ro")], timeout=60)


def test_importing_registers_the_backend_once_and_again_is_harmless(ray_local):
    import importlib

    import collcomm.integrations.ray as ccray
    from ray.util.collective.backend_registry import _global_registry

    assert _global_registry.get("collcomm") is ccray.CollcommGroup
    assert ccray.register()["collective_backend"] is True
    importlib.reload(ccray)  # a second import's registration must not raise (Ray refuses duplicates)
    assert _global_registry.is_registered("COLLCOMM")
