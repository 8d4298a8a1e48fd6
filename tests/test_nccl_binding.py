"""The NCCL binding (collcomm/transport/nccl/) and what the GPU entry points say without a GPU.

Without a GPU (this machine, CI): finding and loading the library and its one-line errors (no
library, a path that is no file, a library that is not NCCL, a fake wheel found through importlib),
lazy loading (importing the package maps no libnccl), NCCL's enum numbers, the unique id's bytes,
the binding's marshalling against stand-in C libraries built here (a fake libnccl and libcuda: they
test collcomm's ctypes plumbing and messages, not NCCL), ``collcomm-perf --device cuda`` and a CUDA
tensor reaching ``as_buffer``. With a GPU: a one-rank communicator's allreduce, broadcast and split
on CUDA tensors (skipped here, with the reason).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collcomm.errors import CollectiveError, NcclUnavailable, UsageError, UsageTypeError
from collcomm.transport.nccl import binding, gpu_problem, require_gpu
from collcomm.transport.nccl.binding import NcclError, UniqueId, nccl_dtype, nccl_op

REPO = Path(__file__).resolve().parent.parent
CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="needs a C compiler to build the stand-in libnccl/libcuda")


def _mapped(stem: str) -> str:
    """The path of a shared library this process has mapped ("libc": libc.so.6 or libc-2.31.so)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        name = Path(line.split()[-1]).name
        if name.startswith((stem + ".so", stem + "-")):
            return line.split()[-1]
    pytest.skip(f"{stem} is not mapped in this process")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLCOMM_")}
    env.update(extra)
    return env


def _python(code: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------- NCCL's numbers
def test_enum_numbers_are_ncclh():
    # NVIDIA/nccl src/nccl.h.in (2.32): ncclDataType_t, ncclRedOp_t, ncclResult_t, NCCL_UNIQUE_ID_BYTES.
    assert binding.DTYPES == {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
                              "float16": 6, "float32": 7, "float64": 8, "bfloat16": 9}
    assert binding.OPS == {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}
    assert binding.RESULTS == {0: "ncclSuccess", 1: "ncclUnhandledCudaError", 2: "ncclSystemError",
                               3: "ncclInternalError", 4: "ncclInvalidArgument", 5: "ncclInvalidUsage",
                               6: "ncclRemoteError", 7: "ncclInProgress", 8: "ncclTimeout"}
    assert binding.UNIQUE_ID_BYTES == 128 == ctypes.sizeof(UniqueId)
    assert (binding.SHRINK_DEFAULT, binding.SHRINK_ABORT) == (0, 1)


def test_enum_numbers_match_the_installed_header():
    """Where the nvidia-nccl wheel is installed, its nccl.h gives the same numbers."""
    lib = binding.wheel_library()
    header = Path(lib).parent.parent / "include" / "nccl.h" if lib else None
    if header is None or not header.is_file():
        pytest.skip("the nvidia-nccl wheel (the gpu extra) is not installed: no nccl.h to read")
    import re

    found = dict(re.findall(r"\b(nccl[A-Z]\w*)\s*=\s*(\d+)\b", header.read_text()))
    names = {"int8": "ncclInt8", "uint8": "ncclUint8", "int32": "ncclInt32", "uint32": "ncclUint32",
             "int64": "ncclInt64", "uint64": "ncclUint64", "float16": "ncclFloat16", "float32": "ncclFloat32",
             "float64": "ncclFloat64", "bfloat16": "ncclBfloat16"}
    assert {k: int(found[v]) for k, v in names.items()} == binding.DTYPES
    assert {k: int(found["nccl" + k.capitalize()]) for k in binding.OPS} == binding.OPS
    assert {int(found[v]): v for v in binding.RESULTS.values()} == binding.RESULTS


def test_dtype_names_numpy_and_torch():
    for name, number in binding.DTYPES.items():
        assert nccl_dtype(name) == number
        if name != "bfloat16":
            assert nccl_dtype(np.dtype(name)) == number
    assert (nccl_dtype("half"), nccl_dtype("float"), nccl_dtype("double")) == (6, 7, 8)
    for bad in ("int16", "bool", "complex64", np.dtype("float128") if hasattr(np, "float128") else "float128"):
        with pytest.raises(UsageTypeError, match="has no NCCL type") as e:
            nccl_dtype(bad)
        assert e.value.argument == "dtype"
    torch = pytest.importorskip("torch")
    assert [nccl_dtype(t) for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8,
                                    torch.uint8, torch.int32, torch.int64)] == [6, 9, 7, 8, 0, 1, 2, 4]
    with pytest.raises(UsageTypeError):
        nccl_dtype(torch.int16)


