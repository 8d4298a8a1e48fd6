"""Ranks of torch.distributed jobs with backend "collcomm", for tests/test_torch_backend.py.

``run(n, "worker", kwargs, timeout)`` starts n processes (``python tests/torch_workers.py``), each
calls ``dist.init_process_group("collcomm", init_method=file://...)``, runs the worker function of
this module, writes what it returned (JSON) or its traceback, and destroys the group. Workers check
their results against a reference computed in the rank (every rank can generate every other rank's
input) and return facts: the number of checks and the failures. Every job is bounded: ranks still
running at the timeout are killed by pid and the test fails with their output.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()


@dataclass
class Rank:
    rank: int
    ok: bool | None
    value: object
    error: str
    output: str


def run(n: int, worker: str, kwargs: dict | None = None, timeout: float = 120.0,
        pg_timeout: float = 30.0) -> list[Rank]:
    with tempfile.TemporaryDirectory(prefix="collcomm-torch-") as tmp:
        out = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COLLCOMM_", "TORCHELASTIC_")) and k not in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1")
        spec = json.dumps({"worker": worker, "kwargs": kwargs or {}, "pg_timeout": pg_timeout})
        procs = []
        for r in range(n):
            log = open(out / f"rank{r}.log", "w")
            procs.append((subprocess.Popen([sys.executable, str(HERE), str(out), str(r), str(n), spec],
                                           stdout=log, stderr=subprocess.STDOUT, env=env), log))
        deadline = time.monotonic() + timeout
        for p, _ in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
        ranks = []
        for r in range(n):
            output = (out / f"rank{r}.log").read_text(errors="replace")
            path = out / f"rank{r}.json"
            if path.exists():
                data = json.loads(path.read_text())
                ranks.append(Rank(r, data["ok"], data.get("value"), data.get("error", ""), output))
            else:
                ranks.append(Rank(r, None, None, "", output))
        return ranks


def values(ranks: list[Rank]) -> list:
    """Every rank's value; AssertionError with every rank's story unless all succeeded."""
    bad = [r for r in ranks if not r.ok]
    if bad:
        story = []
        for r in ranks:
            story.append(f"--- rank {r.rank}: {'ok' if r.ok else 'no result' if r.ok is None else 'raised'}")
            if r.error:
                story.append(r.error.rstrip())
            if not r.ok:
                story.append("output (last 30 lines):\n" + "\n".join(r.output.splitlines()[-30:]))
        raise AssertionError("\n".join(story))
    return [r.value for r in ranks]


# ============================================================================ inside a rank
def _main(out: Path, rank: int, n: int, spec: dict) -> int:
    import torch.distributed as dist

    from collcomm.integrations.torch import register

    register()

    def write(ok: bool, **fields):
        tmp = out / f"rank{rank}.json.tmp"
        tmp.write_text(json.dumps({"ok": ok, **fields}))
        tmp.replace(out / f"rank{rank}.json")

    try:
        dist.init_process_group("collcomm", init_method=f"file://{out / 'store'}", rank=rank, world_size=n,
                                timeout=datetime.timedelta(seconds=spec["pg_timeout"]))
        value = globals()[spec["worker"]](**spec["kwargs"])
    except BaseException:  # noqa: BLE001
        write(False, error=traceback.format_exc())
        os._exit(1)
    write(True, value=value)
    try:
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    return 0


# ============================================================================ data and references
def _torch():
    import torch

    return torch


def gen(case: str, rank: int, shape, dtype):
    """Rank ``rank``'s input for ``case``: small integers, so every reduction is exact."""
    torch = _torch()
    g = torch.Generator().manual_seed(zlib.crc32(f"{case}/{rank}".encode()))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        part = torch.float32 if dtype == torch.complex64 else torch.float64
        return torch.complex(torch.randint(-3, 4, shape, generator=g).to(part),
                             torch.randint(-3, 4, shape, generator=g).to(part))
    if dtype == torch.uint8 or dtype == torch.uint16:
        return torch.randint(0, 8, shape, generator=g).to(dtype)
    if dtype.is_floating_point and dtype.itemsize == 1:  # float8: bytes only
        return torch.randint(-4, 5, shape, generator=g).float().to(dtype)
    return torch.randint(-4, 5, shape, generator=g).to(dtype)


