"""torch.distributed's timeouts (a ``timedelta``, a number of seconds, or none) as seconds."""

from __future__ import annotations

import datetime

from collcomm.runtime.arguments import MAX_TIMEOUT

DEFAULT_TIMEOUT = 1800.0  # torch's default process-group timeout


def seconds(timeout, default: float | None) -> float | None:
    """``timeout`` in seconds; ``default`` when it is None, zero, negative or NaN; at most
    collcomm's longest timeout (MAX_TIMEOUT, about 31 years: a longer one, ``timedelta.max`` or
    infinity, means "as long as it takes" to torch, and no wait can take longer)."""
    if timeout is None:
        return default
    secs = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)
    return min(secs, MAX_TIMEOUT) if secs > 0 else default
