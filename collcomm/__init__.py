"""collcomm: topology-aware collective communication.

    import collcomm as cc
    cc.init()                      # under `collcomm run`, torchrun, or with explicit arguments
    cc.allreduce(x)                # NumPy arrays and CPU torch tensors, in place

The schedule generator (``collcomm.schedules``) and the fabric model (``collcomm.topology``)
are pure and importable on their own: importing them loads nothing of the runtime, because the
public functions below (:mod:`collcomm.api`) are loaded when first used.
"""

from collcomm._version import __version__
from collcomm.errors import (AuthenticationError, CollectiveError, CollectiveTimeout, CorruptionError, EvictedError,
                             LinkFailure, MismatchError, NcclUnavailable, ObjectDeleted, ObjectError, ObjectExists, ObjectLost,
                             ObjectStoreFull, PeerFailure, ScheduleError, TopologyError, UsageError,
                             UsageTypeError)

_API = ("allgather", "allreduce", "alltoall", "barrier", "broadcast", "delete", "get", "grow", "init",
        "is_initialized", "link_health", "new_group", "object_info", "probe_topology", "put", "rank", "recv",
        "reduce", "reduce_objects", "reduce_scatter", "send", "shrink", "shutdown", "world_size")

__all__ = [
    "AuthenticationError", "CollectiveError", "CollectiveTimeout", "CorruptionError", "EvictedError", "LinkFailure",
    "MismatchError", "NcclUnavailable", "ObjectDeleted", "ObjectError", "ObjectExists", "ObjectLost", "ObjectStoreFull", "PeerFailure", "ScheduleError", "TopologyError", "UsageError",
    "UsageTypeError", "__version__", *_API,
]


def __getattr__(name: str):
    """The public functions (and ``collcomm.api`` itself), imported on first use."""
    if name in _API or name == "api":
        import collcomm.api as api

        value = api if name == "api" else getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'collcomm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | {"api"})
