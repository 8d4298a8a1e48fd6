"""`collcomm emulate fault`: take one link of an emulated fabric down, throttle it, bring it back.

Pure parts everywhere (percentages, node names, which links exist); on a real fabric (root
only): one TCP stream across a link throttled to 10% measures ~10% of its rate and the other
direction keeps its rate; `--down` makes connection attempts time out and stalls an open
stream while other links carry on; `--up` restores the rate and the stalled stream resumes;
bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from collcomm import emulation as emulate
from collcomm.emulation import EmulationError, shaping
from collcomm.topology import jsonio
from test_emulate import CAN_EMULATE, cli, stream_rate

needs_root = pytest.mark.skipif(not CAN_EMULATE, reason="emulated fabrics need root and iproute2 (ip, tc)")

# Three ranks around one switch, 1 GB/s links: at 1GB/s=40Mbit each link is 5 MB/s of goodput.
STAR = {
    "format": "collcomm.topology/1", "name": "star3",
    "nodes": [{"id": "r0", "kind": "compute"}, {"id": "r1", "kind": "compute"}, {"id": "r2", "kind": "compute"},
              {"id": "sw", "kind": "switch"}],
    "links": [{"src": f"r{i}", "dst": "sw", "bandwidth": 1} for i in range(3)],
}
SCALE = "1GB/s=40Mbit"
FULL = 5e6


# --------------------------------------------------------------------------- pure
@pytest.mark.parametrize("text,value", [("10%", 10.0), ("10", 10.0), (" 2.5% ", 2.5), ("100%", 100.0), (50, 50.0)])
def test_percentages_parse(text, value):
    assert emulate.parse_percent(text) == value


@pytest.mark.parametrize("text", ["0%", "0", "-5%", "101%", "abc", "", "%", "nan%", "inf"])
def test_bad_percentages_are_refused(text):
    with pytest.raises(EmulationError, match="--bandwidth must be a percentage"):
        emulate.parse_percent(text)


def test_nodes_resolve_by_id_or_rank_and_only_links_that_exist_are_faulted():
    p = emulate.plan(jsonio.from_dict(STAR), "ccplan", SCALE)
    assert emulate.resolve_node(p, "r2") == "r2" and emulate.resolve_node(p, "1") == "r1"
    assert emulate.resolve_node(p, 0) == "r0" and emulate.resolve_node(p, "sw") == "sw"
    for bad in ("3", "r9", "", "-1"):
        with pytest.raises(EmulationError, match="neither a node"):
            emulate.resolve_node(p, bad)
    ends = shaping.link_ends(p, "r0", "sw")
    assert set(ends) == {("r0", "sw"), ("sw", "r0")}
    assert ends[("r0", "sw")][:2] == (p.namespaces[0], "e3") and ends[("sw", "r0")][:2] == (p.namespaces[3], "e0")
    with pytest.raises(EmulationError, match="no link between 'r0' and 'r1'.*'r0' is linked to sw"):
        shaping.link_ends(p, "r0", "r1")
    with pytest.raises(EmulationError, match="two different nodes"):
        emulate.fault(p, "r0", "0", "down")
    with pytest.raises(EmulationError, match="fault mode"):
        emulate.fault(p, "r0", "sw", "sideways")


# --------------------------------------------------------------------------- real fabric
@pytest.fixture(scope="module")
def fabric():
    prefix = f"ccf{os.getpid() % 10000}"
    p = emulate.up(emulate.plan(jsonio.from_dict(STAR), prefix, SCALE))
    try:
        yield p
    finally:
        emulate.down(prefix)
        assert not any(emulate.leftovers(prefix).values())


def fault(p, *args) -> subprocess.CompletedProcess:
    return cli("emulate", "fault", "--prefix", p.prefix, *args)


CONNECT = textwrap.dedent("""
    import socket, sys, time
    t = time.monotonic()
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
        print("connected")
    except OSError as e:
        print("failed", e.__class__.__name__, round(time.monotonic() - t, 1))
""")

SERVER = textwrap.dedent("""
    import socket, sys, threading
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8); s.settimeout(120); print("ready", flush=True)
    def echo(c):
        try:
            while True:
                b = c.recv(1 << 16)
                if not b: return
                c.sendall(b)
        except OSError:
            return
    while True:
        try:
            c, _ = s.accept()
        except OSError:
            break
        threading.Thread(target=echo, args=(c,), daemon=True).start()
""")

# Reads commands on stdin ("ping SECONDS"): sends a byte, waits that long for the echo.
CLIENT = textwrap.dedent("""
    import socket, sys, time
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    print("connected", flush=True)
    for line in sys.stdin:
        c.settimeout(float(line.split()[1])); t = time.monotonic()
        try:
            c.sendall(b"x"); print("echo" if c.recv(1) == b"x" else "closed", flush=True)
        except socket.timeout:
            print("timeout", round(time.monotonic() - t, 1), flush=True)