def reference(op: str, xs: list, factor: float = 1.0):
    torch = _torch()
    if op == "avg":
        acc = sum(x.to(torch.complex128 if x.is_complex() else torch.float64) for x in xs) / len(xs)
        return acc.to(xs[0].dtype)
    if op == "premul_sum":
        return sum((x.double() * factor) for x in xs).to(xs[0].dtype)
    fn = {"sum": lambda a, b: a + b, "product": lambda a, b: a * b, "min": torch.minimum, "max": torch.maximum,
          "band": lambda a, b: a & b, "bor": lambda a, b: a | b, "bxor": lambda a, b: a ^ b}[op]
    r = xs[0].clone()
    for x in xs[1:]:
        r = fn(r, x)
    return r


def _rop(op: str, factor: float = 0.5):
    import torch.distributed as dist

    if op == "premul_sum":
        return dist._make_nccl_premul_sum(factor)
    return {"sum": dist.ReduceOp.SUM, "product": dist.ReduceOp.PRODUCT, "min": dist.ReduceOp.MIN,
            "max": dist.ReduceOp.MAX, "avg": dist.ReduceOp.AVG, "band": dist.ReduceOp.BAND,
            "bor": dist.ReduceOp.BOR, "bxor": dist.ReduceOp.BXOR}[op]


class Checks:
    def __init__(self):
        self.count = 0
        self.failures: list[str] = []

    def eq(self, what: str, got, want, loose: bool = False) -> None:
        torch = _torch()
        self.count += 1
        try:
            if got.dtype != want.dtype or got.shape != want.shape:
                raise AssertionError(f"dtype/shape {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}")
            if loose and (got.is_floating_point() or got.is_complex()):
                ok = torch.allclose(got.to(torch.complex128 if got.is_complex() else torch.float64),
                                    want.to(torch.complex128 if want.is_complex() else torch.float64),
                                    rtol=1e-2, atol=1e-2)
            elif got.is_floating_point() and got.dtype.itemsize == 1:
                ok = torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            else:
                ok = torch.equal(got, want)
            if not ok:
                raise AssertionError(f"got {got.flatten()[:8].tolist()} want {want.flatten()[:8].tolist()}")
        except Exception as e:  # noqa: BLE001
            self.failures.append(f"{what}: {e}")

    def result(self) -> dict:
        return {"checks": self.count, "failures": self.failures}


def _dtypes(names):
    torch = _torch()
    return [getattr(torch, n) for n in names]


FLOAT_OPS = ["sum", "product", "min", "max", "avg", "premul_sum"]
INT_OPS = ["sum", "product", "min", "max", "band", "bor", "bxor"]
COMPLEX_OPS = ["sum", "avg"]


def ops_for(dtype) -> list[str]:
    torch = _torch()
    if dtype.is_complex:
        return COMPLEX_OPS
    if dtype.is_floating_point:
        return FLOAT_OPS
    return INT_OPS  # integers and bool


