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
from collcomm.topology.model import Topology

DEFAULT_PREFIX = "ccemu"
DEFAULT_SCALE = "1GB/s=100Mbit"
MTU = 9000
# Bytes on the wire per full frame and bytes of TCP payload in it (IPv4 + TCP with timestamps):
# tbf counts frames, so rates are raised by this ratio to give the scaled bandwidth as goodput.
WIRE_PER_PAYLOAD = Fraction(MTU + 14, MTU - 52)
REVERSE_TRICKLE_BITS = 1_000_000  # the unused direction of a one-way link (ARP, nothing routed)
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,8}$")


class EmulationError(CollectiveError):
    """The emulated fabric cannot be built, used or removed (not root, bad scale, tool missing)."""


# --------------------------------------------------------------------------- scale and prefix
_UNITS_BYTES = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS_BITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def parse_scale(text: str) -> Fraction:
    """``"1GB/s=100Mbit"`` -> bits per second of tc rate per GB/s of topology bandwidth."""
    m = re.fullmatch(r"\s*([0-9./]+)\s*([KMGT]?B)/s\s*=\s*([0-9./]+)\s*([kmg]?bit)\s*", text, re.IGNORECASE)
    if not m:
        raise EmulationError(f"--scale must look like 1GB/s=100Mbit, got {text!r}")
    try:
        left, right = Fraction(m.group(1)), Fraction(m.group(3))
    except (ValueError, ZeroDivisionError):
        raise EmulationError(f"--scale must look like 1GB/s=100Mbit, got {text!r}") from None
    lunit = {k.lower(): v for k, v in _UNITS_BYTES.items()}[m.group(2).lower()]
    runit = _UNITS_BITS[m.group(4).lower()]
    if left <= 0 or right <= 0:
        raise EmulationError(f"--scale: both sides must be positive, got {text!r}")
    gbytes = left * lunit / 10**9  # the left side in GB/s, the topology's unit
    return right * runit / gbytes


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise EmulationError(f"emulation prefix must be 2-9 lowercase letters or digits starting with a letter "
                             f"(it names interfaces of at most 15 characters), got {prefix!r}")
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
    def from_json(text: str) -> "FabricPlan":
        raw = json.loads(text)
        raw["veths"] = [Veth(**v) for v in raw["veths"]]
        return FabricPlan(**raw)


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
