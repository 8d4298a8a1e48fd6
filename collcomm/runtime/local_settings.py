"""The settings of the shared-memory collectives (collcomm/runtime/local.py), read from the
environment and checked: whether groups use shared memory at all (COLLCOMM_TRANSPORT), the size
of a member's segment halves (COLLCOMM_SHM_BYTES), from what size members read each other's
buffers directly (COLLCOMM_SHM_DIRECT_BYTES), from what size results are written past the cache
(COLLCOMM_SHM_STREAM_BYTES), and how a waiter spins (COLLCOMM_SHM_SPIN,
COLLCOMM_SHM_SPIN_CROWDED). A bad value is a one-line ValueError naming the variable."""

from __future__ import annotations

import os

from collcomm.transport.shm import arena as shm_arena

DEFAULT_HALF_BYTES = 1 << 20  # each half of a member's data area (COLLCOMM_SHM_BYTES)
# How long a waiter spins (checks) and then yields its core before it sleeps on its futex: with a
# core per member spinning answers within a microsecond; with more members than cores the one
# waited for needs the core, so the waiter yields almost at once.
# (tuning knobs for bench/: COLLCOMM_SHM_SPIN and COLLCOMM_SHM_SPIN_CROWDED, "spins,yields")
SPIN = tuple(int(v) for v in os.environ.get("COLLCOMM_SHM_SPIN", "2000,200").split(","))
SPIN_CROWDED = tuple(int(v) for v in os.environ.get("COLLCOMM_SHM_SPIN_CROWDED", "5,50").split(","))
# From this size on (COLLCOMM_SHM_DIRECT_BYTES; "off": never) allreduce, reduce-scatter and
# alltoall (allgather and broadcast too, where copies do not stream) move the members' buffers
# directly (cross-memory attach: one copy per byte instead of two through the segments;
# bench/RESULTS.md: better from 4 MB on, worse at 1 MB, where a syscall per piece and one more
# step cost more than the copy saved; a broadcast of 1 MB with 2 members reads the same either
# way, 4 MB 25-40 % faster direct).
DEFAULT_DIRECT_BYTES = 4 << 20
# From this size of result on (COLLCOMM_SHM_STREAM_BYTES; "off": never) the copies into it
# stream past the cache (collcomm/transport/shm/stream.py), and allgather and broadcast go
# through the segments at every size instead of reading directly: streamed, two copies per byte
# cost less than one through the kernel's ordinary stores (bench/RESULTS.md). Unset, the size is
# the larger of this and what makes the group's results together fill half the last-level cache:
# results that stay in the cache are better written through it (2 ranks, 4 MB allgather on a 32 MiB
# L3: 8.9 GB/s direct against 5.0 streamed).
DEFAULT_STREAM_BYTES = 4 << 20
TRANSPORTS = ("auto", "unix", "tcp")  # COLLCOMM_TRANSPORT: shared memory + sockets, sockets, TCP only


def transport_choice() -> str:
    """COLLCOMM_TRANSPORT, checked (a one-line ValueError naming the choices)."""
    raw = os.environ.get("COLLCOMM_TRANSPORT") or "auto"
    choice = raw.strip().lower()
    if choice not in TRANSPORTS:
        raise ValueError(f"COLLCOMM_TRANSPORT={raw!r}: choose one of {', '.join(TRANSPORTS)}")
    return choice


def enabled() -> bool:
    """Shared memory is on unless COLLCOMM_TRANSPORT says unix or tcp (sockets only)."""
    return transport_choice() == "auto" and shm_arena.SUPPORTED


def direct_bytes() -> int | None:
    """COLLCOMM_SHM_DIRECT_BYTES: from what size members read each other's buffers directly
    (default 4 MiB); "off": never."""
    return _threshold("COLLCOMM_SHM_DIRECT_BYTES", DEFAULT_DIRECT_BYTES)


def stream_bytes(members: int = 1) -> int | None:
    """COLLCOMM_SHM_STREAM_BYTES: from what size of result the copies into it bypass the cache
    ("off": never); unset, the larger of 4 MiB and half the last-level cache over ``members``."""
    return _threshold("COLLCOMM_SHM_STREAM_BYTES",
                      max(DEFAULT_STREAM_BYTES, last_level_cache() // (2 * max(1, members))))


def last_level_cache() -> int:
    """The bytes of the largest cache of CPU 0 as Linux describes it (sysfs), 0 when it does not.
    (Not glibc's figure: under a hypervisor it can be the host's, ten times too large.)"""
    base = "/sys/devices/system/cpu/cpu0/cache"
    largest = 0
    try:
        for index in os.listdir(base):
            if not index.startswith("index"):
                continue
            with open(os.path.join(base, index, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
            largest = max(largest, int(text.rstrip("KkMmGg")) * scale)
    except (OSError, ValueError):
        return largest
    return largest


def _threshold(name: str, default: int) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() == "off":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is neither a number of bytes nor off") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def half_bytes() -> int:
    """COLLCOMM_SHM_BYTES: the bytes of each half of a member's segment (default 1 MiB)."""
    raw = os.environ.get("COLLCOMM_SHM_BYTES", "").strip()
    if not raw:
        return DEFAULT_HALF_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"COLLCOMM_SHM_BYTES={raw!r} is not a number of bytes") from None
    if value < 4096 or value % 64:
        raise ValueError(f"COLLCOMM_SHM_BYTES must be a multiple of 64 of at least 4096, got {value}")
    return value
