"""A thin ctypes binding of libnccl: where the library is, one table of the functions collcomm calls,
NCCL's enum numbers, the 128-byte unique id, and NCCL's result codes as :class:`NcclError`.

Nothing is loaded at import: :func:`library` opens libnccl on first use (and keeps it). Where it
looks, first found wins:

1. ``COLLCOMM_NCCL_LIBRARY``: a path to ``libnccl.so*`` (a wrong path is an error, not a fallback);
2. the ``nvidia-nccl-cu12`` / ``nvidia-nccl-cu13`` wheel (the ``gpu`` extra): ``nvidia/nccl/lib/libnccl.so.2``
   found through importlib's view of the ``nvidia`` namespace package (torch is not imported);
3. ``libnccl.so.2`` through the dynamic loader (a system NCCL).

Every call returns NCCL's ``ncclResult_t``; anything but ncclSuccess is raised as NcclError with
the code, its name and ``ncclGetErrorString``'s text. The numbers below are NCCL's ABI, copied from
NVIDIA/nccl ``src/nccl.h.in`` (2.32; unchanged since 2.10 added bfloat16 and avg) and pinned by
``tests/test_nccl_binding.py``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from pathlib import Path

from collcomm.errors import CollectiveError, NcclUnavailable, UsageError, UsageTypeError

ENV_LIBRARY = "COLLCOMM_NCCL_LIBRARY"
SONAME = "libnccl.so.2"
INSTALL_HINT = "install the gpu extra: pip install 'collcomm[gpu]'"

# nccl.h: #define NCCL_UNIQUE_ID_BYTES 128; typedef struct { char internal[128]; } ncclUniqueId;
UNIQUE_ID_BYTES = 128

# nccl.h: typedef enum { ncclSuccess = 0, ... ncclTimeout = 8 } ncclResult_t;
RESULTS = {0: "ncclSuccess", 1: "ncclUnhandledCudaError", 2: "ncclSystemError", 3: "ncclInternalError",
           4: "ncclInvalidArgument", 5: "ncclInvalidUsage", 6: "ncclRemoteError", 7: "ncclInProgress",
           8: "ncclTimeout"}
SUCCESS, IN_PROGRESS = 0, 7

# nccl.h: ncclDataType_t. NCCL has no 16-bit integers (collcomm's int16 has no NCCL type).
DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6, "float32": 7,
          "float64": 8, "bfloat16": 9}
# torch's and C's other names of the same types ("torch.half" prints as "torch.float16" anyway)
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "double": "float64", "char": "int8", "int": "int32"}

# nccl.h: ncclRedOp_t (ncclSum 0, ncclProd 1, ncclMax 2, ncclMin 3, ncclAvg 4). collcomm's bitwise
# reductions (band, bor, bxor) have no NCCL op.
OPS = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}

# nccl.h: ncclCommShrink's flags.
SHRINK_DEFAULT, SHRINK_ABORT = 0x00, 0x01


class NcclError(CollectiveError):
    """An NCCL call returned an error: ``code`` is its ncclResult_t, ``name`` the enum's name and
    ``text`` what ncclGetErrorString says of it."""

    def __init__(self, message: str, code: int | None = None, text: str = ""):
        super().__init__(message)
        self.code = code
        self.name = RESULTS.get(code, f"ncclResult {code}") if code is not None else ""
        self.text = text


class UniqueId(ctypes.Structure):
    """``ncclUniqueId``: 128 opaque bytes made by one rank and handed to every other (through the
    coordinator), passed by value to ncclCommInitRank."""

    _fields_ = [("internal", ctypes.c_char * UNIQUE_ID_BYTES)]

    def to_bytes(self) -> bytes:
        return bytes(memoryview(self).cast("B"))  # (.internal would stop at the first NUL)

    @classmethod
    def from_bytes(cls, data: bytes) -> "UniqueId":
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UsageTypeError(f"NCCL unique id must be bytes, got {type(data).__name__}", "unique_id")
        if len(data) != UNIQUE_ID_BYTES:
            raise UsageError(f"NCCL unique id must be {UNIQUE_ID_BYTES} bytes, got {len(data)}", "unique_id")
        return cls.from_buffer_copy(bytes(data))


def nccl_dtype(dtype) -> int:
    """NCCL's ncclDataType_t for a dtype given as a name ("float32", "half"), a NumPy dtype or a torch
    dtype (``torch.bfloat16``); UsageTypeError for a type NCCL has not."""
    name = str(dtype).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise UsageTypeError(f"dtype {str(dtype)[:40]!r} has no NCCL type; NCCL takes {', '.join(DTYPES)}", "dtype")
    return DTYPES[name]


def nccl_op(op: str) -> int:
    """NCCL's ncclRedOp_t for one of collcomm's reductions; UsageError for one NCCL has not."""
    if type(op) is not str or op not in OPS:
        raise UsageError(f"op: {str(op)[:40]!r} has no NCCL reduction; NCCL takes {', '.join(OPS)}", "op")
    return OPS[op]


# ---------------------------------------------------------------------------- the function table
_RESULT = ctypes.c_int      # ncclResult_t
_COMM = ctypes.c_void_p     # ncclComm_t
_STREAM = ctypes.c_void_p   # cudaStream_t (0: the legacy default stream)
_P = ctypes.POINTER

# (name, restype, argtypes, required): the signatures of nccl.h. ncclCommShrink came with 2.27;
# the rest is in every NCCL since 2.18 (ncclCommSplit's release).
FUNCTIONS = [
    ("ncclGetVersion", _RESULT, [_P(ctypes.c_int)], True),
    ("ncclGetErrorString", ctypes.c_char_p, [_RESULT], True),
    ("ncclGetUniqueId", _RESULT, [_P(UniqueId)], True),
    ("ncclCommInitRank", _RESULT, [_P(_COMM), ctypes.c_int, UniqueId, ctypes.c_int], True),
    ("ncclCommDestroy", _RESULT, [_COMM], True),
    ("ncclCommAbort", _RESULT, [_COMM], True),
    ("ncclCommGetAsyncError", _RESULT, [_COMM, _P(_RESULT)], True),
    ("ncclCommSplit", _RESULT, [_COMM, ctypes.c_int, ctypes.c_int, _P(_COMM), ctypes.c_void_p], True),
    ("ncclCommShrink", _RESULT, [_COMM, _P(ctypes.c_int), ctypes.c_int, _P(_COMM), ctypes.c_void_p, ctypes.c_int],
     False),
    ("ncclGroupStart", _RESULT, [], True),
    ("ncclGroupEnd", _RESULT, [], True),
    ("ncclSend", _RESULT, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, _COMM, _STREAM], True),
    ("ncclRecv", _RESULT, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, _COMM, _STREAM], True),
    ("ncclAllReduce", _RESULT,
     [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, _COMM, _STREAM], True),
    ("ncclBroadcast", _RESULT,
     [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, _COMM, _STREAM], True),
]


class NcclLibrary:
    """One loaded libnccl: its functions, checked. ``comm`` arguments and results are ncclComm_t
    handles (ctypes.c_void_p); buffers and streams are device addresses as ints (``tensor.data_ptr()``,
    ``stream.cuda_stream``)."""

    def __init__(self, lib: ctypes.CDLL, path: str, where: str):
        self._lib = lib
        self.path = path
        self.where = where  # how it was found: "COLLCOMM_NCCL_LIBRARY", "the nvidia-nccl wheel", "the dynamic loader"
        self._fn = {}
        for name, restype, argtypes, required in FUNCTIONS:
            try:
                fn = getattr(self._lib, name)
            except AttributeError:
                if required:
                    raise NcclUnavailable(f"{where}: {path[:200]} is not an NCCL library (it has no {name})") from None
                continue
            fn.restype, fn.argtypes = restype, argtypes
            self._fn[name] = fn
        self.has_shrink = "ncclCommShrink" in self._fn

    # ------------------------------------------------------------------ errors and versions
    def error_string(self, code: int) -> str:
        text = self._fn["ncclGetErrorString"](code)
        return text.decode(errors="replace") if text else ""

    def check(self, code: int, what: str) -> int:
        """``code`` when it is ncclSuccess or ncclInProgress (a non-blocking communicator's), else NcclError."""
        if code in (SUCCESS, IN_PROGRESS):
            return code
        text = self.error_string(code)
        raise NcclError(f"{what}: {RESULTS.get(code, f'ncclResult {code}')} ({code}): {text}", code, text)

    def _call(self, name: str, *args) -> int:
        return self.check(self._fn[name](*args), name)

    def version(self) -> tuple[int, int, int]:
        """(major, minor, patch): NCCL_VERSION_CODE decoded (2.8 and older: X*1000+Y*100+Z)."""
        code = ctypes.c_int()
        self._call("ncclGetVersion", ctypes.byref(code))
        v = code.value
        return (v // 10000, v // 100 % 100, v % 100) if v >= 10000 else (v // 1000, v // 100 % 10, v % 100)

    # ------------------------------------------------------------------ communicators
    def get_unique_id(self) -> UniqueId:
        uid = UniqueId()
        self._call("ncclGetUniqueId", ctypes.byref(uid))
        return uid

    def comm_init_rank(self, nranks: int, unique_id: UniqueId, rank: int) -> ctypes.c_void_p:
        """A communicator of ``nranks`` on the current CUDA device; blocks until every rank joined."""
        comm = _COMM()
        self._call("ncclCommInitRank", ctypes.byref(comm), nranks, unique_id, rank)
        return comm

    def comm_destroy(self, comm) -> None:
        self._call("ncclCommDestroy", comm)

    def comm_abort(self, comm) -> None:
        self._call("ncclCommAbort", comm)

    def comm_get_async_error(self, comm) -> int:
        """The communicator's asynchronous state (ncclSuccess, ncclInProgress or the error), unraised."""
        state = _RESULT()
        self._call("ncclCommGetAsyncError", comm, ctypes.byref(state))
        return state.value

    def comm_split(self, comm, color: int, key: int) -> ctypes.c_void_p:
        """ncclCommSplit with the parent's configuration; a NULL handle for ``color`` -1 (NCCL_SPLIT_NOCOLOR)."""
        new = _COMM()
        self._call("ncclCommSplit", comm, color, key, ctypes.byref(new), None)
        return new

    def comm_shrink(self, comm, exclude: list[int], flags: int = SHRINK_DEFAULT) -> ctypes.c_void_p:
        """ncclCommShrink (NCCL 2.27+; see ``has_shrink``) without the ranks in ``exclude``."""
        if not self.has_shrink:
            version = ".".join(map(str, self.version()))
            raise NcclUnavailable(f"ncclCommShrink: NCCL {version} at {self.path} has none (it came with 2.27)")
        ranks = (ctypes.c_int * len(exclude))(*exclude)
        new = _COMM()
        self._call("ncclCommShrink", comm, ranks, len(exclude), ctypes.byref(new), None, flags)
        return new

    # ------------------------------------------------------------------ operations (enqueued on a stream)
    def group_start(self) -> None:
        self._call("ncclGroupStart")

    def group_end(self) -> None:
        self._call("ncclGroupEnd")

    def send(self, buf: int, count: int, dtype: int, peer: int, comm, stream: int) -> None:
        self._call("ncclSend", buf, count, dtype, peer, comm, stream)

    def recv(self, buf: int, count: int, dtype: int, peer: int, comm, stream: int) -> None:
        self._call("ncclRecv", buf, count, dtype, peer, comm, stream)

    def all_reduce(self, send: int, recv: int, count: int, dtype: int, op: int, comm, stream: int) -> None:
        self._call("ncclAllReduce", send, recv, count, dtype, op, comm, stream)

    def broadcast(self, send: int, recv: int, count: int, dtype: int, root: int, comm, stream: int) -> None:
        self._call("ncclBroadcast", send, recv, count, dtype, root, comm, stream)


# ---------------------------------------------------------------------------- finding and loading
def wheel_library() -> str | None:
    """``libnccl.so.2`` of an installed nvidia-nccl-cu12/-cu13 wheel, or None. importlib reads the
    ``nvidia`` namespace package's directories without running any code of it."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        # cu12 and cu13 wheels: nvidia/nccl/lib (a cu13 layout of nvidia/cu13/lib is looked at too)
        for sub in ("nccl/lib", "cu13/lib"):
            candidate = Path(root) / sub / SONAME
            if candidate.is_file():
                return str(candidate)
    return None


def locate() -> tuple[str, str]:
    """(path or soname, how it was found) of the library :func:`library` would load; NcclUnavailable
    when COLLCOMM_NCCL_LIBRARY names no file."""
    configured = os.environ.get(ENV_LIBRARY)
    if configured:
        if not Path(configured).is_file():
            raise NcclUnavailable(f"{ENV_LIBRARY}={configured[:200]}: no such file")
        return configured, ENV_LIBRARY
    wheel = wheel_library()
    if wheel is not None:
        return wheel, "the nvidia-nccl wheel"
    return SONAME, "the dynamic loader"


def open_library() -> NcclLibrary:
    """Load libnccl afresh (no cache): NcclUnavailable, one line, when there is none or it is not NCCL."""
    path, where = locate()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        if path == SONAME:
            raise NcclUnavailable(f"no NCCL library (no {ENV_LIBRARY}, no nvidia-nccl-cu12/-cu13 wheel, no "
                                  f"{SONAME} on the loader's path); {INSTALL_HINT}") from None
        raise NcclUnavailable(f"{where}: cannot load {path[:200]}: {' '.join(str(e).split())[:300]}") from None
    return NcclLibrary(lib, path, where)


_loaded: NcclLibrary | None = None
_lock = threading.Lock()


def library() -> NcclLibrary:
    """The process's libnccl, loaded on the first call and kept (a failure is not kept: it is tried
    again next time)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = open_library()
        return _loaded