# ============================================================================ workers
def reductions(dtypes: list[str]) -> dict:
    """all_reduce, reduce, reduce_scatter (list), reduce_scatter_tensor (both method spellings),
    all_reduce_coalesced, reduce_scatter_tensor_coalesced: every dtype x every op it supports."""
    torch = _torch()
    import torch.distributed as dist

    me, n = dist.get_rank(), dist.get_world_size()
    pg = dist.group.WORLD
    c = Checks()
    for dtype in _dtypes(dtypes):
        for i, op in enumerate(ops_for(dtype)):
            loose = op in ("avg", "premul_sum")
            case = f"{dtype}/{op}"
            xs = [gen(case + "/ar", r, (3, 5), dtype) for r in range(n)]
            t = xs[me].clone()
            dist.all_reduce(t, op=_rop(op))
            c.eq(f"all_reduce {case}", t, reference(op, xs, 0.5), loose)
            # non-contiguous (transposed) in place
            t = xs[me].clone().t()
            dist.all_reduce(t, op=_rop(op))
            c.eq(f"all_reduce non-contiguous {case}", t, reference(op, xs, 0.5).t(), loose)
            root = i % n
            t = xs[me].clone()
            dist.reduce(t, dst=root, op=_rop(op))
            if me == root:
                c.eq(f"reduce root {root} {case}", t, reference(op, xs, 0.5), loose)
            ins = [gen(case + "/rst", r, (n * 4,), dtype) for r in range(n)]
            want = reference(op, ins, 0.5)[me * 4:(me + 1) * 4]
            out = torch.empty(4, dtype=dtype)
            dist.reduce_scatter_tensor(out, ins[me].clone(), op=_rop(op))
            c.eq(f"reduce_scatter_tensor {case}", out, want, loose)
            out = torch.empty(4, dtype=dtype)
            pg._reduce_scatter_base(out, ins[me].clone(), _opts("ReduceScatterOptions", op)).wait()
            c.eq(f"_reduce_scatter_base {case}", out, want, loose)
            out = torch.empty(4, dtype=dtype)
            dist.reduce_scatter(out, list(ins[me].clone().chunk(n)), op=_rop(op))
            c.eq(f"reduce_scatter {case}", out, want, loose)
            # coalesced: two tensors per call, both spellings
            a = [gen(case + "/co1", r, (n * 2,), dtype) for r in range(n)]
            b = [gen(case + "/co2", r, (n * 3,), dtype) for r in range(n)]
            outs = [torch.empty(2, dtype=dtype), torch.empty(3, dtype=dtype)]
            pg.reduce_scatter_tensor_coalesced(outs, [a[me].clone(), b[me].clone()],
                                               _opts("ReduceScatterOptions", op)).wait()
            c.eq(f"reduce_scatter_tensor_coalesced[0] {case}", outs[0], reference(op, a, 0.5)[me * 2:me * 2 + 2], loose)
            c.eq(f"reduce_scatter_tensor_coalesced[1] {case}", outs[1], reference(op, b, 0.5)[me * 3:me * 3 + 3], loose)
            outs = [torch.empty(2, dtype=dtype), torch.empty(3, dtype=dtype)]
            pg.reduce_scatter_single_coalesced(outs, [a[me].clone(), b[me].clone()],
                                               _opts("ReduceScatterOptions", op)).wait()
            c.eq(f"reduce_scatter_single_coalesced[1] {case}", outs[1], reference(op, b, 0.5)[me * 3:me * 3 + 3], loose)
            ts = [a[me].clone(), b[me].clone()]
            pg.allreduce_coalesced(ts, _opts("AllreduceCoalescedOptions", op)).wait()
            c.eq(f"allreduce_coalesced[0] {case}", ts[0], reference(op, a, 0.5), loose)
            c.eq(f"allreduce_coalesced[1] {case}", ts[1], reference(op, b, 0.5), loose)
    return c.result()


def _opts(cls: str, op: str):
    from torch._C import _distributed_c10d as c10d

    o = getattr(c10d, cls)()
    o.reduceOp = _rop(op)
    return o


