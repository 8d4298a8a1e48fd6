"""A driver that shuts Ray down and starts it again (as Ray's own test fixtures do per test) joins
the new cluster's collcomm job instead of keeping the dead one's."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
ccray = pytest.importorskip("collcomm.integrations.ray")


@pytest.mark.timeout(180)
def test_a_driver_that_restarts_ray_joins_the_new_clusters_job(ray_local):
    import rayjobs

    import collcomm.api as api

    h = ccray.put(np.arange(100_000))
    assert int(h.get().sum()) == sum(range(100_000))
    old = api.runtime().client.address
    ray.shutdown()                      # no ccray.shutdown(): the process still holds the old job
    rayjobs.local_ray()
    h2 = ccray.put(np.arange(10))
    assert api.runtime().client.address != old      # a new coordinator, in the new cluster
    assert h2.get().tolist() == list(range(10))
