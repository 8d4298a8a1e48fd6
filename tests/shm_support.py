"""What the shared-memory tests ask of the machine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from collcomm.transport.shm import cma


def cma_allowed() -> bool:
    """Whether ranks may read each other's memory directly: the syscall works (on this process
    itself: seccomp would refuse it) and Yama, if present, lets a process read its siblings."""
    probe = np.arange(8, dtype=np.uint8)
    yama = Path("/proc/sys/kernel/yama/ptrace_scope")
    return cma.probe(os.getpid(), cma.address(probe), probe.tobytes()) and \
        (not yama.exists() or yama.read_text().strip() == "0")
