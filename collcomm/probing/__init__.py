"""Topology probing: measure a running job's fabric and infer a ``collcomm.topology/1`` model.

Inside a running job (after ``collcomm.init()``) every rank calls
:func:`collcomm.probe_topology` (or :func:`probe_runtime`); all of them get the same fabric.
The procedure (:mod:`.procedure`: which phases to run) works on any backend: the job's own
network (:mod:`.network`, point-to-point messages through the runtime, with IP hop counts from
:mod:`.hops`) or a model of a fabric (:mod:`.simulated`, for tests without processes). What was
measured becomes a fabric in :func:`collcomm.topology.inference.infer_topology`, which is pure
and lives with the model; this package sits above the runtime, which it uses.

``python -m collcomm.probing --out FILE`` (under ``collcomm run``) probes the job and has rank 0
write the fabric; ``collcomm topology --probe -np N`` runs it.
"""

from collcomm.probing.hops import hop_count
from collcomm.probing.network import probe_at_init, probe_runtime
from collcomm.probing.procedure import (Backend, chunk_for, measure, pack_phases, plan_aggregates, round_robin,
                                        steady_rate)
from collcomm.probing.simulated import SimulatedFabric, simulate

__all__ = ["Backend", "SimulatedFabric", "chunk_for", "hop_count", "measure", "pack_phases",
           "plan_aggregates", "probe_at_init", "probe_runtime", "round_robin", "simulate", "steady_rate"]
