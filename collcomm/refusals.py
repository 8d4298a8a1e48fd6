"""Refused connections and calls, logged so that nobody can flood the logs with them.

Any process that reaches a rank's listeners (TCP, the abstract Unix socket, the object server) or
the coordinator can knock without the job token. A warning line per refusal would let such a
process grow the logs without bound, so a :class:`RefusalLog` writes the first refusal from a
source at once, with its whole reason, then only counts that source's refusals and writes one
line for them per interval (:data:`INTERVAL_S`), with the number of those not written yet::

    rank 1: refused 734 more connections from 127.0.0.1 in the last 60 s: bad handshake (700), wrong token (34)

A source is an address without its port (every connection has a port of its own) or, on a Unix
socket, the connecting user. At most :data:`MAX_SOURCES` sources are tracked at once; refusals
from any further source are counted together as "other sources", so the table stays small and
the lines per interval stay few whatever the number of addresses an attacker uses (any
127.x.y.z reaches a loopback listener): a steady storm from one source writes one line per
interval, the worst case about four per tracked source. A source quiet for a whole interval is
forgotten (its next refusal is written at once again).

No thread of its own: a summary that is due is written with the next refusal from any source, and
:meth:`RefusalLog.flush` (called when the listener closes) writes whatever is still counted.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from typing import Callable

INTERVAL_S = 60.0  # one summary line per source per interval
MAX_SOURCES = 8  # sources tracked one by one; beyond, they are counted together as "other sources"
MAX_REASONS = 8  # distinct reasons counted per source; beyond, counted as "other reasons"
MAX_LINE = 300  # characters of a first refusal's line (its reason may quote a peer's bytes)
OTHERS = "other sources"


class _Source:
    """What a source did in the current interval: its refusals not written yet, by reason."""

    __slots__ = ("since", "reasons")

    def __init__(self, since: float):
        self.since = since
        self.reasons: Counter = Counter()


class RefusalLog:
    """Counts refusals per source and writes a bounded number of lines for them (see the module).

    ``noun`` names what is refused, in the plural ("connections", "calls"); ``prefix`` starts
    every line (e.g. "rank 1: "). Thread-safe: the lock is held only to count, never to write."""

    def __init__(self, logger: logging.Logger, noun: str, prefix: str = "", *, interval: float = INTERVAL_S,
                 max_sources: int = MAX_SOURCES, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic):
        self._log, self._noun, self._prefix, self._level = logger, noun, prefix, level
        self._interval, self._max_sources, self._clock = interval, max_sources, clock
        self._lock = threading.Lock()
        self._sources: dict[str, _Source] = {}  # at most max_sources, and OTHERS
        self._due = math.inf  # when the oldest interval ends

    def refused(self, source: str, reason: str, line: str) -> None:
        """Count a refusal from ``source`` for ``reason`` (a few words, the same for alike
        refusals); ``line`` is written when it is the first from its source in an interval."""
        now = self._clock()
        with self._lock:
            lines = self._due_lines(now) if now >= self._due else []
            tracked = len(self._sources) - (OTHERS in self._sources)  # (the shared count takes no source's place)
            key = source if source in self._sources or tracked < self._max_sources else OTHERS
            entry = self._sources.get(key)
            if entry is None:
                entry = self._sources[key] = _Source(now)
                self._due = min(self._due, now + self._interval)
                if key == OTHERS:
                    line += f" (more than {self._max_sources} sources refused: the others are counted together)"
                lines.append(_one_line(line))
            else:
                reasons = entry.reasons
                reasons[reason if reason in reasons or len(reasons) < MAX_REASONS else "other reasons"] += 1
        self._write(lines)

    def flush(self) -> None:
        """Write what is counted and not written yet, and forget every source (at close)."""
        with self._lock:
            now = self._clock()
            lines = [self._summary(key, entry, now) for key, entry in self._sources.items() if entry.reasons]
            self._sources.clear()
            self._due = math.inf
        self._write(lines)

    @property
    def tracked(self) -> int:
        """How many sources are counted now (at most max_sources + 1)."""
        with self._lock:
            return len(self._sources)

    # ------------------------------------------------------------------ inside
    def _due_lines(self, now: float) -> list[str]:
        """The summaries of every interval that has ended; a source quiet for a whole interval is
        forgotten, a busy one starts its next interval now. Under the lock."""
        lines = []
        for key in [k for k, e in self._sources.items() if e.since + self._interval <= now]:
            entry = self._sources[key]
            if not entry.reasons:
                del self._sources[key]
                continue
            lines.append(self._summary(key, entry, now))
            entry.since = now
            entry.reasons.clear()
        self._due = min((e.since + self._interval for e in self._sources.values()), default=math.inf)
        return lines

    def _summary(self, key: str, entry: _Source, now: float) -> str:
        total = sum(entry.reasons.values())
        why = ", ".join(f"{reason} ({n})" for reason, n in entry.reasons.most_common())
        return (f"{self._prefix}refused {total} more {self._noun} from {key} in the last "
                f"{max(now - entry.since, 0.0):.0f} s: {why}")

    def _write(self, lines: list[str]) -> None:
        for line in lines:
            self._log.log(self._level, "%s", line)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."
