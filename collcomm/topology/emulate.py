"""Emulated fabrics: a topology built from Linux network namespaces, veth pairs and ``tc tbf``.

Every node of the topology, compute or switch, becomes a network namespace
``<prefix>-<i>`` (``i`` its index in ``Topology.order``: ranks first). Every pair of
nodes joined by a link gets one veth pair; each end is shaped with ``tc tbf`` to the
scaled bandwidth of the direction leaving it, so a one-way link is fast one way and a
trickle the other. Switches are forwarding namespaces (routers), not bridges, so that a
fabric with loops (leaf-spine) needs no spanning tree. Every namespace owns one address
(``10.250.x.y/32``); routes are per destination: fewest hops first, then the fattest
path, with equal-cost next hops spread by the kernel's L4 multipath hash. Ranks run in
the namespaces of their compute nodes; a management bridge ``<prefix>br`` in the root
namespace, with one veth ``<prefix>m<i>`` to each compute namespace, reaches the
coordinator and carries nothing else (it holds no route to fabric addresses).

:func:`plan` is pure (testable without root); :func:`up` applies a plan, :func:`down`
removes everything that carries the prefix and nothing else, whether or not a plan or a
state file survived (a killed launcher leaves namespaces that ``down`` still finds).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import zlib
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import networkx as nx

from collcomm.errors import CollectiveError
from collcomm.topology.model import Topology

DEFAULT_PREFIX = "ccemu"
DEFAULT_SCALE = "1GB/s=100Mbit"
MTU = 9000
# Bytes on the wire per full frame and bytes of TCP payload in it (IPv4 + TCP with timestamps):
# tbf counts frames, so rates are raised by this ratio to give the scaled bandwidth as goodput.
WIRE_PER_PAYLOAD = Fraction(MTU + 14, MTU - 52)
TBF_LATENCY_MS = 50
REVERSE_TRICKLE_BITS = 1_000_000  # the unused direction of a one-way link (ARP, nothing routed)
STATE_DIR = Path(os.environ.get("COLLCOMM_EMULATE_STATE", "/run/collcomm-emulate"))
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,8}$")


class EmulationError(CollectiveError):
    """The emulated fabric cannot be built, used or removed (not root, bad scale, tool missing)."""


# --------------------------------------------------------------------------- scale
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


def _mgmt_octet(prefix: str) -> int:
    return MGMT_OCTETS[zlib.crc32(prefix.encode()) % len(MGMT_OCTETS)]  # the first choice for this prefix


def _with_mgmt_octet(p: FabricPlan, octet: int) -> None:
    p.mgmt_host = f"10.{octet}.255.254"
    p.mgmt_addresses = [f"10.{octet}.{r // 250}.{r % 250 + 1}" for r in range(p.num_ranks)]


def _tc_bits(bandwidth: Fraction, scale: Fraction) -> int:
    return max(8000, round(bandwidth * scale * WIRE_PER_PAYLOAD))


def plan(topo: Topology, prefix: str = DEFAULT_PREFIX, scale: str = DEFAULT_SCALE) -> FabricPlan:
    """Everything :func:`up` will create for ``topo``, computed without touching the system."""
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
    octet = _mgmt_octet(prefix)
    n = topo.num_ranks
    return FabricPlan(
        prefix=prefix, name=topo.name, scale_bits_per_gbps=str(factor),
        namespaces=[f"{prefix}-{i}" for i in range(len(order))], node_ids=order,
        addresses=[_address(i) for i in range(len(order))],
        address_iface=[first_if.get(i, "lo") for i in range(len(order))],
        veths=veths, routes=routes, mgmt_bridge=f"{prefix}br", mgmt_host=f"10.{octet}.255.254",
        mgmt_addresses=[f"10.{octet}.{r // 250}.{r % 250 + 1}" for r in range(n)], num_ranks=n)


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


# --------------------------------------------------------------------------- the system
_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21


def _effective_capabilities() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def require_root(what: str = "collcomm emulate") -> None:
    """Root, with the capabilities that namespaces and qdiscs need (a root shell may have lost them)."""
    caps = _effective_capabilities()
    if os.geteuid() != 0 or not (caps >> _CAP_NET_ADMIN & 1 and caps >> _CAP_SYS_ADMIN & 1):
        raise EmulationError(f"{what} needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): it creates network namespaces, "
                             f"veth pairs and tc qdiscs")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise EmulationError(f"{what} needs the `{tool}` command (iproute2), which is not installed")


def _run(argv: list[str], *, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EmulationError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    if check and res.returncode != 0:
        raise EmulationError(f"`{' '.join(argv)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _batch(lines: list[str], *, tool: str = "ip", ns: str | None = None) -> None:
    """Many iproute2 commands in one process (`ip -batch` / `tc -batch`), failing on the first error."""
    if not lines:
        return
    argv = [tool] + (["-n", ns] if ns else []) + ["-batch", "-"]
    try:
        res = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120.0)
    except subprocess.TimeoutExpired:
        raise EmulationError(f"`{' '.join(argv)}` of {len(lines)} commands did not finish within 120 s") from None
    if res.returncode != 0:
        last = (res.stderr or res.stdout).strip().splitlines()
        raise EmulationError(f"`{' '.join(argv)}` failed: {last[0] if last else 'no message'}")


def _per_namespace(cmds: list[tuple[str | None, str]], tool: str = "ip") -> None:
    by_ns: dict[str | None, list[str]] = {}
    for ns, cmd in cmds:
        by_ns.setdefault(ns, []).append(cmd)
    for ns, lines in by_ns.items():
        _batch(lines, tool=tool, ns=ns)


def _sysctl(ns: str, settings: dict[str, str]) -> None:
    script = "; ".join(f"echo {v} > /proc/sys/{k.replace('.', '/')}" for k, v in settings.items())
    _run(["ip", "netns", "exec", ns, "sh", "-c", script])


def _burst_bytes(bits: int) -> int:
    # A token bucket of 20 ms of traffic (at least two jumbo frames): short enough that a
    # probe of a second sees the rate within 2%, long enough that the kernel timer keeps up.
    return max(2 * (MTU + 14), bits // 8 // 50)


def state_file(prefix: str) -> Path:
    return STATE_DIR / f"{prefix}.json"


def current(prefix: str = DEFAULT_PREFIX) -> FabricPlan | None:
    """The plan of the fabric that is up under ``prefix``, if its state file and namespaces exist."""
    path = state_file(prefix)
    if not path.exists():
        return None
    try:
        p = FabricPlan.from_json(path.read_text())
    except (ValueError, TypeError, KeyError):
        return None
    existing = set(_namespaces(prefix))
    return p if set(p.namespaces) <= existing else None


def up(p: FabricPlan) -> FabricPlan:
    """Build the fabric of plan ``p``; an existing fabric under the same prefix is removed first."""
    require_root()
    down(p.prefix)
    try:
        _up(p)
    except BaseException:
        down(p.prefix)
        raise
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state_file(p.prefix).write_text(p.to_json())
    return p


def _up(p: FabricPlan) -> None:
    # The management network: the prefix's own first choice, or the next one that no address of
    # the root namespace uses (another fabric, or anything else on this machine).
    used = {line.split()[3].split(".")[1] for line in
            _run(["ip", "-o", "-4", "addr", "show"], check=False).stdout.splitlines()
            if len(line.split()) > 3 and line.split()[3].startswith("10.")}
    first = _mgmt_octet(p.prefix)
    octets = [o for o in list(MGMT_OCTETS)[first - MGMT_OCTETS[0]:] + list(MGMT_OCTETS) if str(o) not in used]
    if not octets:
        raise EmulationError("every management network 10.200-239.0.0/16 is in use in the root namespace; "
                             "remove a fabric first (collcomm emulate down --prefix ...)")
    _with_mgmt_octet(p, octets[0])
    for ns in p.namespaces:
        _run(["ip", "netns", "add", ns])
    for ns in p.namespaces:
        # rp_filter off: a one-way link makes replies come back another way.
        _sysctl(ns, {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0",
                     "net.ipv4.conf.default.rp_filter": "0", "net.ipv4.fib_multipath_hash_policy": "1"})
    root = [f"link add {v.a_if} netns {p.namespaces[v.a]} mtu {MTU} type veth "
            f"peer name {v.b_if} netns {p.namespaces[v.b]} mtu {MTU}" for v in p.veths]
    _batch(root)
    cmds: list[tuple[str | None, str]] = [(ns, "link set lo up") for ns in p.namespaces]
    for i, ns in enumerate(p.namespaces):
        if p.address_iface[i] != "lo":
            cmds.append((ns, f"addr add {p.addresses[i]}/32 dev {p.address_iface[i]}"))
    for v in p.veths:
        cmds.append((p.namespaces[v.a], f"link set {v.a_if} up"))
        cmds.append((p.namespaces[v.b], f"link set {v.b_if} up"))
    _per_namespace(cmds)
    tc = []
    for v in p.veths:
        for ns, ifname, bits in ((p.namespaces[v.a], v.a_if, v.a_bits), (p.namespaces[v.b], v.b_if, v.b_bits)):
            tc.append((ns, f"qdisc replace dev {ifname} root tbf rate {bits}bit burst {_burst_bytes(bits)} "
                           f"latency {TBF_LATENCY_MS}ms"))
    _per_namespace(tc, tool="tc")
    _per_namespace([(p.namespaces[i], f"route add {r}") for i, rs in enumerate(p.routes) for r in rs])
    # Management network: root-namespace bridge, one veth into each rank's namespace.
    mg = [f"link add {p.mgmt_bridge} type bridge", f"addr add {p.mgmt_host}/16 dev {p.mgmt_bridge}",
          f"link set {p.mgmt_bridge} up"]
    inside: list[tuple[str | None, str]] = []
    for r in range(p.num_ranks):
        root_if = f"{p.prefix}m{r}"
        mg += [f"link add {root_if} type veth peer name mgmt netns {p.namespaces[r]}",
               f"link set {root_if} master {p.mgmt_bridge}", f"link set {root_if} up"]
        inside += [(p.namespaces[r], f"addr add {p.mgmt_addresses[r]}/16 dev mgmt"),
                   (p.namespaces[r], "link set mgmt up")]
    _batch(mg)
    _per_namespace(inside)


def _namespaces(prefix: str) -> list[str]:
    res = _run(["ip", "netns", "list"], check=False)
    pat = re.compile(rf"^{re.escape(prefix)}-\d+$")
    return [line.split()[0] for line in res.stdout.splitlines() if line.split() and pat.match(line.split()[0])]


def _root_links(prefix: str) -> list[str]:
    res = _run(["ip", "-o", "link", "show"], check=False)
    pat = re.compile(rf"^{re.escape(prefix)}(br|m\d+)$")
    names = []
    for line in res.stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if pat.match(name):
                names.append(name)
    return names


def leftovers(prefix: str = DEFAULT_PREFIX) -> dict[str, list]:
    """What of a fabric under ``prefix`` exists now: namespaces, root links, processes, state file."""
    ns = _namespaces(prefix)
    pids = []
    for n in ns:
        pids += [int(x) for x in _run(["ip", "netns", "pids", n], check=False).stdout.split()]
    return {"namespaces": ns, "links": _root_links(prefix), "pids": pids,
            "state": [str(state_file(prefix))] if state_file(prefix).exists() else []}


def down(prefix: str = DEFAULT_PREFIX) -> dict[str, list]:
    """Remove every namespace, root link and process of the fabric ``prefix``; idempotent.

    Returns what was removed. Processes still inside the namespaces (ranks of a killed
    launcher) are killed first, since a namespace with a process in it outlives its name."""
    require_root()
    check_prefix(prefix)
    found = leftovers(prefix)
    for pid in found["pids"]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5.0
    while found["pids"] and time.monotonic() < deadline and any(_alive(pid) for pid in found["pids"]):
        time.sleep(0.02)
    for name in found["links"]:
        _run(["ip", "link", "del", name], check=False)
    for ns in found["namespaces"]:
        _run(["ip", "netns", "del", ns], check=False)
    state_file(prefix).unlink(missing_ok=True)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (our own child not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- running ranks inside
def rank_environment(p: FabricPlan, rank: int) -> dict[str, str]:
    """What a rank needs inside its namespace: its fabric address to listen on, TCP only
    (abstract Unix sockets do not cross namespaces), and where gloo should bind."""
    return {"COLLCOMM_HOST": p.addresses[rank], "COLLCOMM_TRANSPORT": "tcp",
            "COLLCOMM_EMULATED": p.prefix, "GLOO_SOCKET_IFNAME": p.address_iface[rank],
            "MASTER_ADDR": p.addresses[0]}


def wrap_command(p: FabricPlan, rank: int, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", p.namespaces[rank]] + list(argv)


def set_rate(p: FabricPlan, a: str, b: str, bits: int | None) -> None:
    """Reshape the direction ``a -> b`` of the link between nodes ``a`` and ``b`` (``None``: restore)."""
    ia, ib = p.node_ids.index(a), p.node_ids.index(b)
    for v in p.veths:
        if (v.a, v.b) in ((ia, ib), (ib, ia)):
            ns, ifname, planned = (p.namespaces[v.a], v.a_if, v.a_bits) if v.a == ia else \
                (p.namespaces[v.b], v.b_if, v.b_bits)
            rate = planned if bits is None else max(8, bits)
            _run(["tc", "-n", ns, "qdisc", "replace", "dev", ifname, "root", "tbf", "rate", f"{rate}bit",
                  "burst", str(_burst_bytes(rate)), "latency", f"{TBF_LATENCY_MS}ms"])
            return
    raise EmulationError(f"no link between {a!r} and {b!r} in the emulated fabric {p.name!r}")


# --------------------------------------------------------------------------- faults
FAULT_MODES = ("down", "bandwidth", "up")


def parse_percent(text: str | float) -> float:
    """``"10%"``, ``"10"`` or ``2.5`` -> a percentage in (0, 100]."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1] if raw.endswith("%") else raw)
    except ValueError:
        value = float("nan")
    if not (0 < value <= 100):  # also refuses nan
        raise EmulationError(f"--bandwidth must be a percentage of the planned rate in (0, 100], e.g. 10%, "
                             f"got {text!r}")
    return value


