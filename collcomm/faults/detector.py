"""Which links are healthy, degraded, down or flapping: a pure decision on observed throughput.

Collective traffic is periodic and homogeneous, so a link that is slow *compared with its
peers* (the links that carried the same kind of traffic in the same operations) and slow
*compared with its own past* points at the link, while a slowdown that every link shares
(CPU contention, a smaller message size) points elsewhere and is not a link fault.

The decision is :func:`classify`, a pure function of one round of observations, the plan's
expected rates, the explicit state it returned last round, the time and a
:class:`DetectorConfig`; it returns the verdicts and the next state, and touches nothing
else. :class:`LinkDetector` keeps that state between rounds and turns
:mod:`collcomm.transport.telemetry` snapshots into observations. :func:`combine_reports` merges
the verdicts of the two ends of a link (the coordinator's job).

Rules, per link and round (an observation is one operation, or one monitoring interval):

* **normalize** the measured rate by the plan's expected rate where given, and work in log
  space (noise on throughput is multiplicative);
* **peers**: the median of the other links of the same group this round; the noise of the
  group is the EWMA of the groups' robust spread (1.4826 x MAD of the log rates);
* **own history**: the median of the link's last healthy observations (frozen while it is
  not healthy), plus a two-sided CUSUM on the log ratio to it: when the CUSUM sees a change
  point that its peers share (a fabric-wide shift) the link's history starts again from the
  new level within about three rounds;
* an observation is **low** when it is below ``degrade_fraction`` (50%) of every reference
  available and also ``z`` robust standard deviations below it (so that noisy fabrics do not
  flag their tails), or below ``sure_fraction`` (20%) of every reference whatever the noise
  estimate (so that a noisy estimate cannot hide a link at a tenth of its peers); **degraded**
  after ``flag_after`` (2) low observations in a row (one between the cut and the recovery level
  holds the count; one at the recovery level resets it);
  **recovered** after ``recover_after`` (3) observations in a row at or above
  ``recover_fraction`` (70%) of a reference (probation);
* **down** at once on connection errors (reset, refused..., or "stalled": the kernel's TCP
  counters show data in flight for ``STALL_SECONDS`` and nothing acknowledged; in a round
  where every operation completed the monitor takes a stall for a rate and silence for
  waiting, :func:`in_completed_round`), or when the link has been
  silent (no traffic, no heartbeat) for longer than ``liveness_timeout`` while other links of
  its group progress (only links marked ``active``: used by the plan or watched by
  heartbeats); back to healthy after ``recover_after`` live observations without errors (with
  good rates where there is traffic);
* **flapping** while more than ``flap_changes`` state changes fell within ``flap_window``
  seconds; it lasts until a whole window passes without a change.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Mapping

HEALTHY, DEGRADED, DOWN, FLAPPING = "healthy", "degraded", "down", "flapping"
STATES = (HEALTHY, DEGRADED, DOWN, FLAPPING)
MAD_TO_SIGMA = 1.4826
# Error kinds (as recorded by the transport) that mean the connection itself failed.
# "detour": the transport sends the pair's frames through another rank (the path lost them).
CONNECTION_ERRORS = frozenset({"reset", "refused", "unreachable", "eof", "closed", "broken_pipe", "timeout",
                               "connection", "stalled", "detour"})

Link = Hashable
MIN_WIRE_SECONDS = 0.02  # a wire rate needs this much busy time in the round (the kernel counts in jiffies)
# ... and more than one timed chunk (or only untimed small ones): a pair that carried a single
# chunk in a round is measured mostly by its start (slow start after idle, a round trip), at 25-35%
# of bulk pairs on a healthy link (seen after a reroute on the emulated two-box fabric: a pair of
# the new plan with one 256 KB chunk per operation was flagged against 22 peers, and a healthy NIC
# planned around).
MIN_WIRE_CHUNKS = 2
STALL_SECONDS = 1.0  # data in flight this long, window open, not one byte acknowledged: a black hole ("stalled")


@dataclass(frozen=True)
class DetectorConfig:
    degrade_fraction: float = 0.5   # low: below this fraction of every reference ...
    z: float = 4.0                  # ... and this many robust standard deviations below it,
    sure_fraction: float = 0.2      # ... or below this fraction whatever the noise estimate says
    recover_fraction: float = 0.7   # good: at or above this fraction of a reference
    flag_after: int = 2             # K: consecutive low observations to flag degraded
    recover_after: int = 3          # M: consecutive good observations to recover (probation)
    history: int = 20               # healthy observations the own reference keeps
    min_history: int = 3            # ... needed before it counts
    min_peers: int = 2              # other links in the group needed for a peer reference
    sigma_samples: int = 8          # own observations needed before their spread counts
    default_sigma: float = 0.25     # log-space noise assumed while nothing measured it
    min_sigma: float = 0.03         # floor of the noise estimate
    sigma_ewma: float = 0.1         # smoothing of a group's measured noise
    cusum_drift: float = 0.2        # k, in log space
    cusum_threshold: float = 1.0    # h, in log space (a halving alarms on the third round)
    liveness_timeout: float = 10.0  # seconds without traffic or heartbeat: down (if peers progress)
    flap_window: float = 60.0       # seconds
    flap_changes: int = 3           # more changes than this within the window: flapping

    def __post_init__(self):
        if not 0 < self.sure_fraction <= self.degrade_fraction < self.recover_fraction:
            raise ValueError("need 0 < sure_fraction <= degrade_fraction < recover_fraction")
        if self.flag_after < 1 or self.recover_after < 1 or self.min_history < 1 or self.history < self.min_history:
            raise ValueError("flag_after, recover_after, min_history must be >= 1 and history >= min_history")


@dataclass(frozen=True)
class Observation:
    """What one round showed of one link."""
    rate: float | None = None          # bytes/s over the round's transfers; None: carried nothing
    transfers: int = 0                 # transfers behind ``rate`` (for the reason)
    errors: int = 0                    # connection errors (reset, refused...) in the round
    error_kinds: tuple[str, ...] = ()
    last_seen: float | None = None     # monotonic time of the last traffic or heartbeat
    group: Hashable = None             # traffic class: links of one group are each other's peers
    active: bool = True                # the plan uses it or heartbeats watch it: silence means something
    source: str | None = None          # "wire": from the kernel's TCP counters; "chunks": per-chunk times


@dataclass(frozen=True)
class Verdict:
    link: Link
    state: str                         # healthy | degraded | down | flapping
    reason: str                        # one readable line, with the numbers
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"link": list(self.link) if isinstance(self.link, tuple) else self.link, "state": self.state,
                "reason": self.reason, "evidence": dict(self.evidence)}


@dataclass(frozen=True)
class LinkState:
    base: str = HEALTHY                # healthy | degraded | down (flapping is reported on top)
    flapping: bool = False
    low_run: int = 0
    good_run: int = 0
    baseline: tuple[float, ...] = ()   # normalized rates of recent healthy observations
    cusum_lo: float = 0.0
    cusum_hi: float = 0.0
    transitions: tuple[float, ...] = ()  # times of base-state changes within the flap window
    last_seen: float | None = None
    group: Hashable = None
    active: bool = True
    since: float | None = None         # when the base state was entered
    rounds: int = 0


@dataclass(frozen=True)
class DetectorState:
    links: Mapping[Link, LinkState] = field(default_factory=dict)
    sigma: Mapping[Hashable, float] = field(default_factory=dict)  # per group: EWMA of log-space noise
    sigma_rounds: Mapping[Hashable, int] = field(default_factory=dict)  # ... and the rounds behind it


# ------------------------------------------------------------------------------------------- helpers
def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _mad_sigma(values: list[float], small_sample: bool = False) -> float:
    """Robust standard deviation: 1.4826 x MAD (times n/(n-0.8), which undoes most of the MAD's
    downward bias on a few values, with ``small_sample``)."""
    m = _median(values)
    n = len(values)
    factor = n / (n - 0.8) if small_sample and n > 1 else 1.0
    return MAD_TO_SIGMA * factor * _median([abs(v - m) for v in values])


def _loo_median(sorted_values: list[float], v: float) -> float:
    """Median of ``sorted_values`` without one occurrence of ``v`` (at least two values)."""
    i = bisect_left(sorted_values, v)
    m = len(sorted_values) - 1

    def get(j: int) -> float:
        return sorted_values[j if j < i else j + 1]

    return get(m // 2) if m % 2 else (get(m // 2 - 1) + get(m // 2)) / 2


def link_name(link: Link) -> str:
    if isinstance(link, tuple) and len(link) == 2:
        return f"{link[0]}->{link[1]}"
    return str(link)


def fmt_rate(bps: float | None) -> str:
    if bps is None:
        return "n/a"
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if abs(bps) >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} B/s"


def _pct(log_ratio: float) -> str:
    p = 100 * math.exp(log_ratio)
    return f"{p:.0f}%" if p >= 1 else f"{p:.2g}%"


def _as_observation(value) -> Observation:
    if isinstance(value, Observation):
        return value
    if value is None:
        return Observation()
    return Observation(rate=float(value))


# ------------------------------------------------------------------------------------------- the decision
def classify(samples_by_link: Mapping[Link, Observation | float | None],
             expected_by_link: Mapping[Link, float] | None,
             history: DetectorState | None,
             now: float,
             config: DetectorConfig | None = None) -> tuple[dict[Link, Verdict], DetectorState]:
    """One round: the verdict of every link seen now or before, and the state for the next round.

    ``samples_by_link`` maps each link to its :class:`Observation` of the round (a bare number
    is a rate in bytes/s); ``expected_by_link`` the rate the plan expects of it (missing: the
    raw rates are compared); ``history`` the state returned last round (None: the first); ``now``
    the time (the clock of ``Observation.last_seen``). Pure: the inputs are not modified."""
    cfg = config or DetectorConfig()
    hist = history or DetectorState()
    expected = expected_by_link or {}
    obs = {link: _as_observation(v) for link, v in samples_by_link.items()}
    prev_links = hist.links

    # Groups and normalized log rates of the links that carried traffic this round.
    group_of: dict[Link, Hashable] = {}
    for link in set(prev_links) | set(obs):
        o = obs.get(link)
        group_of[link] = o.group if o is not None and o.group is not None else \
            (prev_links[link].group if link in prev_links else None)
    logx: dict[Link, float] = {}
    for link, o in obs.items():
        if o.rate is None:
            continue
        exp = expected.get(link)
        x = o.rate / exp if exp else o.rate
        logx[link] = math.log(max(x, 1e-12))
    by_group: dict[Hashable, list[float]] = {}
    for link, lx in logx.items():
        by_group.setdefault(group_of[link], []).append(lx)
    for vals in by_group.values():
        vals.sort()

    sigma = dict(hist.sigma)
    sigma_rounds = dict(hist.sigma_rounds)
    for g, vals in by_group.items():
        if len(vals) - 1 >= cfg.min_peers:
            # A running mean of the rounds' spread at first, an EWMA once 1/sigma_ewma rounds are in.
            k = sigma_rounds.get(g, 0) + 1
            alpha = max(cfg.sigma_ewma, 1.0 / k)
            s = _mad_sigma(vals, small_sample=True)
            sigma[g] = s if g not in sigma else (1 - alpha) * sigma[g] + alpha * s
            sigma_rounds[g] = k

    # Who progressed this round (traffic, or heard from within the liveness timeout), per group.
    live: dict[Hashable, int] = {}
    progressed_of: dict[Link, bool] = {}
    last_seen: dict[Link, float | None] = {}
    for link in group_of:
        o = obs.get(link)
        prev = prev_links[link].last_seen if link in prev_links else None
        seen = prev
        if o is not None:
            if o.last_seen is not None:
                seen = o.last_seen if prev is None else max(prev, o.last_seen)
            elif o.rate is not None and o.rate > 0:
                seen = now
        last_seen[link] = seen
        progressed = (o is not None and o.rate is not None and o.rate > 0 and o.errors == 0) or \
                     (seen is not None and now - seen <= cfg.liveness_timeout and not (o is not None and o.errors))
        progressed_of[link] = progressed
        if progressed:
            live[group_of[link]] = live.get(group_of[link], 0) + 1

    verdicts: dict[Link, Verdict] = {}
    states: dict[Link, LinkState] = {}
    for link in sorted(group_of, key=lambda l: (str(type(l)), str(l))):
        st = prev_links.get(link, LinkState())
        o = obs.get(link)
        g = group_of[link]
        seen = last_seen[link]
        ev: dict[str, Any] = {"link": link_name(link), "group": g if g is None or isinstance(g, (str, int)) else str(g)}
        exp = expected.get(link)

        # ---- the throughput evidence
        low = good = False
        lx = logx.get(link)
        peer_lr = own_lr = None
        sig = None
        change = None
        if lx is not None:
            vals = by_group.get(g, [])
            peer_ref = _loo_median(vals, lx) if len(vals) - 1 >= cfg.min_peers else None
            own_ref = _median(list(map(math.log, st.baseline))) if len(st.baseline) >= cfg.min_history else None
            sigmas = [cfg.min_sigma]
            if g in sigma and len(vals) - 1 >= cfg.min_peers:
                sigmas.append(sigma[g])
            if len(st.baseline) >= cfg.sigma_samples:
                sigmas.append(_mad_sigma(list(map(math.log, st.baseline)), small_sample=True))
            if len(sigmas) == 1:
                sigmas.append(cfg.default_sigma)
            sig = max(sigmas)
            peer_lr = None if peer_ref is None else lx - peer_ref
            own_lr = None if own_ref is None else lx - own_ref
            # The median of n references is itself noisy: its log has about pi/(2n) of the noise's
            # variance. A spread estimated from a few noisy rounds can come out large enough to put
            # the cut under a link at 11% (seed 40 of the property test: cuts of 9-14%): a reading
            # under sure_fraction is low however noisy the estimate says the links are.
            def cut(n_refs: int) -> float:
                noisy = min(math.log(cfg.degrade_fraction), -cfg.z * sig * math.sqrt(1 + math.pi / 2 / n_refs))
                return max(noisy, math.log(cfg.sure_fraction))

            peer_cut = None if peer_ref is None else cut(len(vals) - 1)
            own_cut = None if own_ref is None else cut(len(st.baseline))
            checks = [(r, c) for r, c in ((peer_lr, peer_cut), (own_lr, own_cut)) if r is not None]
            low = bool(checks) and all(r < c for r, c in checks)
            good = bool(checks) and any(r >= math.log(cfg.recover_fraction) for r, _ in checks)
            scale = exp if exp else 1.0
            ev.update({"rate": o.rate, "transfers": o.transfers, "expected": exp,
                       "normalized": math.exp(lx) if exp else None,
                       "peer_median": None if peer_ref is None else math.exp(peer_ref) * scale,
                       "peer_ratio": None if peer_lr is None else math.exp(peer_lr),
                       "peer_cut": None if peer_cut is None else math.exp(peer_cut),
                       "peers": max(0, len(vals) - 1),
                       "own_median": None if own_ref is None else math.exp(own_ref) * scale,
                       "own_ratio": None if own_lr is None else math.exp(own_lr),
                       "own_cut": None if own_cut is None else math.exp(own_cut),
                       "own_history": len(st.baseline), "sigma": sig})
        else:
            ev.update({"rate": None, "expected": exp})

        # ---- liveness
        errors = o.errors if o is not None else 0
        silence = None if seen is None else now - seen
        others_live = live.get(g, 0) - progressed_of[link]
        active = o.active if o is not None else st.active
        silent = active and silence is not None and silence > cfg.liveness_timeout and others_live > 0
        ev.update({"errors": errors, "error_kinds": list(o.error_kinds) if o is not None else [],
                   "silence_s": silence, "live_peers": others_live})
        down_now = errors > 0 or silent
        alive = o is not None and errors == 0 and silence is not None and silence <= cfg.liveness_timeout

        # ---- the state machine
        base, low_run, good_run = st.base, st.low_run, st.good_run
        baseline, c_lo, c_hi = st.baseline, st.cusum_lo, st.cusum_hi
        if down_now:
            base, low_run, good_run = DOWN, 0, 0
        elif base == HEALTHY:
            if lx is not None:
                # A run of low observations is broken only by one back at a healthy level (the
                # recovery threshold), not by a noisy one between the cut and that level: a link
                # at 11% under heavy noise reads 8%, 19%, 9%... and is slow all along.
                low_run = low_run + 1 if low else (0 if good else low_run)
                if low_run >= cfg.flag_after:
                    base, good_run = DEGRADED, 0
        elif base == DEGRADED:
            if lx is not None:
                good_run = good_run + 1 if good else 0
                low_run = low_run + 1 if low else 0
                if good_run >= cfg.recover_after:
                    base, low_run = HEALTHY, 0
        elif base == DOWN:
            if lx is not None and low:
                base, good_run, low_run = DEGRADED, 0, 1  # traffic again, but slow: already known bad
            elif (lx is not None and good) or (lx is None and alive):
                good_run += 1
                if good_run >= cfg.recover_after:
                    base, low_run = HEALTHY, 0
            elif lx is not None or not alive:
                good_run = 0

        # ---- own history and its change points (healthy links only)
        if base == HEALTHY and st.base == HEALTHY and lx is not None and not low:
            if own_lr is not None:
                c_lo = min(0.0, c_lo + own_lr + cfg.cusum_drift)
                c_hi = max(0.0, c_hi + own_lr - cfg.cusum_drift)
                if c_lo < -cfg.cusum_threshold or c_hi > cfg.cusum_threshold:
                    change = "down" if c_lo < -cfg.cusum_threshold else "up"
                    c_lo = c_hi = 0.0
                    if peer_lr is None or peer_lr >= math.log(cfg.recover_fraction):
                        baseline = ()  # its peers moved too (or it has none): a new normal
                        change += ", shared: new own reference"
            baseline = (baseline + (math.exp(lx),))[-cfg.history:]
        elif base != HEALTHY:
            c_lo = c_hi = 0.0
        ev["change_point"] = change

        # ---- transitions, flapping
        transitions = tuple(t for t in st.transitions if now - t < cfg.flap_window)
        since = st.since
        if base != st.base:
            transitions += (now,)
            since = now
        flapping = st.flapping
        if len(transitions) > cfg.flap_changes:
            flapping = True
        elif flapping and not transitions:
            flapping = False
        ev.update({"base_state": base, "low_run": low_run, "good_run": good_run,
                   "changes_in_window": len(transitions), "since": since})

        state = FLAPPING if flapping else base
        verdicts[link] = Verdict(link, state, _reason(link, state, base, st.base, ev, cfg), ev)
        states[link] = LinkState(base=base, flapping=flapping, low_run=low_run, good_run=good_run,
                                 baseline=baseline, cusum_lo=c_lo, cusum_hi=c_hi, transitions=transitions,
                                 last_seen=seen, group=g, active=active, since=since, rounds=st.rounds + 1)
    return verdicts, DetectorState(states, sigma, sigma_rounds)


def _refs_text(ev: Mapping[str, Any], cuts: bool = False) -> str:
    parts = []
    if ev.get("peer_ratio") is not None:
        parts.append(f"{100 * ev['peer_ratio']:.0f}% of its {ev['peers']} peers' median {fmt_rate(ev['peer_median'])}"
                     + (f" (< {100 * ev['peer_cut']:.0f}%)" if cuts else ""))
    if ev.get("own_ratio") is not None:
        parts.append(f"{100 * ev['own_ratio']:.0f}% of its own median {fmt_rate(ev['own_median'])}"
                     + (f" (< {100 * ev['own_cut']:.0f}%)" if cuts else ""))
    return " and ".join(parts) if parts else "no reference yet"


def _reason(link: Link, state: str, base: str, before: str, ev: Mapping[str, Any], cfg: DetectorConfig) -> str:
    name = link_name(link)
    rate = ev.get("rate")
    if rate is None:
        measured = "no traffic this round"
    else:
        measured = fmt_rate(rate)
        if ev.get("transfers"):
            measured += f" over {ev['transfers']} transfers"
        if ev.get("normalized") is not None:
            measured += f" ({100 * ev['normalized']:.0f}% of the planned {fmt_rate(ev['expected'])})"
        measured += f", {_refs_text(ev, cuts=ev.get('low_run', 0) > 0)}"
    if state == FLAPPING:
        return (f"link {name} flapping: {ev['changes_in_window']} state changes in the last {cfg.flap_window:g} s "
                f"(> {cfg.flap_changes}); now {base}: {measured}")
    if base == DOWN:
        if ev["errors"]:
            kinds = ", ".join(sorted(set(ev["error_kinds"]))) or "connection"
            return f"link {name} down: {ev['errors']} connection error(s) ({kinds}) this round"
        silence = ev.get("silence_s")
        if silence is not None and silence > cfg.liveness_timeout and ev["live_peers"]:
            return (f"link {name} down: silent for {silence:.1f} s (liveness timeout {cfg.liveness_timeout:g} s) "
                    f"while {ev['live_peers']} of its peers progressed")
        return (f"link {name} down, on probation: {ev['good_run']} of {cfg.recover_after} live rounds without "
                f"errors; {measured}")
    if base == DEGRADED:
        if rate is None:
            return f"link {name} degraded: {measured} to measure it again"
        if before == DEGRADED and ev["good_run"]:
            return (f"link {name} degraded, on probation: {ev['good_run']} of {cfg.recover_after} rounds at or "
                    f"above {100 * cfg.recover_fraction:.0f}%: {measured}")
        run = f", low for {ev['low_run']} rounds in a row" if ev["low_run"] > 1 else ""
        return f"link {name} degraded: {measured}{run}"
    if ev.get("low_run"):
        return (f"link {name} healthy, suspect: {measured}, low for {ev['low_run']} of "
                f"{cfg.flag_after} rounds")
    if before != HEALTHY:
        return f"link {name} healthy again after {cfg.recover_after} good rounds: {measured}"
    return f"link {name} healthy: {measured}"


# ------------------------------------------------------------------------------------------- both ends
def combine_reports(report_from_src: Verdict | None, report_from_dst: Verdict | None) -> Verdict:
    """The coordinator's verdict on a link from the verdicts of its two ends.

    * flapping if either end sees it flapping;
    * down if both ends say down, or one end saw connection errors and the other carried no
      traffic (silence); errors on one end while the other carries traffic: degraded;
      silence on one end while the other carries traffic: the other end's verdict;
    * degraded if either end's throughput evidence says so; otherwise healthy.
    A missing report (an end that sent none) leaves the other end's verdict, saying so."""
    if report_from_src is None and report_from_dst is None:
        raise ValueError("combine_reports needs the report of at least one end")
    if report_from_src is None or report_from_dst is None:
        only, which, missing = (report_from_dst, "dst", "src") if report_from_src is None else \
            (report_from_src, "src", "dst")
        return Verdict(only.link, only.state, f"{only.reason} (the {missing} end sent no report)",
                       {f"{which}_end": dict(only.evidence), f"{missing}_end": None})
    a, b = report_from_src, report_from_dst
    link = a.link
    ev = {"src_end": dict(a.evidence), "dst_end": dict(b.evidence)}
    both = f"src end: {a.reason}; dst end: {b.reason}"
    name = link_name(link)

    def errors(v: Verdict) -> int:
        return int(v.evidence.get("errors") or 0)

    def traffic(v: Verdict) -> bool:
        return v.evidence.get("rate") is not None and errors(v) == 0

    states = (a.state, b.state)
    if FLAPPING in states:
        return Verdict(link, FLAPPING, f"link {name} flapping: {both}", ev)
    if states == (DOWN, DOWN):
        return Verdict(link, DOWN, f"link {name} down, both ends agree: {both}", ev)
    if DOWN in states:
        d, other = (a, b) if a.state == DOWN else (b, a)
        if errors(d) and not traffic(other):
            return Verdict(link, DOWN, f"link {name} down: errors on one end, silence on the other: {both}", ev)
        if errors(d):
            return Verdict(link, DEGRADED, f"link {name} degraded: errors on one end while the other carries "
                                           f"traffic: {both}", ev)
        if traffic(other):
            return Verdict(link, other.state, f"link {name} {other.state}: one end reports silence but the other "
                                              f"carries traffic: {both}", ev)
        return Verdict(link, DEGRADED, f"link {name} degraded: one end reports silence, the other no traffic "
                                       f"either: {both}", ev)
    if DEGRADED in states:
        return Verdict(link, DEGRADED, f"link {name} degraded: {both}", ev)
    return Verdict(link, HEALTHY, f"link {name} healthy: {both}", ev)


