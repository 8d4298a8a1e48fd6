"""Copies into large results with stores that bypass the cache (non-temporal stores).

A shared-memory collective copies every byte of its result out of a peer's segment (or its own
input) in segment-sized pieces. An ordinary store reads each destination line before writing it,
so when the result is larger than the cache every byte crosses the memory bus twice on the way
in; a non-temporal store writes whole lines without reading them. glibc's memcpy streams only
copies of a large share of the last-level cache, never pieces of a segment (bench/RESULTS.md: on
a 2-core EPYC VM, 1 MiB pieces out of the cache into a 64 MB buffer 16-19 GB/s with np.copyto,
24-26 with this; a 64 MB allgather 1.4-1.6x as fast). The segment the piece comes from stays in
the cache: only the result's stores stream. A result that stays in the cache is better written
through it, so the default size to stream from depends on the cache (local_settings.stream_bytes).

:func:`copy` is the compiled ``_stream`` extension where the install built it (an optional C
extension: without a compiler ``pip install`` goes on without it) and ``np.copyto`` elsewhere;
:data:`AVAILABLE` says which. The collectives stream only into results of at least
``COLLCOMM_SHM_STREAM_BYTES`` (collcomm/runtime/local_settings.py), which every member agrees on.
"""

from __future__ import annotations

import numpy as np

try:
    from collcomm.transport.shm._stream import STREAMS as _STREAMS
    from collcomm.transport.shm._stream import copy as _copy
except ImportError:  # not built (no compiler at install time)
    _copy, _STREAMS = None, 0

AVAILABLE = bool(_STREAMS)  # x86-64 with the extension built


def copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for C-contiguous arrays of the same dtype and shape that are the same
    memory (nothing to do) or do not overlap,
    the stores streamed past the cache where :data:`AVAILABLE`; visible to other processes once
    it returns (a fence follows the streamed stores)."""
    if _copy is None:
        np.copyto(dst, src)
    else:
        _copy(dst, src)