def resolve_node(p: FabricPlan, ref: str | int) -> str:
    """The node id that ``ref`` names in the fabric: a node id, or a rank number."""
    text = str(ref).strip()
    if text in p.node_ids:
        return text
    if text.isdigit() and int(text) < p.num_ranks:
        return p.node_ids[int(text)]
    raise EmulationError(f"{text!r} is neither a node of the emulated fabric {p.name!r} nor a rank "
                         f"0..{p.num_ranks - 1}")


def _ends(p: FabricPlan, a: str, b: str) -> dict[tuple[str, str], tuple[str, str, int]]:
    """Per direction of the link between nodes a and b: (namespace, interface, planned bits/s) of its sender."""
    ia, ib = p.node_ids.index(a), p.node_ids.index(b)
    for v in p.veths:
        if (v.a, v.b) in ((ia, ib), (ib, ia)):
            end_a = (p.namespaces[v.a], v.a_if, v.a_bits)
            end_b = (p.namespaces[v.b], v.b_if, v.b_bits)
            x, y = p.node_ids[v.a], p.node_ids[v.b]
            return {(x, y): end_a, (y, x): end_b}
    near = sorted({p.node_ids[v.b] for v in p.veths if v.a == ia} | {p.node_ids[v.a] for v in p.veths if v.b == ia})
    raise EmulationError(f"no link between {a!r} and {b!r} in the emulated fabric {p.name!r}; {a!r} is linked to "
                         f"{', '.join(near) or 'nothing'}")


