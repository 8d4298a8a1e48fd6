"""collcomm: topology-aware collective communication.

    import collcomm as cc
    cc.init()                      # under `collcomm run`, torchrun, or with explicit arguments
    cc.allreduce(x)                # NumPy arrays and CPU torch tensors, in place

The schedule generator (``collcomm.schedules``) and the fabric model
(``collcomm.topology``) are pure and importable on their own.
"""

from collcomm.errors import (AuthenticationError, CollectiveError, CollectiveTimeout, CorruptionError, EvictedError,
                             LinkFailure, MismatchError, PeerFailure, ScheduleError, TopologyError)

from collcomm.api import (allgather, allreduce, alltoall, barrier, broadcast, init, is_initialized, new_group, rank,
                          recv, reduce, reduce_scatter, send, shutdown, world_size)
from collcomm.api import grow, link_health, probe_topology, shrink

from collcomm._version import __version__

__all__ = [
    "AuthenticationError", "CollectiveError", "CollectiveTimeout", "CorruptionError", "EvictedError", "LinkFailure", "MismatchError", "PeerFailure",
    "ScheduleError", "TopologyError", "__version__", "grow", "link_health", "probe_topology", "shrink",
    "allgather", "allreduce", "alltoall", "barrier", "broadcast", "init", "is_initialized", "new_group", "rank",
    "recv", "reduce", "reduce_scatter", "send", "shutdown", "world_size",
]
