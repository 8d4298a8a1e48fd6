"""Link rates of an emulated fabric: each veth end's ``tc tbf`` qdisc shapes the direction leaving
it, at the plan's rate or (:func:`set_rate`) another one."""

from __future__ import annotations

from collcomm.emulation.iproute import run_tool
from collcomm.emulation.plan import MTU, EmulationError, FabricPlan

TBF_LATENCY_MS = 50


def _burst_bytes(bits: int) -> int:
    # A token bucket of 20 ms of traffic (at least two jumbo frames): short enough that a
    # probe of a second sees the rate within 2%, long enough that the kernel timer keeps up.
    return max(2 * (MTU + 14), bits // 8 // 50)


def tbf_qdisc(ifname: str, bits: int) -> str:
    """The `tc` command (without `tc -n NS`) that shapes interface ``ifname`` to ``bits`` per second."""
    return f"qdisc replace dev {ifname} root tbf rate {bits}bit burst {_burst_bytes(bits)} latency {TBF_LATENCY_MS}ms"


def link_ends(p: FabricPlan, a: str, b: str) -> dict[tuple[str, str], tuple[str, str, int]]:
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


def set_rate(p: FabricPlan, a: str, b: str, bits: int | None) -> None:
    """Reshape the direction ``a -> b`` of the link between nodes ``a`` and ``b`` (``None``: restore)."""
    ns, ifname, planned = link_ends(p, a, b)[(a, b)]
    rate = planned if bits is None else max(8, bits)
    run_tool(["tc", "-n", ns] + tbf_qdisc(ifname, rate).split())