def _mbit(bits: int) -> str:
    return f"{bits / 1e6:.3g} Mbit/s"


def fault(p: FabricPlan, a: str | int, b: str | int, mode: str, percent: float | str | None = None,
          both: bool = False) -> str:
    """Inject a fault on the link between nodes (or ranks) ``a`` and ``b`` of the fabric that is up;
    returns one line saying what was done.

    * ``down``: both directions drop every packet (the root qdisc of both veth ends becomes a
      ``blackhole``): the link stays up, its addresses and routes stay, nothing crosses: a black
      hole, like a dead cable behind a live port. The node's own address (on its first fabric
      interface) stays reachable from inside the namespace.
    * ``bandwidth``: the direction ``a -> b`` (with ``both`` also ``b -> a``) is shaped to
      ``percent`` of its planned rate (this also lifts ``down`` in that direction).
    * ``up``: both directions back to their planned rates (and out of ``down``)."""
    if mode not in FAULT_MODES:
        raise EmulationError(f"fault mode must be one of {', '.join(FAULT_MODES)}, got {mode!r}")
    pct = parse_percent(percent) if mode == "bandwidth" else None
    a, b = resolve_node(p, a), resolve_node(p, b)
    if a == b:
        raise EmulationError(f"--link needs two different nodes, got {a!r} twice")
    require_root("collcomm emulate fault")
    ends = _ends(p, a, b)
    if mode == "down":
        for ns, ifname, _ in ends.values():
            _run(["tc", "-n", ns, "qdisc", "replace", "dev", ifname, "root", "blackhole"])
        return f"{p.prefix}: link {a} <-> {b} is down (every packet dropped both ways)"
    if mode == "up":
        for (x, y) in ends:
            set_rate(p, x, y, None)
        return (f"{p.prefix}: link {a} <-> {b} is up at its planned rates "
                f"({a} -> {b} {_mbit(ends[(a, b)][2])}, {b} -> {a} {_mbit(ends[(b, a)][2])})")
    done = []
    for x, y in [(a, b)] + ([(b, a)] if both else []):
        planned = ends[(x, y)][2]
        bits = max(8, round(planned * pct / 100))
        set_rate(p, x, y, bits)
        done.append(f"{x} -> {y} {_mbit(bits)} of {_mbit(planned)}")
    return f"{p.prefix}: link {a} <-> {b} shaped to {pct:g}% of its planned rate: {'; '.join(done)}"
