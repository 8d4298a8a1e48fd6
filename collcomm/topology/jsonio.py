"""Load and save topologies in the ``collcomm.topology/1`` JSON format (see ARCHITECTURE.md)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

from collcomm.errors import TopologyError
from collcomm.topology.model import COMPUTE, Link, Node, Topology, as_bandwidth

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


def _require(obj: dict, key: str, where: str, types, what: str):
    if key not in obj:
        raise TopologyError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, types):
        raise TopologyError(f"{where}: {key!r} must be {what}, got {value!r}")
    return value


def from_dict(data: Any) -> Topology:
    if not isinstance(data, dict):
        raise TopologyError("topology file must hold a JSON object")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise TopologyError(f"topology format must be {FORMAT!r}, got {fmt!r}")
    name = data.get("name", "topology")
    if not isinstance(name, str):
        raise TopologyError(f"'name' must be a string, got {name!r}")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list):
        raise TopologyError("'nodes' must be a list")
    raw_links = data.get("links")
    if not isinstance(raw_links, list):
        raise TopologyError("'links' must be a list")
    nodes = []
    for i, n in enumerate(raw_nodes):
        where = f"node {i}"
        if not isinstance(n, dict):
            raise TopologyError(f"{where}: must be an object, got {n!r}")
        nid = _require(n, "id", where, str, "a string")
        kind = n.get("kind", COMPUTE)
        host = n.get("host")
        if host is not None and not isinstance(host, str):
            raise TopologyError(f"{where} ({nid}): 'host' must be a string, got {host!r}")
        nodes.append(Node(nid, kind, host))
    links = []
    for i, l in enumerate(raw_links):
        where = f"link {i}"
        if not isinstance(l, dict):
            raise TopologyError(f"{where}: must be an object, got {l!r}")
        src = _require(l, "src", where, str, "a node id")
        dst = _require(l, "dst", where, str, "a node id")
        where = f"link {i} ({src} -> {dst})"
        if "bandwidth" not in l:
            raise TopologyError(f"{where}: missing 'bandwidth'")
        bw = as_bandwidth(l["bandwidth"], where)
        lat = l.get("latency_us", 1.0)
        if not isinstance(lat, (int, float)) or isinstance(lat, bool):
            raise TopologyError(f"{where}: 'latency_us' must be a number, got {lat!r}")
        duplex = l.get("duplex", True)
        if not isinstance(duplex, bool):
            raise TopologyError(f"{where}: 'duplex' must be true or false, got {duplex!r}")
        links.append(Link(src, dst, bw, float(lat), duplex))
    autos = data.get("automorphisms", [])
    if not isinstance(autos, list) or not all(
            isinstance(a, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in a.items())
            for a in autos):
        raise TopologyError("'automorphisms' must be a list of objects mapping node ids to node ids")
    return Topology(name, nodes, links, autos)


def loads(text: str) -> Topology:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TopologyError(f"topology is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return from_dict(data)


def load(path: str | Path) -> Topology:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise TopologyError(f"topology file {str(p)!r} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise TopologyError(f"cannot read topology file {str(p)!r}: {e.__class__.__name__}") from None
    try:
        return loads(text)
    except TopologyError as e:
        raise TopologyError(f"{p.name}: {e}") from None
