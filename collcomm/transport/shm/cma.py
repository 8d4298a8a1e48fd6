"""Reading and writing another process's memory in one copy: Linux cross-memory attach
(``process_vm_readv``, ``process_vm_writev``).

Shared memory costs two copies per byte moved (the writer's into its segment, the reader's out
of it). For large messages a member can instead read a peer's buffer directly, as Open MPI's
``vader`` transport does: the peer publishes the address of its buffer in its control page, and
the reader asks the kernel to copy from that address in the peer's process into its own buffer.
The kernel allows it when the reader may ptrace the peer (the same user, and no Yama
``ptrace_scope`` above 0); containers often forbid it (seccomp, no CAP_SYS_PTRACE). So the arena
tries it once when it forms (:func:`probe`), and every member keeps to the segments when any
member could not. (Open MPI also calls ``prctl(PR_SET_PTRACER, ANY)`` to get past Yama's scope
1; collcomm does not loosen the process's protection and keeps to the segments there.)

ctypes releases the GIL around the call.
"""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


try:
    _readv = ctypes.CDLL(None, use_errno=True).process_vm_readv
    _readv.restype = ctypes.c_ssize_t
    _readv.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec),
                       ctypes.c_ulong, ctypes.c_ulong]
except (OSError, AttributeError):  # not Linux, or a libc without it
    _readv = None

try:
    _writev = ctypes.CDLL(None, use_errno=True).process_vm_writev
    _writev.restype = ctypes.c_ssize_t
    _writev.argtypes = _readv.argtypes
except (OSError, AttributeError):
    _writev = None

AVAILABLE = _readv is not None and _writev is not None and os.name == "posix"


def address(array: np.ndarray) -> int:
    """The address of ``array``'s first byte in this process."""
    return array.__array_interface__["data"][0]


def read(pid: int, remote: int, out: np.ndarray) -> None:
    """Copy ``out.nbytes`` bytes from address ``remote`` in process ``pid`` into ``out`` (contiguous).
    OSError (with errno) when the kernel refuses or the process is gone (ESRCH)."""
    _move(_readv, "process_vm_readv from", pid, remote, out)


def write(pid: int, remote: int, src: np.ndarray) -> None:
    """Copy ``src`` (contiguous) to address ``remote`` in process ``pid``; errors as :func:`read`."""
    _move(_writev, "process_vm_writev to", pid, remote, src)


def _move(call, what: str, pid: int, remote: int, here: np.ndarray) -> None:
    if call is None:
        raise OSError(errno.ENOSYS, f"{what.split()[0]} is not available")
    total, done = here.nbytes, 0
    base = address(here)
    local, far = _Iovec(), _Iovec()
    while done < total:  # (the kernel may move less than asked: a partial transfer goes on)
        local.base, local.len = base + done, total - done
        far.base, far.len = remote + done, total - done
        got = call(pid, ctypes.byref(local), 1, ctypes.byref(far), 1, 0)
        if got <= 0:
            err = ctypes.get_errno() if got < 0 else errno.EFAULT
            raise OSError(err, f"{what} process {pid}: {os.strerror(err)}")
        done += got


def probe(pid: int, remote: int, expect: bytes) -> bool:
    """Whether this process may read process ``pid``'s memory: read ``len(expect)`` bytes at
    ``remote`` there and compare."""
    if not AVAILABLE:
        return False
    buf = np.zeros(len(expect), np.uint8)
    try:
        read(pid, remote, buf)
    except OSError:
        return False
    return buf.tobytes() == expect
