"""Every collective against a NumPy reference, run as real processes over TCP (`collcomm run`).

Each test is one job of N ranks (tests/multiproc.py) that runs a batch of collectives;
every rank builds all ranks' inputs from a shared seed, computes the NumPy reference
and compares its own result: integers and min/max exactly, floating-point sums,
products and averages within the rounding bound of a reduction in any order
((N - 1) unit roundoffs of the sum of magnitudes). Ranks report failures and a digest
of their allreduce results, which must be identical on every rank (a reduction is
finished at one rank and then copied).

Matrix: allreduce, reduce_scatter, allgather, broadcast, reduce (several roots),
send/recv and barrier x sum/prod/min/max/avg x float16/float32/float64/int8/int16/
int32/int64/uint8 as NumPy arrays (and all of those plus bfloat16 as CPU torch
tensors) x 0, 1, non-divisible and multi-chunk element counts x world sizes 1-8 with
the planner's own choice; the ring, tree, halving-doubling and ForestColl plans of
several fabrics (flat, fully connected, leaf-spine, DGX-A100, hypercube, 2x3 torus,
two clusters, one-way ring), chunked small so pieces pipeline; send/recv between every
pair with several tags; typed one-line errors for bad buffers (non-contiguous, read-only,
unsupported dtype), ops, sizes, roots and peers. Marked slow: 100 MB buffers (world
sizes 2, 3, 5, 8 and each algorithm at 4 and 8) and world size 8 with 0.5-4 MB buffers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import multiproc

import collcomm as cc
import collcomm.api as cc_api
from collcomm.topology import presets

DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8")
TORCH_DTYPES = DTYPES + ("bfloat16",)
OPS = ("sum", "prod", "min", "max", "avg")
ALGORITHMS = ("forestcoll", "ring", "tree", "halving-doubling")
FLOATS = ("float16", "bfloat16", "float32", "float64")
UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -53}
SMALLEST = {"float16": 2.0 ** -24, "bfloat16": 2.0 ** -133, "float32": 2.0 ** -149, "float64": 5e-324}
MAX_REPORTED = 20


# ---------------------------------------------------------------------------- inside the ranks
def sizes_for(n: int, big: int) -> list[int]:
    """0, 1, counts that do not divide among n ranks (so shards differ), and one spanning many chunks."""
    return sorted({0, 1, max(n - 1, 1), n + 1, 3 * n + 2, big})


def roots_for(n: int) -> list[int]:
    return list(range(n)) if n <= 3 else [0, n // 2, n - 1]


def inputs(seed: int, case: int, n: int, count: int, dtype: str, op: str) -> np.ndarray:
    """Every rank's input of one case, shape (n, count): float64 values exact in ``dtype``, or ``dtype`` ints."""
    rng = np.random.default_rng([seed, case])
    if dtype in FLOATS:
        if op == "prod":  # magnitudes in [0.5, 1.5]: no overflow or underflow for 8 ranks
            x = rng.uniform(0.5, 1.5, (n, count)) * rng.choice([-1.0, 1.0], (n, count))
        else:
            x = rng.uniform(-1.0, 1.0, (n, count))
        return representable(x, dtype)
    info = np.iinfo(dtype)
    if op == "prod":  # small factors so products are not all zero modulo 2**bits
        lo = 0 if info.min == 0 else -3
        return rng.integers(lo, 4, (n, count)).astype(dtype)
    return rng.integers(info.min, int(info.max) + 1, (n, count), dtype=dtype)


def representable(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16).to(torch.float64).numpy()
    return x.astype(dtype).astype(np.float64)


def make(values: np.ndarray, dtype: str, container: str):
    """A fresh buffer holding ``values`` as a NumPy array or a CPU torch tensor."""
    if container == "numpy":
        return np.array(values, dtype=dtype)
    import torch

    if dtype == "bfloat16":
        return torch.tensor(values, dtype=torch.float64).to(torch.bfloat16)
    return torch.from_numpy(np.array(values, dtype=dtype))


def empty(count: int, dtype: str, container: str):
    """A buffer of ``count`` elements holding a fill value (7 or 0) for the collective to overwrite."""
    return make(np.full(count, 7.0 if dtype in FLOATS else 0), dtype, container)