def movement(dtypes: list[str]) -> dict:
    """broadcast, all_gather (+ uneven), all_gather_into_tensor (both spellings + coalesced), gather,
    scatter, all_to_all, all_to_all_single (even, uneven splits), all_gather_coalesced, send/recv,
    isend/irecv, recv from any source, barrier; non-contiguous buffers."""
    torch = _torch()
    import torch.distributed as dist
    from torch._C import _distributed_c10d as c10d

    me, n = dist.get_rank(), dist.get_world_size()
    pg = dist.group.WORLD
    c = Checks()
    for k, dtype in enumerate(_dtypes(dtypes)):
        case = str(dtype)
        root = k % n
        xs = [gen(case + "/b", r, (4, 3), dtype) for r in range(n)]
        t = xs[me].clone()
        dist.broadcast(t, src=root)
        c.eq(f"broadcast root {root} {case}", t, xs[root])
        big = torch.zeros(4, 6, dtype=dtype)
        view = big[:, ::2]  # non-contiguous
        view.copy_(xs[me])
        dist.broadcast(view, src=root)
        c.eq(f"broadcast non-contiguous {case}", view, xs[root])
        outs = [torch.empty(4, 3, dtype=dtype) for _ in range(n)]
        dist.all_gather(outs, xs[me])
        for r in range(n):
            c.eq(f"all_gather[{r}] {case}", outs[r], xs[r])
        outs = [torch.zeros(3, 8, dtype=dtype)[:, ::2].t() for _ in range(n)]  # non-contiguous outputs
        dist.all_gather(outs, xs[me])
        c.eq(f"all_gather non-contiguous {case}", outs[(me + 1) % n], xs[(me + 1) % n])
        uneven = [gen(case + "/u", r, (r + 1,), dtype) for r in range(n)]
        outs = [torch.empty(r + 1, dtype=dtype) for r in range(n)]
        dist.all_gather(outs, uneven[me])
        c.eq(f"all_gather uneven {case}", torch.cat(outs), torch.cat(uneven))
        whole = torch.empty(n * 4, 3, dtype=dtype)
        dist.all_gather_into_tensor(whole, xs[me])
        c.eq(f"all_gather_into_tensor {case}", whole, torch.cat(xs))
        whole = torch.empty(n * 12, dtype=dtype)
        pg._allgather_base(whole, xs[me].reshape(-1), c10d.AllgatherOptions()).wait()
        c.eq(f"_allgather_base {case}", whole, torch.cat(xs).reshape(-1))
        ys = [gen(case + "/y", r, (2,), dtype) for r in range(n)]
        for name in ("allgather_into_tensor_coalesced", "all_gather_single_coalesced"):
            o1, o2 = torch.empty(n * 12, dtype=dtype), torch.empty(n * 2, dtype=dtype)
            getattr(pg, name)([o1, o2], [xs[me].reshape(-1), ys[me]], c10d.AllgatherOptions()).wait()
            c.eq(f"{name}[0] {case}", o1, torch.cat(xs).reshape(-1))
            c.eq(f"{name}[1] {case}", o2, torch.cat(ys))
        outs = [[torch.empty(4, 3, dtype=dtype), torch.empty(2, dtype=dtype)] for _ in range(n)]
        dist.all_gather_coalesced(outs, [xs[me], ys[me]])
        c.eq(f"all_gather_coalesced {case}", torch.cat([o[1] for o in outs]), torch.cat(ys))
        outs = [torch.empty(4, 3, dtype=dtype) for _ in range(n)] if me == root else None
        dist.gather(xs[me], outs, dst=root)
        if me == root:
            for r in range(n):
                c.eq(f"gather[{r}] root {root} {case}", outs[r], xs[r])
        parts = [gen(case + "/s", r, (5,), dtype) for r in range(n)]
        out = torch.empty(5, dtype=dtype)
        dist.scatter(out, parts if me == root else None, src=root)
        c.eq(f"scatter root {root} {case}", out, parts[me])
        # all_to_all (list, uneven sizes), all_to_all_single (even; uneven splits; both spellings)
        send = [gen(case + f"/a2a/{me}->{j}", me, (j + me + 1,), dtype) for j in range(n)]
        recv = [torch.empty(me + j + 1, dtype=dtype) for j in range(n)]
        dist.all_to_all(recv, send)
        for j in range(n):
            c.eq(f"all_to_all from {j} {case}", recv[j], gen(case + f"/a2a/{j}->{me}", j, (me + j + 1,), dtype))
        inp = [gen(case + "/a2as", r, (n * 2, 3), dtype) for r in range(n)]
        out = torch.empty(n * 2, 3, dtype=dtype)
        dist.all_to_all_single(out, inp[me])
        c.eq(f"all_to_all_single even {case}", out, torch.cat([inp[j][me * 2:(me + 1) * 2] for j in range(n)]))
        # uneven: rank i sends (i + j) % 3 + 1 rows to rank j
        rows = lambda i, j: (i + j) % 3 + 1  # noqa: E731
        src = [gen(case + "/a2au", i, (sum(rows(i, j) for j in range(n)), 2), dtype) for i in range(n)]

        def block(i, j):
            start = sum(rows(i, q) for q in range(j))
            return src[i][start:start + rows(i, j)]

        want = torch.cat([block(j, me) for j in range(n)])
        for name in ("all_to_all_single", "alltoall_base"):
            out = torch.empty(want.shape, dtype=dtype)
            if name == "all_to_all_single":
                dist.all_to_all_single(out, src[me], [rows(j, me) for j in range(n)], [rows(me, j) for j in range(n)])
            else:
                pg.alltoall_base(out, src[me], [rows(j, me) for j in range(n)], [rows(me, j) for j in range(n)],
                                 c10d.AllToAllOptions()).wait()
            c.eq(f"{name} uneven {case}", out, want)
        # point to point: a ring, blocking and non-blocking, and from any source
        right, left = (me + 1) % n, (me - 1) % n
        msg = [gen(case + "/p2p", r, (6,), dtype) for r in range(n)]
        got = torch.empty(6, dtype=dtype)
        reqs = [dist.isend(msg[me], right), dist.irecv(got, left)]
        for q in reqs:
            q.wait()
        c.eq(f"isend/irecv {case}", got, msg[left])
        got = torch.empty(6, dtype=dtype)
        if me % 2 == 0:
            dist.send(msg[me], right)
            dist.recv(got, left)
        else:
            dist.recv(got, left)
            dist.send(msg[me], right)
        c.eq(f"send/recv {case}", got, msg[left])
        ops = [dist.P2POp(dist.isend, msg[me], right), dist.P2POp(dist.irecv, got, left)]
        for q in dist.batch_isend_irecv(ops):
            q.wait()
        c.eq(f"batch_isend_irecv {case}", got, msg[left])
        if me == 0:
            seen = set()
            for _ in range(n - 1):
                buf = torch.empty(6, dtype=dtype)
                src_rank = dist.recv(buf)  # any source
                c.eq(f"recv any source from {src_rank} {case}", buf, msg[src_rank])
                seen.add(src_rank)
            c.count += 1
            if seen != set(range(1, n)):
                c.failures.append(f"recv any source saw {sorted(seen)}")
        else:
            dist.send(msg[me], 0)
        dist.barrier()
    return c.result()


