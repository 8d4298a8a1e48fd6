"""Whether the GPU path can run here, and the one line that says why not.

Three things are needed, looked at in this order so that the message names the first that is
missing: an NCCL library (:func:`collcomm.transport.nccl.binding.library`), the CUDA driver
(``libcuda.so.1``, which ``cuInit`` must accept) and at least one GPU (``cuDeviceGetCount``). The
driver is asked directly through ctypes, not through torch or CuPy: neither is needed to know, and
importing torch costs seconds.
"""

from __future__ import annotations

import ctypes
import threading

from collcomm.errors import NcclUnavailable
from collcomm.transport.nccl.binding import library

DRIVER = "libcuda.so.1"

_usable = False  # set once everything was found: a GPU does not come and go while a process runs
_lock = threading.Lock()


def _driver_problem() -> str | None:
    """What the CUDA driver lacks (no library, cuInit refused, no device), or None."""
    try:
        cuda = ctypes.CDLL(DRIVER)
    except OSError:
        return f"no CUDA driver ({DRIVER} not found: is the NVIDIA driver installed?)"
    try:
        init, count_devices = cuda.cuInit, cuda.cuDeviceGetCount
    except AttributeError:
        return f"{DRIVER} is not a CUDA driver (no cuInit)"
    init.argtypes, init.restype = [ctypes.c_uint], ctypes.c_int
    code = init(0)
    if code != 0:  # 100 CUDA_ERROR_NO_DEVICE, 34 CUDA_ERROR_STUB_LIBRARY, 35 driver older than the runtime, ...
        return f"the CUDA driver cannot start: cuInit: {_cuda_error(cuda, code)}"
    count = ctypes.c_int()
    count_devices.argtypes, count_devices.restype = [ctypes.POINTER(ctypes.c_int)], ctypes.c_int
    code = count_devices(ctypes.byref(count))
    if code != 0:
        return f"the CUDA driver cannot count GPUs: cuDeviceGetCount: {_cuda_error(cuda, code)}"
    if count.value < 1:
        return "no GPU (the CUDA driver sees 0 devices)"
    return None


def _cuda_error(cuda: ctypes.CDLL, code: int) -> str:
    name = ctypes.c_char_p()
    try:
        get_name = cuda.cuGetErrorName
        get_name.argtypes, get_name.restype = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)], ctypes.c_int
        if get_name(code, ctypes.byref(name)) == 0 and name.value:
            return f"{name.value.decode(errors='replace')} ({code})"
    except AttributeError:
        pass
    return f"CUresult {code}"


def gpu_problem() -> str | None:
    """None when NCCL, the CUDA driver and a GPU are all here; else one line naming the first missing."""
    global _usable
    with _lock:
        if _usable:
            return None
        try:
            nccl = library()
        except NcclUnavailable as e:
            return str(e)
        problem = _driver_problem()
        if problem is not None:
            version = ".".join(map(str, nccl.version()))
            return f"{problem}; NCCL {version} was found ({nccl.where}: {nccl.path})"
        _usable = True
        return None


def require_gpu(what: str) -> None:
    """Raise NcclUnavailable, "``what``: <what is missing>", unless the GPU path can run here."""
    problem = gpu_problem()
    if problem is not None:
        raise NcclUnavailable(f"{what}: {problem}")
