"""The link monitor: the re-routing decision (pure), and plan switches in real jobs.

* pure: a down link is gone from the re-planned fabric and from every tree; a fault that cuts the
  fabric raises TopologyError naming both sides; a down-weighted fabric still gets the optimal
  ForestColl (the cut bound of the reduced fabric); verdicts of rank pairs land on the right
  physical links (a slow row on the sender's uplink, a single slow cell on its direct link);
  both ends' reports of a pair merge to the lower rate;
* loopback jobs (synthetic telemetry, since loopback cannot be throttled per pair): one slow
  link is flagged, every rank switches plan at the same operation, results stay exact; on a
  healthy fabric no plan changes (200 operations in the slow version);
* emulated (root only, and only once the transport records telemetry): two_box.json with
  box0.gpu0 -> net shaped to 10% during an allreduce loop.
"""

from __future__ import annotations

import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import multiproc
from collcomm.errors import TopologyError
from collcomm.faults.detector import DEGRADED, DOWN, HEALTHY, Verdict
from collcomm.faults.monitor import blame, merge_reports, partition, reroute, routes
from collcomm.schedules import evaluate, generate
from collcomm.schedules.optimum import collective_bound
from collcomm.topology import jsonio
from collcomm.topology.model import COMPUTE, SWITCH, Link, Node, Topology

REPO = Path(__file__).resolve().parent.parent
TWO_BOX = REPO / "bench" / "topologies" / "two_box.json"


def mesh(n: int = 4, bw=1) -> Topology:
    nodes = [Node(f"r{i}", COMPUTE) for i in range(n)]
    links = [Link(f"r{i}", f"r{j}", Fraction(bw)) for i in range(n) for j in range(i + 1, n)]
    return Topology(f"mesh{n}", nodes, links)


def star(n: int = 4) -> Topology:
    nodes = [Node(f"r{i}", COMPUTE) for i in range(n)] + [Node("sw", SWITCH)]
    return Topology(f"star{n}", nodes, [Link(f"r{i}", "sw", Fraction(1)) for i in range(n)])


def two_clusters() -> Topology:
    nodes = [Node(x, COMPUTE) for x in ("a0", "a1", "b0", "b1")] + [Node("sa", SWITCH), Node("sb", SWITCH)]
    links = [Link("a0", "sa", Fraction(4)), Link("a1", "sa", Fraction(4)), Link("b0", "sb", Fraction(4)),
             Link("b1", "sb", Fraction(4)), Link("sa", "sb", Fraction(1))]
    return Topology("two-clusters", nodes, links)


def crossings(schedule) -> set[tuple[str, str]]:
    return {hop for ph in schedule.phases for t in ph.trees for e in t.edges for hop in zip(e.path, e.path[1:])}


def verdict(pair, state, ratio=None) -> Verdict:
    return Verdict(pair, state, f"{pair} {state}", {"peer_ratio": ratio} if ratio is not None else {})


# ============================================================================ pure
@pytest.mark.parametrize("collective", ["allgather", "reduce_scatter", "allreduce"])
def test_a_down_link_is_gone_from_the_fabric_and_from_every_tree(collective):
    topo = mesh(4)
    new = reroute(topo, {("r0", "r1"): Fraction(0)})
    assert ("r0", "r1") not in new.capacity and new.capacity[("r1", "r0")] == 1
    s = generate(new, collective, "forestcoll")
    evaluate.validate(s, new)
    assert ("r0", "r1") not in crossings(s)
    assert s.algbw == collective_bound(new, collective)


def test_a_cut_fabric_raises_topology_error_naming_both_sides():
    topo = two_clusters()
    with pytest.raises(TopologyError) as err:
        reroute(topo, {("sa", "sb"): Fraction(0)})
    text = str(err.value)
    assert "sa->sb" in text and "{a0, a1}" in text and "{b0, b1}" in text, text
    assert partition(topo, dict(topo.capacity)) is None
    # Two of the three uplinks of a node down: still connected; all of them: that node is cut off.
    m = mesh(3)
    reroute(m, {("r0", "r1"): 0, ("r0", "r2"): Fraction(1, 10)})
    with pytest.raises(TopologyError, match=r"\{r1, r2\}.*\{r0\}|\{r0\}.*\{r1, r2\}"):
        reroute(m, {("r0", "r1"): 0, ("r0", "r2"): 0})


