"""Per-link telemetry: what every rank measures of the links it sends on and receives from.

A :class:`LinkTelemetry` registry keeps, per ordered rank pair ``(src, dst)``, counters of
bytes, transfers, busy seconds, errors (by kind) and retransmits, the time the link was last
heard from (a heartbeat or a transfer; monotonic and wall clock), a bounded ring of the
most recent transfers (time, bytes, seconds: their throughput is computed when read) and,
where the planner gave one, the throughput the current plan expects of the link.

Recording is cheap enough for the transport's hot path (one call per chunk): one lock per
registry, a dictionary lookup (or none: :meth:`LinkTelemetry.link` hands out the
:class:`LinkStats` of a pair to keep), a few additions, and three slots of a preallocated
ring written in place; nothing is allocated per call.

What a chunk's own time measures is mostly the sender's socket buffer and the receiver's
scheduling, not the link (a chunk copied into an empty socket buffer "takes" microseconds; one
whose receiver was descheduled looks slow). So where the transport passes the socket with a
transfer (:meth:`LinkStats.record_transfer`, ``sock=``), the registry also keeps *wire*
counters of the link, read from the kernel's ``TCP_INFO`` of its sockets when a snapshot is
taken: bytes the peer acknowledged and the seconds the connection had data in flight, less
those it was held back by its own send buffer (``tcpi_busy_time - tcpi_sndbuf_limited``). Their
ratio is the rate the path delivered while it had something to deliver: queueing behind earlier
chunks in the socket buffer and a sender with nothing to send do not count. (The receiver-window
limited time stays in: on a shaped or congested path a full-window flow is "rwnd limited" while
the path is busy, and the kernel acknowledges what reaches the peer's buffer whether or not the
peer reads it.) Per socket, not per call: nothing is added to the hot path but one identity
test.

Reading is for the monitor and for people: :meth:`LinkTelemetry.snapshot` returns a JSON-able
dictionary (``collcomm.telemetry/1``) that :mod:`collcomm.faults.detector` turns into
observations, and :meth:`LinkTelemetry.prometheus` the Prometheus text exposition format 0.0.4.
"""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from typing import Callable, Hashable, Iterator

FORMAT = "collcomm.telemetry/1"
DEFAULT_RING = 64

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked at 120, tcpi_busy_time, tcpi_rwnd_limited and
# tcpi_sndbuf_limited (microseconds, counted in jiffies) at 168 (Linux 4.10 and later).
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_INFO_LEN = 192
_ACKED = struct.Struct("=Q")
_CHRONO = struct.Struct("=QQQ")
# tcpi_backoff (u8) at 4, tcpi_unacked (u32) at 24, tcpi_last_ack_recv (u32, ms) at 56.
_U32 = struct.Struct("=I")


def tcp_stalled_seconds(sock) -> float:
    """How long the connection has had unacknowledged data out with no ACK at all (two or more
    retransmission timeouts in a row, the last ACK this long ago); 0 when it is not stuck (or the
    kernel does not tell)."""
    if _TCP_INFO is None:
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except (OSError, ValueError, AttributeError):
        return 0.0
    if len(info) < _TCP_INFO_LEN or info[4] < 2 or _U32.unpack_from(info, 24)[0] == 0:
        return 0.0
    return _U32.unpack_from(info, 56)[0] / 1e3


def tcp_wire_counters(sock) -> tuple[int, float, float] | None:
    """(bytes acknowledged by the peer, seconds the connection had data in flight and was not
    limited by its send buffer, of those the seconds not limited by the receiver's window either)
    of a TCP socket; None where the kernel does not tell (not Linux, not TCP, an old kernel, a
    closed socket)."""
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except (OSError, ValueError, AttributeError):
        return None
    if len(info) < _TCP_INFO_LEN:
        return None
    busy, rwnd, sndbuf = _CHRONO.unpack_from(info, 168)
    return _ACKED.unpack_from(info, 120)[0], max(0, busy - sndbuf) / 1e6, max(0, busy - sndbuf - rwnd) / 1e6


