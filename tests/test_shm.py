"""Shared-memory collectives (collcomm/runtime/local.py, collcomm/transport/shm/) in real jobs.

Ranks of one machine run their groups' collectives over shared memory by default. These jobs
check, against NumPy inside every rank: every collective with both algorithms (one-shot for
small inputs, two-step in many rounds with a tiny arena), every dtype and op; that shared memory
is really in use (and sockets with COLLCOMM_TRANSPORT=unix give the same answers); that ranks
running different operations get a MismatchError naming both; that a job whose fabric puts its
ranks on two hosts keeps the world on sockets and each host's group on shared memory; that
10,000 back-to-back tiny allreduces grow no fds, threads, memory or /dev/shm names; that no
segment name outlives group formation and that the launcher removes the names a killed job left
(its own only). Dying and stopped ranks are in the fault matrix's "shm" column
(tests/test_fault_matrix.py).
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import multiproc
from shm_support import cma_allowed

import collcomm as cc
from collcomm.runtime import local, local_settings
from collcomm.topology.model import Link, Node, Topology
from collcomm.transport.shm import arena as shm_arena, cma, segment, stream

pytestmark = pytest.mark.skipif(not shm_arena.SUPPORTED or not os.path.isdir("/dev/shm"),
                                reason="shared-memory collectives run on x86-64 Linux with /dev/shm")

DTYPES = ("float32", "float64", "int32", "int64", "int8", "uint8", "float16")
OPS = ("sum", "prod", "min", "max", "avg")


# ---------------------------------------------------------------------------- inside the ranks
def _inputs(n: int, count: int, dtype: str, op: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        lo, hi = (1, 3) if op == "prod" else (-8, 9)
        return rng.integers(lo, hi, (n, count)).astype(dtype)  # small integers: every order is exact
    return rng.integers(-3 if np.dtype(dtype).kind == "i" else 0, 4, (n, count)).astype(dtype)


def _reference(x: np.ndarray, op: str) -> np.ndarray:
    f = {"sum": np.sum, "prod": np.prod, "min": np.min, "max": np.max, "avg": np.sum}[op]
    out = f(x, axis=0).astype(x.dtype)
    return out / x.shape[0] if op == "avg" else out


def every_collective(counts: list[int], transport_expected: bool) -> dict:
    n, me = cc.world_size(), cc.rank()
    wrong, done = [], 0
    for ci, count in enumerate(counts):
        for di, dtype in enumerate(DTYPES):
            for oi, op in enumerate(OPS):
                if op == "avg" and np.dtype(dtype).kind != "f":
                    continue
                x = _inputs(n, count, dtype, op, seed=ci * 1000 + di * 10 + oi)
                ref = _reference(x, op)
                a = x[me].copy()
                cc.allreduce(a, op)
                if not np.array_equal(a, ref.astype(a.dtype)):
                    wrong.append(f"allreduce {op} {count} {dtype}")
                # out of place (x read-only: only read): blocking (the lane, once the shape is
                # filed), and every other member in place, through the full path (async)
                src = x[me].copy()
                src.flags.writeable = False
                o = np.full(count, 7, dtype)
                cc.allreduce(src, op, out=o)
                if not np.array_equal(o, ref.astype(dtype)):
                    wrong.append(f"allreduce out= {op} {count} {dtype}")
                o = x[me].copy() if me % 2 == 0 else np.full(count, 7, dtype)
                cc.allreduce(o if me % 2 == 0 else src, op, out=None if me % 2 == 0 else o, async_op=True).wait(60)
                if not (np.array_equal(o, ref.astype(dtype)) and np.array_equal(src, x[me])):
                    wrong.append(f"allreduce mixed in place and out= {op} {count} {dtype}")
                root = (ci + oi) % n
                r = x[me].copy()
                cc.reduce(r, root=root, op=op)
                if not np.array_equal(r, ref.astype(r.dtype) if me == root else x[me]):
                    wrong.append(f"reduce {op} root {root} {count} {dtype}")
                o = np.full(count, 7, dtype)
                cc.reduce(src, root=root, op=op, out=o)
                if not np.array_equal(o, ref.astype(dtype) if me == root else np.full(count, 7, dtype)):
                    wrong.append(f"reduce out= {op} root {root} {count} {dtype}")
                full = _inputs(n, count * n, dtype, op, seed=ci * 1000 + di * 10 + oi + 7)
                out = np.empty(count, dtype)
                cc.reduce_scatter(out, full[me], op)
                if not np.array_equal(out, _reference(full, op).astype(dtype)[me * count:(me + 1) * count]):
                    wrong.append(f"reduce_scatter {op} {count} {dtype}")
                done += 6
            g = np.empty(count * n, dtype)
            cc.allgather(g, x[me].copy())
            inplace = np.full(count * n, 7, dtype)
            inplace[me * count:(me + 1) * count] = x[me]
            cc.allgather(inplace, inplace[me * count:(me + 1) * count])
            if not (np.array_equal(g, x.reshape(-1)) and np.array_equal(inplace, x.reshape(-1))):
                wrong.append(f"allgather {count} {dtype}")
            b = x[me].copy()
            root = ci % n
            cc.broadcast(b, root=root)
            if not np.array_equal(b, x[root]):
                wrong.append(f"broadcast root {root} {count} {dtype}")
            # out of place (x read-only), blocking (the lane once the shape is filed), then every
            # other member in place through the full path
            src = x[me].copy()
            src.flags.writeable = False
            o = np.full(count, 7, dtype)
            cc.broadcast(src, root=root, out=o)
            if not (np.array_equal(o, x[root]) and np.array_equal(src, x[me])):
                wrong.append(f"broadcast out= root {root} {count} {dtype}")
            o = x[me].copy() if me % 2 == 0 else np.full(count, 7, dtype)
            cc.broadcast(o if me % 2 == 0 else src, root=root, out=None if me % 2 == 0 else o,
                         async_op=True).wait(60)
            if not np.array_equal(o, x[root]):
                wrong.append(f"broadcast mixed in place and out= root {root} {count} {dtype}")
            blocks = _inputs(n, count * n, dtype, "sum", seed=ci * 1000 + di * 10 + 9)  # [sender][receiver block]
            a2a = np.empty(count * n, dtype)
            inplace = blocks[me].copy()
            cc.alltoall(a2a, blocks[me].copy())
            cc.alltoall(inplace, inplace)
            expect = blocks[:, me * count:(me + 1) * count].reshape(-1)
            if not (np.array_equal(a2a, expect) and np.array_equal(inplace, expect)):
                wrong.append(f"alltoall {count} {dtype}")
            done += 4
    cc.barrier()
    inplace = _inputs(n, 5 * n, "float64", "sum", seed=99)
    mine = inplace[me].copy()
    cc.reduce_scatter(mine[me * 5:(me + 1) * 5], mine)  # the output is a block of the input
    if not np.array_equal(mine[me * 5:(me + 1) * 5], inplace.sum(axis=0)[me * 5:(me + 1) * 5]):
        wrong.append("reduce_scatter in place")
    used = bool(cc.api._group(None)._local)
    assert used == transport_expected, f"shared memory in use: {used}"
    if used:
        direct = cc.api._group(None)._local.direct
        assert direct == (local_settings.direct_bytes() if cma_allowed() else None), direct
        streamed = cc.api._group(None)._local.streamed
        assert streamed == (local_settings.stream_bytes(n) if stream.AVAILABLE else None), streamed
    if used:  # what this rank read from each peer's segment is in the link telemetry
        cc.api._group(None)._local._flush_telemetry()
        links = cc.api.runtime().transport.telemetry.snapshot()["links"]
        read = {l["src"]: l["bytes"] for l in links if l["dst"] == me}
        assert all(read.get(p, 0) > 0 for p in range(n) if p != me), read
    return {"wrong": wrong, "done": done}


def mismatch() -> dict:
    """Rank 0 allreduces while rank 1 broadcasts; then both allreduce (over sockets now)."""
    x = np.ones(64, np.float32)
    cc.barrier()  # the arena is formed: the mismatch is met on shared memory
    formed = bool(cc.api._group(None)._local)
    try:
        if cc.rank() == 0:
            cc.allreduce(x)
        else:
            cc.broadcast(x, root=0)
        error, msg = None, ""
    except cc.CollectiveError as e:
        error, msg = type(e).__name__, str(e)
    y = np.arange(10, dtype=np.int64) * (cc.rank() + 1)
    cc.allreduce(y)
    return {"error": error, "msg": msg, "formed": formed, "after": bool(cc.api._group(None)._local),
            "exact_after": bool(np.array_equal(y, np.arange(10) * 3))}


def mixed_hosts() -> dict:
    """Two hosts of two ranks: the world's allreduce on shared memory inside each host and sockets
    between them (a hierarchy), each host's own pair on shared memory; every result exact."""
    n, me = cc.world_size(), cc.rank()
    x = np.arange(1000, dtype=np.int64) * (me + 1)
    cc.allreduce(x)
    ok = bool(np.array_equal(x, np.arange(1000, dtype=np.int64) * sum(range(1, n + 1))))
    pair = cc.new_group([0, 1] if me < 2 else [2, 3])
    y = np.full(300_001, me + 1, np.int32)
    cc.allreduce(y, group=pair)
    ok = ok and bool((y == (3 if me < 2 else 7)).all())
    world = cc.api._group(None)
    for op in ("sum", "max", "avg"):
        z = np.arange(5000, dtype=np.float64) + me
        cc.allreduce(z, op)
        want = {"sum": 4 * np.arange(5000) + 6, "max": np.arange(5000) + 3.0, "avg": np.arange(5000) + 1.5}[op]
        ok = ok and bool(np.array_equal(z, want))
    return {"ok": ok, "world_shm": bool(world._local), "pair_shm": bool(pair._local),
            "hierarchy": bool(world._hierarchy) and bool(world._hierarchy.box._local)}