@pytest.mark.parametrize("collective", ["allgather", "reduce_scatter", "allreduce"])
@pytest.mark.parametrize("fraction", [Fraction(1, 10), Fraction(1, 2)])
def test_down_weighting_keeps_forestcoll_optimal_for_the_reduced_fabric(collective, fraction):
    topo = jsonio.load(TWO_BOX)
    new = reroute(topo, {("box0.gpu0", "net"): fraction})
    assert new.capacity[("box0.gpu0", "net")] == fraction * topo.capacity[("box0.gpu0", "net")]
    assert new.capacity[("net", "box0.gpu0")] == topo.capacity[("net", "box0.gpu0")]  # the other direction
    s = generate(new, collective, "forestcoll")
    evaluate.validate(s, new)
    assert s.algbw == evaluate.algbw(s, new) == collective_bound(new, collective)
    assert collective_bound(new, collective) <= collective_bound(topo, collective)


def test_blame_maps_rank_pair_verdicts_to_physical_links():
    topo = star(4)
    pairs = [(f"r{i}", f"r{j}") for i in range(4) for j in range(4) if i != j]
    rts = {p: routes(topo, *p) for p in pairs}
    assert rts[("r0", "r1")] == {("r0", "sw"), ("sw", "r1")}
    # Everything r0 sends is slow: its uplink, and nothing else.
    v = {p: verdict(p, DEGRADED if p[0] == "r0" else HEALTHY, 0.1 if p[0] == "r0" else None) for p in pairs}
    faults = blame(topo, v, rts, pairs)
    assert set(faults) == {("r0", "sw")} and faults[("r0", "sw")][:2] == (DEGRADED, Fraction(1, 10))
    # Nothing reaches r2: its downlink is down.
    v = {p: verdict(p, DOWN if p[1] == "r2" else HEALTHY) for p in pairs}
    faults = blame(topo, v, rts, pairs)
    assert set(faults) == {("sw", "r2")} and faults[("sw", "r2")][:2] == (DOWN, 0)
    # A mesh: one slow cell is its own direct link.
    m = mesh(4)
    pairs = list(m.capacity)
    rts = {p: routes(m, *p) for p in pairs}
    v = {p: verdict(p, DEGRADED if p == ("r2", "r3") else HEALTHY, 0.25) for p in pairs}
    assert set(blame(m, v, rts, pairs)) == {("r2", "r3")}
    # Routes follow the schedule's paths where it has them.
    s = generate(topo, "allgather", "forestcoll")
    assert routes(topo, "r0", "r1", [s]) <= {("r0", "sw"), ("sw", "r1")}


def test_reports_of_both_ends_merge_to_the_lower_rate():
    a = {"links": [{"src": 0, "dst": 1, "rate": 1e9, "transfers": 4, "errors": 0, "kinds": [], "last_seen": 5.0,
                    "group": None, "active": True}]}
    b = {"links": [{"src": 0, "dst": 1, "rate": 2e8, "transfers": 4, "errors": 1, "kinds": ["reset"],
                    "last_seen": 7.0, "group": None, "active": False}]}
    obs, _ = merge_reports([a, b])
    o = obs[(0, 1)]
    assert (o.rate, o.errors, o.error_kinds, o.last_seen, o.active) == (2e8, 1, ("reset",), 7.0, True)


# ============================================================================ monitors in threads
class FakeClient:
    """The coordinator's key-value store, in memory, shared by the fake ranks."""

    def __init__(self):
        import threading

        self.kv: dict[str, bytes] = {}
        self.cond = threading.Condition()

    def kv_set(self, key, value, timeout=None):
        with self.cond:
            self.kv[key] = bytes(value)
            self.cond.notify_all()

    def kv_get(self, key, timeout=None):
        from collcomm.errors import CollectiveTimeout

        with self.cond:
            if not self.cond.wait_for(lambda: key in self.kv, timeout=timeout or 0.0):
                raise CollectiveTimeout(f"no key {key}")
            return self.kv[key]

    def kv_delete(self, key, timeout=None):
        with self.cond:
            return self.kv.pop(key, None) is not None

    def group_status(self, group_id, timeout=None):
        from types import SimpleNamespace

        return SimpleNamespace(dead=())


class FakeGroup:
    def __init__(self, topo, rank, client):
        from types import SimpleNamespace

        from collcomm.planner import Planner

        self.runtime = SimpleNamespace(rank=rank, client=client, timeout=10.0, transport=None)
        self.planner = Planner(topo)
        self.members = list(range(topo.num_ranks))
        self.me, self.id, self.epoch, self.name = rank, 0, 1, "world"

    def set_topology(self, topo):
        from collcomm.planner import Planner

        self.planner = Planner(topo)


