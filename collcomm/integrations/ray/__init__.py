"""collcomm inside Ray: a ``ray.util.collective`` backend, a Ray tensor transport, and Ray objects
moved through collcomm's on-the-fly trees (extra ``ray``: ``pip install 'collcomm[ray]'``).

::

    import ray, collcomm.integrations.ray as ccray     # registers the backend (and the tensor transport)
    ray.init(runtime_env={"worker_process_setup_hook": "collcomm.integrations.ray.setup"})

    # in actors: ray.util.collective, switched by one word
    col.init_collective_group(4, rank, backend="collcomm", group_name="g")
    col.allreduce(x, group_name="g")                  # bounded; a dead member raises PeerFailure
    ccray.shrink("g")                                 # survivors go on without it

    h = ccray.put(array)                              # a small picklable handle
    worker.step.remote(h)                             # ... h.get() inside any task or actor
    total = ccray.reduce(handles, num_required=k)     # first k of n, exact; total.get()

    @ray.method(tensor_transport="collcomm")          # actor outputs through collcomm's trees
    def weights(self): return self.model_tensor

There is no coordinator to start: the job's processes find it through Ray (:mod:`.job`). Ray
needs the collective backend registered in every process that builds a group, which
``worker_process_setup_hook`` does (or ``import collcomm.integrations.ray`` in the actor's code);
the tensor transport must be registered in the driver before it creates the actors (Ray ships it
to them), and in any worker that imports code annotated with it; importing this package or the
hook does both. The modules:

* :mod:`.job`: joining the Ray job's collcomm job (the coordinator actor), ``init``, ``shutdown``;
* :mod:`.backend`: :class:`CollcommGroup`, the ``ray.util.collective`` backend, and ``shrink``;
* :mod:`.objects`: :class:`Handle`, ``put``, ``get``, ``reduce``;
* :mod:`.tensor_transport`: the Ray Direct Transport "collcomm";
* :mod:`.cluster`: a multi-node Ray cluster on one machine, one node per namespace of an emulated
  fabric (tests and benchmarks).
"""

from __future__ import annotations

try:
    import ray  # noqa: F401 - the extra's dependency, checked first
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("collcomm.integrations.ray needs Ray: pip install 'collcomm[ray]'") from e

from collcomm.integrations.ray import backend as _backend
from collcomm.integrations.ray.backend import BACKEND, CollcommGroup
from collcomm.integrations.ray.job import init, shutdown
from collcomm.integrations.ray.objects import Handle, get, handle, put, reduce

__all__ = ["BACKEND", "CollcommGroup", "Handle", "get", "handle", "init", "put", "reduce", "register", "setup",
           "shrink", "shutdown"]


def register() -> dict:
    """Register the collective backend and the tensor transport in this process; idempotent.
    Returns what was registered. (A worker needs the transport too when it imports code that
    annotates methods with it: Ray checks the name at class definition.)"""
    try:  # Ray Direct Transport: Ray 2.5x; older Rays have the rest
        from collcomm.integrations.ray import tensor_transport
    except ImportError:
        return {"collective_backend": _backend.register(), "tensor_transport": False}
    return {"collective_backend": _backend.register(), "tensor_transport": tensor_transport.register()}


def setup() -> None:
    """For ``ray.init(runtime_env={"worker_process_setup_hook": "collcomm.integrations.ray.setup"})``:
    registers the backend and the transport in every worker process as it starts."""
    register()


def shrink(group_name: str = "default", timeout: float | None = None) -> tuple[int, int]:
    """After a member of the ``ray.util.collective`` group ``group_name`` died: re-form it without
    its dead members (every survivor calls it) and return this actor's new (rank, world size)."""
    from ray.util.collective import collective as col

    group = col.get_group_handle(group_name)
    if not isinstance(group, CollcommGroup):
        raise TypeError(f"group '{group_name}' uses backend {type(group).__name__}, not collcomm")
    group.shrink(timeout)
    return group.rank, group.world_size


register()
