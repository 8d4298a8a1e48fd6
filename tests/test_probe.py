"""Topology probing: measuring (simulated and real) and inferring a fabric from measurements.

* pure pieces: the round-robin schedule covers every pair once in disjoint rounds; steady rates
  drop a token bucket's burst and add up over a common window; max-min fair sharing; clusters;
  measurements survive JSON;
* inference, property-tested on fabrics measured by the simulator with +-10% noise: two boxes
  (fast switch inside, a thin NIC per rank to a network switch), a flat switch, a full mesh and
  a ring of direct links (with hop counts, and with latencies only) come back with the right
  structure, every link within 15%, and ForestColl's optimal allreduce bandwidth within 15%;
  clusters that share one uplink get one; rounds whose pairs share links are detected;
* real jobs (loopback): `collcomm topology --probe -np 3 -o f.json` writes a loadable fabric
  with positive bandwidths that ForestColl plans on; a job with COLLCOMM_TOPOLOGY=probe plans on
  the probed fabric and its allreduce is exact; collcomm.probe_topology() agrees on every rank;
  bad input exits 2 with one line;
* emulated fabrics (root only): the probe recovers tc-shaped links within 15%.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multiproc
from collcomm.schedules import generate
from collcomm.schedules.optimum import collective_bound
from collcomm.topology import jsonio, presets
from collcomm.topology.model import COMPUTE, SWITCH, Link, Node, Topology
from collcomm.probing import chunk_for, hop_count, round_robin, simulate, steady_rate
from collcomm.topology.inference import Measurements, cluster_ranks, infer_topology, max_min_rates

REPO = Path(__file__).resolve().parent.parent
WITHIN = 0.15


def close(x, want, rel=WITHIN) -> bool:
    return abs(float(x) - float(want)) <= rel * float(want)


# ---------------------------------------------------------------------------- fabrics with known answers
def two_boxes(k: int, fast: Fraction, nic: Fraction) -> Topology:
    """Two boxes of k ranks: a fast switch inside each box, a thin NIC per rank to a network switch."""
    nodes = [Node(f"b{b}.g{i}", COMPUTE, f"b{b}") for b in range(2) for i in range(k)]
    nodes += [Node(f"b{b}.sw", SWITCH, f"b{b}") for b in range(2)] + [Node("net", SWITCH)]
    links = [Link(f"b{b}.g{i}", f"b{b}.sw", fast, 1.0) for b in range(2) for i in range(k)]
    links += [Link(f"b{b}.g{i}", "net", nic, 5.0) for b in range(2) for i in range(k)]
    return Topology(f"twoboxes{k}", nodes, links)


def links_between(topo: Topology, u: str, v: str) -> Fraction:
    return topo.capacity.get((u, v), Fraction(0))


def clusters(topo: Topology) -> list[list[int]]:
    """Ranks grouped by the `host` the inference gave them (its clusters)."""
    groups: dict[str, list[int]] = {}
    for r, c in enumerate(topo.compute):
        groups.setdefault(topo.node[c].host, []).append(r)
    return sorted(groups.values())


def rank_links(topo: Topology, r: int) -> dict[str, tuple[Fraction, Fraction]]:
    """Neighbour -> (bandwidth out, bandwidth in) of rank r."""
    me = topo.compute[r]
    out = {}
    for (u, v), bw in topo.capacity.items():
        if u == me:
            out[v] = (bw, topo.capacity.get((v, u), Fraction(0)))
    return out


def check_bound(true: Topology, inferred: Topology) -> None:
    want, got = collective_bound(true, "allreduce"), collective_bound(inferred, "allreduce")
    assert close(got, want), f"allreduce optimum {float(got):.4g} vs true {float(want):.4g}"


def check_rounded(topo: Topology) -> None:
    """The file holds 3-significant-digit decimals and loads back equal."""
    again = jsonio.loads(jsonio.dumps(topo))
    assert again == topo
    for link in topo.links:
        digits = f"{float(link.bandwidth):.3g}"
        assert Fraction(digits) == link.bandwidth, link


bandwidths = st.integers(1, 4000).map(lambda k: Fraction(k, 20))  # 0.05 .. 200 GB/s
noise_seeds = st.integers(0, 2**31)


# ---------------------------------------------------------------------------- pure pieces
@pytest.mark.parametrize("n", range(1, 10))
def test_round_robin_meets_every_pair_once_in_disjoint_rounds(n):
    rounds = round_robin(n)
    pairs = [p for rnd in rounds for p in rnd]
    assert sorted(pairs) == [(a, b) for a in range(n) for b in range(a + 1, n)]
    for rnd in rounds:
        ranks = [r for p in rnd for r in p]
        assert len(ranks) == len(set(ranks))
    assert len(rounds) == (0 if n < 2 else n - 1 if n % 2 == 0 else n)


def test_steady_rate_drops_the_burst_and_adds_up_over_a_common_window():
    chunk = 1000
    # A token bucket's burst: 20 chunks at once, then one chunk every 10 ms (100 kB/s).
    times = [0.001 * i / 20 for i in range(20)] + [0.001 + 0.01 * i for i in range(1, 101)]
    assert steady_rate(times, chunk, start=0.25) == pytest.approx(100e3, rel=1e-3)
    assert steady_rate(times, chunk) > 110e3  # the burst inflates the rate of the whole
    # Two flows whose shares move around: over one window their rates add up to the total.
    a = [0.004 * i for i in range(1, 200)]                     # 250 kB/s
    b = [0.1 + 0.008 * i for i in range(1, 100)]               # 125 kB/s, starts late
    total = steady_rate(a, chunk, 0.2, 0.6) + steady_rate(b, chunk, 0.2, 0.6)
    assert total == pytest.approx(375e3, rel=1e-6)
    assert steady_rate([1.0], chunk) == 0.0


def test_chunks_give_about_32_per_window_within_bounds():
    assert chunk_for(0.0125, 0.5) == 128 << 10          # 12.5 MB/s: 6.25 MB per window
    assert chunk_for(0.0125, 0.5, sharing=8) == 16 << 10
    assert chunk_for(100.0, 0.5) == 1 << 20
    assert chunk_for(0.0, 0.5) == 16 << 10


def test_max_min_fair_rates():
    cap = {"a": 10.0, "b": 4.0}
    assert max_min_rates([["a"], ["a", "b"], ["b"]], cap) == [8.0, 2.0, 2.0]
    assert max_min_rates([["a"], ["a"]], cap) == [5.0, 5.0]


def test_clusters_follow_bandwidth_classes():
    bw = {(a, b): (10.0 if (a < 2) == (b < 2) else 1.0) for a in range(4) for b in range(4) if a != b}
    assert cluster_ranks(4, bw) == [[0, 1], [2, 3]]
    flat = {(a, b): 5.0 * (1 + 0.1 * ((a + b) % 3)) for a in range(4) for b in range(4) if a != b}
    assert cluster_ranks(4, flat) == [[0, 1, 2, 3]]


def test_measurements_survive_json():
    m = simulate(two_boxes(2, Fraction(40), Fraction(5)), noise=0.1, seed=7)
    again = Measurements.from_json(json.loads(json.dumps(m.to_json())))
    assert again == m
    assert jsonio.dumps(infer_topology(again)) == jsonio.dumps(infer_topology(m))


def test_one_and_two_ranks():
    one = infer_topology(Measurements(1))
    assert one.num_ranks == 1 and not one.links
    two = infer_topology(simulate(presets.star(2, 3)))
    assert two.num_ranks == 2 and collective_bound(two, "allreduce") == collective_bound(presets.star(2, 3),
                                                                                          "allreduce")


def test_hop_count_on_this_machine():
    hops = hop_count("127.0.0.1")
    if hops is None:
        pytest.skip("no ICMP port-unreachable on loopback here")
    assert hops == 1


# ---------------------------------------------------------------------------- inference, property-tested
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(2, 4), nic=bandwidths, ratio=st.integers(3, 30), seed=noise_seeds)
def test_two_boxes_come_back_as_two_switches_and_a_network(k, nic, ratio, seed):
    true = two_boxes(k, nic * ratio, nic)
    m = simulate(true, noise=0.1, seed=seed)
    topo = infer_topology(m)
    assert clusters(topo) == [list(range(k)), list(range(k, 2 * k))]
    # A box of two is one direct link (the same fabric as a switch with two ports).
    assert sorted(topo.switches) == (["network"] if k == 2 else ["c0.switch", "c1.switch", "network"])
    for r in range(2 * k):
        links = rank_links(topo, r)
        inside = [f"r{r ^ 1}"] if k == 2 else [f"c{r // k}.switch"]
        assert set(links) == set(inside) | {"network"}, links
        assert all(close(x, nic * ratio) for x in links[inside[0]])
        assert all(close(x, nic) for x in links["network"])
    n = 2 * k  # O(n) phases, nothing interferes: pairs, 3 verified alone, intra (both boxes at once), cross, clusters
    assert m.phases <= 2 * (n - 1) + 3 + 2 * k + 2 * n + 4
    check_bound(true, topo)
    check_rounded(topo)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 8), bw=bandwidths, seed=noise_seeds)
def test_a_flat_switch_comes_back_as_one_switch(n, bw, seed):
    true = presets.star(n, bw)
    topo = infer_topology(simulate(true, noise=0.1, seed=seed))
    assert clusters(topo) == [list(range(n))]
    assert topo.switches == ("c0.switch",)
    for r in range(n):
        links = rank_links(topo, r)
        assert list(links) == ["c0.switch"] and all(close(x, bw) for x in links["c0.switch"])
    check_bound(true, topo)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 6), bw=bandwidths, seed=noise_seeds, hops=st.booleans())
def test_a_full_mesh_comes_back_as_direct_links(n, bw, seed, hops):
    true = presets.fully_connected(n, bw)
    topo = infer_topology(simulate(true, noise=0.1, seed=seed, hops=hops))
    assert not topo.switches
    for a in range(n):
        for b in range(n):
            if a != b:
                assert close(links_between(topo, topo.compute[a], topo.compute[b]), bw)
    check_bound(true, topo)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 8), bw=bandwidths, seed=noise_seeds, hops=st.booleans())
def test_a_ring_comes_back_as_a_ring(n, bw, seed, hops):
    """Pairs of a round share ring links (multi-hop routes): the probe notices and measures alone;
    the neighbours are the one-hop peers, or without hop counts the nearest by latency."""
    true = presets.ring(n, bw)
    m = simulate(true, noise=0.1, seed=seed, hops=hops)
    topo = infer_topology(m)
    assert not topo.switches
    edges = {(a, b) for a in range(n) for b in range(n) if a != b
             and links_between(topo, topo.compute[a], topo.compute[b]) > 0}
    assert edges == {(a, (a + d) % n) for a in range(n) for d in (1, -1)}
    for a, b in edges:
        assert close(links_between(topo, topo.compute[a], topo.compute[b]), bw)
    check_bound(true, topo)


@settings(max_examples=15, deadline=None)
@given(per=st.integers(2, 4), seed=noise_seeds)
def test_clusters_behind_one_thin_link_share_an_uplink(per, seed):
    """Two fully connected clusters joined by one thin link: rounds interfere on it (detected,
    measured alone); the members together get no more out than one alone: a shared uplink."""
    true = presets.two_clusters(per, 10, 1)
    m = simulate(true, noise=0.1, seed=seed, hops=False)
    assert any("interfered" in note for note in m.notes)
    topo = infer_topology(m)
    assert clusters(topo) == [list(range(per)), list(range(per, 2 * per))]
    assert {"c0.uplink", "c1.uplink", "network"} <= set(topo.switches)
    assert close(links_between(topo, "c0.uplink", "network"), 1)
    check_bound(true, topo)


@pytest.mark.parametrize("true", [presets.dgx_a100(2), presets.torus2d(3, 3), presets.hypercube(3),
                                  presets.mi250(1), presets.make_preset("leaf-spine", leaves=2, hosts_per_leaf=3,
                                                                        spines=2, oversubscription=2)],
                         ids=lambda t: t.name)
def test_presets_keep_their_allreduce_optimum(true):
    check_bound(true, infer_topology(simulate(true, noise=0.1, seed=1)))


def test_serial_pairs_give_the_same_model_without_noise():
    true = two_boxes(3, Fraction(50), Fraction(5))
    rounds, serial = simulate(true), simulate(true, concurrent=False)
    assert serial.phases > rounds.phases
    assert infer_topology(rounds) == infer_topology(serial)


# ---------------------------------------------------------------------------- real jobs on this machine
def cli(*args, env=None, timeout=180):
    full = {k: v for k, v in os.environ.items() if not k.startswith("COLLCOMM_")}
    full.update({"OMP_NUM_THREADS": "1"}, **(env or {}))
    return subprocess.run([sys.executable, "-m", "collcomm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full)


@pytest.mark.timeout(180)
def test_cli_probe_writes_a_fabric_forestcoll_plans_on(tmp_path):
    out, meas = tmp_path / "f.json", tmp_path / "m.json"
    res = cli("topology", "--probe", "-np", 3, "-o", out, "--topology-seconds", "0.2", "--measurements", meas)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "probed     3 ranks" in res.stdout and "topology   probed3" in res.stdout
    assert f"wrote {out}" in res.stdout
    topo = jsonio.load(out)
    assert topo.num_ranks == 3
    assert topo.links and all(link.bandwidth > 0 for link in topo.links)
    plan = generate(topo, "allreduce", "forestcoll")
    assert plan.algbw > 0
    m = Measurements.from_json(json.loads(meas.read_text()))
    assert len(m.bandwidth) == 6 and all(v > 0 for v in m.bandwidth.values())
    assert len(m.latency_us) == 3 and all(v > 0 for v in m.latency_us.values())


def probed_allreduce_worker():
    import collcomm as cc

    rt = cc.api.runtime()
    topo = rt.world_topology()
    x = np.arange(1000, dtype=np.float64) + cc.rank()
    cc.allreduce(x)
    n = cc.world_size()
    assert np.array_equal(x, n * np.arange(1000, dtype=np.float64) + n * (n - 1) / 2)
    again = cc.probe_topology(seconds_per_pair=0.1)
    return {"name": topo.name, "ranks": topo.num_ranks, "json": jsonio.dumps(topo),
            "again": jsonio.dumps(again)}


@pytest.mark.timeout(180)
def test_a_job_with_topology_probe_plans_on_the_probed_fabric():
    job = multiproc.run(3, probed_allreduce_worker, timeout=150,
                        env={"COLLCOMM_TOPOLOGY": "probe", "COLLCOMM_PROBE_SECONDS": "0.15"})
    values = job.values()
    assert [v["name"] for v in values] == ["probed3"] * 3
    assert len({v["json"] for v in values}) == 1      # every rank plans on the same fabric
    assert len({v["again"] for v in values}) == 1     # and probe_topology() agrees on every rank
    assert jsonio.loads(values[0]["again"]).num_ranks == 3


@pytest.mark.parametrize("args, message", [
    (["--probe"], "give the number of ranks"),
    (["--probe", "-np", "1"], "at least 2 ranks"),
    (["--preset", "star", "-np", "4"], "-np applies to --probe only"),
    (["--probe", "--preset", "star", "-np", "2"], "not allowed with"),
    (["--probe", "-np", "2", "--ranks", "4"], "--ranks sizes a --preset"),
    (["--probe", "-np", "2", "--topology-seconds", "0"], "--topology-seconds"),
    (["--probe", "-np", "2", "--emulate", "/nonexistent/t.json"], "does not exist"),
    (["--probe", "-np", "2", "-o", "/nonexistent/dir/f.json"], "does not exist"),
])
def test_bad_probe_input_is_one_line_and_exit_2(args, message):
    res = cli("topology", *args, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("collcomm: error:") and message in lines[0], res.stderr


# ---------------------------------------------------------------------------- emulated fabrics (root)
CAN_EMULATE = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
needs_root = pytest.mark.skipif(not CAN_EMULATE, reason="emulated fabrics need root and iproute2 (ip, tc)")
SCALE, PER_GBPS = "1GB/s=100Mbit", 0.0125  # 1 GB/s of the file is shaped to 12.5 MB/s = 0.0125 GB/s


@pytest.fixture
def prefix():
    from collcomm import emulation as emulate

    name = f"ccpr{os.getpid() % 100000}"
    yield name
    if CAN_EMULATE:
        emulate.down(name)


def probe_emulated(tmp_path, topo: Topology, prefix: str, seconds: str = "0.3") -> tuple[Topology, Measurements]:
    path, out, meas = tmp_path / "t.json", tmp_path / "probed.json", tmp_path / "m.json"
    jsonio.save(topo, path)
    res = cli("topology", "--probe", "--emulate", path, "--prefix", prefix, "--scale", SCALE,
              "--topology-seconds", seconds, "-o", out, "--measurements", meas, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return jsonio.load(out), Measurements.from_json(json.loads(meas.read_text()))


@needs_root
@pytest.mark.slow  # the emulated ring's test checks the same accuracy (CI time)
@pytest.mark.timeout(300)
def test_emulated_two_boxes_are_recovered_within_15_percent(tmp_path, prefix):
    true = two_boxes(2, Fraction(4), Fraction(1))  # 50 MB/s inside a box, 12.5 MB/s NICs
    topo, m = probe_emulated(tmp_path, true, prefix)
    for (a, b), rate in m.bandwidth.items():
        assert close(rate, (4 if a // 2 == b // 2 else 1) * PER_GBPS), (a, b, rate)
    assert clusters(topo) == [[0, 1], [2, 3]]
    assert "network" in topo.switches
    for r in range(4):
        assert all(close(x, PER_GBPS) for x in rank_links(topo, r)["network"])
    check_bound(true, scaled(topo, 1 / PER_GBPS))


@needs_root
@pytest.mark.timeout(300)
def test_emulated_ring_is_recovered_within_15_percent(tmp_path, prefix):
    true = presets.ring(5, 2)  # 25 MB/s links; non-neighbours are two hops apart
    topo, m = probe_emulated(tmp_path, true, prefix)
    assert m.hops and max(m.hops.values()) == 2
    edges = {(a, b) for a in range(5) for b in range(5) if a != b
             and links_between(topo, topo.compute[a], topo.compute[b]) > 0}
    assert edges == {(a, (a + d) % 5) for a in range(5) for d in (1, -1)}
    for a, b in edges:
        assert close(links_between(topo, topo.compute[a], topo.compute[b]), 2 * PER_GBPS)
    check_bound(true, scaled(topo, 1 / PER_GBPS))


def scaled(topo: Topology, factor: float) -> Topology:
    links = [Link(l.src, l.dst, l.bandwidth * Fraction(factor).limit_denominator(10**6), l.latency_us, l.duplex)
             for l in topo.links]
    return Topology(topo.name, topo.nodes, links)