class LinkStats:
    """The counters of one directed link; written under its registry's lock."""

    __slots__ = ("src", "dst", "physical", "group", "bytes", "transfers", "seconds", "errors", "retransmits",
                 "heartbeat_mono", "activity_mono", "expected", "_t", "_n", "_s", "_pos", "_len", "_lock",
                 "_clock", "wire_bytes", "wire_seconds", "wire_open_seconds", "wire_stalled", "_sock", "_socks")

    def __init__(self, src: int, dst: int, ring: int, lock: threading.Lock, clock: Callable[[], float]):
        self.src, self.dst = src, dst
        self.physical: str | None = None   # the topology's link id, e.g. "box0.gpu0->box0.nvswitch"
        self.group: Hashable | None = None  # the kind of traffic it carries in the current plan (peers)
        self.bytes = 0
        self.transfers = 0
        self.seconds = 0.0
        self.errors: dict[str, int] = {}
        self.retransmits = 0
        self.heartbeat_mono: float | None = None  # monotonic; the registry converts to wall time
        self.activity_mono: float | None = None   # last transfer or heartbeat
        self.expected: float | None = None  # bytes/s the plan expects; None: unknown
        self.wire_bytes: int | None = None  # TCP_INFO of the link's sockets (None: none attached)
        self.wire_seconds: float | None = None
        self.wire_open_seconds: float | None = None  # ... of those, the receiver's window open
        self.wire_stalled: float | None = None  # seconds a socket has been stuck (tcp_stalled_seconds)
        self._sock = None  # the socket of the last transfer (one identity test per call)
        self._socks: dict[int, list] = {}  # id -> [socket, acked, busy, open seconds at the last reading]
        self._t = [0.0] * ring  # monotonic end time of each sample
        self._n = [0] * ring    # bytes
        self._s = [0.0] * ring  # seconds
        self._pos = 0
        self._len = 0
        self._lock = lock
        self._clock = clock

    def record_transfer(self, nbytes: int, seconds: float, sock=None) -> None:
        """One transfer (a chunk) of ``nbytes`` that kept the link busy ``seconds``; ``sock``: the
        TCP socket it was written to (the sender's side), whose kernel counters are then read at
        every snapshot (see the module's docstring)."""
        now = self._clock()
        if sock is not None and sock is not self._sock:
            self._attach(sock)
        with self._lock:
            self.bytes += nbytes
            self.transfers += 1
            self.seconds += seconds
            pos = self._pos
            self._t[pos] = now
            self._n[pos] = nbytes
            self._s[pos] = seconds
            pos += 1
            self._pos = 0 if pos == len(self._t) else pos
            if self._len < len(self._t):
                self._len += 1
            self.activity_mono = now

    def _attach(self, sock) -> None:
        start = tcp_wire_counters(sock)
        with self._lock:
            self._sock = sock
            if start is None or id(sock) in self._socks:
                return
            self._socks[id(sock)] = [sock, *start]
            if self.wire_bytes is None:
                self.wire_bytes, self.wire_seconds, self.wire_open_seconds, self.wire_stalled = 0, 0.0, 0.0, 0.0

    def _read_wire(self) -> None:
        """Add what the attached sockets delivered since the last reading (lock held)."""
        self.wire_stalled = 0.0
        for key, entry in list(self._socks.items()):
            now = tcp_wire_counters(entry[0])
            if now is None:  # closed (a reconnect replaced it): what it did last was read before
                del self._socks[key]
                continue
            acked, busy, open_ = now
            self.wire_bytes += max(0, acked - entry[1])
            self.wire_seconds += max(0.0, busy - entry[2])
            self.wire_open_seconds += max(0.0, open_ - entry[3])
            entry[1], entry[2], entry[3] = acked, busy, open_
            self.wire_stalled = max(self.wire_stalled, tcp_stalled_seconds(entry[0]))

    def record_bytes(self, nbytes: int, sock=None) -> None:
        """Payload bytes of a small frame: counted, not timed (its time is mostly latency); ``sock``
        as for :meth:`record_transfer` (the kernel's counters time the link, whatever the chunk
        size: with chunks of 64 KB and less nothing else would)."""
        if sock is not None and sock is not self._sock:
            self._attach(sock)
        with self._lock:
            self.bytes += nbytes
            self.activity_mono = self._clock()

    def record_error(self, kind: str = "error") -> None:
        kind = _key_error(kind)
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def record_retransmit(self, count: int = 1) -> None:
        with self._lock:
            self.retransmits += count

    # ---------------------------------------------------------------- reading (lock held by the caller)
    def _samples(self) -> Iterator[tuple[float, int, float]]:
        """The ring's samples, oldest first."""
        cap = len(self._t)
        start = (self._pos - self._len) % cap
        for k in range(self._len):
            i = (start + k) % cap
            yield self._t[i], self._n[i], self._s[i]

    def _recent_rate(self) -> float | None:
        nbytes = seconds = 0
        for _, n, s in self._samples():
            nbytes += n
            seconds += s
        return nbytes / seconds if seconds > 0 else None


def _key_error(kind: str) -> str:
    return str(kind or "error")