""")


def connect(p, src: int, dst: int, port: int, timeout: float = 2.0) -> str:
    res = subprocess.run(emulate.wrap_command(p, src, [sys.executable, "-c", CONNECT, p.addresses[dst], str(port),
                                                       str(timeout)]), capture_output=True, text=True, timeout=30)
    return res.stdout.strip()


def server(p, rank: int, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(emulate.wrap_command(p, rank, [sys.executable, "-c", SERVER, p.addresses[rank],
                                                           str(port)]), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@needs_root
@pytest.mark.timeout(180)
def test_bandwidth_throttles_one_direction_and_up_restores_it(fabric):
    p = fabric
    assert stream_rate(p, 0, 1) == pytest.approx(FULL, rel=0.1)
    try:
        res = fault(p, "--link", "0", "sw", "--bandwidth", "10%")  # rank number and node id
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip().startswith(f"{p.prefix}: link r0 <-> sw shaped to 10% of its planned rate: r0 -> sw")
        assert stream_rate(p, 0, 1) == pytest.approx(FULL / 10, rel=0.25)  # r0 -> sw -> r1
        assert stream_rate(p, 1, 0) == pytest.approx(FULL, rel=0.1)       # sw -> r0 kept its rate
    finally:
        res = fault(p, "--link", "r0", "sw", "--up")
    assert res.returncode == 0, res.stderr
    assert "is up at its planned rates" in res.stdout
    assert stream_rate(p, 0, 1) == pytest.approx(FULL, rel=0.1)


@needs_root
@pytest.mark.slow  # each direction alone is tested above (CI time)
@pytest.mark.timeout(180)
def test_both_throttles_both_directions(fabric):
    p = fabric
    try:
        res = fault(p, "--link", "sw", "r2", "--bandwidth", "20", "--both")
        assert res.returncode == 0, res.stderr
        assert "sw -> r2" in res.stdout and "r2 -> sw" in res.stdout
        assert stream_rate(p, 2, 0) == pytest.approx(FULL / 5, rel=0.25)
        assert stream_rate(p, 0, 2) == pytest.approx(FULL / 5, rel=0.25)
    finally:
        assert fault(p, "--link", "r2", "sw", "--up").returncode == 0
    assert stream_rate(p, 2, 0) == pytest.approx(FULL, rel=0.1)


@needs_root
@pytest.mark.timeout(180)
def test_down_is_a_black_hole_both_ways_and_up_brings_it_back(fabric):
    p = fabric
    servers = [server(p, 1, 5301), server(p, 2, 5302), server(p, 0, 5300)]
    client = subprocess.Popen(emulate.wrap_command(p, 0, [sys.executable, "-c", CLIENT, p.addresses[1], "5301"]),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ping(seconds: float) -> str:
        client.stdin.write(f"ping {seconds}\n")
        client.stdin.flush()
        return client.stdout.readline().strip()

    try:
        assert client.stdout.readline().strip() == "connected"
        assert ping(5) == "echo"
        res = fault(p, "--link", "r1", "sw", "--down")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"{p.prefix}: link r1 <-> sw is down (every packet dropped both ways)"
        assert ping(1.5) == "timeout 1.5"                        # the open stream stalls
        assert connect(p, 0, 1, 5301).startswith("failed TimeoutError")   # into r1 ...
        assert connect(p, 1, 2, 5302).startswith("failed TimeoutError")   # ... and out of it
        assert connect(p, 0, 2, 5302) == "connected"            # other links carry on
        assert connect(p, 1, 1, 5301) == "connected"            # r1's own address is still its own
        res = fault(p, "--link", "r1", "sw", "--up")
        assert res.returncode == 0, res.stderr
        assert connect(p, 0, 1, 5301) == "connected"
        assert ping(15) in ("echo", "closed")  # the stalled byte arrives once TCP retransmits
    finally:
        fault(p, "--link", "r1", "sw", "--up")
        client.kill()
        for s in servers:
            s.kill()
        client.wait()
        for s in servers:
            s.wait()
    assert stream_rate(p, 0, 1) == pytest.approx(FULL, rel=0.1)


@needs_root
@pytest.mark.timeout(60)
def test_bad_input_is_one_line_and_exit_2(fabric):
    p = fabric
    cases = [
        (("--link", "r0", "r9", "--down"), "'r9' is neither a node of the emulated fabric 'star3' nor a rank 0..2"),
        (("--link", "0", "1", "--down"), "no link between 'r0' and 'r1'"),
        (("--link", "r0", "sw", "--bandwidth", "0%"), "--bandwidth must be a percentage"),
        (("--link", "r0", "sw", "--bandwidth", "150%"), "--bandwidth must be a percentage"),
        (("--link", "r0", "sw"), "one of the arguments --down --bandwidth --up is required"),
        (("--link", "r0", "sw", "--up", "--both"), "--both applies to --bandwidth"),
    ]
    for args, message in cases:
        res = fault(p, *args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.count("\n") == 1 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = cli("emulate", "fault", "--prefix", p.prefix + "x", "--link", "r0", "sw", "--down")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert f"no emulated fabric is up under prefix '{p.prefix}x'" in res.stderr
    res = cli("emulate", "fault", "--prefix", p.prefix, "--link", "r0", "sw", "--down", unprivileged=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "needs root" in res.stderr
    assert stream_rate(p, 0, 1) == pytest.approx(FULL, rel=0.1)  # none of that touched the fabric