def broadcast_rounds(count: int) -> dict:
    """Direct broadcasts of ``count`` float64 (several rounds of n parts) from every root, in
    place and out of place, and every other member out of place."""
    n, me = cc.world_size(), cc.rank()
    wrong = []
    for root in range(n):
        data = np.random.default_rng(root).standard_normal((n, count))
        b = data[me].copy()
        cc.broadcast(b, root=root)
        o = np.zeros(count)
        cc.broadcast(data[me], root=root, out=o)
        m = data[me].copy() if me % 2 else np.zeros(count)
        cc.broadcast(data[me] if me % 2 == 0 else m, root=root, out=m if me % 2 == 0 else None)
        for name, got in (("in place", b), ("out=", o), ("mixed", m)):
            if not np.array_equal(got, data[root]):
                wrong.append(f"{name} root {root}: {int((got != data[root]).sum())} wrong")
    return {"wrong": wrong, "direct": cc.api._group(None)._local.direct}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [3, 4])
def test_a_direct_broadcast_in_rounds_lands_whole(n):
    """Three or more members broadcast directly in rounds of n parts of 1 MiB: one and a half
    rounds of float64 and 7 more elements, the second round short and uneven (no streaming,
    which would take the broadcast through the segments)."""
    if not cma_allowed():
        pytest.skip("process_vm_readv is not allowed here (seccomp or ptrace restrictions)")
    count = local.BROADCAST_PART_BYTES // 8 * n * 3 // 2 + 7
    job = multiproc.run(n, broadcast_rounds, kwargs={"count": count}, timeout=100,
                        env={"COLLCOMM_SHM_DIRECT_BYTES": "0", "COLLCOMM_SHM_STREAM_BYTES": "off"}).check()
    for r, v in enumerate(job.values()):
        assert v == {"wrong": [], "direct": 0}, f"rank {r}: {v}"