def run_monitors(topo, ops: int, feed):
    """One GroupMonitor per rank of ``topo`` in threads, every=1; before operation i each rank's
    telemetry gets ``feed(rank, i, telemetry)``; returns per rank (changes, error raised at op)."""
    import threading

    from collcomm.faults.monitor import GroupMonitor
    from collcomm.faults.telemetry import LinkTelemetry

    client = FakeClient()
    n = topo.num_ranks
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def rank_main(r):
        g = FakeGroup(topo, r, client)
        mon = GroupMonitor(g, 1)
        mon.telemetry = LinkTelemetry(r)
        errors = []
        for i in range(ops):
            feed(r, i, mon.telemetry)
            try:
                mon.before_operation(i)
            except TopologyError as e:
                errors.append((i, str(e)))
            barrier.wait(timeout=20)  # the collective
        out[r] = (mon.changes, errors, mon)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_monitors_switch_plan_at_the_same_operation_and_restore_a_recovered_link():
    topo = mesh(4)

    def feed(r, i, tel):
        for peer in range(4):
            if peer != r:
                slow = (r, peer) == (2, 3) and 5 <= i < 12
                tel.record_transfer(r, peer, 1 << 20, (1 << 20) / (1e8 if slow else 1e9))

    out = run_monitors(topo, 30, feed)
    changes = [c for c, _, _ in out]
    assert all(c == changes[0] for c in changes), changes
    assert [c["at"] for c in changes[0]] == [7, 15], changes[0]  # flagged after 2 slow rounds; back after 3 good
    assert changes[0][0]["faults"][0]["link"] == ["r2", "r3"] and changes[0][1]["faults"] == []
    assert all(not e for _, e, _ in out)


def test_monitors_raise_topology_error_naming_the_partition_on_every_rank():
    topo = two_clusters()  # a0 a1 | b0 b1: one link between the clusters

    def feed(r, i, tel):
        for peer in range(4):
            if peer == r:
                continue
            if i >= 4 and (r < 2) != (peer < 2):
                tel.record_error(r, peer, "reset")
            else:
                tel.record_transfer(r, peer, 1 << 20, 1e-3)

    out = run_monitors(topo, 10, feed)
    firsts = {errors[0][0] if errors else None for _, errors, _ in out}
    assert len(firsts) == 1 and None not in firsts, [e for _, e, _ in out]
    for _, errors, _ in out:
        assert "{a0, a1}" in errors[0][1] and "{b0, b1}" in errors[0][1], errors[0][1]


# ============================================================================ loopback jobs
def synthetic_worker(ops: int, slow_from: int | None, slow_pair: list[int], fraction: float, noise: float,
                     synthetic: bool = True):
    """Every rank feeds its outgoing links' telemetry (1 GB/s with noise; ``slow_pair`` at
    ``fraction`` from operation ``slow_from``), runs allreduce/allgather and checks them exactly;
    returns the plan changes its monitor applied. ``synthetic=False``: the transport's own
    telemetry (real loopback rates) instead."""
    import collcomm as cc
    from collcomm.faults.monitor import GroupMonitor
    from collcomm.faults.telemetry import LinkTelemetry

    rt = cc.api.runtime()
    g = rt.world
    me, n = cc.rank(), cc.world_size()
    g.monitor = GroupMonitor(g, rt.monitor_every)
    tel = LinkTelemetry(me)
    if synthetic:
        g.monitor.telemetry = tel
    rng = np.random.default_rng(1000 + me)
    wrong = []
    for i in range(ops):
        for peer in range(n):
            if peer == me:
                continue
            rate = 1e9 * float(np.exp(rng.normal(0, noise)))
            if slow_from is not None and i >= slow_from and [me, peer] == slow_pair:
                rate *= fraction
            for _ in range(4):
                tel.record_transfer(me, peer, 1 << 20, (1 << 20) / rate)
        count = 1000 + 37 * i
        if i % 2 == 0:
            x = (np.arange(count) % 7 + me + 1).astype(np.float64)
            cc.allreduce(x)
            ok = np.array_equal(x, sum((np.arange(count) % 7 + r + 1).astype(np.float64) for r in range(n)))
        else:
            x = np.full(count, me + 0.5)
            out = np.empty(count * n)
            cc.allgather(out, x)
            ok = np.array_equal(out, np.repeat(np.arange(n) + 0.5, count))
        if not ok:
            wrong.append(i)
    health = cc.link_health()
    text = cc.link_health(format="prometheus")
    assert "collcomm_plan_epoch" in text
    return {"changes": g.monitor.changes, "wrong": wrong, "plan_epoch": health["plan_epoch"],
            "topology": g.monitor.topology.name, "faults": health["faults"],
            "capacity": {f"{u}->{v}": str(bw) for (u, v), bw in g.monitor.topology.capacity.items()}}


