"""Load and save topologies in the ``collcomm.topology/1`` JSON format (see ARCHITECTURE.md).

Loading is bounded (:mod:`collcomm.inputs`): the file's size, the JSON's nesting and digits, the
counts of nodes, links and automorphism hints, and every number (bandwidths exact, positive, at
most 1e12 GB/s, their common denominator small; latencies finite, in [0, 1e9] us) are checked
before any exact arithmetic, and a bad file is one TopologyError naming the file, the entry and
the limit."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

from collcomm.errors import TopologyError
from collcomm.inputs import (Limits, current_limits, exact_number, finite_float, one_line, parse_json, read_bounded,
                             shown)
from collcomm.topology.model import COMPUTE, MAX_BANDWIDTH, NODE_KINDS, Link, Node, Topology

FORMAT = "collcomm.topology/1"


def format_fraction(x: Fraction) -> int | str:
    """An exact JSON value: an integer when whole, else the string "p/q"."""
    x = Fraction(x)
    return int(x) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def to_dict(topo: Topology) -> dict[str, Any]:
    nodes = []
    for n in topo.nodes:
        entry: dict[str, Any] = {"id": n.id, "kind": n.kind}
        if n.host is not None:
            entry["host"] = n.host
        nodes.append(entry)
    links = []
    for l in topo.links:
        entry = {"src": l.src, "dst": l.dst, "bandwidth": format_fraction(l.bandwidth),
                 "latency_us": l.latency_us}
        if not l.duplex:
            entry["duplex"] = False
        links.append(entry)
    out: dict[str, Any] = {"format": FORMAT, "name": topo.name, "nodes": nodes, "links": links}
    if topo.automorphisms:
        out["automorphisms"] = [dict(a) for a in topo.automorphisms]
    return out


def dumps(topo: Topology) -> str:
    return json.dumps(to_dict(topo), indent=1)


def save(topo: Topology, path: str | Path) -> None:
    Path(path).write_text(dumps(topo) + "\n")


# The ranges of a link's numbers (a topology in GB/s and microseconds): above them is a mistake of
# units or an attack, and the bounds keep the floats computed from them finite (a bandwidth's
# digits are bounded too, so it is at least 1e-100: no float of it underflows to 0 either).
MAX_LATENCY_US = 1e9                # microseconds: about 17 minutes
MAX_ID_CHARS = 256                  # of a node id, a host or a topology's name


def bandwidth(value, where: str, limits: Limits | None = None) -> Fraction:
    """An exact bandwidth in GB/s (an int, a decimal, or a fraction string like "25/2"), positive
    and at most MAX_BANDWIDTH, refused before any big arithmetic; ``where`` names the field
    ("link 0 (a -> b): bandwidth")."""
    return exact_number(value, where, error=TopologyError, limits=limits, low=0, low_open=True, high=MAX_BANDWIDTH)


def latency(value, where: str) -> float:
    """A latency in microseconds: a finite number in [0, MAX_LATENCY_US]."""
    return finite_float(value, where, error=TopologyError, low=0.0, high=MAX_LATENCY_US)


def identifier(value, where: str, shortest: int = 1) -> str:
    """A node id, host or name: a string of ``shortest`` to MAX_ID_CHARS printable characters (no
    newline or terminal escape: they end up in messages and pictures)."""
    if not isinstance(value, str) or not shortest <= len(value) <= MAX_ID_CHARS or not value.isprintable():
        raise TopologyError(f"{where} must be a string of {shortest} to {MAX_ID_CHARS} printable characters, "
                            f"got {shown(value)}")
    return value


def _require(obj: dict, key: str, where: str):
    if key not in obj:
        raise TopologyError(f"{where}: missing {key!r}")
    return obj[key]


def _check_count(items: list, key: str, field: str, limits: Limits) -> None:
    if len(items) > getattr(limits, field):
        raise TopologyError(f"{key!r} has {len(items)} entries; {limits.describe(field)}")


def _check_denominators(bandwidths: list[Fraction], limits: Limits) -> None:
    """Sums of the bandwidths (parallel links, cuts, flows) stay small: their common denominator
    has at most ``max_number_digits`` digits (checked as it grows, so a hostile file stops early)."""
    common, bound = 1, 10**limits.max_number_digits
    for i, bw in enumerate(bandwidths):
        d = bw.denominator
        if common % d:
            common = common * d // math.gcd(common, d)
            if common >= bound:
                raise TopologyError(f"link {i}: the bandwidths' common denominator has more than "
                                    f"{limits.max_number_digits} digits; {limits.describe('max_number_digits')}")


def from_dict(data: Any, limits: Limits | None = None) -> Topology:
    """A Topology from the parsed ``collcomm.topology/1`` document ``data``, within ``limits``."""
    limits = current_limits(limits)
    try:
        return _from_dict(data, limits)
    except TopologyError as e:
        raise TopologyError(one_line(str(e))) from None


def _from_dict(data: Any, limits: Limits) -> Topology:
    if not isinstance(data, dict):
        raise TopologyError("topology file must hold a JSON object")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise TopologyError(f"topology format must be {FORMAT!r}, got {shown(fmt)}")
    name = identifier(data.get("name", "topology"), "'name'", shortest=0)
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list):
        raise TopologyError("'nodes' must be a list")
    raw_links = data.get("links")
    if not isinstance(raw_links, list):
        raise TopologyError("'links' must be a list")
    autos = data.get("automorphisms", [])
    if not isinstance(autos, list):
        raise TopologyError("'automorphisms' must be a list of objects mapping node ids to node ids")
    _check_count(raw_nodes, "nodes", "max_nodes", limits)
    _check_count(raw_links, "links", "max_links", limits)
    _check_count(autos, "automorphisms", "max_automorphisms", limits)
    nodes = []
    for i, n in enumerate(raw_nodes):
        where = f"node {i}"
        if not isinstance(n, dict):
            raise TopologyError(f"{where}: must be an object, got {shown(n)}")
        nid = identifier(_require(n, "id", where), f"{where}: 'id'")
        kind = n.get("kind", COMPUTE)
        if kind not in NODE_KINDS:
            raise TopologyError(f"{where} ({nid}): kind must be 'compute' or 'switch', got {shown(kind)}")
        host = n.get("host")
        if host is not None:
            identifier(host, f"{where} ({nid}): 'host'")
        nodes.append(Node(nid, kind, host))
    links = []
    for i, l in enumerate(raw_links):
        where = f"link {i}"
        if not isinstance(l, dict):
            raise TopologyError(f"{where}: must be an object, got {shown(l)}")
        src = identifier(_require(l, "src", where), f"{where}: 'src'")
        dst = identifier(_require(l, "dst", where), f"{where}: 'dst'")
        where = f"link {i} ({src} -> {dst})"
        if "bandwidth" not in l:
            raise TopologyError(f"{where}: missing 'bandwidth'")
        bw = bandwidth(l["bandwidth"], f"{where}: bandwidth", limits)
        lat = latency(l.get("latency_us", 1.0), f"{where}: latency_us")
        duplex = l.get("duplex", True)
        if not isinstance(duplex, bool):
            raise TopologyError(f"{where}: 'duplex' must be true or false, got {shown(duplex)}")
        links.append(Link(src, dst, bw, lat, duplex))
    _check_denominators([l.bandwidth for l in links], limits)
    for i, a in enumerate(autos):
        if not isinstance(a, dict) or len(a) > len(nodes):
            raise TopologyError(f"automorphism {i}: must be an object mapping node ids to node ids")
        for k, v in a.items():
            identifier(k, f"automorphism {i}: a node id")
            identifier(v, f"automorphism {i}: a node id")
    return Topology(name, nodes, links, autos)


def loads(text: str, limits: Limits | None = None) -> Topology:
    """A Topology from ``collcomm.topology/1`` text, within ``limits`` (size, nesting, digits,
    nodes, links; :mod:`collcomm.inputs.limits`)."""
    limits = current_limits(limits)
    return from_dict(parse_json(text, what="topology", error=TopologyError, limits=limits), limits)


def load(path: str | Path, limits: Limits | None = None) -> Topology:
    """A Topology from a ``collcomm.topology/1`` file; a bad file is one TopologyError naming the
    file, the field and the limit."""
    limits = current_limits(limits)
    p = Path(path)
    text = read_bounded(p, what="topology file", error=TopologyError, limits=limits)
    try:
        return loads(text, limits)
    except TopologyError as e:
        raise TopologyError(f"{p.name}: {e}") from None
