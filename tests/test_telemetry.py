"""Per-link telemetry: counters, the sample ring, snapshots and the Prometheus exposition."""

from __future__ import annotations

import json
import re
import threading

import pytest

from collcomm.transport.telemetry import FORMAT, LinkTelemetry


def fake_clock(start: float = 100.0):
    now = [start]
    return now, (lambda: now[0]), (lambda: 1_700_000_000.0 + now[0])


def test_counters_ring_and_snapshot():
    now, clock, wall = fake_clock()
    tel = LinkTelemetry(rank=1, ring=4, clock=clock, wall=wall)
    for i in range(6):
        now[0] += 1
        tel.record_transfer(1, 2, 1000 * (i + 1), 0.5)
    tel.record_error(1, 2, "reset")
    tel.record_error(1, 2, "reset")
    tel.record_error(1, 2, "checksum")
    tel.record_retransmit(1, 2)
    tel.set_expected(1, 2, 5000.0, group="ag", physical="a->b")
    now[0] += 2
    tel.heartbeat(0)  # 0 -> 1 heard from
    now[0] += 0.5
    snap = tel.snapshot()
    json.dumps(snap)
    assert snap["format"] == FORMAT and snap["rank"] == 1 and snap["monotonic"] == now[0]
    link = next(l for l in snap["links"] if (l["src"], l["dst"]) == (1, 2))
    assert link["bytes"] == 21000 and link["transfers"] == 6 and link["seconds"] == 3.0
    assert link["errors"] == {"reset": 2, "checksum": 1} and link["error_total"] == 3 and link["retransmits"] == 1
    assert link["expected_bytes_per_second"] == 5000.0 and link["group"] == "ag" and link["physical"] == "a->b"
    # The ring keeps the last 4 transfers, oldest first; rate = bytes / seconds.
    assert [s[1] for s in link["samples"]] == [3000, 4000, 5000, 6000]
    assert [s[3] for s in link["samples"]] == [6000, 8000, 10000, 12000]
    assert [s[0] for s in link["samples"]] == [5.5, 4.5, 3.5, 2.5]  # ages
    assert link["recent_bytes_per_second"] == 18000 / 2.0
    assert link["last_activity_age"] == 2.5 and link["last_heartbeat_age"] is None
    hb = next(l for l in snap["links"] if (l["src"], l["dst"]) == (0, 1))
    assert hb["last_heartbeat_age"] == 0.5 and hb["last_heartbeat_wall"] == pytest.approx(snap["wall"] - 0.5)
    assert snap["peers"]["0"]["last_heartbeat_age"] == 0.5