@pytest.mark.timeout(120)
def test_one_slow_link_all_ranks_switch_plan_at_the_same_operation_with_exact_results():
    slow_from = 6
    job = multiproc.run(4, synthetic_worker, timeout=100, topology=mesh(4),
                        kwargs={"ops": 16, "slow_from": slow_from, "slow_pair": [0, 1], "fraction": 0.1,
                                "noise": 0.02},
                        env={"COLLCOMM_MONITOR_EVERY": "1"})
    values = job.values()
    for r, v in enumerate(values):
        assert v["wrong"] == [], f"rank {r}: wrong results at operations {v['wrong']}"
        assert len(v["changes"]) == 1, f"rank {r}: {v['changes']}"
    ats = {v["changes"][0]["at"] for v in values}
    assert len(ats) == 1, f"ranks switched at different operations: {ats}"
    at = ats.pop()
    # Flagged after two slow rounds (reports of operations 6 and 7, decided at 7), applied at 8.
    assert slow_from < at <= slow_from + 3, at
    assert {v["plan_epoch"] for v in values} == {1}
    for v in values:
        assert [f["link"] for f in v["faults"]] == [["r0", "r1"]] and v["faults"][0]["state"] == DEGRADED
        # Down-weighted to its measured fraction (10%, with 2% noise), the other direction untouched.
        assert Fraction(8, 100) <= Fraction(v["capacity"]["r0->r1"]) <= Fraction(12, 100), v["capacity"]
        assert v["capacity"]["r1->r0"] == "1"


def _healthy(ops: int, synthetic: bool = True):
    job = multiproc.run(4, synthetic_worker, timeout=60 + ops, kwargs={"ops": ops, "slow_from": None,
                                                                        "slow_pair": [0, 1], "fraction": 1.0,
                                                                        "noise": 0.15, "synthetic": synthetic},
                        env={"COLLCOMM_MONITOR_EVERY": "1"})
    for r, v in enumerate(job.values()):
        assert v["wrong"] == [] and v["changes"] == [] and v["plan_epoch"] == 0, f"rank {r}: {v}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("synthetic", [True, False], ids=["synthetic", "transport-telemetry"])
def test_a_healthy_fabric_changes_no_plan_short(synthetic):
    _healthy(40, synthetic)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("synthetic", [True, False], ids=["synthetic", "transport-telemetry"])
def test_a_healthy_fabric_changes_no_plan_in_200_operations(synthetic):
    _healthy(200, synthetic)


# ============================================================================ emulated (root)
def _transport_records_telemetry() -> bool:
    import inspect

    from collcomm.transport import tcp

    return "telemetry" in inspect.getsource(tcp)


CAN_EMULATE = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


