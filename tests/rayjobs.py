"""A local Ray for the Ray integration's tests: one per test session, on 127.0.0.1, few CPUs.

``local_ray()`` starts it on first use (tests that need it take the ``ray_local`` fixture of
conftest.py) and ``stop()`` ends it at the session's end. Actors are made with ``num_cpus=0``
so that more actors than this machine's 2 cores can exist; each worker process registers the
collcomm backend as it starts (``worker_process_setup_hook``), as the README tells users to.
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUM_CPUS = 4
_STARTED = False


def local_ray():
    global _STARTED
    import ray

    if not ray.is_initialized():
        # Keep Ray (and the coordinator it hosts) on loopback; no usage reporting.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        os.environ.setdefault("COLLCOMM_TIMEOUT", "30")
        import collcomm.integrations.ray  # noqa: F401 - registers the backend and the transport in the driver

        ray.init(num_cpus=NUM_CPUS, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", object_store_memory=256 << 20,
                 runtime_env={"worker_process_setup_hook": "collcomm.integrations.ray.setup",
                              # workers import the test modules that define the actors
                              "env_vars": {"COLLCOMM_TIMEOUT": os.environ["COLLCOMM_TIMEOUT"],
                                           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}})
        _STARTED = True
    return ray


def stop() -> None:
    global _STARTED
    if _STARTED:
        import ray

        import collcomm.integrations.ray as ccray

        ccray.shutdown(stop_coordinator=True)
        ray.shutdown()
        _STARTED = False
