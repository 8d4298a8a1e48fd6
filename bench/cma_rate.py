"""How fast one process copies another's memory (cross-memory attach, what collcomm's direct reads
and writes on shared memory use) against ``np.copyto`` and the streamed copy
(collcomm.transport.shm.stream, non-temporal stores) in one process, by size; then 1 MiB pieces
out of a cached segment into a 64 MB result, as a shared-memory allgather copies them.

    python bench/cma_rate.py

The child is a fork that holds the same buffer; the parent reads it back with
``process_vm_readv`` (collcomm.transport.shm.cma.read) as often as ``np.copyto`` copies it.
"""

from __future__ import annotations

import os
import time

import numpy as np

from collcomm.transport.shm import cma, stream


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
        streamed = rate(lambda: stream.copy(dst, src), size, reps)
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
        print(f"{size >> 20:4d} MB: np.copyto {local:6.2f} GB/s, streamed {streamed:6.2f} GB/s, "
              f"process_vm_readv {far:6.2f} GB/s")
    piece, result = 1 << 20, np.empty(64 << 20, np.uint8)
    segment = np.ones(piece, np.uint8)

    def pieces(copy):
        for at in range(0, result.size, piece):
            copy(result[at:at + piece], segment)

    for name, copy in (("np.copyto", np.copyto), ("streamed", stream.copy)):
        print(f"1 MiB pieces into 64 MB, {name}: {rate(lambda: pieces(copy), result.size, 8):6.2f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
