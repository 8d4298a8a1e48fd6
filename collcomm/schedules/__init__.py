"""Schedule generation: ForestColl and the classic baselines, one algorithm per module.

All algorithms return a :class:`~collcomm.schedules.ir.Schedule` in the
``collcomm.schedule/1`` format, so one evaluator, executor and exporter serve them all.
"""

from __future__ import annotations

import importlib
import time

from collcomm.errors import ScheduleError
from collcomm.schedules.ir import ALLGATHER, ALLREDUCE, COLLECTIVES, REDUCE_SCATTER, Schedule

# name -> (module, function); imported on first use so a missing optional piece never breaks the rest.
ALGORITHMS: dict[str, tuple[str, str]] = {
    "forestcoll": ("collcomm.schedules.forestcoll", "forestcoll"),
    "ring": ("collcomm.schedules.ring", "ring"),
    "tree": ("collcomm.schedules.tree", "double_binary_tree"),
    "halving-doubling": ("collcomm.schedules.halving_doubling", "halving_doubling"),
    "blink": ("collcomm.schedules.blink", "blink"),
}


def algorithm(name: str):
    """The generator function registered under ``name``."""
    if name not in ALGORITHMS:
        raise ScheduleError(f"unknown algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    module, func = ALGORITHMS[name]
    return getattr(importlib.import_module(module), func)


def generate(topo, collective: str = ALLGATHER, algorithm_name: str = "forestcoll", **options) -> Schedule:
    """A schedule of ``collective`` on ``topo`` by ``algorithm_name`` (options go to the generator)."""
    if collective not in COLLECTIVES:
        raise ScheduleError(f"unknown collective {collective!r}; choose one of: {', '.join(COLLECTIVES)}")
    fn = algorithm(algorithm_name)
    start = time.perf_counter()
    schedule = fn(topo, collective, **options)
    if not schedule.generation_seconds:
        schedule.generation_seconds = time.perf_counter() - start
    return schedule


__all__ = ["ALGORITHMS", "ALLGATHER", "ALLREDUCE", "COLLECTIVES", "REDUCE_SCATTER", "Schedule", "algorithm",
           "generate"]
