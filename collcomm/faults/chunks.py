"""Chunk size from the measured link rates (the link monitor's second decision).

Every tree's part of the buffer is pipelined in chunks (:mod:`collcomm.transport.executor`): a
rank forwards a chunk once it has all of it, so a chunk that takes long on the slowest hop of a
tree delays every hop after it, and a tree with one or two chunks does not pipeline at all. A
chunk that takes long on no link costs the other way: each one is a frame, an ACK and a Python
event, which is what loopback at gigabytes per second pays for.

So the right size is a time, not a size: about :data:`CHUNK_SECONDS` of the slowest link the plan
uses, as measured (the kernel's wire rate of each pair's connection, see
:mod:`collcomm.transport.telemetry`). On the emulated two-box fabric (inter-box NICs of 6.25 MB/s)
that is 64 KB, and with it 4 MB allreduces ran at 0.95 of the optimum against 0.83 with 256 KB
chunks, and at 0.97 against 0.79 on the plan rerouted around a throttled NIC (bench/RESULTS.md,
"Issue 6"). On loopback the rates give the configured maximum (1 MB), unchanged.

Only group rank 0's monitor decides (every member applies the size at the same operation, like
a new plan: sender and receiver must cut a tree into the same chunks). A size the user set
(``chunk_bytes=`` or ``COLLCOMM_CHUNK_BYTES``) is never changed.
"""

from __future__ import annotations

import math
from typing import Iterable

CHUNK_SECONDS = 0.01  # a chunk takes about this long on the slowest measured link
MIN_CHUNK_BYTES = 64 << 10  # below this the per-frame cost dominates on any link
CONFIRM_ROUNDS = 2  # rounds in a row that must propose the same new size


def chunk_for_rates(rates: Iterable[float | None], current: int, ceiling: int,
                    lower_bounds: Iterable[float | None] = (), seconds: float = CHUNK_SECONDS,
                    floor: int = MIN_CHUNK_BYTES) -> int:
    """The chunk size for connections measured at ``rates`` (bytes per second; None: not
    measured): ``current`` while the slowest rate times ``seconds`` is within a factor of two of
    it (no change on noise), else that product rounded down to a power of two, within ``[floor,
    ceiling]``. No rate: ``current``.

    ``lower_bounds``: rates of connections that sent only small frames (64 KB and less, counted
    but not timed), whose time is mostly round trips: they can show that every link is fast
    enough for larger chunks, never that chunks must shrink (a job of small operations would
    otherwise cut the chunks of its next large one on loopback)."""
    measured = [r for r in rates if r is not None and r > 0]
    bounds = [r for r in lower_bounds if r is not None and r > 0]
    if not measured and not bounds:
        return current
    floor = min(floor, ceiling)
    ideal = min(measured + bounds) * seconds
    wanted = max(floor, min(ceiling, 1 << max(0, int(ideal).bit_length() - 1)))
    if wanted == current or (current // 2 <= ideal <= current * 2 and floor <= current <= ceiling):
        return current
    if wanted < current and (not measured or min(bounds, default=math.inf) < min(measured)):
        return current  # only a lower bound says "smaller"
    return wanted


class ChunkSizer:
    """:func:`chunk_for_rates` with confirmation: a new size applies once :data:`CONFIRM_ROUNDS`
    rounds in a row proposed it (one round with a descheduled receiver does not shrink chunks)."""

    def __init__(self, ceiling: int, size: int | None = None, confirm: int = CONFIRM_ROUNDS):
        self.ceiling = ceiling
        self.size = ceiling if size is None else size  # where it starts (a shrunk group goes on from its size)
        self.confirm = confirm
        self._proposal: tuple[int, int] = (self.size, 0)  # (size, rounds in a row)

    def observe(self, rates: Iterable[float | None], lower_bounds: Iterable[float | None] = ()) -> int:
        """The size from this round on, given this round's measured rates (see
        :func:`chunk_for_rates`)."""
        wanted = chunk_for_rates(rates, self.size, self.ceiling, lower_bounds)
        if wanted == self.size:
            self._proposal = (wanted, 0)
            return self.size
        count = self._proposal[1] + 1 if self._proposal[0] == wanted else 1
        self._proposal = (wanted, count)
        if count >= self.confirm:
            self.size, self._proposal = wanted, (wanted, 0)
        return self.size