class LinkTelemetry:
    """Thread-safe registry of :class:`LinkStats`, keyed by the ordered rank pair ``(src, dst)``.

    ``rank`` (optional) is the rank that owns the registry: :meth:`heartbeat` from a peer
    then also marks the link ``peer -> rank`` alive. ``clock`` and ``wall`` are injectable
    for tests (monotonic and wall-clock seconds)."""

    def __init__(self, rank: int | None = None, ring: int = DEFAULT_RING, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        if ring < 1:
            raise ValueError(f"ring must hold at least one sample, got {ring}")
        self.rank = rank
        self.ring = ring
        self._lock = threading.Lock()
        self._clock, self._wall = clock, wall
        # Wall time = monotonic time + offset; taken once so that reading converts without drift.
        self._offset = wall() - clock()
        self._by_src: dict[int, dict[int, LinkStats]] = {}
        self._peers: dict[int, float] = {}  # peer rank -> monotonic time of its last heartbeat

    # ---------------------------------------------------------------- handles
    def link(self, src: int, dst: int) -> LinkStats:
        """The stats of ``src -> dst`` (created on first use). Keep it to record without a lookup."""
        row = self._by_src.get(src)
        stats = row.get(dst) if row is not None else None
        if stats is not None:
            return stats
        with self._lock:
            row = self._by_src.setdefault(src, {})
            stats = row.get(dst)
            if stats is None:
                stats = row[dst] = LinkStats(src, dst, self.ring, self._lock, self._clock)
            return stats

    def links(self) -> list[LinkStats]:
        with self._lock:
            return [s for row in self._by_src.values() for s in row.values()]

    # ---------------------------------------------------------------- recording
    def record_transfer(self, src: int, dst: int, nbytes: int, seconds: float) -> None:
        """``nbytes`` went from ``src`` to ``dst`` and kept the link busy ``seconds`` (one chunk)."""
        self.link(src, dst).record_transfer(nbytes, seconds)

    def record_error(self, src: int, dst: int, kind: str = "error") -> None:
        """An error on ``src -> dst``: ``kind`` is short and stable (``reset``, ``refused``, ``timeout``,
        ``checksum``, ``eof``...): it becomes a label value."""
        stats = self.link(src, dst)
        kind = _key_error(kind)
        with self._lock:
            stats.errors[kind] = stats.errors.get(kind, 0) + 1

    def record_retransmit(self, src: int, dst: int, count: int = 1) -> None:
        """``count`` frames of ``src -> dst`` had to be sent again (a checksum failure, a reconnect)."""
        stats = self.link(src, dst)
        with self._lock:
            stats.retransmits += count

    def heartbeat(self, peer: int, dst: int | None = None) -> None:
        """``peer`` was heard from (a heartbeat frame, or any frame). Marks the link ``peer -> dst``
        alive, ``dst`` defaulting to the registry's own rank; without either only the peer table."""
        now = self._clock()
        dst = self.rank if dst is None else dst
        stats = self.link(peer, dst) if dst is not None else None
        with self._lock:
            self._peers[peer] = now
            if stats is not None:
                stats.heartbeat_mono = now
                stats.activity_mono = now

    # ---------------------------------------------------------------- the plan
    def set_expected(self, src: int, dst: int, bytes_per_second: float | None, *, group: Hashable | None = None,
                     physical: str | None = None) -> None:
        """What the current plan expects of ``src -> dst`` (bytes/s; None: unknown), which traffic
        class (``group``: links compared with each other) and which physical link it rides."""
        if bytes_per_second is not None and not (bytes_per_second > 0 and math.isfinite(bytes_per_second)):
            raise ValueError(f"expected throughput of {src}->{dst} must be a positive number, "
                             f"got {bytes_per_second!r}")
        stats = self.link(src, dst)
        with self._lock:
            stats.expected = None if bytes_per_second is None else float(bytes_per_second)
            if group is not None:
                stats.group = group
            if physical is not None:
                stats.physical = physical

    def clear_expected(self) -> None:
        """Forget every link's expectation and group (a new plan is about to be set)."""
        with self._lock:
            for row in self._by_src.values():
                for s in row.values():
                    s.expected = None
                    s.group = None

    # ---------------------------------------------------------------- reading
    def snapshot(self) -> dict:
        """Everything, JSON-able (``collcomm.telemetry/1``). Times are seconds: ``monotonic`` is this
        process's clock when taken (the detector's ``now``), ``*_age`` are seconds before it,
        ``*_wall`` Unix times; samples are ``[age, bytes, seconds, bytes_per_second]``, oldest first."""
        with self._lock:
            now = self._clock()
            wall = now + self._offset
            links = []
            for src in sorted(self._by_src, key=_sort_key):
                row = self._by_src[src]
                for dst in sorted(row, key=_sort_key):
                    s = row[dst]
                    if s._socks:
                        s._read_wire()
                    samples = [[round(now - t, 6), n, sec, (n / sec if sec > 0 else None)]
                               for t, n, sec in s._samples()]
                    links.append({
                        "src": src, "dst": dst, "physical": s.physical,
                        "group": s.group if s.group is None or isinstance(s.group, (str, int)) else str(s.group),
                        "bytes": s.bytes, "transfers": s.transfers, "seconds": s.seconds,
                        "errors": dict(s.errors), "error_total": sum(s.errors.values()),
                        "retransmits": s.retransmits,
                        "last_heartbeat_age": None if s.heartbeat_mono is None else now - s.heartbeat_mono,
                        "last_heartbeat_wall": None if s.heartbeat_mono is None else s.heartbeat_mono + self._offset,
                        "last_activity_age": None if s.activity_mono is None else now - s.activity_mono,
                        "last_activity_wall": None if s.activity_mono is None else s.activity_mono + self._offset,
                        "last_activity_mono": s.activity_mono,
                        "recent_bytes_per_second": s._recent_rate(),
                        "expected_bytes_per_second": s.expected,
                        "wire_bytes": s.wire_bytes, "wire_seconds": s.wire_seconds,
                        "wire_open_seconds": s.wire_open_seconds, "wire_stalled_seconds": s.wire_stalled,
                        "samples": samples,
                    })
            peers = {str(p): {"last_heartbeat_age": now - t, "last_heartbeat_wall": t + self._offset}
                     for p, t in sorted(self._peers.items(), key=lambda kv: _sort_key(kv[0]))}
        return {"format": FORMAT, "rank": self.rank, "monotonic": now, "wall": wall, "links": links,
                "peers": peers}

    def prometheus(self) -> str:
        """The registry in the Prometheus text exposition format 0.0.4."""
        snap = self.snapshot()
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, rows: list[tuple[dict, float | int | None]]) -> None:
            out.append(f"# HELP {name} {_escape_help(help_text)}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in rows:
                if value is None:
                    continue
                text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{text}}} {_number(value)}")

        def labels(link: dict) -> dict:
            lab = {"src": str(link["src"]), "dst": str(link["dst"])}
            if link["physical"] is not None:
                lab["link"] = str(link["physical"])
            return lab

        links = snap["links"]
        family("collcomm_link_bytes_total", "counter", "Payload bytes carried by the link (src rank -> dst rank).",
               [(labels(l), l["bytes"]) for l in links])
        family("collcomm_link_transfers_total", "counter", "Transfers (chunks) carried by the link.",
               [(labels(l), l["transfers"]) for l in links])
        family("collcomm_link_transfer_seconds_total", "counter", "Seconds the link was busy with transfers.",
               [(labels(l), l["seconds"]) for l in links])
        family("collcomm_link_errors_total", "counter", "Errors on the link, by kind (reset, refused, timeout...).",
               [({**labels(l), "kind": k}, n) for l in links for k, n in sorted(l["errors"].items())])
        family("collcomm_link_retransmits_total", "counter", "Frames of the link that were sent again.",
               [(labels(l), l["retransmits"]) for l in links])
        family("collcomm_link_throughput_bytes_per_second", "gauge",
               "Throughput of the link's recent transfers (bytes over busy seconds of the sample ring).",
               [(labels(l), l["recent_bytes_per_second"]) for l in links])
        family("collcomm_link_expected_bytes_per_second", "gauge",
               "Throughput the current plan expects of the link.",
               [(labels(l), l["expected_bytes_per_second"]) for l in links])
        family("collcomm_link_heartbeat_age_seconds", "gauge",
               "Seconds since the link was last heard from (heartbeat or transfer).",
               [(labels(l), l["last_activity_age"]) for l in links])
        family("collcomm_link_last_heartbeat_timestamp_seconds", "gauge",
               "Unix time of the link's last heartbeat.",
               [(labels(l), l["last_heartbeat_wall"]) for l in links])
        family("collcomm_peer_heartbeat_age_seconds", "gauge", "Seconds since the peer rank was last heard from.",
               [({"peer": p}, v["last_heartbeat_age"]) for p, v in snap["peers"].items()])
        return "\n".join(out) + "\n"


def _sort_key(x) -> tuple:
    return (0, x, "") if isinstance(x, int) else (1, 0, str(x))


def _escape_label(value) -> str:
    """Label values: backslash, double quote and line feed escaped (exposition format 0.0.4)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float | int) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
