"""The link monitor's control loop: telemetry reports, the detector's rounds, plan switches.

Every ``every`` operations of a group (a *round*, counted by operation number, so every member
agrees on where rounds fall) each member publishes what its telemetry saw since its last report
(:func:`collcomm.faults.detector.observations_between` of two snapshots: rates, transfers,
connection errors, last activity) in the coordinator's key-value store::

    monitor/<group>/<epoch>/r<round>/<rank>    one member's observations of the round (JSON)
    monitor/<group>/<epoch>/d<round>           group rank 0's decision of the round (JSON)
    monitor/latest/<group>, monitor/latest     the last decision and verdicts (for `collcomm status`)

Group rank 0 collects the round's reports, merges the observations of each rank pair
``(src, dst)`` (both ends may report it: the sender's rate from the kernel's TCP counters where
it has one, else the lower rate; the errors of both), and runs the
:class:`~collcomm.faults.detector.LinkDetector`. Rank pairs are compared with the pairs whose
route has the same bottleneck bandwidth in the fabric (a slow network link is not "slow"
next to an NVLink), each credited with what its path carries (its rate times the number of the
plan's pairs sharing its bottleneck, :func:`sharing`). Flagged pairs are mapped to the fabric's
physical links along their routes (:func:`blame`: the fewest links, not crossed by healthy
traffic, that explain every flagged pair); :func:`reroute` removes a down link and
down-weights a degraded or flapping one (to half its measured fraction: over-estimating a slow
link costs far more than under-estimating it). When the set of faulty
physical links changes, the decision carries the new fabric and a new plan epoch, applied at
the round's own operation ``round * every``: each member waits for the round's decision before
that operation (which cannot start without group rank 0 anyway) and switches its planner
there, so no operation mixes plans. A
link that recovers (the detector's probation: ``recover_after`` good rounds) is restored the
same way, and one that nothing measured bad for ``probation_rounds`` rounds is re-admitted for a
new measurement; a flapping link stays down-weighted until it has been quiet for the detector's flap
window (no plan thrash). A fault that cuts the fabric in two raises
:class:`~collcomm.errors.TopologyError` naming both sides, on every member, at that operation.
Unless the user chose a chunk size, the decision also carries one fitted to the slowest measured
connection (:mod:`collcomm.faults.chunks`), applied at the same operation by every member.

The decisions themselves (:func:`~collcomm.faults.decisions.merge_reports`,
:func:`~collcomm.faults.decisions.blame`, :func:`~collcomm.faults.decisions.reroute`,
:func:`~collcomm.faults.decisions.partition`) are pure and live in :mod:`collcomm.faults.decisions`;
this module is the loop around them: threads, the coordinator's store, the group's planner.
"""

from __future__ import annotations

import json
import threading
import time
from fractions import Fraction
from typing import Mapping

from collcomm.errors import CollectiveError, CollectiveTimeout, PeerFailure, TopologyError
from collcomm.faults.chunks import ChunkSizer
from collcomm.faults.decisions import (SEVERITY, Edge, avoid_marginal_links, blame, bottleneck, fault_classes,
                                       faults_from_json, faults_to_json, merge_reports, observation_to_json,
                                       plan_routes, reroute, routes, sharing, stalled_only, low_now)
from collcomm.faults.detector import (DOWN, HEALTHY, MIN_WIRE_CHUNKS, DetectorConfig, LinkDetector, Observation,
                                      Verdict, in_completed_round, observations_between)
from collcomm.topology import jsonio
from collcomm.topology.model import Topology
from collcomm.transport.telemetry import LinkTelemetry, _escape_label

POLL_SECONDS = 0.25  # how often a wait for a report or decision asks whether its writer died