def no_growth(ops: int) -> dict:
    """``ops`` back-to-back 8-byte allreduces; fds, threads, RSS and /dev/shm names before and after."""
    import threading

    def facts():
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
        names = [p for p in os.listdir("/dev/shm") if p.startswith(segment.PREFIX + cc.api.runtime().job_tag)]
        return len(os.listdir("/proc/self/fd")), threading.active_count(), rss, len(names)

    x = np.zeros(2, np.float32)
    for _ in range(1000):  # warm: the arena formed, caches filled
        x[:] = 1.0
        cc.allreduce(x)
    before = facts()
    wrong = 0
    for _ in range(ops):
        x[:] = 1.0
        cc.allreduce(x)
        wrong += int(x[0] != cc.world_size())
    after = facts()
    maps = Path("/proc/self/maps").read_text()
    mapped = sum(1 for line in maps.splitlines() if segment.PREFIX in line and "(deleted)" in line)
    return {"before": before, "after": after, "wrong": wrong, "mapped": mapped,
            "shm": bool(cc.api._group(None)._local)}


LEFTOVER = '''
import os
from collcomm.transport.shm import segment
tag = segment.job_tag(os.environ["COLLCOMM_COORDINATOR"], os.environ["COLLCOMM_TOKEN"])
if rank == 0:  # what a rank killed between creating its segment and the group's agreement leaves
    open(os.path.join(segment.directory(), segment.name(tag, 0, 0, 1, 0)), "wb").close()
report(tag)
'''


