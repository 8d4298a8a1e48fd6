"""Sleeping on a word of shared memory: the Linux futex, through ctypes.

A waiter that has spun and yielded long enough sleeps in ``FUTEX_WAIT`` on its own word; a
publisher that sees it asleep changes the word and calls ``FUTEX_WAKE``. Shared (not
``FUTEX_PRIVATE``) futexes work across processes that map the same file. ctypes releases the
GIL around the call, so the process's other threads go on. Every wait has a timeout, so a
wake-up lost to a race costs at most that timeout, never a hang.

Where the syscall is not available (not Linux, an unknown architecture), :func:`wait` sleeps
for a short while instead, which is correct, only slower.
"""

from __future__ import annotations

import ctypes
import os
import platform
import time

_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine().lower())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


try:
    _syscall = ctypes.CDLL(None, use_errno=True).syscall if _SYS_FUTEX and os.name == "posix" else None
except (OSError, AttributeError):  # pragma: no cover - a libc without syscall()
    _syscall = None

AVAILABLE = _syscall is not None


def wait(address: int, expected: int, seconds: float) -> None:
    """Sleep while the 32-bit word at ``address`` holds ``expected``, at most ``seconds``
    (returns at once when it already differs; a signal or a spurious wake-up also returns)."""
    if _syscall is None:
        time.sleep(min(seconds, 0.0005))
        return
    ts = _Timespec(int(seconds), int((seconds - int(seconds)) * 1e9))
    _syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_int(_FUTEX_WAIT),
             ctypes.c_uint32(expected & 0xFFFFFFFF), ctypes.byref(ts), None, ctypes.c_int(0))


def wake(address: int, count: int = 1 << 30) -> None:
    """Wake up to ``count`` processes sleeping on the word at ``address``."""
    if _syscall is not None:
        _syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_int(_FUTEX_WAKE),
                 ctypes.c_int(count), None, None, ctypes.c_int(0))
