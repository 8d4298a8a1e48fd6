"""The plan of an emulated fabric: everything :func:`collcomm.emulation.up` will create, computed
without touching the system (testable without root).

Every node of the topology, compute or switch, becomes a network namespace
``<prefix>-<i>`` (``i`` its index in ``Topology.order``: ranks first). Every pair of nodes
joined by a link gets one veth pair; each end is shaped with ``tc tbf`` to the scaled
bandwidth of the direction leaving it (``--scale``, e.g. ``1GB/s=100Mbit``), so a one-way link
is fast one way and a trickle the other. Every namespace owns one address (``10.250.x.y/32``);
routes are per destination: fewest hops first, then the fattest path, with equal-cost next hops
spread by the kernel's L4 multipath hash. The management network (a bridge ``<prefix>br`` in the
root namespace, one veth ``<prefix>m<i>`` per rank) gets its addresses from the prefix; the
bridge's own is chosen again when the fabric goes up, where another one may be in use.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import networkx as nx

from collcomm.errors import CollectiveError
from collcomm.inputs import Limits, exact_number, one_line, parse_json, shown
from collcomm.topology.model import Topology

DEFAULT_PREFIX = "ccemu"
DEFAULT_SCALE = "1GB/s=100Mbit"
MTU = 9000
# Bytes on the wire per full frame and bytes of TCP payload in it (IPv4 + TCP with timestamps):
# tbf counts frames, so rates are raised by this ratio to give the scaled bandwidth as goodput.
WIRE_PER_PAYLOAD = Fraction(MTU + 14, MTU - 52)
REVERSE_TRICKLE_BITS = 1_000_000  # the unused direction of a one-way link (ARP, nothing routed)
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{1,8}")  # fullmatch: "$" would let a trailing newline in


class EmulationError(CollectiveError):
    """The emulated fabric cannot be built, used or removed (not root, bad scale, tool missing)."""


class PlanError(EmulationError, ValueError):
    """A plan read back (the state file of a fabric that is up) is malformed; a ValueError too, so
    that a reader that treats an unreadable state file as "no fabric" still does."""


# --------------------------------------------------------------------------- scale and prefix
_UNITS_BYTES = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS_BITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def parse_scale(text: str) -> Fraction:
    """``"1GB/s=100Mbit"`` -> bits per second of tc rate per GB/s of topology bandwidth."""
    m = re.fullmatch(r"\s*([0-9./]+)\s*([KMGT]?B)/s\s*=\s*([0-9./]+)\s*([kmg]?bit)\s*", text, re.IGNORECASE)
    if not m:
        raise EmulationError(f"--scale must look like 1GB/s=100Mbit, got {shown(text)}")
    try:
        left, right = (exact_number(m.group(i), "--scale", error=EmulationError) for i in (1, 3))
    except EmulationError:
        raise EmulationError(f"--scale must look like 1GB/s=100Mbit, got {shown(text)}") from None
    lunit = {k.lower(): v for k, v in _UNITS_BYTES.items()}[m.group(2).lower()]
    runit = _UNITS_BITS[m.group(4).lower()]
    if left <= 0 or right <= 0:
        raise EmulationError(f"--scale: both sides must be positive, got {shown(text)}")
    gbytes = left * lunit / 10**9  # the left side in GB/s, the topology's unit
    return right * runit / gbytes


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise EmulationError(f"emulation prefix must be 2-9 lowercase letters or digits starting with a letter "
                             f"(it names interfaces of at most 15 characters), got {shown(prefix)}")
    return prefix


# --------------------------------------------------------------------------- the plan
@dataclass
class Veth:
    a: int            # namespace index of one end
    b: int            # ... and of the other
    a_if: str         # interface name inside namespace a (e<b>)
    b_if: str
    a_bits: int       # tbf rate of a's end (traffic a -> b), bits/s
    b_bits: int


@dataclass
class FabricPlan:
    prefix: str
    name: str
    scale_bits_per_gbps: str          # Fraction as text
    namespaces: list[str]
    node_ids: list[str]
    addresses: list[str]              # one /32 per namespace, on its first fabric interface
    address_iface: list[str]          # the interface carrying that address (GLOO_SOCKET_IFNAME)
    veths: list[Veth]
    routes: list[list[str]] = field(default_factory=list)  # per namespace: `ip route` argument lists, joined
    mgmt_bridge: str = ""
    mgmt_host: str = ""               # the bridge's address: the coordinator listens here
    mgmt_addresses: list[str] = field(default_factory=list)  # per rank, on its namespace's "mgmt" veth
    num_ranks: int = 0

    def namespace_of_rank(self, rank: int) -> str:
        return self.namespaces[rank]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def same_fabric(self, other: "FabricPlan") -> bool:
        """Equal but for the management network (chosen when the fabric goes up)."""
        mine, theirs = asdict(self), asdict(other)
        for d in (mine, theirs):
            for key in ("mgmt_host", "mgmt_addresses"):
                d.pop(key)
        return mine == theirs

    @staticmethod
    def from_json(text: str, what: str = "emulation plan", limits: Limits | None = None) -> "FabricPlan":
        """The plan written by :meth:`to_json` (the state file of a fabric that is up), every field
        checked: its names and addresses end up in ``ip`` commands run as root. A bad plan is a
        :class:`PlanError` (an EmulationError and a ValueError) naming the field."""
        try:
            raw = parse_json(text, what=what, error=PlanError, limits=limits)
            fields = _plan_fields(raw)
        except PlanError as e:
            raise PlanError(one_line(str(e))) from None
        return FabricPlan(**{**fields, "veths": [Veth(**v) for v in fields["veths"]]})


# ---------------------------------------------------------------------------- a plan read back
MAX_NAMESPACES = 250 * 250       # one address each in 10.250.0.0/16
MAX_TC_BITS = 10**15             # bits/s of one tbf rate (a petabit)
_IFACE_RE = re.compile(r"e\d{1,5}|lo", re.ASCII)
_IPV4_RE = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)", re.ASCII)
_ROUTE_RE = re.compile(r"[ -~]{1,4096}", re.ASCII)  # printable ASCII on one line: one `ip route add`
_REQUIRED = ("prefix", "name", "scale_bits_per_gbps", "namespaces", "node_ids", "addresses", "address_iface",
             "veths")
_OPTIONAL = ("routes", "mgmt_bridge", "mgmt_host", "mgmt_addresses", "num_ranks")


def _strings(raw: dict, key: str, n: int, pattern: re.Pattern | None = None) -> list[str]:
    value = raw.get(key)
    if not isinstance(value, list) or len(value) != n:
        raise PlanError(f"plan: {key!r} must be a list of {n} strings, got {shown(value)}")
    for i, x in enumerate(value):
        if not isinstance(x, str) or not (pattern.fullmatch(x) if pattern else 0 < len(x) <= 256 and x.isprintable()):
            raise PlanError(f"plan: {key}[{i}] is not valid here, got {shown(x)}")
    return value


def _plan_fields(raw) -> dict:
    """The fields of a FabricPlan from its parsed JSON, each checked (shape, count, pattern)."""
    if not isinstance(raw, dict):
        raise PlanError("plan must be a JSON object")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    missing = [k for k in _REQUIRED if k not in raw]
    if unknown or missing:
        raise PlanError(f"plan: {'unknown field ' + shown(unknown[0]) if unknown else 'missing ' + repr(missing[0])}")
    try:
        prefix = check_prefix(raw["prefix"]) if isinstance(raw["prefix"], str) else check_prefix("")
    except EmulationError:
        raise PlanError(f"plan: 'prefix' is not a valid prefix, got {shown(raw['prefix'])}") from None
    name = raw["name"]
    if not isinstance(name, str) or len(name) > 256 or not name.isprintable():
        raise PlanError(f"plan: 'name' must be a string of at most 256 printable characters, got {shown(name)}")
    scale = raw["scale_bits_per_gbps"]
    if not isinstance(scale, str):
        raise PlanError(f"plan: 'scale_bits_per_gbps' must be a fraction as text, got {shown(scale)}")
    exact_number(scale, "plan: 'scale_bits_per_gbps'", error=PlanError, low=0, low_open=True, high=MAX_TC_BITS)
    spaces = raw["namespaces"]
    if not isinstance(spaces, list) or not 0 < len(spaces) <= MAX_NAMESPACES:
        raise PlanError(f"plan: 'namespaces' must be a list of 1 to {MAX_NAMESPACES} names, got {shown(spaces)}")
    n = len(spaces)
    if spaces != [f"{prefix}-{i}" for i in range(n)]:
        raise PlanError(f"plan: 'namespaces' must be {prefix}-0 ... {prefix}-{n - 1}")
    fields = {"prefix": prefix, "name": name, "scale_bits_per_gbps": scale, "namespaces": spaces,
              "node_ids": _strings(raw, "node_ids", n), "addresses": _strings(raw, "addresses", n, _IPV4_RE),
              "address_iface": _strings(raw, "address_iface", n, _IFACE_RE)}
    veths = raw["veths"]
    if not isinstance(veths, list) or len(veths) > n * n:
        raise PlanError(f"plan: 'veths' must be a list of at most {n * n} veth pairs")
    for i, v in enumerate(veths):
        ok = isinstance(v, dict) and set(v) == {"a", "b", "a_if", "b_if", "a_bits", "b_bits"}
        ok = ok and all(type(v[k]) is int and 0 <= v[k] < n for k in ("a", "b")) and v["a"] != v["b"]
        ok = ok and all(isinstance(v[k], str) and _IFACE_RE.fullmatch(v[k]) for k in ("a_if", "b_if"))
        ok = ok and all(type(v[k]) is int and 0 < v[k] <= MAX_TC_BITS for k in ("a_bits", "b_bits"))
        if not ok:
            raise PlanError(f"plan: veths[{i}] must hold a, b (namespace indexes), a_if, b_if (interfaces) "
                            f"and a_bits, b_bits (rates up to {MAX_TC_BITS:g} bit/s), got {shown(v)}")
    fields["veths"] = veths
    routes = raw.get("routes", [])
    if not isinstance(routes, list) or len(routes) not in (0, n) or not all(
            isinstance(r, list) and len(r) < n and all(isinstance(x, str) and _ROUTE_RE.fullmatch(x) for x in r)
            for r in routes):
        raise PlanError("plan: 'routes' must be one list per namespace of `ip route` arguments (printable, "
                        "one line each)")
    fields["routes"] = routes
    ranks = raw.get("num_ranks", 0)
    if type(ranks) is not int or not 0 <= ranks <= n:
        raise PlanError(f"plan: 'num_ranks' must be an integer in [0, {n}], got {shown(ranks)}")
    fields["num_ranks"] = ranks
    bridge = raw.get("mgmt_bridge", "")
    if bridge not in ("", f"{prefix}br"):
        raise PlanError(f"plan: 'mgmt_bridge' must be {prefix}br, got {shown(bridge)}")
    fields["mgmt_bridge"] = bridge
    host = raw.get("mgmt_host", "")
    if host != "" and not (isinstance(host, str) and _IPV4_RE.fullmatch(host)):
        raise PlanError(f"plan: 'mgmt_host' must be an IPv4 address, got {shown(host)}")
    fields["mgmt_host"] = host
    mgmt = raw.get("mgmt_addresses", [])
    fields["mgmt_addresses"] = _strings(raw, "mgmt_addresses", ranks, _IPV4_RE) if mgmt != [] else []
    return fields


def _address(i: int) -> str:
    return f"10.250.{i // 250}.{i % 250 + 1}"


MGMT_OCTETS = range(200, 240)  # management networks 10.200-239.0.0/16


def first_mgmt_octet(prefix: str) -> int:
    """The management network this prefix tries first (up() takes the next free one if it is in use)."""
    return MGMT_OCTETS[zlib.crc32(prefix.encode()) % len(MGMT_OCTETS)]  # the first choice for this prefix


def use_mgmt_octet(p: FabricPlan, octet: int) -> None:
    """Put the management network of ``p`` on 10.<octet>.0.0/16."""
    p.mgmt_host = f"10.{octet}.255.254"
    p.mgmt_addresses = [f"10.{octet}.{r // 250}.{r % 250 + 1}" for r in range(p.num_ranks)]


def _tc_bits(bandwidth: Fraction, scale: Fraction) -> int:
    return max(8000, round(bandwidth * scale * WIRE_PER_PAYLOAD))


def plan(topo: Topology, prefix: str = DEFAULT_PREFIX, scale: str = DEFAULT_SCALE) -> FabricPlan:
    """Everything :func:`collcomm.emulation.up` will create for ``topo``, computed without touching the system."""
    check_prefix(prefix)
    factor = parse_scale(scale)
    order = list(topo.order)
    index = {nid: i for i, nid in enumerate(order)}
    if len(order) > 250 * 250:
        raise EmulationError(f"topology {topo.name!r} has {len(order)} nodes; emulation supports at most 62500")
    pairs = sorted({tuple(sorted((index[u], index[v]))) for (u, v) in topo.capacity})
    veths = []
    for a, b in pairs:
        ab = topo.capacity.get((order[a], order[b]))
        ba = topo.capacity.get((order[b], order[a]))
        veths.append(Veth(a, b, f"e{b}", f"e{a}",
                          _tc_bits(ab, factor) if ab else REVERSE_TRICKLE_BITS,
                          _tc_bits(ba, factor) if ba else REVERSE_TRICKLE_BITS))
    first_if: dict[int, str] = {}
    for v in veths:
        first_if.setdefault(v.a, v.a_if)
        first_if.setdefault(v.b, v.b_if)
    routes = _routes(topo, order, index)
    p = FabricPlan(
        prefix=prefix, name=topo.name, scale_bits_per_gbps=str(factor),
        namespaces=[f"{prefix}-{i}" for i in range(len(order))], node_ids=order,
        addresses=[_address(i) for i in range(len(order))],
        address_iface=[first_if.get(i, "lo") for i in range(len(order))],
        veths=veths, routes=routes, mgmt_bridge=f"{prefix}br", num_ranks=topo.num_ranks)
    use_mgmt_octet(p, first_mgmt_octet(prefix))
    return p


def _routes(topo: Topology, order: list[str], index: dict[str, int]) -> list[list[str]]:
    """Per namespace, `ip route add` argument strings towards every other node's address.

    Fewest hops first (a rank reaches an adjacent rank over their direct link, as the
    schedules assume), then the fattest path; every next hop on an equally good path is
    kept, for multipath."""
    g = nx.DiGraph()
    min_bw = min(topo.capacity.values())
    for (u, v), bw in topo.capacity.items():
        # Hop count dominates: the tie-break term summed over any simple path stays below 1.
        g.add_edge(index[u], index[v], w=1.0 + float(min_bw / bw) / (len(order) + 1))
    rev = g.reverse(copy=False)
    routes: list[list[str]] = [[] for _ in order]
    for d in range(len(order)):
        dist = nx.single_source_dijkstra_path_length(rev, d, weight="w")
        for u in range(len(order)):
            if u == d or u not in dist:
                continue
            hops = [v for v in g.successors(u) if v in dist
                    and abs(g[u][v]["w"] + dist[v] - dist[u]) < 1e-9]
            src = _address(u)
            if len(hops) == 1:
                v = hops[0]
                routes[u].append(f"{_address(d)}/32 via {_address(v)} dev e{v} onlink src {src}")
            else:
                nh = " ".join(f"nexthop via {_address(v)} dev e{v} onlink" for v in sorted(hops))
                routes[u].append(f"{_address(d)}/32 src {src} {nh}")
    return routes