# ---------------------------------------------------------------------------- tests
@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,streamed", [(2, ""), pytest.param(3, "", marks=pytest.mark.slow), (4, "0")])
def test_every_collective_dtype_and_op_over_shared_memory(n, streamed):
    """4 KiB halves: 1 and 7 elements one-shot, 3001 and 70_001 two-step in many rounds. With 4
    members every copy into a result streams past the cache (threshold 0), so allgathers of every
    size go through the segments; with 2 and 3, from 4 MiB (none here)."""
    # (3 members: slow, for CI's time; the direct-read test runs 3)
    job = multiproc.run(n, every_collective, kwargs={"counts": [1, 7, 3001, 70_001], "transport_expected": True},
                        timeout=240, env={"COLLCOMM_SHM_BYTES": "4096", "COLLCOMM_SHM_STREAM_BYTES": streamed}).check()
    for r, v in enumerate(job.values()):
        assert v["wrong"] == [], f"rank {r}: {v['wrong']}"
        assert v["done"] > 100


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,threshold", [(2, "0"), (3, "10000")])
def test_every_collective_reading_peers_directly(n, threshold):
    """Cross-memory attach: allreduce, allgather and reduce-scatter read the peers' buffers
    directly from ``threshold`` bytes on (0: all of them; 10000: the larger sizes, the others
    through the segments in the same job); the large ones reduce through the scratch in pieces.
    Broadcast writes and reads parts (two steps with 2 members, three with 3). No streaming,
    which would take allgather and broadcast through the segments."""
    if not cma_allowed():
        pytest.skip("process_vm_readv is not allowed here (seccomp or ptrace restrictions)")
    job = multiproc.run(n, every_collective, kwargs={"counts": [1, 7, 3001, 70_001], "transport_expected": True},
                        timeout=240, env={"COLLCOMM_SHM_DIRECT_BYTES": threshold,
                                                   "COLLCOMM_SHM_STREAM_BYTES": "off"}).check()
    for r, v in enumerate(job.values()):
        assert v["wrong"] == [], f"rank {r}: {v['wrong']}"