# ------------------------------------------------------------------------------------------- telemetry
def observations_between(previous: Mapping | None, snapshot: Mapping,
                         connection_errors: Iterable[str] = CONNECTION_ERRORS
                         ) -> tuple[dict[Link, Observation], dict[Link, float]]:
    """Observations of the interval between two :meth:`LinkTelemetry.snapshot` results of one
    registry (``previous`` None: since it started), and the expected rates of the newer one."""
    fatal = frozenset(connection_errors)
    before = {(l["src"], l["dst"]): l for l in (previous or {}).get("links", [])}
    obs: dict[Link, Observation] = {}
    expected: dict[Link, float] = {}
    for l in snapshot["links"]:
        key = (l["src"], l["dst"])
        p = before.get(key, {})
        dbytes = l["bytes"] - p.get("bytes", 0)
        dsec = l["seconds"] - p.get("seconds", 0.0)
        dtransfers = l["transfers"] - p.get("transfers", 0)
        perr = p.get("errors", {})
        kinds = tuple(k for k, n in l["errors"].items() if k in fatal and n > perr.get(k, 0))
        nerr = sum(n - perr.get(k, 0) for k, n in l["errors"].items() if k in fatal)
        if l.get("wire_seconds") is not None:
            # The kernel's view of the path (see collcomm.transport.telemetry): bytes the peer
            # acknowledged over the seconds the connection had data in flight. A round that kept
            # it busy for less than MIN_WIRE_SECONDS, or that sent a single timed chunk, says
            # nothing (timer granularity, slow start); one that sent chunks and got nothing
            # acknowledged is a rate of 0.
            dwire = l["wire_seconds"] - (p.get("wire_seconds") or 0.0)
            dacked = l["wire_bytes"] - (p.get("wire_bytes") or 0)
            measured = (dtransfers >= MIN_WIRE_CHUNKS or (dtransfers == 0 and dbytes > 0)) and \
                dwire >= MIN_WIRE_SECONDS
            rate = dacked / dwire if measured else None
            source = "wire"
            # Not one byte through in STALL_SECONDS with data waiting and the receiver's window
            # open (within the round, or a connection stuck in retransmission timeouts that long
            # across rounds): the path drops everything (a cut cable behind a live port; TCP only
            # retransmits). A connection error. (A receiver that does not read closes its
            # window: that is not the path.)
            dopen = (l.get("wire_open_seconds") or 0.0) - (p.get("wire_open_seconds") or 0.0)
            if (dacked <= 0 and dopen >= STALL_SECONDS) or (l.get("wire_stalled_seconds") or 0.0) >= STALL_SECONDS:
                nerr += 1
                kinds += ("stalled",)
                rate = 0.0 if rate is None else rate
        else:
            rate = dbytes / dsec if dtransfers > 0 and dsec > 0 else None
            source = "chunks"
        # Silence only means something on a link that the plan uses or that heartbeats watch.
        active = l.get("expected_bytes_per_second") is not None or l.get("last_heartbeat_age") is not None
        obs[key] = Observation(rate=rate, transfers=dtransfers, errors=nerr, error_kinds=kinds,
                               last_seen=l.get("last_activity_mono"), group=l.get("group"), active=active,
                               source=source)
        if l.get("expected_bytes_per_second"):
            expected[key] = l["expected_bytes_per_second"]
    return obs, expected


