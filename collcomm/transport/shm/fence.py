"""A full memory fence (x86-64 ``mfence``) callable from Python.

The step protocol needs one ordering that x86-64 does not give for free: a store followed by a
load of another word (a publisher stores its step and then reads whether peers sleep; a waiter
stores "asleep" and then reads the steps). Without a fence both may read the old value and a
wake-up is lost (the waiter then sleeps until its futex timeout). Python has no atomics, so the
four bytes ``mfence; ret`` are placed in an executable page and called through ctypes (about
0.2 us). Where such a page cannot be made (a hardened kernel), :data:`fence` is None and the
protocol falls back to waking every sleeper at every step.
"""

from __future__ import annotations

import ctypes
import mmap

from collcomm.transport.shm.arena_support import X86_64

_CODE = b"\x0f\xae\xf0\xc3"  # mfence; ret


def _make():
    if not X86_64:
        return None, None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):
        return None, None
    page.write(_CODE)
    holder = ctypes.c_char.from_buffer(page)
    return ctypes.CFUNCTYPE(None)(ctypes.addressof(holder)), (page, holder)


fence, _keep = _make()  # _keep: the page stays mapped as long as the function exists
