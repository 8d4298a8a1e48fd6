"""IP hop counts between hosts, as tracepath counts them, without privileges."""

from __future__ import annotations

import socket
import struct
import time

HOPS_MAX_TTL, HOPS_WAIT, HOPS_PORT = 8, 0.2, 33434


def hop_count(host: str, max_ttl: int = HOPS_MAX_TTL, wait: float = HOPS_WAIT) -> int | None:
    """IP hops to ``host`` as tracepath counts them, without privileges: UDP datagrams with TTL
    1, 2, ... to an unused port; routers answer "time exceeded" and the host "port
    unreachable", read from the socket's error queue (IP_RECVERR). None when unknown (IPv6, a
    silent host or firewall, ICMP rate limits)."""
    recverr = getattr(socket, "IP_RECVERR", 11)
    errqueue = getattr(socket, "MSG_ERRQUEUE", 0x2000)
    try:
        addr = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
    except (OSError, IndexError):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_IP, recverr, 1)
        s.setblocking(False)
        for ttl in range(1, max_ttl + 1):
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            try:
                s.sendto(b"collcomm-probe-hops", (addr, HOPS_PORT + ttl))
            except OSError:
                return None
            deadline = time.monotonic() + wait
            kind = None
            while kind is None:
                try:
                    _, anc, _, _ = s.recvmsg(256, 512, errqueue)
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return None
                    time.sleep(0.0005)
                    continue
                for level, typ, data in anc:
                    if level == socket.SOL_IP and typ == recverr and len(data) >= 8:
                        kind = struct.unpack_from("=IBBB", data)[2]  # sock_extended_err.ee_type
            if kind == 3:      # destination unreachable: the host itself answered
                return ttl
            if kind != 11:     # anything but "time exceeded" on the way
                return None
    return None
