"""Running ranks inside an emulated fabric: each in the namespace of its compute node, with the
environment that makes it listen on its fabric address."""

from __future__ import annotations

from collcomm.emulation.plan import FabricPlan


def rank_environment(p: FabricPlan, rank: int) -> dict[str, str]:
    """What a rank needs inside its namespace: its fabric address to listen on, TCP only
    (abstract Unix sockets do not cross namespaces), and where gloo should bind."""
    return {"COLLCOMM_HOST": p.addresses[rank], "COLLCOMM_TRANSPORT": "tcp",
            "COLLCOMM_EMULATED": p.prefix, "GLOO_SOCKET_IFNAME": p.address_iface[rank],
            "MASTER_ADDR": p.addresses[0]}


def wrap_command(p: FabricPlan, rank: int, argv: list[str]) -> list[str]:
    """``argv`` run inside rank ``rank``'s namespace."""
    return ["ip", "netns", "exec", p.namespaces[rank]] + list(argv)
