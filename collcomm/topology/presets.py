"""Parameterised fabrics: switch star, rings, torus, hypercube, fully connected,
leaf-spine (2-level fat-tree) with oversubscription, two clusters joined by a thin
link, and DGX-A100-, DGX-H100- and MI250-like boxes (any number of boxes).

Every preset attaches generators of its symmetry (verified by the Topology), so the
schedule generator can build trees for one representative root and map them.
Bandwidths are GB/s, exact.

Parameters are checked as a topology file's values are (collcomm.topology.jsonio): the nodes and
links a preset would make are counted from its parameters and refused past ``COLLCOMM_MAX_NODES``
and ``COLLCOMM_MAX_LINKS`` before anything is built, naming the parameters and the limit; numbers
are refused from their digits (``bandwidth="1e99999999999"``) before any arithmetic.
"""

from __future__ import annotations

import inspect
from fractions import Fraction
from typing import Callable

from collcomm.errors import TopologyError
from collcomm.inputs import current_limits, exact_number, shown
from collcomm.topology.jsonio import bandwidth as checked_bandwidth
from collcomm.topology.jsonio import latency as checked_latency
from collcomm.topology.model import COMPUTE, SWITCH, Link, Node, Topology

Number = int | Fraction | str


def _bw(x: Number, name: str = "bandwidth") -> Fraction:
    """A bandwidth parameter, exact and in range, refused before any big arithmetic
    (``bandwidth="1e99999999999"`` fails at once)."""
    return checked_bandwidth(x, name)


def _lat(x: float) -> float:
    return checked_latency(x, "latency_us")