def subgroups() -> dict:
    """new_group subgroups (overlapping, two groups with the same members, non-members), group names,
    and a 2-D DeviceMesh when the world has 4 ranks."""
    torch = _torch()
    import torch.distributed as dist

    me, n = dist.get_rank(), dist.get_world_size()
    c = Checks()
    specs = [[0, 1], [1, n - 1], [0, n - 1], list(range(n)), [0, 1]]
    groups = [dist.new_group(s) for s in specs]
    names = set()
    for s, g in zip(specs, groups):
        if me not in s:
            c.count += 1
            if g is not dist.GroupMember.NON_GROUP_MEMBER:
                c.failures.append(f"non-member of {s} got {g}")
            continue
        names.add(g.group_name)
        c.count += 1
        if dist.get_process_group_ranks(g) != s or g.size() != len(s) or g.rank() != s.index(me):
            c.failures.append(f"group {s}: ranks {dist.get_process_group_ranks(g)} size {g.size()} rank {g.rank()}")
        t = torch.full((7,), float(me + 1))
        dist.all_reduce(t, group=g)
        c.eq(f"all_reduce in {s}", t, torch.full((7,), float(sum(r + 1 for r in s))))
        t = torch.tensor([me * 10.0])
        dist.broadcast(t, src=s[-1], group=g)
        c.eq(f"broadcast in {s}", t, torch.tensor([s[-1] * 10.0]))
        outs = [torch.empty(2, dtype=torch.int64) for _ in s]
        dist.all_gather(outs, torch.tensor([me, me * me]), group=g)
        c.eq(f"all_gather in {s}", torch.stack(outs), torch.tensor([[r, r * r] for r in s]))
        out = torch.empty(len(s), dtype=torch.int64)
        dist.all_to_all_single(out, torch.tensor([me * 100 + r for r in s]), group=g)
        c.eq(f"all_to_all_single in {s}", out, torch.tensor([r * 100 + me for r in s]))
        if len(s) > 1:
            peer = s[(s.index(me) + 1) % len(s)]
            back = s[(s.index(me) - 1) % len(s)]
            got = torch.empty(1)
            reqs = [dist.isend(torch.tensor([float(me)]), peer, group=g), dist.irecv(got, back, group=g)]
            for q in reqs:
                q.wait()
            c.eq(f"isend/irecv in {s}", got, torch.tensor([float(back)]))
    c.count += 1
    mine = [s for s in specs if me in s]
    if len(names) != len(mine) or "" in names:
        c.failures.append(f"group names not distinct/set: {names}")
    # two groups with the same members interleave asynchronous operations independently
    if me in (0, 1):
        a, b = groups[0], groups[4]
        ta, tb = torch.ones(3), torch.full((3,), 2.0)
        wa = dist.all_reduce(ta, group=a, async_op=True)
        wb = dist.all_reduce(tb, group=b, async_op=True)
        wb.wait()
        wa.wait()
        c.eq("same members, group a", ta, torch.full((3,), 2.0))
        c.eq("same members, group b", tb, torch.full((3,), 4.0))
    if n == 4:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        for dim in ("dp", "tp"):
            g = mesh.get_group(dim)
            members = dist.get_process_group_ranks(g)
            t = torch.tensor([float(me)])
            dist.all_reduce(t, group=g)
            c.eq(f"mesh {dim} {members}", t, torch.tensor([float(sum(members))]))
    dist.barrier()
    return c.result()


