"""Faults on one link of an emulated fabric that is up (``collcomm emulate fault``): down (a black
hole both ways), one direction throttled to a percentage of its planned rate, or back up."""

from __future__ import annotations

from collcomm.emulation.iproute import require_root, run_tool
from collcomm.emulation.plan import EmulationError, FabricPlan
from collcomm.emulation.shaping import link_ends, set_rate

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
    ends = link_ends(p, a, b)
    if mode == "down":
        for ns, ifname, _ in ends.values():
            run_tool(["tc", "-n", ns, "qdisc", "replace", "dev", ifname, "root", "blackhole"])
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
