"""The copy with non-temporal stores (collcomm/transport/shm/stream.py and _stream.c): every
byte lands, at any alignment and length, against NumPy's copy; overlap and size errors are
refused; the fallback is the same copy."""

from __future__ import annotations

import platform
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from collcomm.transport.shm import stream

X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def test_the_extension_is_built_where_a_compiler_is():
    """The optional extension may be missing only where the install could not build it: no C
    compiler, or no Python headers."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not X86_64 or shutil.which(cc) is None or not headers.exists():
        pytest.skip(f"no x86-64, no C compiler ({cc}) or no {headers}: the copies are np.copyto here")
    assert stream.AVAILABLE, "the install did not build collcomm.transport.shm._stream"


@settings(max_examples=300, deadline=None)
@given(length=st.integers(0, 5000), dst_at=st.integers(0, 130), src_at=st.integers(0, 130),
       seed=st.integers(0, 2**32 - 1))
def test_every_byte_lands_at_any_alignment_and_length(length, dst_at, src_at, seed):
    """Heads before the first whole line of the destination, whole lines, tails: none lost,
    and nothing written around the destination."""
    rng = np.random.default_rng(seed)
    src_mem = rng.integers(0, 256, src_at + length + 64, np.uint8)
    dst_mem = rng.integers(0, 256, dst_at + length + 64, np.uint8)
    expect = dst_mem.copy()
    expect[dst_at:dst_at + length] = src_mem[src_at:src_at + length]
    stream.copy(dst_mem[dst_at:dst_at + length], src_mem[src_at:src_at + length])
    assert np.array_equal(dst_mem, expect)


def test_large_copies_of_every_dtype_match_numpy():
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64, np.int8, np.uint16, np.complex128):
        src = rng.integers(-100, 100, (3 << 20) + 5).astype(dtype)
        dst = np.zeros_like(src)
        stream.copy(dst[1:], src[:-1])
        assert np.array_equal(dst[1:], src[:-1]) and dst[0] == 0


def test_the_same_memory_is_left_as_it_is_and_overlap_is_refused():
    a = np.arange(4096, dtype=np.uint8)
    before = a.copy()
    stream.copy(a, a)  # an in-place call: nothing to do
    assert np.array_equal(a, before)
    if stream.AVAILABLE:
        with pytest.raises(ValueError, match="copy: dst and src overlap"):
            stream.copy(a[64:], a[:-64])
        with pytest.raises(ValueError, match="copy: dst has 10 bytes, src 12"):
            stream.copy(a[:10], a[100:112])
        with pytest.raises(ValueError, match="not C-contiguous"):
            stream.copy(np.zeros(4096, np.uint8)[::2], a[:2048])
        ro = np.zeros(16, np.uint8)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            stream.copy(ro, a[:16])
        assert np.array_equal(a, before)


def test_without_the_extension_the_copy_is_numpys(monkeypatch):
    monkeypatch.setattr(stream, "_copy", None)
    src = np.arange(1000, dtype=np.float64)
    dst = np.zeros_like(src)
    stream.copy(dst, src)
    assert np.array_equal(dst, src)
