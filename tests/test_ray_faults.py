"""A member of a ray.util.collective group on collcomm killed mid-collective (``ray.kill``): every
other member gets a typed error within the timeout, then the survivors shrink and go on."""

from __future__ import annotations

import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
col = pytest.importorskip("ray.util.collective")

pytestmark = pytest.mark.timeout(240)

TIMEOUT = 30.0  # COLLCOMM_TIMEOUT of the test session's Ray (tests/rayjobs.py)


@ray.remote(num_cpus=0, max_restarts=0)
class Member:
    def join(self, n: int, rank: int, name: str) -> int:
        col.init_collective_group(n, rank, backend="collcomm", group_name=name)
        return col.get_rank(name)

    def loop(self, name: str, iters: int) -> dict:
        """Allreduce 1 MiB over and over until told to stop by a failure; what happened, and when."""
        done = 0
        try:
            for _ in range(iters):
                x = np.ones(1 << 18, np.float32)
                col.allreduce(x, name)
                done += 1
        except Exception as e:  # noqa: BLE001 - the test asserts on the type
            return {"done": done, "error": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                    "message": str(e), "at": time.time()}
        return {"done": done, "error": None, "at": time.time()}

    def shrink_and_go_on(self, name: str) -> dict:
        import collcomm.integrations.ray as ccray

        rank, size = ccray.shrink(name)
        x = np.full(1000, rank + 1.0)
        col.allreduce(x, name)
        assert col.get_rank(name) == rank and col.get_collective_group_size(name) == size
        return {"rank": rank, "size": size, "sum": x.tolist()}


def test_an_actor_killed_mid_collective_gives_typed_errors_then_the_survivors_shrink(ray_local):
    actors = [Member.remote() for _ in range(4)]
    assert ray.get([a.join.remote(4, i, "doomed") for i, a in enumerate(actors)], timeout=120) == [0, 1, 2, 3]
    runs = [a.loop.remote("doomed", 100_000) for a in actors]
    ready, _ = ray.wait(runs, timeout=1.0)     # let them get going (a failure then lands mid-loop)
    assert ready == [], "the loop ended before the kill"
    victim = actors[2]
    t_kill = time.time()
    ray.kill(victim)
    survivors = [a for a in actors if a is not victim]
    results = ray.get([runs[i] for i in (0, 1, 3)], timeout=TIMEOUT + 60)
    for res in results:
        assert res["error"] is not None, res
        assert "CollectiveError" in res["mro"], res            # a typed collcomm error ...
        assert res["error"] in ("PeerFailure", "LinkFailure", "CollectiveTimeout"), res
        assert res["at"] - t_kill <= TIMEOUT + 5, res           # ... within the timeout, never a hang
        assert res["done"] > 0                                   # the kill came mid-run
    after = ray.get([a.shrink_and_go_on.remote("doomed") for a in survivors], timeout=TIMEOUT + 60)
    assert [r["rank"] for r in after] == [0, 1, 2] and {r["size"] for r in after} == {3}
    assert all(r["sum"] == [6.0] * 1000 for r in after)        # 1 + 2 + 3 over the survivors
    for a in survivors:
        ray.kill(a)