def async_work() -> dict:
    """Asynchronous collectives: many outstanding, waited in reverse; futures carry the output tensors."""
    torch = _torch()
    import torch.distributed as dist

    me, n = dist.get_rank(), dist.get_world_size()
    c = Checks()
    ts = [torch.full((100 * (i + 1),), float(me + i)) for i in range(10)]
    works = [dist.all_reduce(t, async_op=True) for t in ts]
    for i, w in reversed(list(enumerate(works))):
        w.wait()
        c.eq(f"async all_reduce {i}", ts[i], torch.full((100 * (i + 1),), float(sum(r + i for r in range(n)))))
    t = torch.full((5,), float(me))
    w = dist.all_reduce(t, async_op=True)
    fut = w.get_future()
    doubled = fut.then(lambda f: f.value()[0] * 2)
    value = fut.wait()
    c.count += 1
    if not (isinstance(value, list) and len(value) == 1 and value[0].data_ptr() == t.data_ptr()):
        c.failures.append(f"future value {value!r} is not [the all_reduce's tensor]")
    c.eq("future then", doubled.wait(), torch.full((5,), float(2 * sum(range(n)))))
    c.count += 1
    if not w.is_completed():
        c.failures.append("is_completed() False after wait")
    outs = [torch.empty(2) for _ in range(n)]
    w = dist.all_gather(outs, torch.full((2,), float(me)), async_op=True)
    value = w.get_future().wait()
    c.count += 1
    if len(value) != n or any(v.data_ptr() != o.data_ptr() for v, o in zip(value, outs)):
        c.failures.append("all_gather future value is not the output tensors")
    whole = torch.empty(2 * n)
    w = dist.all_gather_into_tensor(whole, torch.full((2,), float(me)), async_op=True)
    c.eq("all_gather_into_tensor future", w.get_future().wait()[0], torch.arange(n).repeat_interleave(2).float())
    # a callback that runs (and waits for) another collective: it must not block the group
    t = torch.full((4,), float(me))

    def nested(f):
        u = f.value()[0] * 10
        dist.all_reduce(u)
        return u

    got = dist.all_reduce(t, async_op=True).get_future().then(nested).wait()
    c.eq("collective inside a future callback", got, torch.full((4,), float(10 * n * sum(range(n)))))
    w = dist.barrier(async_op=True)
    w.wait()
    return c.result()


