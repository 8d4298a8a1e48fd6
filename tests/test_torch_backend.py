"""collcomm as a torch.distributed backend: ``dist.init_process_group(backend="collcomm")``.

* registration: the ``torch.backends`` entry point registers "collcomm" on ``import torch`` alone;
  ``register()`` twice is harmless;
* every collective PyTorch dispatches for CPU tensors (both method spellings), every dtype x every
  reduction it supports, against a reference computed in the rank, with 2 and 3 ranks;
  non-contiguous tensors; uneven all-gathers and all-to-alls; point to point and any-source;
* new_group subgroups (overlapping, same members twice, non-members) and a 2-D DeviceMesh;
* asynchronous work: futures carry the output tensors; errors and timeouts raise on wait();
* bad use: mismatched sizes raise on every rank, unsupported dtypes and ops raise at the call, a rank
  that exits early makes the others' next collective fail fast;
* DDP (with and without find_unused_parameters, with the PowerSGD comm hook) and FSDP2 under
  torchrun match gloo;
* a fast subset of PyTorch's own distributed test suite (the full run: bench/torch_suite.py).

The jobs are real processes (tests/torch_workers.py, torchrun); each is bounded by its timeout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch_workers as tw  # noqa: E402

from faultjobs import free_port_pair  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ALL_DTYPES = ["float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool",
              "complex64", "complex128"]
MOVE_DTYPES = ["float32", "bfloat16", "int64", "bool", "complex64", "float8_e4m3fn", "uint16"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COLLCOMM_", "TORCHELASTIC_")) and k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _no_failures(values: list) -> int:
    for v in values:
        assert v["failures"] == [], v["failures"][:20]
    return sum(v["checks"] for v in values)


# ============================================================================ registration
@pytest.mark.timeout(120)
def test_entry_point_registers_on_import_torch():
    code = "import torch, torch.distributed as dist; print('collcomm' in dist.Backend.backend_list)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True", (out.stdout, out.stderr)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(TORCH_DEVICE_BACKEND_AUTOLOAD="0"), timeout=100)
    assert off.stdout.strip() == "False", (off.stdout, off.stderr)


@pytest.mark.timeout(60)
def test_register_twice_is_harmless():
    import torch.distributed as dist

    from collcomm.integrations import torch as ct

    ct.register()
    assert ct.register() is False
    assert dist.Backend.backend_list.count("collcomm") == 1
    assert dist.Backend.backend_capability["collcomm"] == ["cpu"]
    ct._autoload()  # never raises


# ============================================================================ collectives
@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", [2, pytest.param(3, marks=pytest.mark.slow)])  # 3: slow (CI time; NumPy's sweep has 3)
def test_reductions_every_dtype_and_op(n):
    values = tw.values(tw.run(n, "reductions", {"dtypes": ALL_DTYPES}, timeout=200))
    assert _no_failures(values) > 500 * n


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", [2, pytest.param(3, marks=pytest.mark.slow)])  # 3: slow (CI time)
def test_data_movement_every_collective(n):
    values = tw.values(tw.run(n, "movement", {"dtypes": MOVE_DTYPES}, timeout=200))
    assert _no_failures(values) > 100 * n


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [3, pytest.param(4, marks=pytest.mark.slow)])  # 4: slow (CI time)
def test_subgroups_and_device_mesh(n):
    values = tw.values(tw.run(n, "subgroups", timeout=150))
    assert _no_failures(values) >= 10 * n


@pytest.mark.timeout(120)
def test_async_work_and_futures():
    values = tw.values(tw.run(2, "async_work", timeout=100))
    assert _no_failures(values) >= 2 * 15


@pytest.mark.timeout(120)
def test_timeout_raises_on_wait():
    first, late, *_ = tw.values(tw.run(2, "timeouts", timeout=100))
    # rank 0 waits alone: wait() raises a DistBackendError that says it timed out, near the group's 2 s
    assert first["error"] and "Timed out" in first["error"] and first["is_dist_error"], first
    # worded as gloo words it: PyTorch's suite (test_barrier_timeout_*) matches this on str(error)
    assert re.search(r" (Timed out|closed|timeout) ", first["error"].partition(": ")[2]), first
    assert 1.5 < first["seconds"] < 15, first
    assert first["future_error"] and "Timed out" in first["future_error"], first
    # the late rank fails at once with the recorded failure instead of waiting its own timeout
    assert late["error"] and late["seconds"] < 5, late
    assert first["world_after"] == late["world_after"] == [2.0, 2.0, 2.0]


# ============================================================================ bad use
@pytest.mark.timeout(120)
def test_bad_use_raises_pytorch_style_errors():
    values = tw.values(tw.run(2, "bad_use", timeout=100))
    for v in values:
        for key in ("mismatch_all_reduce", "mismatch_all_gather", "mismatch_broadcast"):
            assert v[key] and "Mismatch" in v[key], (key, v[key])  # on every rank
            assert v[key + "_seconds"] < 20, (key, v)
        assert v["after"] == [2.0] * 6 and v["end"] == [2.0] * 2
        assert v["dtype_float8"].startswith("TypeError") and "float8_e4m3fn" in v["dtype_float8"]
        assert v["dtype_uint16"].startswith("TypeError") and "uint16" in v["dtype_uint16"]
        assert v["op_band_float"].startswith("ValueError") and "BAND" in v["op_band_float"]
        assert v["op_avg_int"].startswith("ValueError") and "AVG" in v["op_avg_int"]
        assert v["op_max_complex"].startswith("ValueError") and "complex" in v["op_max_complex"]
        assert v["op_premul_int"].startswith("ValueError") and "PREMUL_SUM" in v["op_premul_int"]
        assert v["cuda_like"] and "CPU" in v["cuda_like"]


@pytest.mark.timeout(120)
def test_rank_that_exits_early_fails_the_others_fast():
    ranks = tw.run(3, "early_exit", {"victim": 2}, timeout=100, pg_timeout=60)
    assert ranks[2].ok is None  # the victim left without a word
    for r in ranks[:2]:
        assert r.ok, r.error or r.output
        assert r.value["error"] and "rank 2" in r.value["error"], r.value
        assert r.value["seconds"] < 20, r.value  # far below the 60 s timeout


# ============================================================================ DDP and FSDP2 under torchrun
@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [pytest.param(2, marks=pytest.mark.slow), 4])  # 2: slow (CI time)
def test_ddp_and_fsdp2_match_gloo(n, tmp_path):
    port = free_port_pair()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(REPO / "tests" / "torch_ddp_job.py"), "--steps", "20", "--fsdp",
           "--results", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=280, cwd=str(REPO))
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert out.returncode == 0 and len(results) == n, out.stdout[-3000:] + out.stderr[-5000:]
    for r in results:
        assert r["backend"] == "collcomm" and r["world_size"] == n
        for variant in ("ddp", "ddp_unused", "ddp_powersgd", "fsdp"):
            assert r[variant]["match"] and r[variant]["ranks_agree"], (variant, r)


# ============================================================================ PyTorch's own suite
# CI runs two of PyTorch's tests (each starts a world of processes: ~20 s on 2 cores); broadcast and
# all_gather are checked against gloo by test_data_movement_every_collective, and run here with -m slow.
FAST_SUITE = ["test_all_reduce_sum", "test_send_recv_any_source"]
SLOW_SUITE = FAST_SUITE + ["test_broadcast", "test_all_gather",
    "test_all_gather_coalesced_simple", "test_all_reduce_max", "test_all_reduce_product", "test_all_reduce_sum_complex",
    "test_gather", "test_scatter", "test_reduce_sum", "test_barrier", "test_send_recv", "test_isend", "test_irecv",
    "test_DistributedDataParallel_requires_grad", "test_ddp_comm_hook_logging",
    "test_ddp_unused_params_rebuild_buckets_exception", "test_all_reduce_group_sum", "test_broadcast_group",
    "test_new_subgroups",
]


def _suite(names: list[str], tmp_path: Path, timeout: float) -> dict:
    pytest.importorskip("expecttest")  # torch.testing._internal needs it
    results = tmp_path / "suite.json"
    cmd = [sys.executable, str(REPO / "bench" / "torch_suite.py"), "--backend", "collcomm", "--per-test", "60",
           "--results", str(results)]
    for n in names:
        cmd += ["-k", f"^{n}$"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=str(REPO))
    assert results.exists(), out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(results.read_text())["backends"]["collcomm"]


@pytest.mark.timeout(150)
def test_pytorch_suite_fast_subset(tmp_path):
    r = _suite(FAST_SUITE, tmp_path, 140)
    assert r["failed"] == 0 and r["passed"] == len(FAST_SUITE), r["failed_tests"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pytorch_suite_allow_list(tmp_path):
    r = _suite(SLOW_SUITE, tmp_path, 880)
    assert r["failed"] == 0, r["failed_tests"]
    assert r["passed"] + r["skipped"] == len(SLOW_SUITE)
