"""Emulated fabrics: the plan (pure), and real namespaces, veth pairs and tbf (root only).

* the plan's routes, followed hop by hop like the kernel would, reach every node from every
  node by a shortest path, over links that exist in that direction; rates are the scaled
  bandwidths; one-way links are a trickle backwards;
* `collcomm emulate up` builds what the plan says, the shaped rates are what a TCP stream
  measures, `down` leaves no namespace, link, process or state file, also after a job whose
  launcher was SIGKILLed, and never touches a namespace outside its prefix;
* a short job under `collcomm run --emulate` gives exact results with every algorithm;
* `collcomm-perf --emulate --scale --prefix` runs on the fabric `collcomm emulate up` built (and
  leaves it up), builds and removes its own otherwise, and refuses another fabric under its prefix;
* without root, a one-line error and exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collcomm import emulation as emulate
from collcomm.emulation import EmulationError, netns
from collcomm.topology import jsonio, presets

REPO = Path(__file__).resolve().parent.parent
TWO_BOX = REPO / "bench" / "topologies" / "two_box.json"
CAN_EMULATE = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
needs_root = pytest.mark.skipif(not CAN_EMULATE, reason="emulated fabrics need root and iproute2 (ip, tc)")


# --------------------------------------------------------------------------- the plan, pure
def follow(p: emulate.FabricPlan, u: int, d: int) -> list[list[int]]:
    """Every path the routing tables of plan ``p`` can take from namespace u to the address of d."""
    target = p.addresses[d]
    if u == d:
        return [[d]]
    line = next(r for r in p.routes[u] if r.split()[0] == f"{target}/32")
    words = line.split()
    hops = [int(words[i + 1][1:]) for i, w in enumerate(words) if w == "dev"]
    vias = [words[i + 1] for i, w in enumerate(words) if w == "via"]
    assert [p.addresses[h] for h in hops] == vias, line  # next hop address is the neighbour at that interface
    return [[u] + rest for h in hops for rest in follow(p, h, d)]


FABRICS = [presets.make_preset("leaf-spine", leaves=2, hosts_per_leaf=3, spines=2, oversubscription=2),
           presets.make_preset("oneway-ring", ranks=5), presets.make_preset("dgx-a100", boxes=2),
           presets.make_preset("two-clusters", ranks_per_cluster=3), jsonio.load(TWO_BOX),
           presets.make_preset("torus", rows=3, cols=3)]


@pytest.mark.parametrize("topo", FABRICS, ids=lambda t: t.name)
def test_routes_follow_existing_directed_links_along_shortest_paths(topo):
    p = emulate.plan(topo, "ccplan", "1GB/s=100Mbit")
    g = nx.DiGraph(list(topo.capacity))
    index = {nid: i for i, nid in enumerate(topo.order)}
    hops = dict(nx.all_pairs_shortest_path_length(g))
    for u_id in topo.order:
        for d_id in topo.order:
            for path in follow(p, index[u_id], index[d_id]):
                ids = [topo.order[i] for i in path]
                assert all((a, b) in topo.capacity for a, b in zip(ids, ids[1:])), ids
                assert len(ids) - 1 == hops[u_id][d_id], (ids, hops[u_id][d_id])


def test_rates_are_the_scaled_bandwidths_as_goodput_and_one_way_links_trickle_back():
    topo = presets.make_preset("oneway-ring", ranks=4, bandwidth=2)
    p = emulate.plan(topo, "ccplan", "1GB/s=50Mbit")
    assert len(p.veths) == 4
    forward = round(Fraction(2) * 50_000_000 * emulate.WIRE_PER_PAYLOAD)
    for v in p.veths:
        rates = {(v.a, v.b): v.a_bits, (v.b, v.a): v.b_bits}
        for (x, y), bits in rates.items():
            one_way = (topo.order[x], topo.order[y]) in topo.capacity
            assert bits == (forward if one_way else emulate.REVERSE_TRICKLE_BITS)


def test_the_fattest_of_equally_short_paths_wins():
    # Two ranks joined through a fat switch and through a thin one: two hops either way.
    p = emulate.plan(jsonio.load(TWO_BOX), "ccplan")
    # box0.gpu0 (0) to box0.gpu1 (1): through box0.switch (8 GB/s), not through net (1 GB/s).
    assert follow(p, 0, 1) == [[0, 8, 1]]
    assert follow(p, 0, 4) == [[0, 10, 4]]


@pytest.mark.parametrize("text,bits", [("1GB/s=100Mbit", 100_000_000), ("2GB/s=1gbit", 500_000_000),
                                       ("100MB/s=10Mbit", 100_000_000), ("1/2GB/s=1Mbit", 2_000_000)])
def test_scale_parses(text, bits):
    assert emulate.parse_scale(text) == bits


@pytest.mark.parametrize("text", ["", "100Mbit", "1GB/s=", "0GB/s=1Mbit", "1GB/s=-1Mbit", "1Gb/s=1MB"])
def test_bad_scale_and_prefix_are_refused(text):
    with pytest.raises(EmulationError, match="scale"):
        emulate.parse_scale(text)


@pytest.mark.parametrize("prefix", ["", "a", "Cap", "toolongname", "a-b", "1ab"])
def test_bad_prefixes_are_refused(prefix):
    with pytest.raises(EmulationError, match="prefix"):
        emulate.check_prefix(prefix)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.integers(1, 3), st.integers(1, 3))
def test_leaf_spine_plans_reach_everything(leaves, hosts, spines):
    topo = presets.make_preset("leaf-spine", leaves=leaves, hosts_per_leaf=hosts, spines=spines)
    p = emulate.plan(topo, "ccplan")
    assert len(p.namespaces) == len(topo.order) and len(set(p.addresses)) == len(p.addresses)
    for u in range(len(topo.order)):
        for d in range(topo.num_ranks):
            assert all(path[-1] == d for path in follow(p, u, d))


# --------------------------------------------------------------------------- real namespaces
def cli(*args, timeout=60, env=None, unprivileged=False) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "collcomm.cli", *args]
    if unprivileged:  # root without capabilities: what an unprivileged user meets (and it can import numpy)
        argv = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"] + argv
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def unique_prefix(tag: str) -> str:
    return f"cc{tag}{os.getpid() % 10000}"


@pytest.fixture
def prefix(request):
    name = unique_prefix(request.node.name[5:7].replace("_", "x"))
    yield name
    if CAN_EMULATE:
        emulate.down(name)
        assert not any(emulate.leftovers(name).values())


def nothing_left(prefix: str) -> None:
    left = emulate.leftovers(prefix)
    assert left == {"namespaces": [], "links": [], "pids": [], "state": []}, left
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix + "-" not in ns
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f" {prefix}br" not in links and f" {prefix}m" not in links


def stream_rate(p: emulate.FabricPlan, src: int, dst: int, seconds: float = 1.5) -> float:
    """Bytes/s of one TCP stream from rank src to rank dst inside the fabric, steady state only."""
    code = textwrap.dedent("""
        import socket, sys, time
        mode, host, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        if mode == "server":
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port)); s.listen(1); s.settimeout(20); print("ready", flush=True)
            c, _ = s.accept(); c.settimeout(20); buf = bytearray(1 << 20); marks = []
            n = 0
            while True:
                k = c.recv_into(buf)
                if not k: break
                n += k; marks.append((time.monotonic(), n))
            t0 = marks[0][0] + 0.3  # skip the token bucket's initial burst
            first = next(m for m in marks if m[0] >= t0)
            print((n - first[1]) / (marks[-1][0] - first[0]))
        else:
            c = socket.create_connection((host, port), timeout=20); data = b"x" * (1 << 16)
            end = time.monotonic() + seconds
            while time.monotonic() < end: c.sendall(data)
            c.close()
    """)
    host = p.addresses[dst]
    server = subprocess.Popen(emulate.wrap_command(p, dst, [sys.executable, "-c", code, "server", host, "5201",
                                                           str(seconds)]), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        subprocess.run(emulate.wrap_command(p, src, [sys.executable, "-c", code, "client", host, "5201",
                                                     str(seconds)]), check=True, timeout=30)
        out, _ = server.communicate(timeout=30)
        return float(out)
    finally:
        if server.poll() is None:
            server.kill()


@needs_root
@pytest.mark.timeout(120)
def test_up_shapes_links_to_the_scaled_rates_and_down_leaves_nothing(prefix):
    res = cli("emulate", "up", str(TWO_BOX), "--prefix", prefix, "--scale", "1GB/s=40Mbit")
    assert res.returncode == 0, res.stderr
    p = emulate.current(prefix)
    assert p is not None and p.num_ranks == 8
    inside = stream_rate(p, 0, 1)  # through box0.switch: 8 GB/s -> 320 Mbit/s = 40 MB/s
    across = stream_rate(p, 0, 5)  # through net: 1 GB/s -> 40 Mbit/s = 5 MB/s
    assert inside == pytest.approx(40e6, rel=0.08)
    assert across == pytest.approx(5e6, rel=0.08)
    # A namespace outside the prefix survives `down`.
    bystander = f"{prefix}x-0"
    subprocess.run(["ip", "netns", "add", bystander], check=True)
    try:
        res = cli("emulate", "down", "--prefix", prefix)
        assert res.returncode == 0, res.stderr
        assert "removed 11 namespaces" in res.stdout
        nothing_left(prefix)
        assert bystander in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        again = cli("emulate", "down", "--prefix", prefix)  # idempotent
        assert again.returncode == 0 and "removed 0 namespaces" in again.stdout
    finally:
        subprocess.run(["ip", "netns", "del", bystander])


EXACT_JOB = textwrap.dedent("""
    import os, numpy as np, collcomm as cc
    cc.init()
    r, n = cc.rank(), cc.world_size()
    for size in (1, 1001, 65536 + 3):
        x = (np.arange(size, dtype=np.float64) % 97 + r).astype(np.float32)
        want = sum((np.arange(size, dtype=np.float64) % 97 + q) for q in range(n)).astype(np.float32)
        cc.allreduce(x)
        assert np.array_equal(x, want), ("allreduce", size)
        out = np.empty(size * n, dtype=np.int64)
        cc.allgather(out, np.full(size, r * 1000 + 7, dtype=np.int64))
        assert np.array_equal(out, np.repeat(np.arange(n) * 1000 + 7, size)), ("allgather", size)
    print("exact", os.environ["COLLCOMM_ALGORITHM"], os.environ["COLLCOMM_HOST"], flush=True)
    cc.shutdown()