def timeouts() -> dict:
    """A collective one rank never joins: the other's wait() raises within the group's timeout, as a
    DistBackendError saying it timed out; the late rank then fails at once too; the world still works."""
    torch = _torch()
    import torch.distributed as dist

    me = dist.get_rank()
    g = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=2))
    out = {}
    if me == 0:
        started = time.monotonic()
        w = dist.all_reduce(torch.ones(4), group=g, async_op=True)
        try:
            w.wait()
            out["error"] = None
        except Exception as e:  # noqa: BLE001
            out["error"] = f"{type(e).__name__}: {e}"
            out["is_dist_error"] = isinstance(e, dist.DistBackendError)
        out["seconds"] = time.monotonic() - started
        fut = w.get_future()
        try:
            fut.wait()
            out["future_error"] = None
        except Exception as e:  # noqa: BLE001
            out["future_error"] = f"{type(e).__name__}: {e}"
        dist.barrier()
    elif me == 1:
        dist.barrier()  # after rank 0 gave up
        started = time.monotonic()
        try:
            dist.all_reduce(torch.ones(4), group=g)
            out["error"] = None
        except Exception as e:  # noqa: BLE001
            out["error"] = f"{type(e).__name__}: {e}"
        out["seconds"] = time.monotonic() - started
    else:
        dist.barrier()
    t = torch.ones(3)
    dist.all_reduce(t)  # the world is unaffected
    out["world_after"] = t.tolist()
    return out


def bad_use() -> dict:
    """Mismatched sizes (every rank raises; the world still works), unsupported dtypes and ops (raised
    at the call, before anything is sent)."""
    torch = _torch()
    import torch.distributed as dist

    me, n = dist.get_rank(), dist.get_world_size()
    out: dict = {}

    def attempt(key, fn):
        started = time.monotonic()
        try:
            fn()
            out[key] = None
        except Exception as e:  # noqa: BLE001
            out[key] = f"{type(e).__name__}: {e}"
        out[key + "_seconds"] = round(time.monotonic() - started, 2)

    # Each disagreement in a group of its own: like gloo's, a group that failed is not used again
    # (ranks may have left the failed operation at different points).
    g = [dist.new_group(list(range(n))) for _ in range(3)]
    attempt("mismatch_all_reduce", lambda: dist.all_reduce(torch.ones(10 + me), group=g[0]))
    attempt("mismatch_all_gather", lambda: dist.all_gather_into_tensor(torch.empty(n * (5 + me)), torch.ones(5 + me),
                                                                       group=g[1]))
    attempt("mismatch_broadcast", lambda: dist.broadcast(torch.ones(4 + me), src=0, group=g[2]))
    t = torch.ones(6)
    dist.all_reduce(t)  # other groups are unaffected
    out["after"] = t.tolist()
    attempt("dtype_float8", lambda: dist.all_reduce(torch.ones(4).to(torch.float8_e4m3fn)))
    attempt("dtype_uint16", lambda: dist.all_reduce(torch.ones(4, dtype=torch.uint16)))
    attempt("op_band_float", lambda: dist.all_reduce(torch.ones(4), op=dist.ReduceOp.BAND))
    attempt("op_avg_int", lambda: dist.all_reduce(torch.ones(4, dtype=torch.int64), op=dist.ReduceOp.AVG))
    attempt("op_max_complex", lambda: dist.group.WORLD.allreduce([torch.ones(4, dtype=torch.complex64)],
                                                                 _opts("AllreduceOptions", "max")))
    attempt("op_premul_int", lambda: dist.all_reduce(torch.ones(4, dtype=torch.int32),
                                                     op=dist._make_nccl_premul_sum(2.0)))
    attempt("cuda_like", lambda: dist.all_reduce(torch.ones(4, device="meta")))
    t = torch.ones(2)
    dist.all_reduce(t)
    out["end"] = t.tolist()
    return out


def early_exit(victim: int) -> dict:
    """Rank ``victim`` exits right after a barrier; the others' next all_reduce must fail fast."""
    torch = _torch()
    import torch.distributed as dist

    dist.barrier()
    if dist.get_rank() == victim:
        os._exit(0)
    time.sleep(0.5)
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1000))
        error = None
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "seconds": round(time.monotonic() - started, 2)}


if __name__ == "__main__":
    sys.exit(_main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])))
