"""Fault injection on the wire: a plan of faults the transport applies on the sending side.

A :class:`FaultPlan` comes from the environment variable ``COLLCOMM_FAULTS`` (read when a
transport is created) or from :func:`configure`. Its grammar, rules separated by ``;``::

    plan   := item (";" item)*
    item   := "seed=" INT                       the plan's random seed (default 0)
            | KIND ":" SRC "->" DST (":" PARAM)*
    SRC, DST := rank number | "*"               "*" matches any rank
    PARAM  := NAME "=" VALUE

    corrupt:SRC->DST[:p=P]      flip one byte of a DATA frame's payload after its checksum was
                                computed (P: probability per frame, default 1)
    drop:SRC->DST[:p=P]         do not send a DATA frame at all (default P 1); the sender finds
                                it lost (PROBE/ECHO after its retransmission timeout) and sends
                                it again
    delay:SRC->DST:ms=MS        sleep MS milliseconds (0 to 1e12) before sending each DATA frame
    throttle:SRC->DST:bps=B     pace DATA frames to B bytes per second (finite, at least 1)

drop, delay and throttle also apply to the DATA frames SRC relays to DST on a detour (its own,
or another member's that it passes on), so a relay can lose what it carries; control frames
(ACK, PROBE, ECHO) are never dropped, relayed or not, and a relayed frame is never corrupted
(its header would be).
    reset:SRC->DST:after=SIZE   cut the connection (shutdown) once SIZE bytes went out on it
                                (SIZE: bytes, with an optional K/M/G suffix, powers of 1024); once
                                per link

Every rule may also take ``seed=N`` (its own seed) and ``count=N`` (inject at most N times on
a link). Example: ``corrupt:0->1:p=0.01;drop:*->2:p=0.001;delay:1->0:ms=20;seed=7``.
A malformed plan raises ``ValueError`` in one line naming the bad part (quoted short).

The runtime gives the active plan to its transport (which knows it only as a
:class:`collcomm.transport.interface.FaultPlan`); each link applies it to the frames it sends to
its peer (src = this rank, dst = the peer); random choices are drawn from a generator seeded by
(seed, src, dst, kind), so a plan replays the same choices link by link.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from dataclasses import dataclass, field

from collcomm.inputs import SizeError, parse_size, shown

ENV = "COLLCOMM_FAULTS"
KINDS = ("corrupt", "drop", "delay", "throttle", "reset")
_PARAMS = {"corrupt": {"p"}, "drop": {"p"}, "delay": {"ms"}, "throttle": {"bps"}, "reset": {"after"}}
_REQUIRED = {"delay": "ms", "throttle": "bps", "reset": "after"}
# Bounds on the numbers a plan sleeps on: time.sleep() raises OverflowError (in the sending
# thread, mid-collective) on an infinite or too long sleep, so a plan is refused when parsed.
MAX_DELAY_MS = 1e12  # 1e9 s, the longest timeout the API takes
MIN_BPS = 1.0        # a throttle slower than a byte per second would sleep past any deadline
MAX_RANK_DIGITS = 9


@dataclass(frozen=True)
class Rule:
    kind: str
    src: int | None  # None: any rank
    dst: int | None
    p: float = 1.0
    ms: float = 0.0
    bps: float = 0.0
    after: int = 0
    seed: int | None = None
    count: int | None = None

    def matches(self, src: int, dst: int) -> bool:
        return (self.src is None or self.src == src) and (self.dst is None or self.dst == dst)


@dataclass(frozen=True)
class FaultPlan:
    rules: tuple[Rule, ...] = ()
    seed: int = 0
    text: str = field(default="", compare=False)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def for_link(self, src: int, dst: int) -> "LinkFaults | None":
        """What to inject on frames ``src`` sends to ``dst`` (None: nothing)."""
        rules = [r for r in self.rules if r.matches(src, dst)]
        return LinkFaults(rules, self.seed, src, dst) if rules else None


def _size(text: str, part: str) -> int:
    """Bytes (K/M/G/T suffixes, powers of 1024): collcomm's one size parser, bounded."""
    try:
        return parse_size(text)
    except SizeError as e:
        raise ValueError(f"{ENV}: bad size in {shown(part)}: {e}") from None


def _endpoint(text: str, part: str) -> int | None:
    text = text.strip()
    if text == "*":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_RANK_DIGITS:  # "²".isdigit() is true
        raise ValueError(f"{ENV}: bad rank {shown(text)} in {shown(part)} (a rank number or '*')")
    return int(text)