def test_ops():
    assert [nccl_op(o) for o in ("sum", "prod", "min", "max", "avg")] == [0, 1, 3, 2, 4]
    for bad in ("band", "SUM", None, 0):
        with pytest.raises(UsageError, match="has no NCCL reduction") as e:
            nccl_op(bad)
        assert e.value.argument == "op"


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=128, max_size=128))
def test_unique_id_bytes_round_trip(data):
    uid = UniqueId.from_bytes(data)
    assert uid.to_bytes() == data and bytes(uid) == data  # NUL bytes included (.internal would cut them)
    assert UniqueId.from_bytes(bytearray(uid.to_bytes())).to_bytes() == data


def test_unique_id_refuses_wrong_sizes_and_types():
    for n in (0, 127, 129):
        with pytest.raises(UsageError, match=f"must be 128 bytes, got {n}"):
            UniqueId.from_bytes(b"x" * n)
    with pytest.raises(UsageTypeError, match="must be bytes, got str"):
        UniqueId.from_bytes("x" * 128)


# ---------------------------------------------------------------------------- finding the library
def _one_line_unavailable(match: str) -> str:
    with pytest.raises(NcclUnavailable) as e:
        binding.open_library()
    text = str(e.value)
    assert "\n" not in text and isinstance(e.value, CollectiveError)
    assert match in text, text
    return text


def test_no_library_says_install_the_gpu_extra(monkeypatch):
    monkeypatch.delenv(binding.ENV_LIBRARY, raising=False)
    monkeypatch.setattr(binding, "wheel_library", lambda: None)
    monkeypatch.setattr(binding, "SONAME", "libnccl-collcomm-test-absent.so.2")
    text = _one_line_unavailable("install the gpu extra: pip install 'collcomm[gpu]'")
    assert text.startswith("no NCCL library")


def test_configured_path_that_is_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv(binding.ENV_LIBRARY, str(tmp_path / "libnccl.so.2"))
    assert _one_line_unavailable("no such file") == f"COLLCOMM_NCCL_LIBRARY={tmp_path / 'libnccl.so.2'}: no such file"


def test_configured_library_that_is_not_nccl(monkeypatch, tmp_path):
    libc = _mapped("libc")
    monkeypatch.setenv(binding.ENV_LIBRARY, libc)
    assert _one_line_unavailable("is not an NCCL library") == (
        f"COLLCOMM_NCCL_LIBRARY: {libc} is not an NCCL library (it has no ncclGetVersion)")
    text_file = tmp_path / "libnccl.so.2"
    text_file.write_text("not a shared object\n")
    monkeypatch.setenv(binding.ENV_LIBRARY, str(text_file))
    _one_line_unavailable(f"COLLCOMM_NCCL_LIBRARY: cannot load {text_file}")


def test_the_wheel_is_found_through_importlib(tmp_path):
    """A directory laid out like the nvidia-nccl-cu12 wheel on PYTHONPATH (its libnccl.so.2 a copy of
    libm): found without COLLCOMM_NCCL_LIBRARY, and refused as not NCCL."""
    fake = tmp_path / "nvidia" / "nccl" / "lib" / "libnccl.so.2"
    fake.parent.mkdir(parents=True)
    shutil.copy(_mapped("libm"), fake)
    code = ("from collcomm.transport.nccl import binding, library\n"
            "print(binding.wheel_library())\n"
            "try:\n    library()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = _python(code, _env(PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(fake), f"NcclUnavailable the nvidia-nccl wheel: {fake} is not an NCCL "
                                                  f"library (it has no ncclGetVersion)"]


