"""collcomm: topology-aware collective communication.

The schedule generator (``collcomm.schedules``) and the fabric model
(``collcomm.topology``) are pure and importable on their own.
"""

from collcomm.errors import (AuthenticationError, CollectiveError, CollectiveTimeout, MismatchError,
                             PeerFailure, ScheduleError, TopologyError)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError", "CollectiveError", "CollectiveTimeout", "MismatchError", "PeerFailure",
    "ScheduleError", "TopologyError", "__version__",
]
