"""torch.distributed's timeouts (a ``timedelta``, a number of seconds, or none) as seconds."""

from __future__ import annotations

import datetime

DEFAULT_TIMEOUT = 1800.0  # torch's default process-group timeout


def seconds(timeout, default: float | None) -> float | None:
    """``timeout`` in seconds; ``default`` when it is None, zero or negative."""
    if timeout is None:
        return default
    secs = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)
    return secs if secs > 0 else default