EMULATED_JOB = """
import json, os, subprocess, sys, time
import numpy as np
import collcomm as cc

cc.init()
rt = cc.api.runtime()
me, n = cc.rank(), cc.world_size()
ops, fault_at, prefix = int(os.environ["T_OPS"]), int(os.environ["T_FAULT_AT"]), os.environ["T_PREFIX"]
wrong, times = [], []
x0 = (np.arange(1 << 18) % 11).astype(np.float32)
for i in range(ops):
    if i == fault_at and me == 0:
        res = subprocess.run([sys.executable, "-m", "collcomm.cli", "emulate", "fault", "--prefix", prefix,
                              "--link", "box0.gpu0", "net", "--bandwidth", "10%"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    t = time.monotonic()
    x = x0 + me
    cc.allreduce(x)
    times.append(time.monotonic() - t)
    if not np.array_equal(x, x0 * n + sum(range(n))):
        wrong.append(i)
g = rt.world
print("RESULT " + json.dumps({"rank": me, "wrong": wrong, "times": times,
                              "changes": g.monitor.changes if g.monitor else [],
                              "verdicts": [v["reason"] for v in cc.link_health()["verdicts"]
                                           if "box0.gpu0" in v["reason"] or "0->" in v["reason"]]}), flush=True)
cc.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not CAN_EMULATE, reason="emulated fabrics need root and iproute2 (ip, tc)")
def test_emulated_two_box_throttled_link_is_flagged_and_rerouted(tmp_path):
    """box0.gpu0 -> net shaped to 10% before operation 10 of an allreduce loop: flagged and
    re-planned by operation 13 on every rank at the same operation, exact results throughout.

    Marked slow because it is not yet reliable: in about one run in five the transport's per-chunk
    rates of pair 0 -> 4 are already as low before the fault as after it (1 MB allreduces fit in
    the socket buffers, so what a chunk's time measures is mostly queueing), the link's own
    history then says "normal" and nothing is flagged. Exact results hold in every run."""
    import json
    import subprocess
    import sys

    if not _transport_records_telemetry():
        pytest.skip("the TCP transport does not record link telemetry yet")
    from collcomm.topology import emulate as emu

    prefix = f"ccm{os.getpid() % 10000}"
    job = tmp_path / "job.py"
    job.write_text(EMULATED_JOB)
    emu.up(emu.plan(jsonio.load(TWO_BOX), prefix, "1GB/s=200Mbit"))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COLLCOMM_")}
        env.update(COLLCOMM_MONITOR_EVERY="1", T_OPS="30", T_FAULT_AT="10", T_PREFIX=prefix,
                   PYTHONPATH=str(REPO))
        res = subprocess.run([sys.executable, "-m", "collcomm.cli", "run", "-n", "8", "--emulate", str(TWO_BOX),
                              "--prefix", prefix, "--scale", "1GB/s=200Mbit", "--timeout", "60", sys.executable,
                              str(job)], capture_output=True, text=True, env=env, timeout=240)
    finally:
        emu.down(prefix)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    values = sorted((json.loads(l.split("RESULT ", 1)[1]) for l in res.stdout.splitlines() if "RESULT " in l),
                    key=lambda v: v["rank"])
    assert len(values) == 8, res.stdout[-3000:]
    for v in values:
        assert v["wrong"] == [], f"rank {v['rank']}: wrong results at {v['wrong']}"
    ats = {v["changes"][0]["at"] if v["changes"] else None for v in values}
    assert len(ats) == 1 and None not in ats, (ats, values[0]["verdicts"])
    assert 10 < ats.pop() <= 13
    first = values[0]["changes"][0]
    print("plan changes:", json.dumps(values[0]["changes"]))
    print("allreduce seconds, rank 0:", " ".join(f"{t:.3f}" for t in values[0]["times"]))
    # Only pair 0 -> 4 crossed the throttled link in that plan: its whole route may be blamed.
    links = [f["link"] for f in first["faults"]]
    assert ["box0.gpu0", "net"] in links and all(l[0] in ("box0.gpu0", "net") for l in links), first


# ============================================================================ collcomm status
def test_status_cli_prints_the_latest_report(capsys, monkeypatch):
    import json

    from collcomm.cli import main
    from collcomm.coordinator.client import CoordinatorClient
    from collcomm.coordinator.server import CoordinatorServer

    server = CoordinatorServer("t0ken-for-status-test", host="127.0.0.1", port=0)
    address = server.start()
    try:
        monkeypatch.setenv("COLLCOMM_COORDINATOR", address)
        monkeypatch.setenv("COLLCOMM_TOKEN", "t0ken-for-status-test")
        assert main(["status"]) != 0  # nothing reported yet
        report = {"group": 0, "group_name": "world", "members": [0, 1, 2], "epoch": 3, "round": 7,
                  "current_plan_epoch": 1, "topology_name": "mesh3@plan1", "healthy": 5, "missing_reports": [],
                  "verdicts": [{"link": [0, 1], "state": "degraded", "reason": "link 0->1 degraded: 10 MB/s",
                                "evidence": {}}],
                  "faults": [{"link": ["r0", "r1"], "state": "degraded", "fraction": "1/10", "reason": "x"}],
                  "error": None}
        with CoordinatorClient(address, "t0ken-for-status-test", timeout=5) as c:
            c.kv_set("monitor/latest", json.dumps(report).encode())
        capsys.readouterr()
        assert main(["status"]) == 0
        text = capsys.readouterr().out
        assert "plan epoch 1" in text and "link 0->1 degraded" in text and "r0 -> r1" in text, text
        assert main(["status", "--prometheus"]) == 0
        text = capsys.readouterr().out
        assert 'collcomm_link_state{group="0",src="0",dst="1",state="degraded"} 1' in text, text
        assert 'collcomm_plan_epoch{group="0"} 1' in text
    finally:
        server.stop(0)