""")


@needs_root
@pytest.mark.timeout(240)
def test_every_algorithm_is_exact_on_an_emulated_fabric(prefix, tmp_path):
    job = tmp_path / "job.py"
    job.write_text(EXACT_JOB)
    res = cli("emulate", "up", str(TWO_BOX), "--prefix", prefix, "--scale", "1GB/s=200Mbit")
    assert res.returncode == 0, res.stderr
    for algorithm in ("forestcoll", "ring", "tree", "halving-doubling"):
        res = cli("run", "-n", "8", "--emulate", str(TWO_BOX), "--prefix", prefix, "--scale", "1GB/s=200Mbit",
                  "--timeout", "60", sys.executable, str(job), env={"COLLCOMM_ALGORITHM": algorithm}, timeout=120)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        lines = [l for l in res.stdout.splitlines() if " exact " in l]
        assert len(lines) == 8
        # Each rank ran inside its namespace, on its fabric address.
        p = emulate.current(prefix)
        assert sorted(l.split()[-1] for l in lines) == sorted(p.addresses[:8])
    # The fabric was up before the job: the job leaves it up.
    assert emulate.current(prefix) is not None


@needs_root
@pytest.mark.timeout(120)
def test_a_job_builds_its_fabric_and_removes_it_afterwards(prefix, tmp_path):
    job = tmp_path / "job.py"
    job.write_text("import collcomm as cc, numpy as np\ncc.init()\nx = np.ones(10)\ncc.allreduce(x)\n"
                   "assert x[0] == cc.world_size()\ncc.shutdown()\n")
    res = cli("run", "-n", "8", "--emulate", str(TWO_BOX), "--prefix", prefix, sys.executable, str(job))
    assert res.returncode == 0, res.stderr
    nothing_left(prefix)


@needs_root
@pytest.mark.timeout(120)
def test_down_cleans_up_after_a_killed_launcher(prefix, tmp_path):
    job = tmp_path / "job.py"
    job.write_text("import collcomm as cc, time\ncc.init()\nprint('inside', flush=True)\ntime.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, "-m", "collcomm.cli", "run", "-n", "8", "--emulate", str(TWO_BOX),
                                 "--prefix", prefix, sys.executable, str(job)], stdout=subprocess.PIPE, text=True,
                                cwd=REPO)
    try:
        seen = 0
        deadline = time.monotonic() + 60
        while seen < 8 and time.monotonic() < deadline:
            if "inside" in launcher.stdout.readline():
                seen += 1
        assert seen == 8
        ranks = emulate.leftovers(prefix)["pids"]
        assert len(ranks) == 8
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
        left = emulate.leftovers(prefix)
        assert len(left["namespaces"]) == 11 and left["pids"]  # the ranks outlive a killed launcher
    finally:
        if launcher.poll() is None:
            launcher.kill()
    res = cli("emulate", "down", "--prefix", prefix)
    assert res.returncode == 0, res.stderr
    assert "8 processes" in res.stdout
    nothing_left(prefix)
    for pid in ranks:
        assert not netns._alive(pid)


@needs_root
@pytest.mark.timeout(60)
def test_without_root_a_one_line_error(prefix):
    res = cli("emulate", "up", str(TWO_BOX), "--prefix", prefix, unprivileged=True)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "needs root" in res.stderr and "Traceback" not in res.stderr
    res = cli("run", "-n", "8", "--emulate", str(TWO_BOX), "--prefix", prefix, "true", unprivileged=True)
    assert res.returncode == 2 and "needs root" in res.stderr and "Traceback" not in res.stderr
    nothing_left(prefix)


@needs_root
@pytest.mark.timeout(60)
def test_a_different_fabric_under_the_same_prefix_is_not_clobbered(prefix, tmp_path):
    other = tmp_path / "ring.json"
    jsonio.save(presets.make_preset("ring", ranks=8), other)
    assert cli("emulate", "up", str(other), "--prefix", prefix).returncode == 0
    res = cli("run", "-n", "8", "--emulate", str(TWO_BOX), "--prefix", prefix, "true")
    assert res.returncode == 2 and "another fabric" in res.stderr
    assert emulate.current(prefix).name == "ring8"


# --------------------------------------------------------------------------- collcomm-perf --emulate
DUO = {"format": "collcomm.topology/1", "name": "duo",
       "nodes": [{"id": "r0", "kind": "compute"}, {"id": "r1", "kind": "compute"}, {"id": "sw", "kind": "switch"}],
       "links": [{"src": f"r{i}", "dst": "sw", "bandwidth": 1} for i in range(2)]}
PERF_QUICK = ("-b", "1K", "-e", "4K", "-f", "2", "-n", "2", "-w", "1")


def perf_env() -> dict:
    """This environment, less what would make collcomm-perf a rank of another job."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("COLLCOMM_RANK", "COLLCOMM_WORLD_SIZE", "COLLCOMM_COORDINATOR", "COLLCOMM_PERF_REPORT")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", COLLCOMM_TIMEOUT="60")
    return env


