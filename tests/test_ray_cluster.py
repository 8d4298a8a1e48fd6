"""A Ray cluster on an emulated fabric (collcomm.integrations.ray.cluster), root only:

* RayCluster starts one Ray node per namespace of a 2-node fabric; a driver run through
  ``cluster.run`` on node 0 gets a task pinned to node 1 (NodeAffinitySchedulingStrategy) to
  report node 1's fabric address; a command past its timeout is killed with a typed error;
* leaving the ``with`` block, also by an exception, leaves no process in the namespaces;
* the command: ``down`` on a prefix that is not up says so and exits 0; bad input exits 2 with
  one line and no traceback.

Ray starts slowly (about 10 s for 2 nodes on 2 cores): one test starts it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _netns_works() -> bool:
    if shutil.which("ip") is None:
        return False
    try:
        return subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="an emulated fabric needs root"),
    pytest.mark.skipif(not _netns_works(), reason="`ip netns` (iproute2) is not available"),
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (collcomm[ray])"),
]

TWO_NODES = {"format": "collcomm.topology/1", "name": "two",
             "nodes": [{"id": "n0", "kind": "compute"}, {"id": "n1", "kind": "compute"}],
             "links": [{"src": "n0", "dst": "n1", "bandwidth": 1, "latency_us": 1.0},
                       {"src": "n1", "dst": "n0", "bandwidth": 1, "latency_us": 1.0}]}

# Runs inside node 0's namespace: where does a task pinned to the node at argv[2] run?
DRIVER = r"""
import sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
gcs, want = sys.argv[1], sys.argv[2]
ray.init(address=gcs, log_to_driver=False, logging_level="WARNING")
node_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == want)

@ray.remote(num_cpus=0)
def where():
    return ray.util.get_node_ip_address()

pinned = where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
print(ray.get(pinned.remote(), timeout=60))
"""


class _Leave(Exception):
    """Raised inside the ``with`` block: the cluster must still go down."""


def _prefix() -> str:
    return "rcl" + uuid.uuid4().hex[:6]   # 9 characters: the longest prefix check_prefix takes


def _collcomm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collcomm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def _cluster_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collcomm.integrations.ray.cluster", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)


def _pids(ns: str) -> str:
    return subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout.strip()


@pytest.fixture
def fabric(tmp_path):
    """A 2-node fabric under a fresh prefix, removed afterwards whatever happened."""
    topo = tmp_path / "two.json"
    topo.write_text(json.dumps(TWO_NODES))
    prefix = _prefix()
    res = _collcomm("emulate", "up", str(topo), "--scale", "1GB/s=200Mbit", "--prefix", prefix)
    try:
        assert res.returncode == 0, res.stderr
        yield prefix
    finally:
        _collcomm("emulate", "down", "--prefix", prefix)
        shutil.rmtree(f"/tmp/ray-{prefix}", ignore_errors=True)


@pytest.mark.timeout(150)
def test_a_task_pinned_to_node_1_runs_at_node_1s_fabric_address_and_down_leaves_nothing(fabric):
    from collcomm.integrations.ray.cluster import RayCluster, RayClusterError, RayCommandTimeout

    cluster = RayCluster(fabric, timeout=90)
    assert cluster.namespaces == [f"{fabric}-0", f"{fabric}-1"]
    assert cluster.gcs_address == f"{cluster.addresses[0]}:6379"
    with pytest.raises(_Leave):
        with cluster:
            res = cluster.run([sys.executable, "-c", DRIVER, cluster.gcs_address, cluster.addresses[1]], node=0,
                              timeout=90)
            assert res.returncode == 0, res.stderr[-3000:]
            assert res.stdout.split()[-1] == cluster.addresses[1]

            with pytest.raises(RayCommandTimeout, match="did not finish within 1 s"):
                cluster.run(["sh", "-c", "echo started; exec sleep 60"], node=1, timeout=1)
            with pytest.raises(RayClusterError, match="node 2 does not exist"):
                cluster.run(["true"], node=2, timeout=5)
            raise _Leave()
    assert [_pids(ns) for ns in cluster.namespaces] == ["", ""]
    assert cluster.root.exists(), "after an error the logs are kept"
    cluster.down()
    assert not cluster.root.exists()


def test_no_fabric_is_a_one_line_error():
    from collcomm.integrations.ray.cluster import RayCluster, RayClusterError

    with pytest.raises(RayClusterError, match="no emulated fabric is up under prefix 'rclnone'"):
        RayCluster("rclnone")


@pytest.mark.timeout(60)
def test_command_down_on_a_prefix_that_is_not_up_says_so_and_exits_0():
    prefix = _prefix()
    res = _cluster_cli("down", "--prefix", prefix)
    assert res.returncode == 0, res.stderr
    assert f"nothing is up under prefix '{prefix}'" in res.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["down", "--prefix", "Bad-Prefix"], ["up", "x.json", "--num-cpus", "0"],
                                  ["run", "--prefix", "rclnone", "--", "true"]])
def test_command_bad_input_exits_2_with_one_line(args):
    res = _cluster_cli(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].count("error:") == 1