def in_completed_round(obs: Observation) -> Observation:
    """The observation of a round in which every member's operations completed, so the plan's
    data crossed every link it uses. Neither of the two signs of a dead path can then be one:
    a connection that read as "stalled" and nothing else (a long operation behind a throttled
    link backs its retransmission timer off; a shaper's queue drops what overflows it) is a slow
    path, measured by what it acknowledged over its time in flight (a rate of 0 is no
    measurement); and a link silent longer than the liveness timeout was only waiting on a slower
    one (a 64 MB operation behind a link at 10% keeps the others idle for 20 s), so its silence
    says nothing (``active`` False). Errors of other kinds stay."""
    if obs.error_kinds == ("stalled",):
        return Observation(obs.rate if obs.rate else None, obs.transfers, 0, (), obs.last_seen, obs.group,
                           False, obs.source)
    return Observation(obs.rate, obs.transfers, obs.errors, obs.error_kinds, obs.last_seen, obs.group, False,
                       obs.source)


class LinkDetector:
    """:func:`classify` with its state kept between rounds."""

    def __init__(self, config: DetectorConfig | None = None):
        self.config = config or DetectorConfig()
        self.state = DetectorState()
        self._previous: Mapping | None = None
        self.verdicts: dict[Link, Verdict] = {}

    def observe(self, samples_by_link: Mapping[Link, Observation | float | None],
                expected_by_link: Mapping[Link, float] | None, now: float) -> dict[Link, Verdict]:
        self.verdicts, self.state = classify(samples_by_link, expected_by_link, self.state, now, self.config)
        return self.verdicts

    def update(self, snapshot: Mapping, now: float | None = None) -> dict[Link, Verdict]:
        """One round from a telemetry snapshot (the interval since the previous one)."""
        obs, expected = observations_between(self._previous, snapshot)
        self._previous = snapshot
        return self.observe(obs, expected, snapshot["monotonic"] if now is None else now)

    def faulty(self) -> dict[Link, Verdict]:
        """The links of the last round that are not healthy (what the planner should avoid)."""
        return {k: v for k, v in self.verdicts.items() if v.state != HEALTHY}