def test_recording_is_thread_safe():
    tel = LinkTelemetry(ring=8)
    handle = tel.link(0, 1)

    def work():
        for _ in range(5000):
            handle.record_transfer(10, 0.001)
            tel.record_transfer(1, 0, 10, 0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = {(l["src"], l["dst"]): l for l in tel.snapshot()["links"]}
    assert snap[(0, 1)]["transfers"] == 20000 and snap[(0, 1)]["bytes"] == 200000
    assert snap[(1, 0)]["transfers"] == 20000 and len(snap[(1, 0)]["samples"]) == 8


def test_bad_expected_rate_is_refused():
    tel = LinkTelemetry()
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            tel.set_expected(0, 1, bad)


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*)\} '
                    r'(-?[0-9.e+-]+|NaN|[+-]Inf)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_prometheus(text: str) -> dict:
    """A strict reader of the 0.0.4 text format as far as we use it: families, samples, labels."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in families
            families[name] = {"help": line.split(" ", 3)[3], "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and kind in ("counter", "gauge")
            families[name]["type"] = kind
        else:
            m = SAMPLE.match(line)
            assert m, line
            assert m.group(1) == current
            labels = {k: re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), v)
                      for k, v in LABEL.findall(m.group(2))}
            families[current]["samples"].append((labels, float(m.group(3))))
    return families


def test_prometheus_exposition():
    now, clock, wall = fake_clock()
    tel = LinkTelemetry(rank=0, clock=clock, wall=wall)
    tel.record_transfer(0, 1, 4096, 0.001)
    tel.record_transfer(0, 1, 4096, 0.001)
    tel.record_error(0, 1, 'weird "kind"\\\n')
    tel.set_expected(0, 1, 5e6, physical='box0.gpu0->"net"')
    tel.heartbeat(1)
    now[0] += 3
    fam = parse_prometheus(tel.prometheus())
    for name, f in fam.items():
        assert name.startswith("collcomm_")
        assert name.endswith("_total") == (f["type"] == "counter"), name
    by_pair = {(l["src"], l["dst"]): (l, v) for l, v in fam["collcomm_link_bytes_total"]["samples"]}
    assert by_pair[("0", "1")] == ({"src": "0", "dst": "1", "link": 'box0.gpu0->"net"'}, 8192)
    assert by_pair[("1", "0")] == ({"src": "1", "dst": "0"}, 0)  # heard from by heartbeat only
    (labels, value), = fam["collcomm_link_errors_total"]["samples"]
    assert labels["kind"] == 'weird "kind"\\\n' and value == 1
    assert fam["collcomm_link_throughput_bytes_per_second"]["samples"] == [
        ({"src": "0", "dst": "1", "link": 'box0.gpu0->"net"'}, pytest.approx(4096 / 0.001))]
    assert fam["collcomm_link_expected_bytes_per_second"]["samples"][0][1] == 5e6
    ages = {(l["src"], l["dst"]): v for l, v in fam["collcomm_link_heartbeat_age_seconds"]["samples"]}
    assert ages == {("0", "1"): 3.0, ("1", "0"): 3.0}
    assert fam["collcomm_peer_heartbeat_age_seconds"]["samples"] == [({"peer": "1"}, 3.0)]
    assert fam["collcomm_link_transfers_total"]["type"] == "counter"


def test_prometheus_of_an_empty_registry_is_valid():
    fam = parse_prometheus(LinkTelemetry().prometheus())
    assert all(f["samples"] == [] for f in fam.values())


def test_wire_counters_of_a_tcp_socket_and_the_observations_they_make():
    """A transfer recorded with its socket attaches the socket: snapshots then carry the kernel's
    bytes acknowledged and busy seconds (Linux), which observations_between turns into a "wire"
    rate; a path with data in flight and nothing acknowledged for a second is "stalled"."""
    import socket

    from collcomm.faults.detector import STALL_SECONDS, observations_between
    from collcomm.transport.telemetry import tcp_wire_counters

    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    try:
        if tcp_wire_counters(a) is None:
            pytest.skip("the kernel does not report TCP_INFO busy times here")
        tel = LinkTelemetry(rank=0)
        first = tel.snapshot()
        payload = b"x" * (8 << 20)
        def read_all(total=2 * len(payload)):
            while total > 0:
                got = b.recv(1 << 20)
                if not got:
                    return
                total -= len(got)

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        a.sendall(payload)
        tel.link(0, 1).record_transfer(len(payload), 0.001, a)
        a.sendall(payload)
        reader.join(10)
        snap = tel.snapshot()
        link = next(l for l in snap["links"] if (l["src"], l["dst"]) == (0, 1))
        assert link["wire_bytes"] > 0 and link["wire_seconds"] >= 0 and link["wire_open_seconds"] <= link["wire_seconds"]
        obs, _ = observations_between(first, snap)
        assert obs[(0, 1)].source == "wire" and obs[(0, 1)].errors == 0
        # Small frames (chunks of 64 KB and less are not timed) attach the socket too: the link is
        # still measured, by the kernel, with no timed transfer at all.
        small = LinkTelemetry(rank=0)
        before = small.snapshot()
        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        for _ in range(128):
            a.sendall(payload[:1 << 16])
            small.link(0, 1).record_bytes(1 << 16, a)
        a.sendall(payload)
        reader.join(10)
        obs, _ = observations_between(before, small.snapshot())
        assert obs[(0, 1)].source == "wire" and obs[(0, 1)].transfers == 0, obs[(0, 1)]
        # No socket: per-chunk times, as before.
        tel.record_transfer(0, 2, 1000, 0.5)
        obs, _ = observations_between(None, tel.snapshot())
        assert obs[(0, 2)].source == "chunks" and obs[(0, 2)].rate == 2000.0
    finally:
        for s in (a, b, srv):
            s.close()
    # Stalled: busy with the window open for STALL_SECONDS, nothing acknowledged.
    base = {"src": 0, "dst": 1, "bytes": 0, "transfers": 0, "seconds": 0.0, "errors": {},
            "wire_bytes": 100, "wire_seconds": 1.0, "wire_open_seconds": 1.0}
    stalled = dict(base, bytes=1 << 20, transfers=2, seconds=0.01, wire_seconds=1.0 + 2 * STALL_SECONDS,
                   wire_open_seconds=1.0 + 2 * STALL_SECONDS)
    obs, _ = observations_between({"links": [base]}, {"links": [stalled]})
    assert obs[(0, 1)].errors == 1 and obs[(0, 1)].error_kinds == ("stalled",) and obs[(0, 1)].rate == 0.0
    # The same time spent waiting on a closed receive window (a receiver that does not read) is not a stall.
    window = dict(stalled, wire_open_seconds=1.0)
    obs, _ = observations_between({"links": [base]}, {"links": [window]})
    assert obs[(0, 1)].errors == 0 and obs[(0, 1)].rate == 0.0
    # Too little busy time in the round: no rate (the kernel counts in jiffies).
    short = dict(base, bytes=1 << 20, transfers=2, seconds=0.01, wire_bytes=200, wire_seconds=1.001,
                 wire_open_seconds=1.001)
    obs, _ = observations_between({"links": [base]}, {"links": [short]})
    assert obs[(0, 1)].rate is None and obs[(0, 1)].errors == 0
