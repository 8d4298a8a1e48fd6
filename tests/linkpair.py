"""Two real TCP transports in one process, linked for one group: what the transport tests drive
frames through (no runtime, no coordinator)."""

from __future__ import annotations

import threading

from collcomm.transport.tcp import TcpTransport

GROUP = 5


class Box:
    """A receiver for one frame (what an operation gives the transport)."""

    def __init__(self, n: int):
        self.buf = bytearray(n)
        self.arrived = threading.Event()
        self.error = None

    def destination(self, header, peer):
        return memoryview(self.buf)[:header.length]

    def delivered(self, header, view, peer):
        self.arrived.set()

    def failed(self, error):
        self.error = error
        self.arrived.set()


def transports(faults=None, auth_a: bool = False, auth_b: bool | None = None) -> tuple[TcpTransport, TcpTransport]:
    """Ranks 0 and 1, each knowing the other's address; ``faults`` applies to both."""
    a = TcpTransport(0, "tok", faults=faults, auth_frames=auth_a)
    b = TcpTransport(1, "tok", faults=faults, auth_frames=auth_a if auth_b is None else auth_b)
    a.set_peers({1: b.address})
    b.set_peers({0: a.address})
    return a, b


def links(a: TcpTransport, b: TcpTransport, timeout: float = 5.0, group: int = GROUP):
    """Rank 0's link to rank 1 and rank 1's to rank 0, for ``group`` (rank 1 accepts while 0 connects)."""
    other = {}
    t = threading.Thread(target=lambda: other.setdefault("link", b.link(0, group, 0, timeout)))
    t.start()
    link = a.link(1, group, 0, timeout)
    t.join(2 * timeout)
    return link, other["link"]