def _check_count(name: str, value: int, minimum: int, scales_nodes: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TopologyError(f"{name} must be an integer >= {minimum}, got {shown(value)}")
    limits = current_limits()
    if scales_nodes and value > limits.max_nodes:  # the count makes at least as many nodes
        raise TopologyError(f"{name}={shown(value)} makes more than the {limits.max_nodes} nodes a topology may "
                            f"have; {limits.describe('max_nodes')}")
    return value


def _check_size(params: dict[str, int], nodes: int, links: int) -> None:
    """Refuse, before building anything, a preset whose parameters make too many nodes or links
    (``ring(ranks=100000000)`` would allocate until the machine runs out of memory)."""
    limits = current_limits()
    given = ", ".join(f"{k}={v}" for k, v in params.items())
    verb = "makes" if len(params) == 1 else "make"
    for count, what, field in ((nodes, "nodes", "max_nodes"), (links, "links", "max_links")):
        if count > getattr(limits, field):
            raise TopologyError(f"{given} {verb} {count} {what}, more than a topology may have; "
                                f"{limits.describe(field)}")


def _rotation(ids: list[str], step: int = 1) -> dict[str, str]:
    n = len(ids)
    return {ids[i]: ids[(i + step) % n] for i in range(n)}


def star(ranks: int = 8, bandwidth: Number = 1, latency_us: float = 1.0) -> Topology:
    """``ranks`` compute nodes on one switch, each with a duplex link of ``bandwidth``."""
    _check_count("ranks", ranks, 1)
    _check_size({"ranks": ranks}, ranks + 1, ranks)
    bw, latency_us = _bw(bandwidth), _lat(latency_us)
    gpus = [f"r{i}" for i in range(ranks)]
    nodes = [Node(g) for g in gpus] + [Node("switch", SWITCH)]
    links = [Link(g, "switch", bw, latency_us) for g in gpus]
    return Topology(f"star{ranks}", nodes, links, [_rotation(gpus)] if ranks > 1 else [])


def ring(ranks: int = 8, bandwidth: Number = 1, bidirectional: bool = True, latency_us: float = 1.0) -> Topology:
    """A ring of ``ranks`` nodes; two-way (duplex links) or one-way (r_i -> r_i+1)."""
    _check_count("ranks", ranks, 2)
    _check_size({"ranks": ranks}, ranks, ranks)
    if not isinstance(bidirectional, bool):
        raise TopologyError(f"bidirectional must be true or false, got {shown(bidirectional)}")
    bw, latency_us = _bw(bandwidth), _lat(latency_us)
    ids = [f"r{i}" for i in range(ranks)]
    if bidirectional and ranks == 2:
        links = [Link(ids[0], ids[1], bw, latency_us)]
    else:
        links = [Link(ids[i], ids[(i + 1) % ranks], bw, latency_us, duplex=bidirectional)
                 for i in range(ranks)]
    kind = "ring" if bidirectional else "oneway-ring"
    return Topology(f"{kind}{ranks}", [Node(i) for i in ids], links, [_rotation(ids)])


def torus2d(rows: int = 4, cols: int = 4, bandwidth: Number = 1, latency_us: float = 1.0) -> Topology:
    """A 2D torus: node (r, c) linked both ways to (r, c+1) and (r+1, c), with wrap-around."""
    _check_count("rows", rows, 1)
    _check_count("cols", cols, 1)
    if rows * cols < 2:
        raise TopologyError("a torus needs at least 2 nodes")
    _check_size({"rows": rows, "cols": cols}, rows * cols, 2 * rows * cols)
    bw, latency_us = _bw(bandwidth), _lat(latency_us)
    name = lambda r, c: f"n{r}_{c}"  # noqa: E731
    links = []
    for r in range(rows):
        for c in range(cols):
            if cols > 1 and (cols > 2 or c == 0):
                links.append(Link(name(r, c), name(r, (c + 1) % cols), bw, latency_us))
            if rows > 1 and (rows > 2 or r == 0):
                links.append(Link(name(r, c), name((r + 1) % rows, c), bw, latency_us))
    nodes = [Node(name(r, c)) for r in range(rows) for c in range(cols)]
    autos = []
    if cols > 1:
        autos.append({name(r, c): name(r, (c + 1) % cols) for r in range(rows) for c in range(cols)})
    if rows > 1:
        autos.append({name(r, c): name((r + 1) % rows, c) for r in range(rows) for c in range(cols)})
    return Topology(f"torus{rows}x{cols}", nodes, links, autos)


def hypercube(dim: int = 3, bandwidth: Number = 1, latency_us: float = 1.0) -> Topology:
    """A ``dim``-dimensional hypercube of 2**dim nodes with duplex links along each dimension."""
    _check_count("dim", dim, 1, scales_nodes=False)
    limits = current_limits()
    if dim >= limits.max_nodes.bit_length():  # 2**dim nodes: compare exponents, never build 2**dim itself
        raise TopologyError(f"dim={shown(dim)} makes 2**dim nodes, more than a topology may have; "
                            f"{limits.describe('max_nodes')}")
    n = 1 << dim
    _check_size({"dim": dim}, n, dim * n // 2)
    bw, latency_us = _bw(bandwidth), _lat(latency_us)
    ids = [f"h{i}" for i in range(n)]
    links = [Link(ids[i], ids[i ^ (1 << d)], bw, latency_us)
             for i in range(n) for d in range(dim) if i < i ^ (1 << d)]
    autos = [{ids[i]: ids[i ^ (1 << d)] for i in range(n)} for d in range(dim)]
    return Topology(f"hypercube{dim}", [Node(i) for i in ids], links, autos)


def fully_connected(ranks: int = 4, bandwidth: Number = 1, latency_us: float = 1.0) -> Topology:
    """Every pair of ``ranks`` nodes joined by a duplex link."""
    _check_count("ranks", ranks, 2)
    _check_size({"ranks": ranks}, ranks, ranks * (ranks - 1) // 2)
    bw, latency_us = _bw(bandwidth), _lat(latency_us)
    ids = [f"r{i}" for i in range(ranks)]
    links = [Link(ids[i], ids[j], bw, latency_us) for i in range(ranks) for j in range(i + 1, ranks)]
    return Topology(f"full{ranks}", [Node(i) for i in ids], links, [_rotation(ids)])


def leaf_spine(leaves: int = 4, hosts_per_leaf: int = 4, spines: int = 2, host_bandwidth: Number = 1,
               oversubscription: Number = 1, latency_us: float = 1.0) -> Topology:
    """A two-level fat-tree: hosts on leaf switches, every leaf linked to every spine.

    Each leaf's uplink bandwidth is its hosts' bandwidth divided by ``oversubscription``
    (1 = non-blocking, 2 = 2:1), spread evenly over the spines.
    """
    _check_count("leaves", leaves, 1)
    _check_count("hosts_per_leaf", hosts_per_leaf, 1)
    _check_count("spines", spines, 1)
    if leaves * hosts_per_leaf < 2:
        raise TopologyError("a leaf-spine fabric needs at least 2 hosts")
    _check_size({"leaves": leaves, "hosts_per_leaf": hosts_per_leaf, "spines": spines},
                leaves * hosts_per_leaf + leaves + spines, leaves * hosts_per_leaf + leaves * spines)
    over = exact_number(oversubscription, "oversubscription", error=TopologyError, low=0, low_open=True,
                        high=10**6)
    hbw = _bw(host_bandwidth, "host_bandwidth")
    latency_us = _lat(latency_us)
    uplink = checked_bandwidth(hbw * hosts_per_leaf / over / spines,
                               "the uplink bandwidth (host_bandwidth x hosts_per_leaf / oversubscription / spines)")
    nodes, links = [], []
    for l in range(leaves):
        nodes += [Node(f"leaf{l}.h{h}", COMPUTE, f"leaf{l}") for h in range(hosts_per_leaf)]
    for l in range(leaves):
        nodes.append(Node(f"leaf{l}.switch", SWITCH, f"leaf{l}"))
        links += [Link(f"leaf{l}.h{h}", f"leaf{l}.switch", hbw, latency_us) for h in range(hosts_per_leaf)]
    if leaves > 1:
        nodes += [Node(f"spine{s}", SWITCH) for s in range(spines)]
        links += [Link(f"leaf{l}.switch", f"spine{s}", uplink, latency_us)
                  for l in range(leaves) for s in range(spines)]
    autos = []
    if hosts_per_leaf > 1:
        autos.append({f"leaf{l}.h{h}": f"leaf{l}.h{(h + 1) % hosts_per_leaf}"
                      for l in range(leaves) for h in range(hosts_per_leaf)})
    return Topology(f"leafspine{leaves}x{hosts_per_leaf}-{spines}s-{over}to1", nodes, links, autos)


def two_clusters(ranks_per_cluster: int = 4, intra_bandwidth: Number = 10, inter_bandwidth: Number = 1,
                 latency_us: float = 1.0) -> Topology:
    """Two fully connected clusters joined by one duplex link between their first nodes."""
    _check_count("ranks_per_cluster", ranks_per_cluster, 1)
    _check_size({"ranks_per_cluster": ranks_per_cluster}, 2 * ranks_per_cluster,
                ranks_per_cluster * (ranks_per_cluster - 1) + 1)
    intra, inter = _bw(intra_bandwidth, "intra_bandwidth"), _bw(inter_bandwidth, "inter_bandwidth")
    latency_us = _lat(latency_us)
    nodes, links = [], []
    for c in "ab":
        ids = [f"{c}{i}" for i in range(ranks_per_cluster)]
        nodes += [Node(i, COMPUTE, f"cluster-{c}") for i in ids]
        links += [Link(ids[i], ids[j], intra, latency_us)
                  for i in range(len(ids)) for j in range(i + 1, len(ids))]
    links.append(Link("a0", "b0", inter, latency_us))
    return Topology(f"twoclusters{ranks_per_cluster}", nodes, links)


def _boxes_with_nics(boxes: int, gpus: int, intra_bw: Fraction, nic_bw: Fraction, nic_switch_of,
                     n_nic_switches: int, name: str, box_rotation_step: int, nic_switch_rotation,
                     extra_autos=()) -> Topology:
    """Boxes of ``gpus`` GPUs on one NVSwitch; for several boxes one NIC per GPU on shared switches."""
    many = boxes > 1
    _check_size({"boxes": boxes}, boxes * (gpus + 1) + many * (boxes * gpus + n_nic_switches),
                boxes * gpus * (1 + 2 * many))
    nodes, links = [], []
    for b in range(boxes):
        nodes += [Node(f"box{b}.gpu{g}", COMPUTE, f"box{b}") for g in range(gpus)]
    for b in range(boxes):
        nodes.append(Node(f"box{b}.nvswitch", SWITCH, f"box{b}"))
        links += [Link(f"box{b}.gpu{g}", f"box{b}.nvswitch", intra_bw, 0.7) for g in range(gpus)]
        if boxes > 1:
            nodes += [Node(f"box{b}.nic{g}", SWITCH, f"box{b}") for g in range(gpus)]
            links += [Link(f"box{b}.gpu{g}", f"box{b}.nic{g}", nic_bw, 0.5) for g in range(gpus)]
            links += [Link(f"box{b}.nic{g}", f"ib{nic_switch_of(g)}", nic_bw, 2.0) for g in range(gpus)]
    if boxes > 1:
        nodes += [Node(f"ib{s}", SWITCH) for s in range(n_nic_switches)]
    # In-box rotation of GPUs (with their NICs, and the NIC switches as they must follow).
    rot = {}
    for b in range(boxes):
        for g in range(gpus):
            h = (g + box_rotation_step) % gpus
            rot[f"box{b}.gpu{g}"] = f"box{b}.gpu{h}"
            if boxes > 1:
                rot[f"box{b}.nic{g}"] = f"box{b}.nic{h}"
    if boxes > 1:
        rot.update(nic_switch_rotation)
    autos = [rot] + list(extra_autos)
    return Topology(f"{name}x{boxes}", nodes, links, autos)


def dgx_a100(boxes: int = 1) -> Topology:
    """DGX-A100-like boxes: 8 GPUs on one NVSwitch at 300 GB/s each; one 25 GB/s NIC per GPU,
    the NICs of even GPUs on InfiniBand switch ib0 and of odd GPUs on ib1."""
    _check_count("boxes", boxes, 1)
    if boxes == 1:
        return _boxes_with_nics(1, 8, Fraction(300), Fraction(25), lambda g: g % 2, 2, "dgx-a100", 1, {})
    # Rotating by two keeps every NIC on its switch; swapping neighbours swaps the two IB switches.
    swap = {}
    for b in range(boxes):
        for g in range(8):
            swap[f"box{b}.gpu{g}"] = f"box{b}.gpu{g ^ 1}"
            swap[f"box{b}.nic{g}"] = f"box{b}.nic{g ^ 1}"
    swap.update({"ib0": "ib1", "ib1": "ib0"})
    return _boxes_with_nics(boxes, 8, Fraction(300), Fraction(25), lambda g: g % 2, 2, "dgx-a100", 2, {},
                            extra_autos=[swap])


def dgx_h100(boxes: int = 1) -> Topology:
    """DGX-H100-like boxes: 8 GPUs on NVSwitch at 450 GB/s each (NVLink4); one 400 Gb/s
    (50 GB/s) NIC per GPU, rail-optimised: NIC g of every box on rail switch g."""
    _check_count("boxes", boxes, 1)
    rails = {f"ib{g}": f"ib{(g + 1) % 8}" for g in range(8)}
    return _boxes_with_nics(boxes, 8, Fraction(450), Fraction(50), lambda g: g, 8, "dgx-h100", 1, rails)


# AMD MI250 node (4 packages x 2 GCDs): number of xGMI links between GCD pairs, 50 GB/s each.
MI250_XGMI_LINKS = {
    (0, 1): 4, (0, 4): 2, (0, 8): 1, (1, 5): 1, (1, 9): 1, (1, 10): 1, (2, 3): 4, (2, 6): 1,
    (2, 9): 1, (2, 10): 1, (3, 7): 2, (3, 11): 1, (4, 5): 4, (4, 6): 1, (5, 6): 1, (5, 7): 1,
    (6, 7): 4, (8, 9): 4, (8, 12): 2, (9, 13): 1, (10, 11): 4, (10, 14): 1, (11, 15): 2,
    (12, 13): 4, (12, 14): 1, (13, 14): 1, (13, 15): 1, (14, 15): 4,
}
# Two automorphisms of that wiring (together with the identity they form a group acting freely).
_MI250_AUTOS = ([8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7],
                [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12])


def mi250(boxes: int = 1) -> Topology:
    """MI250-like boxes: 16 GCDs joined directly by xGMI links at 50 GB/s (4, 2 or 1 links per
    connected pair); for several boxes, a 16 GB/s InfiniBand link from every GCD to one switch."""
    _check_count("boxes", boxes, 1)
    _check_size({"boxes": boxes}, 16 * boxes + (boxes > 1), boxes * (len(MI250_XGMI_LINKS) + 16 * (boxes > 1)))
    nodes, links = [], []
    for b in range(boxes):
        nodes += [Node(f"box{b}.gcd{g}", COMPUTE, f"box{b}") for g in range(16)]
        links += [Link(f"box{b}.gcd{i}", f"box{b}.gcd{j}", Fraction(50 * n), 0.7)
                  for (i, j), n in MI250_XGMI_LINKS.items()]
        if boxes > 1:
            links += [Link(f"box{b}.gcd{g}", "ib", Fraction(16), 2.0) for g in range(16)]
    if boxes > 1:
        nodes.append(Node("ib", SWITCH))
    autos = [{f"box{b}.gcd{g}": f"box{b}.gcd{perm[g]}" for b in range(boxes) for g in range(16)}
             for perm in _MI250_AUTOS]
    return Topology(f"mi250x{boxes}", nodes, links, autos)


PRESETS: dict[str, Callable[..., Topology]] = {
    "star": star,
    "ring": ring,
    "oneway-ring": lambda ranks=8, bandwidth=1, latency_us=1.0: ring(ranks, bandwidth, False, latency_us),
    "torus": torus2d,
    "hypercube": hypercube,
    "fully-connected": fully_connected,
    "leaf-spine": leaf_spine,
    "two-clusters": two_clusters,
    "dgx-a100": dgx_a100,
    "dgx-h100": dgx_h100,
    "mi250": mi250,
}


def preset_parameters(name: str) -> list[str]:
    return list(inspect.signature(PRESETS[name]).parameters)


def make_preset(name: str, **params) -> Topology:
    """Build preset ``name``; unknown names and parameters raise a one-line TopologyError."""
    if name not in PRESETS:
        raise TopologyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    allowed = preset_parameters(name)
    for key in params:
        if key not in allowed:
            raise TopologyError(f"preset {name!r} has no parameter {key!r}; it takes: {', '.join(allowed)}")
    return PRESETS[name](**params)