def test_importing_the_package_loads_no_library(tmp_path):
    """``import collcomm.transport.nccl`` (and collcomm, and the buffers that call require_gpu) maps
    no libnccl; the first library() call does (so the check below can see one)."""
    fake = tmp_path / "libnccl.so.2"
    shutil.copy(_mapped("libm"), fake)
    code = ("import collcomm, collcomm.transport.nccl, collcomm.runtime.buffers\n"
            "def mapped():\n    return any('libnccl' in l for l in open('/proc/self/maps'))\n"
            "print(mapped())\n"
            "try:\n    collcomm.transport.nccl.library()\nexcept collcomm.NcclUnavailable:\n    pass\n"
            "print(mapped())\n")
    out = _python(code, _env(COLLCOMM_NCCL_LIBRARY=str(fake)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


# ---------------------------------------------------------------------------- the binding's plumbing
STUB_NCCL = r"""
#include <stddef.h>
typedef struct { char internal[128]; } uid_t_;
static long last[8];
void stub_last(long *out) { for (int i = 0; i < 8; i++) out[i] = last[i]; }
int ncclGetVersion(int *v) { *v = 22703; return 0; }
const char *ncclGetErrorString(int r) { return r == 4 ? "invalid argument (stub)" : "stub"; }
int ncclGetUniqueId(uid_t_ *u) { for (int i = 0; i < 128; i++) u->internal[i] = (char)(i * 7); return 0; }
int ncclCommInitRank(void **c, int n, uid_t_ id, int r) {
  if (n < 1 || r < 0 || r >= n) return 4;
  *c = (void *)(long)(1000 + (unsigned char)id.internal[5] + 256 * (unsigned char)id.internal[127]); return 0; }
int ncclCommDestroy(void *c) { last[0] = (long)c; return 0; }
int ncclCommAbort(void *c) { last[0] = -(long)c; return 0; }
int ncclCommGetAsyncError(void *c, int *e) { *e = 6; return 0; }
int ncclCommSplit(void *c, int color, int key, void **nc, void *cfg) {
  *nc = color < 0 ? 0 : (void *)(long)(color * 100 + key); return cfg ? 5 : 0; }
int ncclGroupStart(void) { last[7] += 1; return 0; }
int ncclGroupEnd(void) { last[7] -= 1; return 0; }
static int p2p(const void *b, size_t n, int dt, int peer, void *c, void *s) {
  last[0] = (long)b; last[1] = (long)n; last[2] = dt; last[3] = peer; last[4] = (long)c; last[5] = (long)s;
  return peer < 0 ? 4 : 0; }
int ncclSend(const void *b, size_t n, int dt, int peer, void *c, void *s) { return p2p(b, n, dt, peer, c, s); }
int ncclRecv(void *b, size_t n, int dt, int peer, void *c, void *s) { p2p(b, n, dt, peer, c, s); return 3; }
int ncclAllReduce(const void *a, void *b, size_t n, int dt, int op, void *c, void *s) {
  last[0] = (long)a; last[1] = (long)b; last[2] = (long)n; last[3] = dt; last[4] = op; last[5] = (long)c;
  last[6] = (long)s; return 0; }
int ncclBroadcast(const void *a, void *b, size_t n, int dt, int root, void *c, void *s) {
  return ncclAllReduce(a, b, n, dt, root, c, s); }
#ifdef WITH_SHRINK
int ncclCommShrink(void *c, int *ex, int n, void **nc, void *cfg, int flags) {
  long sum = 0; for (int i = 0; i < n; i++) sum += ex[i];
  *nc = (void *)(sum * 10 + flags + 1); return 0; }
#endif
"""

STUB_CUDA = r"""
int cuInit(unsigned flags) { return INIT; }
int cuDeviceGetCount(int *n) { *n = COUNT; return 0; }
int cuGetErrorName(int e, const char **s) { *s = e == 100 ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_OTHER"; return 0; }
"""


def _compile(tmp: Path, name: str, source: str, *defines: str) -> Path:
    src, out = tmp / (name + ".c"), tmp / name
    src.write_text(source)
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(out), str(src), *defines], check=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    if CC is None:
        pytest.skip("needs a C compiler to build the stand-in libnccl/libcuda")
    tmp = tmp_path_factory.mktemp("nccl-stubs")
    made = {"nccl": _compile(tmp, "libnccl-stub.so.2", STUB_NCCL),
            "nccl_shrink": _compile(tmp, "libnccl-shrink.so.2", STUB_NCCL, "-DWITH_SHRINK")}
    for name, init, count in (("no_device", 100, 0), ("zero", 0, 0), ("one", 0, 1)):
        (tmp / name).mkdir()
        made[name] = _compile(tmp / name, "libcuda.so.1", STUB_CUDA, f"-DINIT={init}", f"-DCOUNT={count}").parent
    return made


def _stub_library(path: Path) -> binding.NcclLibrary:
    return binding.NcclLibrary(ctypes.CDLL(str(path)), str(path), "COLLCOMM_NCCL_LIBRARY")


def test_binding_marshals_every_call(stubs):
    lib = _stub_library(stubs["nccl"])
    last = (ctypes.c_long * 8)()
    read = lambda: (lib._lib.stub_last(last), list(last))[1]  # noqa: E731
    assert lib.version() == (2, 27, 3) and lib.has_shrink is False
    uid = lib.get_unique_id()
    assert uid.to_bytes() == bytes((i * 7) % 256 for i in range(128))
    comm = lib.comm_init_rank(1, UniqueId.from_bytes(uid.to_bytes()), 0)  # the struct goes by value
    assert comm.value == 1000 + 35 + 256 * ((127 * 7) % 256)
    with pytest.raises(NcclError) as e:
        lib.comm_init_rank(2, uid, 5)
    assert (e.value.code, e.value.name, e.value.text) == (4, "ncclInvalidArgument", "invalid argument (stub)")
    assert str(e.value) == "ncclCommInitRank: ncclInvalidArgument (4): invalid argument (stub)"
    big = (1 << 40) + 3  # size_t, not int
    lib.all_reduce(0x1000, 0x2000, big, nccl_dtype("bfloat16"), nccl_op("avg"), comm, 0x77)
    assert read()[:7] == [0x1000, 0x2000, big, 9, 4, comm.value, 0x77]
    lib.broadcast(0x1000, 0x1000, 5, nccl_dtype("float64"), 3, comm, 0)
    assert read()[:7] == [0x1000, 0x1000, 5, 8, 3, comm.value, 0]
    lib.group_start()
    lib.send(0x3000, 12, nccl_dtype("int64"), 2, comm, 0x55)
    assert read()[:6] == [0x3000, 12, 4, 2, comm.value, 0x55] and read()[7] == 1
    with pytest.raises(NcclError, match=r"ncclRecv: ncclInternalError \(3\)"):
        lib.recv(0x3000, 12, 4, 2, comm, 0)
    lib.group_end()
    assert read()[7] == 0
    assert lib.comm_get_async_error(comm) == 6
    assert lib.comm_split(comm, 2, 7).value == 207 and lib.comm_split(comm, -1, 0).value is None
    lib.comm_abort(comm)
    assert read()[0] == -comm.value
    lib.comm_destroy(comm)
    assert read()[0] == comm.value
    with pytest.raises(NcclUnavailable, match=r"ncclCommShrink: NCCL 2\.27\.3 at .* has none"):
        lib.comm_shrink(comm, [1])
    shrinking = _stub_library(stubs["nccl_shrink"])
    assert shrinking.has_shrink and shrinking.comm_shrink(comm, [1, 3], binding.SHRINK_ABORT).value == 42


def _gpu_probe(stubs, cuda: str, code: str) -> subprocess.CompletedProcess:
    env = _env(COLLCOMM_NCCL_LIBRARY=str(stubs["nccl"]), LD_LIBRARY_PATH=str(stubs[cuda]))
    return _python(code, env)


@pytest.mark.parametrize("cuda, expected", [
    ("no_device", "the CUDA driver cannot start: cuInit: CUDA_ERROR_NO_DEVICE (100); NCCL 2.27.3 was found "
                  "(COLLCOMM_NCCL_LIBRARY: {nccl})"),
    ("zero", "no GPU (the CUDA driver sees 0 devices); NCCL 2.27.3 was found (COLLCOMM_NCCL_LIBRARY: {nccl})"),
    ("one", "None"),
])
def test_what_is_missing_with_nccl_but_no_gpu(stubs, cuda, expected):
    out = _gpu_probe(stubs, cuda, "from collcomm.transport.nccl import gpu_problem; print(gpu_problem())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected.format(nccl=stubs["nccl"])


def test_a_library_that_is_not_the_driver(stubs, tmp_path):
    shutil.copy(_mapped("libm"), tmp_path / "libcuda.so.1")
    out = _python("from collcomm.transport.nccl import gpu_problem; print(gpu_problem())",
                  _env(COLLCOMM_NCCL_LIBRARY=str(stubs["nccl"]), LD_LIBRARY_PATH=str(tmp_path)))
    assert out.stdout.startswith("libcuda.so.1 is not a CUDA driver (no cuInit); NCCL 2.27.3 was found"), out.stderr


# ---------------------------------------------------------------------------- the surfaces
def test_require_gpu_is_one_line_naming_what_is_missing():
    problem = gpu_problem()
    if problem is None:
        pytest.skip("a GPU, its driver and NCCL are all here: nothing is missing")
    with pytest.raises(NcclUnavailable) as e:
        require_gpu("allreduce: x is on cuda:0")
    assert str(e.value) == f"allreduce: x is on cuda:0: {problem}" and "\n" not in str(e.value)
    assert any(s in problem for s in ("install the gpu extra", "CUDA driver", "no GPU")), problem


def test_a_cuda_tensor_reaching_as_buffer():
    """A torch tensor whose device says cuda (a subclass: a real one cannot be made without a GPU)
    takes the path a CUDA tensor takes in as_buffer: NcclUnavailable naming what is missing."""
    torch = pytest.importorskip("torch")
    problem = gpu_problem()
    if problem is None:
        pytest.skip("a GPU is here: a real CUDA tensor is tested below")
    from collcomm.runtime.buffers import as_buffer

    class CudaLooking(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    with pytest.raises(NcclUnavailable) as e:
        as_buffer(torch.zeros(4).as_subclass(CudaLooking), "allreduce: x")
    assert str(e.value) == f"allreduce: x is on cuda:0: {problem}"


def test_perf_device_cuda_exits_2_with_one_line():
    out = subprocess.run([sys.executable, "-m", "collcomm.perf", "allreduce", "--device", "cuda", "-b", "1K",
                          "-e", "1K"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("collcomm-perf: error: --device cuda: "), out.stderr
    problem = gpu_problem()
    assert lines[0].endswith(problem if problem else "collcomm-perf has no GPU sweep yet (NCCL and a GPU were found)")


def test_perf_device_cuda_with_nccl_and_no_device(stubs):
    out = subprocess.run([sys.executable, "-m", "collcomm.perf", "--device", "cuda"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env=_env(COLLCOMM_NCCL_LIBRARY=str(stubs["nccl"]),
                                                         LD_LIBRARY_PATH=str(stubs["zero"])))
    assert out.returncode == 2
    assert out.stderr == (f"collcomm-perf: error: --device cuda: no GPU (the CUDA driver sees 0 devices); NCCL 2.27.3 "
                          f"was found (COLLCOMM_NCCL_LIBRARY: {stubs['nccl']})\n")


def test_perf_device_default_and_choices():
    from collcomm.perf.options import UsageError as PerfUsage
    from collcomm.perf.options import parse

    assert parse([]).device == "cpu" and parse(["--device", "cpu"]).device == "cpu"
    with pytest.raises(PerfUsage, match=r"argument --device: invalid choice: 'gpu'"):
        parse(["--device", "gpu"])


# ---------------------------------------------------------------------------- on a GPU
def _cuda_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


NO_GPU = gpu_problem() or (None if _cuda_torch() else "torch cannot see a CUDA device (a CPU build of torch?)")


@pytest.mark.skipif(NO_GPU is not None, reason=f"needs one GPU with its driver, NCCL and a CUDA torch: {NO_GPU}")
def test_one_rank_communicator_on_a_cuda_tensor():
    torch = _cuda_torch()
    torch.cuda.set_device(0)
    lib = binding.library()
    assert lib.version() >= (2, 21, 0)
    comm = lib.comm_init_rank(1, UniqueId.from_bytes(lib.get_unique_id().to_bytes()), 0)
    stream = torch.cuda.current_stream().cuda_stream
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            x = torch.arange(1 << 20, device="cuda").to(dtype)
            want = x.clone()
            out = torch.empty_like(x)
            for op in ("sum", "max") + (("avg",) if dtype.is_floating_point else ()):
                lib.all_reduce(x.data_ptr(), out.data_ptr(), x.numel(), nccl_dtype(dtype), nccl_op(op), comm, stream)
                torch.cuda.synchronize()
                assert torch.equal(out, want), (dtype, op)  # one rank: the reduction of x alone is x
            lib.all_reduce(x.data_ptr(), x.data_ptr(), x.numel(), nccl_dtype(dtype), nccl_op("sum"), comm, stream)
            lib.broadcast(x.data_ptr(), out.data_ptr(), x.numel(), nccl_dtype(dtype), 0, comm, stream)
            torch.cuda.synchronize()
            assert torch.equal(x, want) and torch.equal(out, want)
        child = lib.comm_split(comm, 0, 0)
        y = torch.ones(1000, device="cuda")
        lib.all_reduce(y.data_ptr(), y.data_ptr(), y.numel(), nccl_dtype(y.dtype), nccl_op("prod"), child, stream)
        torch.cuda.synchronize()
        assert torch.equal(y, torch.ones_like(y)) and lib.comm_get_async_error(child) == 0
        lib.comm_destroy(child)
    finally:
        lib.comm_destroy(comm)
