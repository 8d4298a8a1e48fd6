"""Bringing a plan up and down: network namespaces, veth pairs, addresses, routes, the management
bridge, and the state file that records the fabric that is up under a prefix.

Switches are forwarding namespaces (routers), not bridges, so that a fabric with loops
(leaf-spine) needs no spanning tree. The management bridge ``<prefix>br`` in the root namespace,
with one veth ``<prefix>m<i>`` to each compute namespace, reaches the coordinator and carries
nothing else (it holds no route to fabric addresses).

:func:`down` removes everything that carries the prefix and nothing else, whether or not a plan
or a state file survived (a killed launcher leaves namespaces that ``down`` still finds).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from collcomm.emulation.iproute import require_root, run_batch, run_per_namespace, run_tool
from collcomm.emulation.plan import (DEFAULT_PREFIX, MGMT_OCTETS, MTU, EmulationError, FabricPlan, PlanError,
                                     check_prefix, first_mgmt_octet, use_mgmt_octet)
from collcomm.emulation.shaping import tbf_qdisc
from collcomm.inputs import read_bounded

STATE_DIR = Path(os.environ.get("COLLCOMM_EMULATE_STATE", "/run/collcomm-emulate"))


def state_file(prefix: str) -> Path:
    return STATE_DIR / f"{prefix}.json"


def current(prefix: str = DEFAULT_PREFIX) -> FabricPlan | None:
    """The plan of the fabric that is up under ``prefix``, if its state file and namespaces exist."""
    path = state_file(prefix)
    if not path.exists():
        return None
    try:
        # Bounded (COLLCOMM_MAX_INPUT_BYTES), and a FIFO put there cannot block: PlanError is a ValueError.
        p = FabricPlan.from_json(read_bounded(path, what="emulation state file", error=PlanError))
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


def _sysctl(ns: str, settings: dict[str, str]) -> None:
    script = "; ".join(f"echo {v} > /proc/sys/{k.replace('.', '/')}" for k, v in settings.items())
    run_tool(["ip", "netns", "exec", ns, "sh", "-c", script])


def _up(p: FabricPlan) -> None:
    # The management network: the prefix's own first choice, or the next one that no address of
    # the root namespace uses (another fabric, or anything else on this machine).
    used = {line.split()[3].split(".")[1] for line in
            run_tool(["ip", "-o", "-4", "addr", "show"], check=False).stdout.splitlines()
            if len(line.split()) > 3 and line.split()[3].startswith("10.")}
    first = first_mgmt_octet(p.prefix)
    octets = [o for o in list(MGMT_OCTETS)[first - MGMT_OCTETS[0]:] + list(MGMT_OCTETS) if str(o) not in used]
    if not octets:
        raise EmulationError("every management network 10.200-239.0.0/16 is in use in the root namespace; "
                             "remove a fabric first (collcomm emulate down --prefix ...)")
    use_mgmt_octet(p, octets[0])
    for ns in p.namespaces:
        run_tool(["ip", "netns", "add", ns])
    for ns in p.namespaces:
        # rp_filter off: a one-way link makes replies come back another way.
        _sysctl(ns, {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0",
                     "net.ipv4.conf.default.rp_filter": "0", "net.ipv4.fib_multipath_hash_policy": "1"})
    root = [f"link add {v.a_if} netns {p.namespaces[v.a]} mtu {MTU} type veth "
            f"peer name {v.b_if} netns {p.namespaces[v.b]} mtu {MTU}" for v in p.veths]
    run_batch(root)
    cmds: list[tuple[str | None, str]] = [(ns, "link set lo up") for ns in p.namespaces]
    for i, ns in enumerate(p.namespaces):
        if p.address_iface[i] != "lo":
            cmds.append((ns, f"addr add {p.addresses[i]}/32 dev {p.address_iface[i]}"))
    for v in p.veths:
        cmds.append((p.namespaces[v.a], f"link set {v.a_if} up"))
        cmds.append((p.namespaces[v.b], f"link set {v.b_if} up"))
    run_per_namespace(cmds)
    tc = []
    for v in p.veths:
        for ns, ifname, bits in ((p.namespaces[v.a], v.a_if, v.a_bits), (p.namespaces[v.b], v.b_if, v.b_bits)):
            tc.append((ns, tbf_qdisc(ifname, bits)))
    run_per_namespace(tc, tool="tc")
    run_per_namespace([(p.namespaces[i], f"route add {r}") for i, rs in enumerate(p.routes) for r in rs])
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
    run_batch(mg)
    run_per_namespace(inside)


def _namespaces(prefix: str) -> list[str]:
    res = run_tool(["ip", "netns", "list"], check=False)
    pat = re.compile(rf"^{re.escape(prefix)}-\d+$")
    return [line.split()[0] for line in res.stdout.splitlines() if line.split() and pat.match(line.split()[0])]


def _root_links(prefix: str) -> list[str]:
    res = run_tool(["ip", "-o", "link", "show"], check=False)
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
        pids += [int(x) for x in run_tool(["ip", "netns", "pids", n], check=False).stdout.split()]
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
        run_tool(["ip", "link", "del", name], check=False)
    for ns in found["namespaces"]:
        run_tool(["ip", "netns", "del", ns], check=False)
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