# ============================================================================ the monitor of one group
class GroupMonitor:
    """Reports, decisions and plan switches of one group (see the module's docstring)."""

    def __init__(self, group, every: int, config: DetectorConfig | None = None, report_timeout: float | None = None,
                 probation_rounds: int = 10):
        if every < 1:
            raise ValueError(f"monitor rounds need at least one operation, got {every}")
        self.group = group
        self.rt = group.runtime
        self.every = every
        self.detector = LinkDetector(config)
        self.base: Topology = group.planner.topo  # the group's fabric (compute nodes in group order)
        self.topology: Topology = self.base
        self.plan_epoch = 0
        self.faults: dict[Edge, tuple[str, Fraction, str]] = {}
        self.verdicts: dict[tuple[int, int], Verdict] = {}
        self.changes: list[dict] = []  # plan switches applied here: {"at", "plan_epoch", "faults"}
        self.report_timeout = report_timeout if report_timeout is not None else min(self.rt.timeout, 30.0)
        self._telemetry: LinkTelemetry | None = None
        self._own: LinkTelemetry | None = None
        self._previous: dict | None = None
        self._lock = threading.Lock()
        self._view: tuple | None = None  # (schedules, (routes, sharing)) of the current plan
        self._marginal: tuple = (None, {})  # (faults, avoid_marginal_links of them): see _decide
        self._jobs: dict = {}  # slot -> (fn, args): writes for the writer thread (see _background)
        self._writer: threading.Thread | None = None
        self._wake = threading.Condition(self._lock)
        self._confirmed: dict[Edge, int] = {}  # rank 0: the last round that blamed each faulty link
        self.probation_rounds = probation_rounds
        self._failed_seen: dict = {}  # rank 0: each member's failed-operation count at the last round
        # rank 0: the chunk size fitted to the measured rates, unless the user chose one
        self.chunks: ChunkSizer | None = None
        if not getattr(self.rt, "chunk_fixed", True):
            self.chunks = ChunkSizer(self.rt.chunk_bytes, group.chunk_bytes)

    # ---------------------------------------------------------------- telemetry source
    @property
    def telemetry(self) -> LinkTelemetry:
        """The registry reported from: one set explicitly (tests feed synthetic samples), else the
        transport's, else an empty one of the monitor's own."""
        if self._telemetry is not None:
            return self._telemetry
        t = getattr(self.rt.transport, "telemetry", None)
        if t is not None:
            return t
        if self._own is None:
            self._own = LinkTelemetry(self.rt.rank)
        return self._own

    @telemetry.setter
    def telemetry(self, value: LinkTelemetry | None) -> None:
        self._telemetry = value
        self._previous = None

    def _key(self, what: str) -> str:
        return f"monitor/{self.group.id}/{self.group.epoch}/{what}"

    # ---------------------------------------------------------------- per operation
    def before_operation(self, seq: int) -> None:
        if seq == 0 or seq % self.every:
            return
        r = seq // self.every
        client = self.rt.client
        client.kv_set(self._key(f"r{r}/{self.rt.rank}"), json.dumps(self._report()).encode(), timeout=5.0)
        if r >= 3:
            # This member's report of round r - 2 was read: group rank 0 decided that round before
            # the operations that brought this member here. Each member deletes its own, in the
            # background, so that the round, which every member waits for, stays short.
            self._background(("delete", r), client.kv_delete, self._key(f"r{r - 2}/{self.rt.rank}"))
        if self.group.me == 0:
            decision = self._decide(r, seq)
            client.kv_set(self._key(f"d{r}"), json.dumps(decision).encode(), timeout=5.0)
            self._publish_latest(decision)
            if r >= 2:  # every member read it before sending its report of this round
                self._background(("delete-decision", r), client.kv_delete, self._key(f"d{r - 1}"))
        else:
            # The operation cannot start before group rank 0 has decided anyway (it takes part in
            # it), so waiting for the decision here costs one notification, and the new plan
            # applies to this very operation: one operation sooner than a decision read a round
            # later, and after a failed operation the next one already avoids the fault.
            raw = self._wait_key(self._key(f"d{r}"), self.group.members[0], time.monotonic() + self.report_timeout)
            if raw is None:
                raise CollectiveTimeout(f"{self.group}: the monitor decision of round {r} was not published "
                                        f"by group rank 0 within {self.report_timeout:g} s")
            decision = json.loads(raw)
        self._apply(decision, seq)

    def _wait_key(self, key: str, writer: int, deadline: float) -> bytes | None:
        """The value at ``key`` once ``writer`` sets it; None at the deadline. Raises PeerFailure
        when the coordinator learns that ``writer`` died meanwhile (no waiting out the timeout)."""
        client = self.rt.client
        while True:
            left = deadline - time.monotonic()
            try:
                return client.kv_get(key, timeout=max(min(left, POLL_SECONDS), 0.0))
            except CollectiveTimeout:
                pass
            if left <= 0:
                return None
            try:
                status = client.group_status(self.group.id, timeout=5.0)
            except CollectiveError:
                continue
            for d in status.dead:
                if d.rank == writer:
                    raise PeerFailure(f"rank {writer} failed: {d.reason or 'reported dead'}", rank=writer)

    def _report(self) -> dict:
        snap = self.telemetry.snapshot()
        obs, expected = observations_between(self._previous, snap)
        self._previous = snap
        offset = snap["wall"] - snap["monotonic"]
        return {"rank": self.rt.rank, "wall": snap["wall"], "failed_operations": self.group.failed_operations,
                "links": [dict(observation_to_json(o, expected.get(k), offset), src=k[0], dst=k[1])
                          for k, o in obs.items()]}

    # ---------------------------------------------------------------- group rank 0
    def _decide(self, r: int, at: int) -> dict:
        reports, missing = [], []
        deadline = time.monotonic() + self.report_timeout
        for m in self.group.members:
            try:
                raw = self._wait_key(self._key(f"r{r}/{m}"), m, deadline)
            except PeerFailure:
                raw = None
            if raw is None:
                missing.append(m)
            else:
                reports.append(json.loads(raw))
        round_failed = bool(missing) or self._round_failed(reports)
        now = time.time()
        obs, expected = merge_reports(reports)
        chunk = self._fit_chunks(obs)
        if not round_failed:
            obs = {k: in_completed_round(o) for k, o in obs.items()}
        obs = self._classify_by_route(obs)
        verdicts = self.detector.observe(obs, expected, now)
        self.verdicts = dict(verdicts)
        decision = {"round": r, "at": at, "plan_epoch": self.plan_epoch, "topology": None, "error": None,
                    "faults": [], "missing_reports": missing, "wall": now,
                    "verdicts": [v.to_dict() for v in verdicts.values() if v.state != HEALTHY],
                    "healthy": sum(1 for v in verdicts.values() if v.state == HEALTHY)}
        if chunk is not None:
            decision["chunk_bytes"] = chunk
        faults = self._faults(verdicts, obs, r)
        key = tuple(sorted(faults.items()))
        if self._marginal[0] != key:  # the same faults round after round: decided once
            self._marginal = (key, avoid_marginal_links(self.base, faults))
        faults = dict(self._marginal[1])
        decision["faults"] = faults_to_json(faults)
        if fault_classes(faults) != fault_classes(self.faults):
            try:
                topo = reroute(self.base, faults, f"{self.base.name}@plan{self.plan_epoch + 1}") if faults \
                    else self.base
            except TopologyError as e:
                if round_failed:
                    decision["error"] = str(e)
                    return decision
                # Every member reported and none had an operation fail since the last round: the
                # data crossed the fabric, so it is not cut, whatever the kernel's counters say (a
                # long operation behind a throttled link leaves other connections with closed
                # windows and backed-off probes that can read as stalled). Keep the slow links,
                # drop this round's new "down" verdicts that rest on those counters alone, and let
                # later rounds measure again.
                faults = {e2: f for e2, f in faults.items()
                          if f[0] != DOWN or self.faults.get(e2, (None,))[0] == DOWN or not stalled_only(f[2])}
                decision["faults"] = faults_to_json(faults)
                decision["note"] = f"partition contradicted by a round without failures, down verdicts ignored: {e}"
                if fault_classes(faults) == fault_classes(self.faults):
                    return decision
                try:
                    topo = reroute(self.base, faults, f"{self.base.name}@plan{self.plan_epoch + 1}") if faults \
                        else self.base
                except TopologyError as cut:  # cut by the connection errors themselves: believe them
                    decision["error"] = str(cut)
                    return decision
            self.faults = faults
            self.plan_epoch += 1
            decision["plan_epoch"] = self.plan_epoch
            decision["topology"] = jsonio.to_dict(topo)
        return decision

    def _fit_chunks(self, obs: Mapping) -> int | None:
        """The chunk size from this round's merged observations (None: the user chose one). The
        connections' own wire rates, before any credit: timed (chunks over 64 KB) or, from small
        frames only, a lower bound (see collcomm.faults.chunks)."""
        if self.chunks is None:
            return None
        wire = [o for o in obs.values() if o.source == "wire" and o.rate is not None]
        return self.chunks.observe([o.rate for o in wire if o.transfers >= MIN_WIRE_CHUNKS],
                                   [o.rate for o in wire if o.transfers < MIN_WIRE_CHUNKS])

    def _round_failed(self, reports: list[dict]) -> bool:
        """Whether some member had an operation fail since the previous round (a report without
        the count, from an older member, counts as a failure: no evidence against a cut)."""
        failed = any(rep.get("failed_operations") is None or
                     rep["failed_operations"] > self._failed_seen.get(rep.get("rank"), 0) for rep in reports)
        self._failed_seen = {rep.get("rank"): rep.get("failed_operations") or 0 for rep in reports}
        return failed

    def _pairs(self) -> dict[tuple[int, int], Edge]:
        """World rank pairs of the group -> compute nodes of its fabric."""
        c = self.base.compute
        return {(a, b): (c[i], c[j]) for i, a in enumerate(self.group.members)
                for j, b in enumerate(self.group.members) if i != j}

    def _schedules(self) -> list:
        planner = self.group.planner
        chosen = list(getattr(planner, "_choice", {}).values()) or \
            [s for s in getattr(planner, "_schedules", {}).values() if s is not None]
        return [s for s in chosen if s is not None]

    def _routes(self) -> dict[Edge, set[Edge]]:
        return self._plan_view()[0]

    def _plan_view(self) -> tuple[dict[Edge, set[Edge]], dict[Edge, float]]:
        """Per compute-node pair of the group: its route and :func:`sharing` factor under the
        current plan (cached while the planner's chosen schedules stay the same)."""
        schedules = tuple(self._schedules())
        cached = self._view
        if cached is not None and len(cached[0]) == len(schedules) and \
                all(x is y for x, y in zip(cached[0], schedules)):
            return cached[1]
        rts = {p: routes(self.base, *p, schedules) for p in self._pairs().values()}
        used = plan_routes(schedules)
        share = {p: float(sharing(self.base, used, rt)) for p, rt in rts.items()}
        self._view = (schedules, (rts, share))  # holds the schedules: identity stays meaningful
        return rts, share

    def _classify_by_route(self, obs: dict) -> dict:
        """Pairs whose routes have the same bottleneck bandwidth are each other's peers; a pair
        that shares its bottleneck with others of the plan (:func:`sharing`) is credited the rate
        of its path (its own times the number of ways the link is split), so that a plan which
        puts two pairs on one link does not make them look slow next to pairs alone on theirs."""
        pairs = self._pairs()
        rts, share = self._plan_view()
        out = {}
        for k, o in obs.items():
            nodes = pairs.get(k)
            if nodes is None:
                continue  # a pair outside the group
            route = rts.get(nodes, ())
            group = o.group
            if group is None:
                bw = bottleneck(self.base, route)
                group = f"bw={bw}" if bw is not None else None
            rate = o.rate
            if rate is not None and route:
                rate *= share[nodes]
            out[k] = Observation(rate, o.transfers, o.errors, o.error_kinds, o.last_seen, group, o.active, o.source)
        return out

    def _faults(self, verdicts: Mapping, obs: Mapping, r: int) -> dict[Edge, tuple[str, Fraction, str]]:
        pairs = self._pairs()
        by_nodes = {pairs[k]: v for k, v in verdicts.items() if k in pairs}
        observed = [pairs[k] for k, o in obs.items() if k in pairs and o.rate is not None]
        # Pairs measured this round (a rate or errors): a verdict without them is the state the
        # detector kept from earlier rounds, not new evidence.
        fresh = {pairs[k] for k, o in obs.items() if k in pairs and (o.rate is not None or o.errors)}
        # (A rate without timed transfers: chunks of 64 KB and less are counted, not timed.)
        alive = [pairs[k] for k, o in obs.items()
                 if k in pairs and (o.transfers > 0 or o.rate is not None) and not o.errors]
        rts = self._routes()
        faults = blame(self.base, by_nodes, rts, observed, alive)
        # A link joins the faults only on a bad reading of this round: not on a verdict the
        # detector keeps from earlier rounds (a pair no longer measured, or one on probation whose
        # reading is good again: after a reroute around box0.gpu0 -> net, box1.gpu0 -> box0.gpu0,
        # slow only while its ACKs crossed the shaped link, read 128% of its peers and, still
        # "degraded" until probation ends, took both NICs of box1.gpu0 out of the plan).
        for e in [e for e in faults if e not in self.faults]:
            if not any(p in fresh and low_now(v) for p, v in by_nodes.items()
                       if v.state != HEALTHY and e in rts.get(p, ())):
                del faults[e]
        for e, (state, frac, why) in list(faults.items()):
            old = self.faults.get(e)
            if old is not None and old[0] == state:  # keeps the fraction it got (no re-plan on every wobble)
                faults[e] = (state, old[1], why)
            if old is None or any(p in fresh for p, v in by_nodes.items()
                                  if v.state != HEALTHY and e in rts.get(p, ())):
                self._confirmed[e] = r
        # A faulty link returns when healthy traffic crosses it again (the detector's probation
        # passed); one that nothing has measured bad for ``probation_rounds`` rounds (the plan
        # avoids it, or gives it too little to measure) is re-admitted for a new measurement: the
        # detector forgets the verdicts of the pairs that blamed it (keeping their healthy
        # history and state changes), so it is flagged again within two rounds if still bad (and
        # seen flapping if that keeps happening: then it stays down-weighted), and otherwise stays.
        measured_ok = {e for p in observed if by_nodes.get(p) is not None and by_nodes[p].state == HEALTHY
                       for e in rts.get(p, ())}
        for e, f in self.faults.items():
            if e not in faults and e not in measured_ok:
                faults[e] = f
        for e in [e for e in faults if e in self.faults and r - self._confirmed.get(e, r) >= self.probation_rounds]:
            del faults[e]
            self._readmit(e, rts)
        for e in [e for e in self._confirmed if e not in faults]:
            del self._confirmed[e]
        return faults

    def _readmit(self, e: Edge, rts: Mapping[Edge, set[Edge]]) -> None:
        """Forget the detector's verdicts of the rank pairs whose routes cross ``e`` (see _faults)."""
        from dataclasses import replace

        state = self.detector.state
        links = dict(state.links)
        for k, nodes in self._pairs().items():
            st = links.get(k)
            if st is not None and st.base != HEALTHY and e in rts.get(nodes, ()):
                links[k] = replace(st, base=HEALTHY, low_run=0, good_run=0, cusum_lo=0.0, cusum_hi=0.0)
        self.detector.state = replace(state, links=links)

    def _publish_latest(self, decision: dict) -> None:
        """Hand the round's status to the publisher thread (the latest one wins): the round, which
        every member waits for, does not wait for these two writes."""
        status = dict(decision, group=self.group.id, group_name=self.group.name, epoch=self.group.epoch,
                      members=self.group.members, topology_name=self.topology.name,
                      current_plan_epoch=self.plan_epoch)
        status.pop("topology", None)
        text = json.dumps(status).encode()
        for key in (f"monitor/latest/{self.group.id}", "monitor/latest"):
            self._background(("latest", key), self.rt.client.kv_set, key, text)

    def _background(self, slot, fn, *args) -> None:
        """Run ``fn(*args, timeout=5)`` in the monitor's writer thread, best effort (the status for
        `collcomm status`, deleting read reports); a newer job for the same ``slot`` replaces one
        not yet run."""
        with self._lock:
            self._jobs[slot] = (fn, args)
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                                name=f"collcomm-monitor-writer-g{self.group.id}")
                self._writer.start()
            self._wake.notify()

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                if not self._jobs and not self._wake.wait_for(lambda: bool(self._jobs), timeout=5.0):
                    self._writer = None  # idle: the next job starts another
                    return
                slot = next(iter(self._jobs))
                fn, args = self._jobs.pop(slot)
            try:
                fn(*args, timeout=5.0)
            except Exception:  # noqa: BLE001 - best effort: the coordinator may be gone (shutdown)
                pass

    # ---------------------------------------------------------------- every member
    def _apply(self, decision: dict, seq: int) -> None:
        if decision.get("error"):
            raise TopologyError(decision["error"])
        if decision.get("chunk_bytes"):
            self.group.chunk_override = int(decision["chunk_bytes"])
        if decision.get("topology") is not None:
            topo = jsonio.from_dict(decision["topology"])
            self.topology = topo
            self.plan_epoch = int(decision["plan_epoch"])
            if self.group.me != 0:
                self.faults = faults_from_json(decision.get("faults", []))
            self.group.set_topology(topo)
            self.changes.append({"at": seq, "plan_epoch": self.plan_epoch, "faults": decision.get("faults", [])})
        if self.group.me != 0:
            self.verdicts = {tuple(v["link"]): Verdict(tuple(v["link"]), v["state"], v["reason"], v["evidence"])
                             for v in decision.get("verdicts", [])}

    def health(self) -> dict:
        return {"group": self.group.id, "group_name": self.group.name, "epoch": self.group.epoch,
                "chunk_bytes": self.group.chunk_bytes,
                "plan_epoch": self.plan_epoch, "topology": self.topology.name, "every": self.every,
                "faults": faults_to_json(self.faults), "changes": list(self.changes),
                "verdicts": [v.to_dict() for v in self.verdicts.values()],
                "telemetry": self.telemetry.snapshot()}