def values(buf) -> np.ndarray:
    """The buffer's contents as NumPy (bfloat16 as float64)."""
    if isinstance(buf, np.ndarray):
        return buf.astype(np.float64) if buf.dtype.kind == "f" else buf.copy()
    import torch

    if buf.dtype == torch.bfloat16:
        return buf.to(torch.float64).numpy()
    arr = buf.numpy()
    return arr.astype(np.float64) if arr.dtype.kind == "f" else arr.copy()


def raw(buf) -> bytes:
    if isinstance(buf, np.ndarray):
        return buf.tobytes()
    import torch

    return buf.view(torch.uint8).numpy().tobytes() if buf.numel() else b""


def reference(data: np.ndarray, dtype: str, op: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(expected, tolerance) of reducing ``data`` (n, count) over ranks; tolerance None: exact."""
    n = data.shape[0]
    if dtype not in FLOATS:
        ufunc = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}[op]
        return ufunc.reduce(data, axis=0, dtype=data.dtype), None  # wraps like the ranks' integer arithmetic
    if op in ("min", "max"):
        return (data.min(axis=0) if op == "min" else data.max(axis=0)), None
    u, tiny = UNIT_ROUNDOFF[dtype], SMALLEST[dtype]
    # n - 1 roundings in any order, in the ranks' dtype and in this float64 reference (a little over, for
    # float16's double rounding through float32)
    gamma = 1.1 * (n - 1) * (u + UNIT_ROUNDOFF["float64"])
    if op == "prod":
        ref = np.prod(data, axis=0)
        return ref, gamma * np.abs(ref) + tiny
    ref = data.sum(axis=0)
    tol = gamma * np.abs(data).sum(axis=0) + n * tiny
    if op == "avg":
        ref = ref / n
        tol = tol / n + 2.1 * u * np.abs(ref) + tiny
    return ref, tol


class Checker:
    """Runs the cases of one job in the same order on every rank; collects failures, counts, a digest."""

    def __init__(self, seed: int):
        self.seed = seed
        self.case = 0
        self.failures: list[str] = []
        self.checks = 0
        self.digest = hashlib.sha256()
        self.me, self.n = cc.rank(), cc.world_size()

    def next_case(self) -> int:
        self.case += 1
        return self.case

    def expect(self, what: str, got: np.ndarray, want: np.ndarray, tol: np.ndarray | None = None) -> None:
        self.checks += 1
        if got.shape != want.shape:
            self.fail(f"{what}: shape {got.shape}, expected {want.shape}")
            return
        bad = (got != want) if tol is None else ~(np.abs(got - want) <= tol)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            bound = "" if tol is None else f" ± {tol[i]:.3g}"
            self.fail(f"{what}: {int(bad.sum())} of {got.size} elements wrong, first [{i}]: got {got[i]!r}, "
                      f"expected {want[i]!r}{bound}")

    def fail(self, message: str) -> None:
        if len(self.failures) < MAX_REPORTED:
            self.failures.append(f"rank {self.me}: {message}")

    def report(self) -> dict:
        return {"failures": self.failures, "checks": self.checks, "digest": self.digest.hexdigest()}

    # -------------------------------------------------------------- one collective each
    def allreduce(self, dtype: str, op: str, count: int, container: str) -> None:
        data = inputs(self.seed, self.next_case(), self.n, count, dtype, op)
        x = make(data[self.me], dtype, container)
        cc.allreduce(x, op)
        want, tol = reference(data, dtype, op)
        self.expect(f"allreduce {op} of {count} {dtype} ({container})", values(x), want, tol)
        self.digest.update(raw(x))

    def reduce_scatter(self, dtype: str, op: str, count: int, container: str) -> None:
        n, me = self.n, self.me
        data = inputs(self.seed, self.next_case(), n, count * n, dtype, op)
        x, out = make(data[me], dtype, container), empty(count, dtype, container)
        before = raw(x)
        cc.reduce_scatter(out, x, op)
        want, tol = reference(data[:, me * count:(me + 1) * count], dtype, op)
        what = f"reduce_scatter {op} of {n} x {count} {dtype} ({container})"
        self.expect(what, values(out), want, tol)
        if raw(x) != before:
            self.fail(f"{what}: the input buffer changed")

    def allgather(self, dtype: str, count: int, container: str) -> None:
        n = self.n
        data = inputs(self.seed, self.next_case(), n, count, dtype, "sum")
        x, out = make(data[self.me], dtype, container), empty(count * n, dtype, container)
        cc.allgather(out, x)
        self.expect(f"allgather of {n} x {count} {dtype} ({container})", values(out), data.reshape(-1))
        self.digest.update(raw(out))

    def broadcast(self, dtype: str, count: int, root: int, container: str) -> None:
        data = inputs(self.seed, self.next_case(), self.n, count, dtype, "sum")
        x = make(data[self.me], dtype, container)
        cc.broadcast(x, root=root)
        self.expect(f"broadcast from {root} of {count} {dtype} ({container})", values(x), data[root])
        self.digest.update(raw(x))

    def reduce(self, dtype: str, op: str, count: int, root: int, container: str) -> None:
        data = inputs(self.seed, self.next_case(), self.n, count, dtype, op)
        x = make(data[self.me], dtype, container)
        cc.reduce(x, root=root, op=op)
        what = f"reduce {op} to {root} of {count} {dtype} ({container})"
        if self.me == root:
            want, tol = reference(data, dtype, op)
            self.expect(what, values(x), want, tol)
        else:
            self.expect(what + " (a non-root buffer must not change)", values(x), data[self.me])

    def send_recv(self, dtype: str, count: int, container: str) -> None:
        """Each rank sends to the next and receives from the previous; even ranks send first."""
        n, me = self.n, self.me
        data = inputs(self.seed, self.next_case(), n, count, dtype, "sum")
        if n == 1:
            return
        dst, src = (me + 1) % n, (me - 1) % n
        x, got = make(data[me], dtype, container), empty(count, dtype, container)
        if me % 2 == 0:
            cc.send(x, dst)
            cc.recv(got, src)
        else:
            cc.recv(got, src)
            cc.send(x, dst)
        self.expect(f"recv from {src} of {count} {dtype} ({container})", values(got), data[src])


def matrix_cases(n: int, containers: list[str], dtypes: dict, ops: list[str], big: int,
                 collectives: list[str]) -> list[tuple]:
    """The cases of one job, as (Checker method, arguments); ``dtypes`` maps a container to its dtypes."""
    cases = []
    for container in containers:
        for dtype in dtypes[container]:
            for count in sizes_for(n, big):
                for op in ops:
                    if op == "avg" and dtype not in FLOATS:
                        continue
                    if "allreduce" in collectives:
                        cases.append(("allreduce", dtype, op, count, container))
                    if "reduce_scatter" in collectives:
                        cases.append(("reduce_scatter", dtype, op, count, container))
                    if "reduce" in collectives:
                        for root in roots_for(n) if op == "sum" else [(count + len(op)) % n]:
                            cases.append(("reduce", dtype, op, count, root, container))
                if "allgather" in collectives:
                    cases.append(("allgather", dtype, count, container))
                if "broadcast" in collectives:
                    for root in roots_for(n):
                        cases.append(("broadcast", dtype, count, root, container))
                if "send_recv" in collectives and n > 1:
                    cases.append(("send_recv", dtype, count, container))
    return cases


BARRIERS = 5


def matrix_worker(seed: int, cases: list, barrier_dir: str | None = None, algorithms: list | None = None) -> dict:
    """Run ``cases`` (from matrix_cases) in order; with ``algorithms``, once per algorithm.

    Switching algorithm sets the Runtime's ``algorithm`` (what COLLCOMM_ALGORITHM sets at init),
    so one job runs every plan of its fabric."""
    n = cc.world_size()
    check = Checker(seed)
    fabric, chosen = None, {}
    for algorithm in algorithms or [None]:
        if algorithm is not None:
            cc_api.runtime().algorithm = algorithm
        for method, *args in cases:
            getattr(check, method)(*args)
        if algorithm is not None or cc_api.runtime().algorithm is not None:
            planner = cc_api.runtime().world.planner  # which plan the runtime ran, for the test to confirm
            fabric = planner.topo.name
            for kind in ("allreduce", "allgather", "reduce_scatter"):
                chosen[f"{algorithm}/{kind}"] = planner.schedule(kind, 1024, cc_api.runtime().algorithm).algorithm
    if barrier_dir is not None:  # nobody leaves barrier i before everybody has entered it
        for i in range(BARRIERS):
            Path(barrier_dir, f"{i}.{check.me}").touch()
            cc.barrier()
            present = sum(Path(barrier_dir, f"{i}.{r}").exists() for r in range(n))
            check.checks += 1
            if present != n:
                check.fail(f"barrier {i}: left it when only {present} of {n} ranks had entered")
    cc.barrier()  # a rank leaves only when nobody still waits on it (see test_recv_completes_when_sender_leaves)
    return check.report() | {"fabric": fabric, "chosen": chosen}


def assert_clean(job: multiproc.Job, expect_checks: int | None = None) -> list[dict]:
    reports = job.values()
    failures = [f for r in reports for f in r["failures"]]
    assert not failures, "\n".join(failures)
    digests = {r["digest"] for r in reports}
    assert len(digests) == 1, f"ranks' results differ: {[r['digest'][:12] for r in reports]}"
    counts = [r["checks"] for r in reports]
    if expect_checks is not None:
        assert counts == [expect_checks] * job.nprocs, f"{counts} checks ran, expected {expect_checks} each"
    return reports


# ---------------------------------------------------------------------------- inside the ranks: bad buffers
def refusals_worker() -> list[str]:
    """Every collective refuses unusable buffers before any frame moves; the group stays usable."""
    import torch

    me, n = cc.rank(), cc.world_size()
    problems: list[str] = []

    def refused(what: str, error: type, words: tuple[str, ...], call) -> None:
        try:
            call()
        except error as e:
            text = str(e).lower()
            if not all(w in text for w in words):
                problems.append(f"{what}: {type(e).__name__} {e!r} does not say {words}")
            if "\n" in str(e):
                problems.append(f"{what}: the message spans lines: {e!r}")
        except Exception as e:  # noqa: BLE001 - the wrong kind of error is what we report
            problems.append(f"{what}: raised {type(e).__name__}: {e}, expected {error.__name__}")
        else:
            problems.append(f"{what}: accepted")

    good = np.zeros(8, np.float32)
    strided = {"numpy x[::2]": np.zeros(16, np.float32)[::2],
               "numpy Fortran order": np.zeros((4, 2), np.float32, order="F"),
               "torch x[::2]": torch.zeros(16)[::2],
               "torch x.t()": torch.zeros(4, 2).t(),
               "torch bfloat16 x[::2]": torch.zeros(16, dtype=torch.bfloat16)[::2]}
    for name, x in strided.items():
        words = ("contiguous",)
        refused(f"allreduce of {name}", ValueError, words, lambda: cc.allreduce(x))
        refused(f"broadcast of {name}", ValueError, words, lambda: cc.broadcast(x, root=0))
        refused(f"reduce of {name}", ValueError, words, lambda: cc.reduce(x, root=0))
        refused(f"allgather into {name}", ValueError, words, lambda: cc.allgather(x, good[:8 // n]))
        refused(f"allgather from {name}", ValueError, words, lambda: cc.allgather(np.zeros(8 * n, np.float32), x))
        refused(f"reduce_scatter into {name}", ValueError, words,
                lambda: cc.reduce_scatter(x, np.zeros(8 * n, np.float32)))
        refused(f"reduce_scatter from {name}", ValueError, words,
                lambda: cc.reduce_scatter(np.zeros(8 // n, np.float32), x))
        refused(f"send of {name}", ValueError, words, lambda: cc.send(x, (me + 1) % n))
        refused(f"recv into {name}", ValueError, words, lambda: cc.recv(x, (me + 1) % n))
        refused(f"async allreduce of {name}", ValueError, words, lambda: cc.allreduce(x, async_op=True).wait(10))
    readonly = np.zeros(8, np.float32)
    readonly.flags.writeable = False
    refused("allreduce of a read-only array", ValueError, ("read-only",), lambda: cc.allreduce(readonly))
    ro_out = np.zeros(4 * n, np.float32)
    ro_out.flags.writeable = False
    refused("allgather into a read-only array", ValueError, ("read-only",),
            lambda: cc.allgather(ro_out, np.zeros(4, np.float32)))
    # an input that is only read may be read-only (Ray hands arrays over so): allgather and send
    mine = np.full(4, me + 1.0, np.float32)
    mine.flags.writeable = False
    gathered = np.zeros(4 * n, np.float32)
    cc.allgather(gathered, mine)
    if gathered.tolist() != [float(r + 1) for r in range(n) for _ in range(4)]:
        problems.append(f"allgather of a read-only input gave {gathered}")
    for name, x in {"complex64": np.zeros(4, np.complex64), "bool": np.zeros(4, bool),
                    "uint16": np.zeros(4, np.uint16), "torch complex64": torch.zeros(4, dtype=torch.complex64),
                    "a list": [1.0, 2.0]}.items():
        refused(f"allreduce of {name}", TypeError, (), lambda: cc.allreduce(x))
    refused("avg of int32", ValueError, ("avg",), lambda: cc.allreduce(np.zeros(4, np.int32), op="avg"))
    refused("op 'mean'", ValueError, ("mean",), lambda: cc.allreduce(np.zeros(4, np.float32), op="mean"))
    refused("allgather output too small", ValueError, ("allgather",),
            lambda: cc.allgather(np.zeros(4 * n - 1, np.float32), np.zeros(4, np.float32)))
    refused("allgather output of another dtype", TypeError, ("dtype",),
            lambda: cc.allgather(np.zeros(4 * n, np.float64), np.zeros(4, np.float32)))
    refused("reduce_scatter input too small", ValueError, ("reduce_scatter",),
            lambda: cc.reduce_scatter(np.zeros(4, np.float32), np.zeros(4 * n + 1, np.float32)))
    refused("broadcast root out of range", ValueError, ("root",), lambda: cc.broadcast(good, root=n))
    refused("reduce root -1", ValueError, ("root",), lambda: cc.reduce(good, root=-1))
    refused("send to itself", ValueError, ("peer",), lambda: cc.send(good, me))
    refused("recv from rank n", ValueError, ("peer",), lambda: cc.recv(good, n))
    # contiguous views of any shape are used in place
    grid = np.full((3, 4), me + 1, np.int32)
    cc.allreduce(grid)
    if not (grid == n * (n + 1) // 2).all():
        problems.append(f"allreduce of a 3 x 4 array gave {grid}")
    scalar = np.array(me + 1.0)
    cc.allreduce(scalar, op="max")
    if scalar != n:
        problems.append(f"allreduce of a 0-d array gave {scalar}")
    whole = torch.zeros(10, dtype=torch.int64)
    if me == 0:
        whole[3:7] = 5
    cc.broadcast(whole[3:7], root=0)
    if whole.tolist() != [0, 0, 0, 5, 5, 5, 5, 0, 0, 0]:
        problems.append(f"broadcast into a slice at offset 3 of a tensor gave {whole.tolist()}")
    # nothing above moved a frame or used up an operation number: the group still agrees
    x = np.full(5, me + 1, np.int64)
    cc.allreduce(x)
    if not (x == n * (n + 1) // 2).all():
        problems.append(f"allreduce after the refusals gave {x}")
    t = torch.arange(6, dtype=torch.bfloat16) + me
    cc.broadcast(t, root=n - 1)
    if not torch.equal(t, torch.arange(6, dtype=torch.bfloat16) + n - 1):
        problems.append(f"broadcast after the refusals gave {t}")
    cc.barrier()
    return problems


# ---------------------------------------------------------------------------- inside the ranks: point to point
MESSAGES = [(0, "float64", 5), (0, "int8", 0), (3, "float32", 1000), (0, "uint8", 7), (3, "int64", 1),
            ((1 << 31) - 2, "float16", 9), (0, "int16", 70_000)]


def p2p_worker(seed: int) -> list[str]:
    """Every ordered pair of ranks in turn: several tags, dtypes and sizes, each tag's messages in order."""
    me, n = cc.rank(), cc.world_size()
    failures = []
    case = 0
    for src in range(n):
        for dst in range(n):
            if src == dst:
                continue
            for tag, dtype, count in MESSAGES:
                case += 1
                data = inputs(seed, case, 1, count, dtype, "sum")[0]
                if me == src:
                    cc.send(make(data, dtype, "numpy"), dst, tag=tag)
                elif me == dst:
                    got = empty(count, dtype, "numpy")
                    cc.recv(got, src, tag=tag)
                    if not np.array_equal(values(got), data):
                        failures.append(f"rank {me}: message {case} ({count} {dtype}, tag {tag}) from {src} wrong")
    cc.barrier()
    return failures


# ---------------------------------------------------------------------------- inside the ranks: 100 MB
def pattern(start: int, count: int, dtype: str) -> np.ndarray:
    """Small integers (exact in float16/32 after summing 8 of them) that differ from element to element."""
    period = ((np.arange(251, dtype=np.int64) * 7919) % 251).astype(dtype)  # element i is period[i % 251]
    return np.resize(np.roll(period, -(start % 251)), count)


def big_worker(nbytes: int, dtypes: list[str], collectives: list[str]) -> dict:
    """Collectives of ``nbytes`` buffers whose references are cheap: rank r holds pattern + r."""
    import time

    n, me = cc.world_size(), cc.rank()
    failures, times = [], {}

    def same(what: str, got: np.ndarray, want: np.ndarray) -> None:
        if not np.array_equal(got, want):
            i = int(np.flatnonzero(got != want)[0])
            failures.append(f"rank {me}: {what}: first wrong [{i}]: got {got[i]!r}, expected {want[i]!r}")

    def timed(what: str, call) -> None:
        t = time.perf_counter()
        call()
        times[what] = round(time.perf_counter() - t, 3)

    for dtype in dtypes:
        count = nbytes // np.dtype(dtype).itemsize
        base = pattern(0, count, dtype)
        total = base * np.array(n, dtype) + np.array(n * (n - 1) // 2, dtype)  # the sum of base + r over ranks
        if "allreduce" in collectives:
            x = base + np.array(me, dtype)
            timed(f"allreduce sum {dtype}", lambda: cc.allreduce(x))
            same(f"allreduce sum of {count} {dtype}", x, total)
            x = base + np.array(me, dtype)
            timed(f"allreduce max {dtype}", lambda: cc.allreduce(x, op="max"))
            want = base.copy()
            for r in range(1, n):  # base + r wraps around in uint8
                np.maximum(want, base + np.array(r, dtype), out=want)
            same(f"allreduce max of {count} {dtype}", x, want)
            del want, x
        if "broadcast" in collectives:
            x = base + np.array(me, dtype)
            timed(f"broadcast {dtype}", lambda: cc.broadcast(x, root=n - 1))
            same(f"broadcast of {count} {dtype}", x, base + np.array(n - 1, dtype))
            del x
        if "reduce" in collectives:
            x = base + np.array(me, dtype)
            timed(f"reduce {dtype}", lambda: cc.reduce(x, root=n // 2))
            same(f"reduce to {n // 2} of {count} {dtype}", x, total if me == n // 2 else base + np.array(me, dtype))
            del x
        m = count // n  # per-rank part of reduce_scatter/allgather: the whole buffer is n * m elements
        if "reduce_scatter" in collectives:
            x = base[:n * m] + np.array(me, dtype)
            out = np.zeros(m, dtype)
            timed(f"reduce_scatter {dtype}", lambda: cc.reduce_scatter(out, x))
            same(f"reduce_scatter of {n} x {m} {dtype}", out, total[me * m:(me + 1) * m])
            del x, out
        if "allgather" in collectives:
            x = pattern(me * m, m, dtype) + np.array(me, dtype)
            out = np.zeros(n * m, dtype)
            timed(f"allgather {dtype}", lambda: cc.allgather(out, x))
            want = base[:n * m].copy()
            for r in range(n):
                want[r * m:(r + 1) * m] += np.array(r, dtype)
            same(f"allgather of {n} x {m} {dtype}", out, want)
            del x, out, want
        if "send_recv" in collectives and n > 1:
            x, got = base + np.array(me, dtype), np.zeros(count, dtype)
            dst, src = (me + 1) % n, (me - 1) % n

            def ring():
                if me % 2 == 0:
                    cc.send(x, dst)
                    cc.recv(got, src)
                else:
                    cc.recv(got, src)
                    cc.send(x, dst)

            timed(f"send/recv {dtype}", ring)
            same(f"recv from {src} of {count} {dtype}", got, base + np.array(src, dtype))
            del x, got
    cc.barrier()
    return {"failures": failures, "times": times}


# ---------------------------------------------------------------------------- the tests
ALL = ["allreduce", "reduce_scatter", "reduce", "allgather", "broadcast", "send_recv"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("n", [1, 2, 3] + [pytest.param(n, marks=pytest.mark.slow) for n in (4, 5, 6, 7, 8)])  # the ones marked slow repeat what the others cover (CI's 15 minutes)
def test_every_collective_op_dtype_and_size_numpy(n, tmp_path):
    """World sizes 1-8 with the planner's own choice: NumPy arrays of every dtype, every op."""
    cases = matrix_cases(n, ["numpy"], {"numpy": list(DTYPES)}, list(OPS), 1000 + 17 * n, ALL)
    job = multiproc.run(n, matrix_worker, timeout=120,
                        kwargs=dict(seed=n, cases=cases, barrier_dir=str(tmp_path)))
    assert_clean(job, len(cases) + BARRIERS)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("n", [2, pytest.param(3, marks=pytest.mark.slow)])  # 3: slow (CI time; NumPy's sweep has 3)
def test_every_collective_op_dtype_and_size_torch(n):
    """CPU torch tensors of every dtype, bfloat16 included."""
    pytest.importorskip("torch")
    cases = matrix_cases(n, ["torch"], {"torch": list(TORCH_DTYPES)}, list(OPS), 700 + 13 * n, ALL)
    job = multiproc.run(n, matrix_worker, timeout=120, kwargs=dict(seed=100 + n, cases=cases))
    assert_clean(job, len(cases))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_from_environment(algorithm):
    """COLLCOMM_ALGORITHM forces the plan of every collective of the job; small chunks pipeline."""
    n = 3
    cases = matrix_cases(n, ["numpy"], {"numpy": ["float32", "int64"]}, ["sum", "max"], 1031, ALL)
    job = multiproc.run(n, matrix_worker, timeout=50, algorithm=algorithm, chunk_bytes=256,
                        kwargs=dict(seed=7, cases=cases))
    reports = assert_clean(job, len(cases))
    for report in reports:
        assert set(report["chosen"].values()) == {algorithm}, report["chosen"]


FABRICS = {  # fabric -> (topology, or None for the flat model of one host; world size; plans it must have)
    "flat2": (None, 2, ALGORITHMS),
    "flat5": (None, 5, ALGORITHMS),
    "flat7": (None, 7, ALGORITHMS),  # halving-doubling folds three ranks onto the core of four
    "fully-connected4": (presets.fully_connected(4), 4, ALGORITHMS),
    "leaf-spine-2x2": (presets.leaf_spine(2, 2, 2), 4, ALGORITHMS),
    "dgx-a100": (presets.dgx_a100(1), 8, ALGORITHMS),
    "hypercube3": (presets.hypercube(3), 8, ("forestcoll", "ring", "halving-doubling")),  # ForestColl: 1/3 shares
    "torus2x3": (presets.torus2d(2, 3), 6, ("forestcoll", "ring")),  # ForestColl shares of 1/3 and 2/3
    "two-clusters3": (presets.two_clusters(3), 6, ("forestcoll", "tree")),
    "one-way-ring3": (presets.ring(3, bidirectional=False), 3, ("forestcoll", "ring")),
}


# slow (CI's 15 minutes): hypercube3 (torus2x3 has its 1/3 shares too), flat5 and flat7 (flat2 and
# fully-connected4 stay), two-clusters3 (leaf-spine-2x2 has two levels too), dgx-a100 (8 ranks, the
# longest at 12 s; leaf-spine-2x2 has switch nodes too)
SLOW_FABRICS = {"hypercube3", "flat5", "flat7", "two-clusters3", "dgx-a100"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fabric", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FABRICS else f
                                    for f in FABRICS])
def test_every_plan_of_a_fabric(fabric):
    """Every algorithm that has a plan on the fabric (COLLCOMM_TOPOLOGY), run by the executor, chunked."""
    from collcomm.errors import CollectiveError
    from collcomm.schedules.planner import flat_topology
    from collcomm.schedules import generate

    topo, n, required = FABRICS[fabric]
    model = topo if topo is not None else flat_topology(["one-host"] * n)
    available = []
    for algorithm in ALGORITHMS:
        try:
            for kind in ("allreduce", "allgather", "reduce_scatter"):
                generate(model, kind, algorithm)
            available.append(algorithm)
        except CollectiveError:
            pass
    assert set(required) <= set(available), f"{fabric}: expected plans of {required}, found {available}"
    cases = matrix_cases(n, ["numpy"], {"numpy": ["float32", "int32"]}, ["sum", "max"], 997,
                         ["allreduce", "reduce_scatter", "reduce", "allgather", "broadcast"])
    job = multiproc.run(n, matrix_worker, timeout=100, topology=topo, chunk_bytes=256,
                        kwargs=dict(seed=11, cases=cases, algorithms=available))
    reports = assert_clean(job, len(cases) * len(available))
    for report in reports:
        if topo is not None:
            assert report["fabric"] == topo.name
        assert report["chosen"] == {f"{a}/{k}": a for a in available
                                    for k in ("allreduce", "allgather", "reduce_scatter")}


@pytest.mark.timeout(60)
def test_bad_buffers_are_refused_with_a_clear_error():
    """Non-contiguous, read-only and unsupported buffers, bad ops, sizes, roots and peers: typed one-line
    errors raised before anything moves, after which the group still works."""
    pytest.importorskip("torch")
    job = multiproc.run(2, refusals_worker, timeout=50)
    problems = [p for rank in job.values() for p in rank]
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(60)
def test_send_recv_between_every_pair():
    job = multiproc.run(3, p2p_worker, timeout=50, kwargs=dict(seed=3))
    failures = [f for r in job.values() for f in r]
    assert not failures, "\n".join(failures)


SENDER_LEAVES = """
x = np.full(1000, rank + 1, np.int64)
last = world_size - 1
if rank < last:
    cc.send(x, last)  # ... and leave at once: shutdown() closes the connection
else:
    for src in range(last):
        got = np.zeros(1000, np.int64)
        cc.recv(got, src)
        assert (got == src + 1).all(), (src, got[:4])
report(rank)
"""


@pytest.mark.timeout(60)
def test_recv_completes_when_sender_leaves():
    """A message that arrived is received even if its sender closes the connection right after."""
    job = multiproc.run(6, SENDER_LEAVES, timeout=50)
    assert job.values() == list(range(6))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_100_megabytes(n):
    job = multiproc.run(n, big_worker, timeout=560, collective_timeout=300, kwargs=dict(
        nbytes=100_000_000, dtypes=["float32", "uint8", "float16"], collectives=ALL))
    reports = job.values()
    failures = [f for r in reports for f in r["failures"]]
    assert not failures, "\n".join(failures)
    print(n, reports[0]["times"])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n", [4, 8])
def test_100_megabytes_per_algorithm(n, algorithm):
    from collcomm.topology import presets

    topo = presets.fully_connected(4) if n == 4 else presets.dgx_a100(1)
    job = multiproc.run(n, big_worker, timeout=560, collective_timeout=300, algorithm=algorithm, topology=topo,
                        kwargs=dict(nbytes=100_000_000, dtypes=["float32"],
                                    collectives=["allreduce", "reduce_scatter", "allgather", "broadcast"]))
    reports = job.values()
    failures = [f for r in reports for f in r["failures"]]
    assert not failures, "\n".join(failures)
    print(n, algorithm, reports[0]["times"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_world_of_eight_with_megabyte_buffers_every_dtype():
    """World size 8, every dtype and op, buffers of 1-4 MB split in many chunks."""
    n = 8
    cases = matrix_cases(n, ["numpy"], {"numpy": list(DTYPES)}, list(OPS), 500_003, ALL)
    cases = [c for c in cases if 500_003 in c]
    job = multiproc.run(n, matrix_worker, timeout=280, chunk_bytes=1 << 16, kwargs=dict(seed=88, cases=cases))
    assert_clean(job, len(cases))