def parse(text: str) -> FaultPlan:
    """Parse a plan (see the module's grammar); raises a one-line ValueError naming the bad part."""
    rules: list[Rule] = []
    seed = 0
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        if part.startswith("seed="):
            try:
                seed = int(part[5:])
            except ValueError:
                raise ValueError(f"{ENV}: bad seed in {shown(part)}") from None
            continue
        fields = part.split(":")
        kind = fields[0].strip().lower()
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {shown(fields[0])} in {shown(part)} (one of {', '.join(KINDS)})")
        if len(fields) < 2 or "->" not in fields[1]:
            raise ValueError(f"{ENV}: missing SRC->DST in {shown(part)}")
        src_text, _, dst_text = fields[1].partition("->")
        kw: dict = {"kind": kind, "src": _endpoint(src_text, part), "dst": _endpoint(dst_text, part)}
        for param in fields[2:]:
            name, eq, value = param.partition("=")
            name = name.strip().lower()
            if not eq or name not in _PARAMS[kind] | {"seed", "count"}:
                raise ValueError(f"{ENV}: bad parameter {shown(param)} in {shown(part)} "
                                 f"(allowed: {', '.join(sorted(_PARAMS[kind] | {'seed', 'count'}))})")
            if name in kw:
                raise ValueError(f"{ENV}: parameter {shown(name)} given twice in {shown(part)}")
            try:
                if name == "after":
                    kw[name] = _size(value, part)
                elif name in ("seed", "count"):
                    kw[name] = int(value)
                else:
                    kw[name] = float(value)
            except ValueError as e:
                if str(e).startswith(ENV):
                    raise
                raise ValueError(f"{ENV}: bad value {shown(param)} in {shown(part)}") from None
        if kind in _REQUIRED and _REQUIRED[kind] not in kw:
            raise ValueError(f"{ENV}: {kind} needs {_REQUIRED[kind]}= in {shown(part)}")
        if "p" in kw and not 0.0 <= kw["p"] <= 1.0:
            raise ValueError(f"{ENV}: probability out of [0, 1] in {shown(part)}")
        if kind == "throttle" and not (MIN_BPS <= kw["bps"] and math.isfinite(kw["bps"])):
            raise ValueError(f"{ENV}: throttle needs a finite bps >= {MIN_BPS:g} in {shown(part)}")
        if kind == "delay" and not 0 <= kw["ms"] <= MAX_DELAY_MS:  # false for nan and inf too
            raise ValueError(f"{ENV}: delay needs ms >= 0 and <= {MAX_DELAY_MS:g} in {shown(part)}")
        if kw.get("count") is not None and kw["count"] < 0:
            raise ValueError(f"{ENV}: count must be >= 0 in {shown(part)}")
        rules.append(Rule(**kw))
    return FaultPlan(tuple(rules), seed, text or "")


_lock = threading.Lock()
_configured: FaultPlan | None = None


def configure(plan: "str | FaultPlan | None") -> FaultPlan | None:
    """Set the process's fault plan (a string in the grammar above, a FaultPlan, or None to fall
    back to ``COLLCOMM_FAULTS``). Applies to transports created afterwards. Returns the plan."""
    global _configured
    parsed = parse(plan) if isinstance(plan, str) else plan
    with _lock:
        _configured = parsed
    return parsed


def active_plan() -> FaultPlan | None:
    """The plan a new transport applies: the configured one, else ``COLLCOMM_FAULTS`` (None: no faults)."""
    with _lock:
        plan = _configured
    if plan is None:
        text = os.environ.get(ENV, "")
        plan = parse(text) if text.strip() else None
    return plan if plan else None


class LinkFaults:
    """The faults of one directed link, applied by its Link's sending side (one thread at a time)."""

    def __init__(self, rules: list[Rule], seed: int, src: int, dst: int):
        def first(kind):
            return next((r for r in rules if r.kind == kind), None)

        def rng(rule):
            s = rule.seed if rule.seed is not None else seed
            return random.Random(f"{s}/{src}/{dst}/{rule.kind}")

        self.corrupt, self.drop, self.delay = first("corrupt"), first("drop"), first("delay")
        self.throttle, self.reset = first("throttle"), first("reset")
        self._rng = {r.kind: rng(r) for r in (self.corrupt, self.drop) if r is not None}
        self._left = {r.kind: r.count for r in rules if r.count is not None}
        self._free_at = 0.0  # throttle: when the paced link is free again
        self.sent = 0  # bytes handed to the socket (reset)
        self.injected = {k: 0 for k in KINDS}

    def _fire(self, rule: Rule | None) -> bool:
        if rule is None:
            return False
        left = self._left.get(rule.kind)
        if left is not None and left <= 0:
            return False
        if rule.p < 1.0 and self._rng[rule.kind].random() >= rule.p:
            return False
        if left is not None:
            self._left[rule.kind] = left - 1
        self.injected[rule.kind] += 1
        return True

    def before_data(self, nbytes: int, corrupt: bool = True) -> str | None:
        """Called before a DATA frame of ``nbytes`` payload goes out (directly, or relayed: then
        ``corrupt`` is False): sleeps for delay and throttle; returns "drop", "corrupt" or None."""
        if self.delay is not None and self.delay.ms > 0:
            time.sleep(self.delay.ms / 1000.0)
        if self.throttle is not None:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + nbytes / self.throttle.bps
            if self._free_at > now:
                time.sleep(self._free_at - now)
        if self._fire(self.drop):
            return "drop"
        if corrupt and nbytes and self._fire(self.corrupt):
            return "corrupt"
        return None

    def corrupted(self, payload) -> bytearray:
        """A copy of ``payload`` with one byte changed (the source buffer stays intact)."""
        copy = bytearray(payload)
        i = self._rng["corrupt"].randrange(len(copy))
        copy[i] ^= 1 << self._rng["corrupt"].randrange(8)
        return copy

    def cut_after(self, nbytes: int) -> int | None:
        """For a frame of ``nbytes`` about to go out: how many of its bytes go before the
        connection is cut (None: the whole frame, no cut)."""
        r = self.reset
        if r is None or self.injected["reset"]:
            self.sent += nbytes
            return None
        if self.sent + nbytes <= r.after:
            self.sent += nbytes
            return None
        self.injected["reset"] += 1
        cut = max(0, r.after - self.sent)
        self.sent += cut
        return cut
