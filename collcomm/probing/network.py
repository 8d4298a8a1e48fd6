"""Probing on the job's own network: the probe's phases as point-to-point messages between ranks.

Every member of the group calls :func:`probe_runtime`; all of them get the same
:class:`~collcomm.topology.model.Topology`. The member with group rank 0 conducts
(:func:`~collcomm.probing.procedure.measure` with this module's backend): it sends each phase
to the others, takes part itself and gathers the results; the others serve phases until it
sends the inferred fabric (JSON) to everyone. Only point-to-point messages
(:mod:`collcomm.runtime.p2p`, on tags of their own) are used, so probing needs no planner and
can run while the job starts (``COLLCOMM_TOPOLOGY=probe``: :func:`probe_at_init`). A sending
member keeps only about 25 ms of the acknowledged rate in flight, so socket buffers never hold
seconds of data to drain after the stop.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import statistics
import threading
import time
from typing import Callable, Sequence

import numpy as np

from collcomm.errors import CollectiveError, CollectiveTimeout
from collcomm.probing.hops import hop_count
from collcomm.probing.procedure import CHUNK_BYTES, measure, steady_rate
from collcomm.runtime import p2p
from collcomm.topology import jsonio
from collcomm.topology.inference import DEFAULT_SECONDS, Measurements, infer_topology
from collcomm.topology.model import Topology

MIN_INFLIGHT_BYTES, MAX_INFLIGHT_BYTES = 256 << 10, 8 << 20   # in flight per flow
INFLIGHT_SECONDS = 0.025       # ... about this much of the flow's measured rate
MIN_WINDOW_CHUNKS = 3
SKIP_FRACTION = 0.25
PING_WARMUP, PING_COUNT = 3, 15

TAG_BASE = 0x7FFFFF00          # point-to-point tags of the probe (user tags stay below)
TAG_CTRL, TAG_DATA, TAG_ACK, TAG_PING = TAG_BASE, TAG_BASE + 1, TAG_BASE + 2, TAG_BASE + 3


class _Network:
    """The probe's messages between the members of a group (point-to-point, probe tags)."""

    def __init__(self, rt, members: Sequence[int], timeout: float):
        self.rt = rt
        self.members = list(members)
        self.me = self.members.index(rt.rank)
        self.timeout = float(timeout)

    # ------------------------------------------------------------ messages
    def send(self, x, peer: int, tag: int) -> None:
        p2p.send(self.rt, x, self.members[peer], tag, self.timeout)

    def recv(self, x, peer: int, tag: int) -> None:
        p2p.recv(self.rt, x, self.members[peer], tag, self.timeout)

    def send_obj(self, obj, peer: int) -> None:
        data = json.dumps(obj).encode()
        self.send(np.array([len(data)], dtype=np.int64), peer, TAG_CTRL)
        if data:
            self.send(np.frombuffer(bytearray(data), dtype=np.uint8), peer, TAG_CTRL)

    def recv_obj(self, peer: int):
        size = np.zeros(1, dtype=np.int64)
        self.recv(size, peer, TAG_CTRL)
        buf = np.empty(int(size[0]), dtype=np.uint8)
        if buf.size:
            self.recv(buf, peer, TAG_CTRL)
        return json.loads(buf.tobytes().decode())

    # ------------------------------------------------------------ the conductor's side (Backend)
    def _phase(self, spec: dict) -> dict:
        for peer in range(1, len(self.members)):
            self.send_obj(spec, peer)
        results = dict(self.run(spec, time.perf_counter()))
        for peer in range(1, len(self.members)):
            results.update(self.recv_obj(peer))
        return results

    def latency(self, pairs):
        got = self._phase({"kind": "latency", "pairs": [list(p) for p in pairs]})
        return {tuple(map(int, k.split(","))): (v[0], v[1]) for k, v in got.items()}

    def transfer(self, flows, seconds, chunks=None):
        chunks = chunks or {}
        got = self._phase({"kind": "transfer", "seconds": seconds,
                           "flows": [[s, d, int(chunks.get((s, d), CHUNK_BYTES))] for s, d in flows]})
        return {tuple(map(int, k.split(","))): v for k, v in got.items()}

    def finish(self, message: dict) -> None:
        for peer in range(1, len(self.members)):
            self.send_obj(message, peer)

    # ------------------------------------------------------------ every member's side
    def serve(self) -> dict:
        """Run the conductor's phases until it sends the result (or an error)."""
        while True:
            spec = self.recv_obj(0)
            t_phase = time.perf_counter()
            if spec["kind"] == "done":
                return spec
            if spec["kind"] == "error":
                raise CollectiveError(f"topology probe failed on rank {self.members[0]}: {spec['message']}")
            self.send_obj(self.run(spec, t_phase), 0)

    def run(self, spec: dict, t_phase: float) -> dict[str, float]:
        """This member's part of one phase (which began at ``t_phase`` here); returns the values
        it measured, keyed "a,b"."""
        jobs: list[tuple[str, Callable[[], float | None]]] = []
        me = self.me
        if spec["kind"] == "latency":
            for a, b in spec["pairs"]:
                if a == me:
                    jobs.append((f"{a},{b}", lambda b=b: self._ping(b)))
                elif b == me:
                    jobs.append(("", lambda a=a: self._echo(a)))
        elif spec["kind"] == "transfer":
            seconds = float(spec["seconds"])
            for s, d, chunk in spec["flows"]:
                if s == me:
                    jobs.append(("", lambda d=d, c=chunk: self._send_flow(d, c)))
                elif d == me:
                    jobs.append((f"{s},{d}", lambda s=s, c=chunk: self._recv_flow(s, c, t_phase, seconds)))
        else:
            raise CollectiveError(f"topology probe: unknown phase {spec['kind']!r}")
        results: dict[str, float] = {}
        errors: list[BaseException] = []

        def work(key, fn):
            try:
                value = fn()
                if key:
                    results[key] = value
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        if len(jobs) == 1:
            work(*jobs[0])
        else:
            threads = [threading.Thread(target=work, args=job, daemon=True, name="collcomm-probe") for job in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return results

    def _ping(self, peer: int) -> float:
        buf = np.zeros(1, dtype=np.int64)
        rtts = []
        for i in range(PING_WARMUP + PING_COUNT):
            t = time.perf_counter()
            buf[0] = i
            self.send(buf, peer, TAG_PING)
            self.recv(buf, peer, TAG_PING)
            rtts.append(time.perf_counter() - t)
        hops = None
        try:  # the registered address: "host:port", maybe followed by "#@unix-name"
            host = self.rt.peer_addresses[self.members[peer]].partition("#@")[0].rpartition(":")[0]
            hops = hop_count(host)
        except (KeyError, AttributeError, IndexError, OSError):
            pass
        return [statistics.median(rtts[PING_WARMUP:]) / 2 * 1e6, hops]

    def _echo(self, peer: int) -> None:
        buf = np.zeros(1, dtype=np.int64)
        for _ in range(PING_WARMUP + PING_COUNT):
            self.recv(buf, peer, TAG_PING)
            self.send(buf, peer, TAG_PING)

    def _send_flow(self, peer: int, chunk_bytes: int) -> None:
        """Stream chunks to ``peer`` until it says stop, keeping about INFLIGHT_SECONDS of the
        acknowledged rate in flight (so nothing much is left to drain after the stop); then one
        last chunk marked 1."""
        chunk = np.zeros(max(chunk_bytes // 8, 1), dtype=np.int64)
        size = chunk.nbytes
        lowest = max(2, math.ceil(MIN_INFLIGHT_BYTES / size))
        highest = max(lowest, MAX_INFLIGHT_BYTES // size)
        cond = threading.Condition()
        state: dict = {"acked": 0, "stop": False, "limit": lowest, "error": None}

        def acks():
            ack = np.zeros(2, dtype=np.int64)
            mark_t, mark_n = None, 0
            try:
                while True:
                    self.recv(ack, peer, TAG_ACK)
                    now = time.perf_counter()
                    with cond:
                        state["acked"] = int(ack[0]) + 1
                        if mark_t is None:
                            mark_t, mark_n = now, state["acked"]
                        elif now - mark_t >= 0.02:
                            per_second = (state["acked"] - mark_n) / (now - mark_t)
                            state["limit"] = min(highest, max(lowest, math.ceil(per_second * INFLIGHT_SECONDS)))
                            mark_t, mark_n = now, state["acked"]
                        if ack[1]:
                            state["stop"] = True
                        cond.notify_all()
                    if ack[1]:
                        return
            except BaseException as e:  # noqa: BLE001 - reported by the sending thread
                with cond:
                    state["error"] = e
                    cond.notify_all()

        waiter = threading.Thread(target=acks, daemon=True, name="collcomm-probe-acks")
        waiter.start()
        deadline = time.monotonic() + self.timeout
        sent = 0
        while True:
            with cond:
                while not state["stop"] and state["error"] is None and sent - state["acked"] >= state["limit"]:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise CollectiveTimeout(f"topology probe: rank {self.members[peer]} stopped acknowledging")
                    cond.wait(min(left, 1.0))
                if state["error"] is not None:
                    raise state["error"]
                if state["stop"]:
                    break
            chunk[0] = 0
            self.send(chunk, peer, TAG_DATA)
            sent += 1
        chunk[0] = 1
        self.send(chunk, peer, TAG_DATA)
        waiter.join(self.timeout)

    def _recv_flow(self, peer: int, chunk_bytes: int, t_phase: float, seconds: float) -> float:
        """Receive a flow and time its chunks; the window is [t_phase + SKIP_FRACTION * seconds,
        t_phase + seconds] of this rank's clock (the same for every flow of the phase), stretched
        for a flow too slow to bring MIN_WINDOW_CHUNKS chunks into it. GB/s."""
        buf = np.empty(max(chunk_bytes // 8, 1), dtype=np.int64)
        size = buf.nbytes
        ack = np.zeros(2, dtype=np.int64)
        start, end = t_phase + SKIP_FRACTION * seconds, t_phase + seconds
        times: list[float] = []
        window: tuple[list[float], float] | None = None
        while True:
            self.recv(buf, peer, TAG_DATA)
            now = time.perf_counter()
            if buf[0] == 1:
                break
            times.append(now)
            if window is not None:
                continue
            inside = len(times) - bisect.bisect_left(times, start)
            stop = now >= end and (inside >= MIN_WINDOW_CHUNKS or now >= t_phase + 4 * seconds)
            ack[0], ack[1] = len(times) - 1, int(stop)
            self.send(ack, peer, TAG_ACK)
            if stop:
                window = (times[:], end if inside >= MIN_WINDOW_CHUNKS else now)
        if window is None:  # pragma: no cover - the sender stops only when told
            window = (times, times[-1] if times else now)
        arrivals, until = window
        return steady_rate(arrivals, size, start, until) / 1e9


def probe_runtime(rt, members: Sequence[int] | None = None, *, seconds_per_pair: float | None = None,
                  timeout: float | None = None, concurrent: bool = True,
                  log: Callable[[str], None] | None = None) -> tuple[Topology, Measurements]:
    """Probe the fabric among ``members`` (world ranks; default: the world) of the Runtime ``rt``.
    Every member calls it; all get the same (Topology, Measurements)."""
    members = list(range(rt.world_size)) if members is None else [int(x) for x in members]
    if rt.rank not in members:
        raise ValueError(f"rank {rt.rank} is not a member of {members}")
    seconds = DEFAULT_SECONDS if seconds_per_pair is None else float(seconds_per_pair)
    if not seconds > 0:
        raise ValueError(f"seconds_per_pair must be positive, got {seconds_per_pair!r}")
    net = _Network(rt, members, rt.timeout if timeout is None else timeout)
    if net.me == 0:
        try:
            m = measure(net, len(members), seconds, concurrent=concurrent, log=log)
            m.hostnames = [rt.hostnames[r] for r in members] if getattr(rt, "hostnames", None) else None
            text = jsonio.dumps(infer_topology(m))
        except BaseException as e:
            try:
                net.finish({"kind": "error", "message": f"{type(e).__name__}: {e}"})
            except BaseException:  # noqa: BLE001 - the others time out instead
                pass
            raise
        net.finish({"kind": "done", "topology": text, "measurements": m.to_json()})
        return jsonio.loads(text), m
    result = net.serve()
    return jsonio.loads(result["topology"]), Measurements.from_json(result["measurements"])


def probe_at_init(rt) -> Topology:
    """``COLLCOMM_TOPOLOGY=probe``: the world's fabric, probed while the runtime starts
    (window from ``COLLCOMM_PROBE_SECONDS``)."""
    raw = os.environ.get("COLLCOMM_PROBE_SECONDS")
    seconds = float(raw) if raw else None
    topo, _ = probe_runtime(rt, seconds_per_pair=seconds)
    return topo