def perf(*args, timeout=150, unprivileged=False) -> subprocess.CompletedProcess:
    """``python -m collcomm.perf ARGS`` as a user starts it (not as a rank of another job)."""
    argv = [sys.executable, "-m", "collcomm.perf", *map(str, args)]
    if unprivileged:
        argv = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"] + argv
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=perf_env())


def perf_watching_namespaces(prefix: str, *args, timeout=150) -> tuple[subprocess.CompletedProcess, list[set]]:
    """:func:`perf`, meanwhile collecting the processes in the namespaces of ranks 0 and 1 under
    ``prefix`` (a rank lives for seconds: the polls every 50 ms see it)."""
    argv = [sys.executable, "-m", "collcomm.perf", *map(str, args)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=perf_env())
    seen: list[set] = [set(), set()]
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for i in (0, 1):
                res = subprocess.run(["ip", "netns", "pids", f"{prefix}-{i}"], capture_output=True, text=True,
                                     timeout=10)
                seen[i] |= {int(x) for x in res.stdout.split()}
            time.sleep(0.05)
        out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), seen


def perf_rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture
def duo(tmp_path) -> Path:
    path = tmp_path / "duo.json"
    path.write_text(json.dumps(DUO))
    return path


@needs_root
@pytest.mark.timeout(200)
def test_perf_runs_on_the_fabric_emulate_up_built_and_leaves_it_up(prefix, duo, tmp_path):
    res = cli("emulate", "up", str(duo), "--prefix", prefix, "--scale", "1GB/s=200Mbit")
    assert res.returncode == 0, res.stderr
    before = emulate.current(prefix)
    try:
        out = tmp_path / "perf.json"
        res, seen = perf_watching_namespaces(prefix, "-np", 2, "--emulate", duo, "--prefix", prefix, "--scale",
                                             "1GB/s=200Mbit", *PERF_QUICK, "--json", out)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        rows = perf_rows(res.stdout)
        assert [r[0] for r in rows] == ["1024", "2048", "4096"]
        assert all(r[8] == "0" and r[12] == "0" for r in rows), rows  # #wrong, out-of-place and in-place
        doc = json.loads(out.read_text())
        assert (doc["config"]["fabric"], doc["config"]["scale"], doc["config"]["prefix"]) == (
            "duo", "1GB/s=200Mbit", prefix)
        # Each rank ran inside its namespace of this fabric.
        assert [r["pid"] in seen[r["rank"]] for r in doc["ranks"]] == [True, True], (doc["ranks"], seen)
        # Used as it was, not rebuilt (that would have removed it afterwards), and left up.
        assert emulate.current(prefix) == before
    finally:
        res = cli("emulate", "down", "--prefix", prefix)
        assert res.returncode == 0, res.stderr
    nothing_left(prefix)


