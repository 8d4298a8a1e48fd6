"""The topology model: compute nodes, switches and directed links with exact bandwidths.

A :class:`Topology` is an immutable value. Bandwidths are :class:`fractions.Fraction`
in GB/s; a duplex link stands for two directed edges of the same bandwidth, and
parallel links between the same ordered pair add up. The order of the compute
nodes is the rank order. Construction validates everything and raises
:class:`~collcomm.errors.TopologyError` naming the offending entry.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Mapping

from collcomm.errors import TopologyError
from collcomm.inputs import Limits, current_limits, exact_number, finite_float, shown

COMPUTE = "compute"
SWITCH = "switch"
NODE_KINDS = (COMPUTE, SWITCH)


@dataclass(frozen=True)
class Node:
    id: str
    kind: str = COMPUTE
    host: str | None = None


@dataclass(frozen=True)
class Link:
    src: str
    dst: str
    bandwidth: Fraction
    latency_us: float = 1.0
    duplex: bool = True


# Above this a bandwidth (GB/s, a zettabyte per second) is a mistake of units or an attack; the
# topology/1 loader (jsonio) refuses it with the same bound.
MAX_BANDWIDTH = Fraction(10**12)


def as_bandwidth(value, where: str, limits: Limits | None = None) -> Fraction:
    """An exact bandwidth in (0, MAX_BANDWIDTH] from an int, a decimal number or a fraction string.

    Text and floats go through :func:`collcomm.inputs.exact_number`, which bounds their digits
    before building the Fraction (``Fraction("1e99999999999")`` would hang). An int or a Fraction is
    already built, so only its range is checked: code that scales bandwidths (a reroute) may make
    long fractions, and ``limits`` must not refuse them."""
    if isinstance(value, (int, Fraction)) and not isinstance(value, bool):
        bw = Fraction(value)
        if bw <= 0:
            raise TopologyError(f"{where}: bandwidth must be positive, got {shown(value)}")
        if bw > MAX_BANDWIDTH:
            raise TopologyError(f"{where}: bandwidth must be at most {float(MAX_BANDWIDTH):g}, got {shown(value)}")
        return bw
    return exact_number(value, f"{where}: bandwidth", error=TopologyError, limits=limits, low=0, low_open=True,
                        high=MAX_BANDWIDTH)


class Topology:
    """A validated fabric. Use :func:`collcomm.topology.load` / presets to make one."""

    def __init__(
        self,
        name: str,
        nodes: Iterable[Node],
        links: Iterable[Link],
        automorphisms: Iterable[Mapping[str, str]] = (),
    ):
        self.name = str(name)
        self.nodes: tuple[Node, ...] = tuple(nodes)
        self.links: tuple[Link, ...] = tuple(links)
        self._validate_nodes()
        self.compute: tuple[str, ...] = tuple(n.id for n in self.nodes if n.kind == COMPUTE)
        self.switches: tuple[str, ...] = tuple(n.id for n in self.nodes if n.kind == SWITCH)
        # Index space used by the algorithms: ranks first, then switches.
        self.order: tuple[str, ...] = self.compute + self.switches
        self.index: dict[str, int] = {nid: i for i, nid in enumerate(self.order)}
        self.node: dict[str, Node] = {n.id: n for n in self.nodes}
        self.capacity: dict[tuple[str, str], Fraction] = {}
        self.latency_us: dict[tuple[str, str], float] = {}
        self._build_edges()
        self._check_reachability()
        from collcomm.topology.symmetry import verify_automorphism

        self.automorphisms: tuple[dict[str, str], ...] = tuple(
            verify_automorphism(self, dict(a), where=f"automorphism {i}") for i, a in enumerate(automorphisms)
        )

    # ----------------------------------------------------------------- validation
    def _validate_nodes(self) -> None:
        seen: set[str] = set()
        for i, n in enumerate(self.nodes):
            if not isinstance(n.id, str) or not n.id:
                raise TopologyError(f"node {i}: id must be a non-empty string, got {n.id!r}")
            if n.kind not in NODE_KINDS:
                raise TopologyError(f"node {i} ({n.id}): kind must be 'compute' or 'switch', got {n.kind!r}")
            if n.id in seen:
                raise TopologyError(f"node {i}: duplicate id {n.id!r}")
            seen.add(n.id)
        if not any(n.kind == COMPUTE for n in self.nodes):
            raise TopologyError("topology has no compute node: at least one node needs kind 'compute'")

    def _build_edges(self) -> None:
        cap: dict[tuple[str, str], Fraction] = defaultdict(Fraction)
        lat: dict[tuple[str, str], float] = {}
        limits = current_limits()  # read once, not per link
        for i, link in enumerate(self.links):
            where = f"link {i} ({link.src} -> {link.dst})"
            for end in (link.src, link.dst):
                if end not in self.index:
                    raise TopologyError(f"{where}: unknown node {end!r}")
            if link.src == link.dst:
                raise TopologyError(f"{where}: a link cannot connect {link.src!r} to itself")
            bw = as_bandwidth(link.bandwidth, where, limits)
            # An int past a float's range (10**400) is refused here, not an OverflowError below.
            latency_us = finite_float(link.latency_us, f"{where}: latency_us", error=TopologyError, low=0.0)
            pairs = [(link.src, link.dst)] + ([(link.dst, link.src)] if link.duplex else [])
            for pair in pairs:
                cap[pair] += bw
                lat[pair] = min(lat.get(pair, float("inf")), latency_us)
        self.capacity = dict(cap)
        self.latency_us = lat

    def _check_reachability(self) -> None:
        succ: dict[str, list[str]] = defaultdict(list)
        pred: dict[str, list[str]] = defaultdict(list)
        for u, v in self.capacity:
            succ[u].append(v)
            pred[v].append(u)
        first = self.compute[0]
        for adj, verb in ((succ, "reach"), (pred, "be reached from")):
            seen = {first}
            stack = [first]
            while stack:
                for w in adj[stack.pop()]:
                    if w not in seen:
                        seen.add(w)
                        stack.append(w)
            for c in self.compute:
                if c not in seen:
                    if verb == "reach":
                        raise TopologyError(f"compute node {first!r} cannot reach compute node {c!r}: "
                                            f"every rank must reach every other through the links")
                    raise TopologyError(f"compute node {c!r} cannot reach compute node {first!r}: "
                                        f"every rank must reach every other through the links")

    # ----------------------------------------------------------------- queries
    @property
    def num_ranks(self) -> int:
        return len(self.compute)

    def is_compute(self, nid: str) -> bool:
        return self.node[nid].kind == COMPUTE

    def rank(self, nid: str) -> int:
        return self.compute.index(nid)

    def host_of(self, nid: str) -> str | None:
        return self.node[nid].host

    def successors(self, nid: str) -> list[str]:
        return [v for (u, v) in self.capacity if u == nid]

    def ingress(self, nid: str) -> Fraction:
        return sum((bw for (u, v), bw in self.capacity.items() if v == nid), Fraction(0))

    def egress(self, nid: str) -> Fraction:
        return sum((bw for (u, v), bw in self.capacity.items() if u == nid), Fraction(0))

    def out_bandwidth(self, subset: Iterable[str]) -> Fraction:
        """B+(S): total bandwidth of the directed edges leaving ``subset``."""
        s = set(subset)
        return sum((bw for (u, v), bw in self.capacity.items() if u in s and v not in s), Fraction(0))

    def reversed(self) -> "Topology":
        """The same fabric with every directed edge turned around (for reduce-scatter)."""
        links = [Link(l.dst, l.src, l.bandwidth, l.latency_us, l.duplex) for l in self.links]
        return Topology(self.name, self.nodes, links, self.automorphisms)

    def with_name(self, name: str) -> "Topology":
        return Topology(name, self.nodes, self.links, self.automorphisms)

    def __repr__(self) -> str:
        return (f"Topology({self.name!r}, {len(self.compute)} compute, {len(self.switches)} switches, "
                f"{len(self.capacity)} directed edges)")

    def __eq__(self, other) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return (self.name, self.compute, self.switches, self.capacity) == (
            other.name, other.compute, other.switches, other.capacity)

    def __hash__(self) -> int:
        return hash((self.name, self.compute, self.switches, len(self.capacity)))
