"""How fast one process copies another's memory (cross-memory attach, what collcomm's direct reads
and writes on shared memory use) against ``np.copyto`` in one process, by size.

    python bench/cma_rate.py

The child is a fork that holds the same buffer; the parent reads it back with
``process_vm_readv`` (collcomm.transport.shm.cma.read) as often as ``np.copyto`` copies it.
"""

from __future__ import annotations

import os
import time

import numpy as np

from collcomm.transport.shm import cma


def rate(copy, size: int, reps: int) -> float:
    copy()
    t = time.perf_counter()
    for _ in range(reps):
        copy()
    return size * reps / (time.perf_counter() - t) / 1e9


def main() -> int:
    for size in (1 << 20, 4 << 20, 64 << 20):
        src, dst = np.ones(size, np.uint8), np.empty(size, np.uint8)
        reps = max(3, (256 << 20) // size)
        local = rate(lambda: np.copyto(dst, src), size, reps)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the peer: holds the buffer until killed
            os.write(w, b"x")
            time.sleep(60)
            os._exit(0)
        os.read(r, 1)
        try:
            far = rate(lambda: cma.read(pid, cma.address(src), dst), size, reps)
        finally:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        print(f"{size >> 20:4d} MB: np.copyto {local:6.2f} GB/s, process_vm_readv {far:6.2f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