def direct_agreement(refuse: int) -> dict:
    """Rank ``refuse`` will neither read directly nor stream; the group forms (first barrier)
    and says. Rank 0 offers a lower streaming threshold than the others."""
    if cc.rank() == refuse:
        os.environ["COLLCOMM_SHM_DIRECT_BYTES"] = "off"
        os.environ["COLLCOMM_SHM_STREAM_BYTES"] = "off"
    elif cc.rank() == 0:
        os.environ["COLLCOMM_SHM_STREAM_BYTES"] = "1000"
    cc.barrier()
    x = np.full(1 << 21, cc.rank() + 1, np.float32)  # 8 MB: direct if the group had agreed to
    cc.allreduce(x)
    g = np.empty(x.size * cc.world_size(), np.float32)
    cc.allgather(g, x)  # 24 or 16 MB: streamed through the segments if agreed, else directly
    n = cc.world_size()
    exact = bool((x == n * (n + 1) // 2).all()) and bool((g == np.repeat(n * (n + 1) // 2, g.size)).all())
    local = cc.api._group(None)._local
    return {"direct": local.direct, "streamed": local.streamed, "exact": exact}


@pytest.mark.timeout(120)
def test_one_member_that_will_not_read_directly_or_stream_keeps_the_whole_group_from_it():
    values = list(multiproc.run(3, direct_agreement, kwargs={"refuse": 1}, timeout=100).check().values())
    assert values == [{"direct": None, "streamed": None, "exact": True}] * 3, values
    values = list(multiproc.run(2, direct_agreement, kwargs={"refuse": -1}, timeout=100).check().values())
    direct = local_settings.DEFAULT_DIRECT_BYTES if cma_allowed() else None
    streamed = local_settings.stream_bytes(2) if stream.AVAILABLE else None  # the largest offer
    assert values == [{"direct": direct, "streamed": streamed, "exact": True}] * 2, values


@pytest.mark.parametrize("name,read,default", [
    ("COLLCOMM_SHM_DIRECT_BYTES", local_settings.direct_bytes, local_settings.DEFAULT_DIRECT_BYTES),
    ("COLLCOMM_SHM_STREAM_BYTES", local_settings.stream_bytes,
     max(local_settings.DEFAULT_STREAM_BYTES, local_settings.last_level_cache() // 2))])
def test_threshold_settings_are_checked(monkeypatch, name, read, default):
    monkeypatch.setenv(name, "Lots")
    with pytest.raises(ValueError, match=f"{name}='Lots' is neither a number of bytes nor off"):
        read()
    monkeypatch.setenv(name, "-1")
    with pytest.raises(ValueError, match=f"{name} must be >= 0, got -1"):
        read()
    monkeypatch.setenv(name, "Off")
    assert read() is None
    monkeypatch.setenv(name, " 12345 ")
    assert read() == 12345
    monkeypatch.delenv(name)
    assert read() == default


def test_unset_the_streaming_size_leaves_results_that_fit_half_the_cache_to_it(monkeypatch):
    """The last-level cache as lscpu reads it; unset, results stream from the larger of 4 MiB and
    half of it over the members (a group's results that fit are better written through it)."""
    monkeypatch.delenv("COLLCOMM_SHM_STREAM_BYTES", raising=False)
    try:
        out = subprocess.run(["lscpu", "-C=NAME,ONE-SIZE", "-B"], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        pytest.skip("no lscpu to read the caches with")
    sizes = [int(line.split()[1]) for line in out.stdout.splitlines()[1:] if len(line.split()) == 2]
    if out.returncode != 0 or not sizes:
        pytest.skip(f"lscpu lists no cache sizes here: {out.stdout!r} {out.stderr!r}")
    assert local_settings.last_level_cache() == max(sizes)
    for members in (1, 2, 3, 4, 8, 64):
        assert local_settings.stream_bytes(members) == max(4 << 20, max(sizes) // (2 * members))
    monkeypatch.setenv("COLLCOMM_SHM_STREAM_BYTES", "1234")  # set: as it is
    assert local_settings.stream_bytes(2) == 1234


@pytest.mark.parametrize("move", [cma.read, cma.write])
def test_reading_or_writing_a_process_that_is_gone_is_an_error_naming_it(move):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    out = np.zeros(8, np.uint8)
    with pytest.raises(OSError) as info:
        move(proc.pid, cma.address(out), out)
    assert info.value.errno == errno.ESRCH and str(proc.pid) in str(info.value)


def test_a_direct_write_lands_where_it_is_aimed():
    if not cma_allowed():
        pytest.skip("process_vm_writev is not allowed here (seccomp or ptrace restrictions)")
    target = np.zeros(1 << 20, np.uint8)
    src = np.random.default_rng(1).integers(0, 256, 300_001, dtype=np.uint8)
    cma.write(os.getpid(), cma.address(target) + 12345, src)
    expected = np.zeros_like(target)
    expected[12345:12345 + src.size] = src
    assert np.array_equal(target, expected)


@pytest.mark.timeout(300)
def test_every_collective_over_sockets_small_and_large():
    """The same matrix with shared memory off: small allreduces gather every input over the sockets
    and reduce locally (one round), larger ones run the planner's plan."""
    job = multiproc.run(3, every_collective, kwargs={"counts": [1, 7, 3001, 70_001], "transport_expected": False},
                        timeout=240, env={"COLLCOMM_TRANSPORT": "unix"}).check()
    for r, v in enumerate(job.values()):
        assert v["wrong"] == [], f"rank {r}: {v['wrong']}"


@pytest.mark.timeout(120)
def test_default_arena_and_sockets_agree():
    for env, expected in (({}, True), ({"COLLCOMM_TRANSPORT": "unix"}, False)):
        job = multiproc.run(2, every_collective, kwargs={"counts": [5, 300_001], "transport_expected": expected},
                            timeout=100, env=env).check()
        assert [v["wrong"] for v in job.values()] == [[], []], env


@pytest.mark.timeout(60)
def test_ranks_running_different_operations_are_told_both():
    values = multiproc.run(2, mismatch, timeout=40, collective_timeout=10).check().values()
    for v in values:
        assert v["error"] == "MismatchError", values
        assert "allreduce of 64 float32" in v["msg"] and "broadcast of 64 float32" in v["msg"], values
        assert v["formed"] and not v["after"] and v["exact_after"], values  # on sockets after, exact


@pytest.mark.timeout(120)
def test_two_hosts_shared_memory_inside_sockets_between():
    nodes = [Node(f"h{h}.r{i}", "compute", host=f"h{h}") for h in range(2) for i in range(2)] + [Node("sw", "switch")]
    links = [Link(nd.id, "sw", 10) for nd in nodes[:4]]
    topo = Topology("two-hosts", nodes, links)
    values = multiproc.run(4, mixed_hosts, timeout=100, topology=topo).check().values()
    assert values == [{"ok": True, "world_shm": False, "pair_shm": True, "hierarchy": True}] * 4


@pytest.mark.timeout(300)
def test_ten_thousand_tiny_allreduces_grow_nothing():
    values = multiproc.run(2, no_growth, kwargs={"ops": 10_000}, timeout=280).check().values()
    for v in values:
        fds0, threads0, rss0, names0 = v["before"]
        fds1, threads1, rss1, names1 = v["after"]
        assert v["shm"] and v["wrong"] == 0, v
        assert (fds1, threads1, names0, names1) == (fds0, threads0, 0, 0), v
        assert rss1 - rss0 < 4 << 20, v
        assert v["mapped"] == 2  # its own segment and its peer's, mapped, their names gone


@pytest.mark.timeout(60)
def test_launcher_removes_what_a_job_left_and_nothing_else():
    other = os.path.join(segment.directory(), segment.PREFIX + "0123456789ab-g0e0n1-r0")
    Path(other).write_bytes(b"")
    try:
        tags = multiproc.run(2, LEFTOVER, timeout=40).check().values()
        left = [p for p in os.listdir(segment.directory()) if p.startswith(segment.PREFIX + tags[0])]
        assert left == [] and os.path.exists(other)
    finally:
        os.unlink(other)


# ---------------------------------------------------------------------------- pure parts
@settings(max_examples=200, deadline=None)
@given(count=st.integers(0, 10_000), n=st.integers(1, 9))
def test_parts_cover_the_buffer_once_and_evenly(count, n):
    layout = local.parts(count, n)
    covered = [i for off, length in layout for i in range(off, off + length)]
    assert covered == list(range(count))
    assert max(l for _, l in layout) - min(l for _, l in layout) <= 1


@given(n=st.integers(2, 8), a=st.integers(1, 1 << 24), b=st.integers(1, 1 << 24),
       alpha=st.floats(1e-7, 1e-3), beta=st.floats(1e-7, 1e-3))
def test_one_shot_below_a_size_two_step_above(n, a, b, alpha, beta):
    """The model's choice is monotone in the size (one-shot up to a crossover, two-step beyond it,
    and always beyond the arena's half, which a one-shot input must fit) and in alpha (dearer
    steps never move a size from one-shot to two-step)."""
    capacity = 4 << 20
    small, large = min(a, b), max(a, b)
    if local.choose(n, small, capacity, alpha) == "two_step":
        assert local.choose(n, large, capacity, alpha) == "two_step"
    if local.choose(n, small, capacity, min(alpha, beta)) == "one_shot":
        assert local.choose(n, small, capacity, max(alpha, beta)) == "one_shot"
    assert local.choose(n, capacity + 1, capacity, alpha) == "two_step"


def test_bad_arena_size_is_one_line(monkeypatch):
    monkeypatch.setenv("COLLCOMM_SHM_BYTES", "12ab")
    with pytest.raises(ValueError, match="COLLCOMM_SHM_BYTES='12ab' is not a number of bytes"):
        local_settings.half_bytes()
    monkeypatch.setenv("COLLCOMM_SHM_BYTES", "100")
    with pytest.raises(ValueError, match="multiple of 64 of at least 4096"):
        local_settings.half_bytes()


def test_segment_names_are_the_jobs_own():
    a, b = segment.job_tag("127.0.0.1:1", "t1"), segment.job_tag("127.0.0.1:1", "t2")
    assert a != b and len(a) == 12
    assert segment.name(a, 3, 1, 2, 0).startswith(segment.PREFIX + a + "-")


def test_a_misspelt_transport_is_one_line(monkeypatch):
    monkeypatch.setenv("COLLCOMM_TRANSPORT", "shmem")
    with pytest.raises(ValueError, match=r"COLLCOMM_TRANSPORT='shmem': choose one of auto, unix, tcp"):
        local_settings.transport_choice()


def test_a_full_shm_directory_is_an_error_at_creation_not_a_crash_later(tmp_path, monkeypatch):
    """posix_fallocate reserves the pages: a tmpfs that cannot hold the segment refuses it at once."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setenv("COLLCOMM_SHM_DIR", str(small))
        with pytest.raises(OSError):
            segment.Segment.create("collcomm-test-big", 4 << 20)
        assert os.listdir(small) == []  # nothing half-made is left
        seg = segment.Segment.create("collcomm-test-small", 64 << 10)
        seg.close()
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)])