@needs_root
@pytest.mark.timeout(200)
def test_perf_builds_its_own_fabric_and_removes_it_afterwards(prefix, duo, tmp_path):
    out = tmp_path / "perf.json"
    res, seen = perf_watching_namespaces(prefix, "-np", 2, "--emulate", duo, "--prefix", prefix, "--scale",
                                         "1GB/s=200Mbit", *PERF_QUICK, "--json", out)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert len(perf_rows(res.stdout)) == 3
    ranks = json.loads(out.read_text())["ranks"]
    assert [r["pid"] in seen[r["rank"]] for r in ranks] == [True, True], (ranks, seen)
    nothing_left(prefix)


@needs_root
@pytest.mark.timeout(120)
def test_perf_refuses_another_fabric_under_its_prefix(prefix, duo, tmp_path):
    ring = tmp_path / "ring.json"
    jsonio.save(presets.make_preset("ring", ranks=4), ring)
    try:
        assert cli("emulate", "up", str(ring), "--prefix", prefix).returncode == 0
        res = perf("-np", 2, "--emulate", duo, "--prefix", prefix, *PERF_QUICK, timeout=60)
        assert res.returncode == 2 and res.stdout == "", res.stdout + res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
        assert res.stderr.startswith(f"collcomm-perf: error: another fabric (ring4) is up under prefix '{prefix}'")
        assert f"`collcomm emulate down --prefix {prefix}`" in res.stderr
        assert emulate.current(prefix).name == "ring4"  # not clobbered
        # The same topology at another scale is another fabric as well.
        assert cli("emulate", "up", str(duo), "--prefix", prefix, "--scale", "1GB/s=200Mbit").returncode == 0
        res = perf("-np", 2, "--emulate", duo, "--prefix", prefix, *PERF_QUICK, timeout=60)  # the default scale
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "another fabric (duo)" in res.stderr
        assert emulate.current(prefix).same_fabric(emulate.plan(jsonio.load(duo), prefix, "1GB/s=200Mbit"))
    finally:
        assert cli("emulate", "down", "--prefix", prefix).returncode == 0


@needs_root
@pytest.mark.timeout(60)
def test_perf_without_root_a_one_line_error(prefix, duo):
    res = perf("-np", 2, "--emulate", duo, "--prefix", prefix, *PERF_QUICK, timeout=60, unprivileged=True)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "needs root" in res.stderr and "Traceback" not in res.stderr
    nothing_left(prefix)