# ============================================================================ the public view
def link_health(rt, group, format: str = "dict"):
    """``cc.link_health()``: the monitor's verdicts, plan epoch and fabric changes of ``group`` and
    this rank's telemetry; ``format="prometheus"`` for the text exposition format, ``"json"`` a
    JSON string."""
    mon = group.monitor
    if mon is None:
        t = getattr(rt.transport, "telemetry", None)
        health = {"group": group.id, "group_name": group.name, "epoch": group.epoch, "plan_epoch": 0,
                  "topology": None, "every": 0, "faults": [], "changes": [], "verdicts": [],
                  "telemetry": t.snapshot() if t is not None else None, "monitor": False}
    else:
        health = dict(mon.health(), monitor=True)
    if format in ("dict", None):
        return health
    if format == "json":
        return json.dumps(health, default=str)
    if format == "prometheus":
        return prometheus(health, mon.telemetry if mon is not None else getattr(rt.transport, "telemetry", None))
    raise ValueError(f"format must be 'dict', 'json' or 'prometheus', not {format!r}")


def prometheus(health: dict, telemetry: LinkTelemetry | None = None) -> str:
    """Link verdicts (``collcomm_link_state``, one series per state, 1 for the current one), the
    plan epoch and the faulty physical links, followed by the telemetry's own families."""
    g = str(health.get("group"))
    lines = ["# HELP collcomm_link_state The monitor's verdict on a rank pair (1 for its current state).",
             "# TYPE collcomm_link_state gauge"]
    for v in health.get("verdicts", []):
        link = v["link"]
        src, dst = (link[0], link[1]) if isinstance(link, (list, tuple)) else (link, "")
        for state in SEVERITY:
            lines.append(f'collcomm_link_state{{group="{g}",src="{_escape_label(src)}",dst="{_escape_label(dst)}",'
                         f'state="{state}"}} {1 if v["state"] == state else 0}')
    lines += ["# HELP collcomm_plan_epoch Plan changes of the group since it formed.",
              "# TYPE collcomm_plan_epoch gauge", f'collcomm_plan_epoch{{group="{g}"}} {health.get("plan_epoch", 0)}',
              "# HELP collcomm_fabric_link_fraction Bandwidth fraction the plan gives a faulty physical link.",
              "# TYPE collcomm_fabric_link_fraction gauge"]
    for f in health.get("faults", []):
        lines.append(f'collcomm_fabric_link_fraction{{group="{g}",src="{_escape_label(f["link"][0])}",'
                     f'dst="{_escape_label(f["link"][1])}",state="{f["state"]}"}} {float(Fraction(f["fraction"]))!r}')
    text = "\n".join(lines) + "\n"
    if telemetry is not None:
        text += telemetry.prometheus()
    return text
