"""Running iproute2 (``ip``, ``tc``) for an emulated fabric: the root check, one command, and
batches of commands (one process per namespace instead of one per line)."""

from __future__ import annotations

import os
import shutil
import subprocess

from collcomm.emulation.plan import EmulationError

_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21


def _effective_capabilities() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def require_root(what: str = "collcomm emulate") -> None:
    """Root, with the capabilities that namespaces and qdiscs need (a root shell may have lost them)."""
    caps = _effective_capabilities()
    if os.geteuid() != 0 or not (caps >> _CAP_NET_ADMIN & 1 and caps >> _CAP_SYS_ADMIN & 1):
        raise EmulationError(f"{what} needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): it creates network namespaces, "
                             f"veth pairs and tc qdiscs")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise EmulationError(f"{what} needs the `{tool}` command (iproute2), which is not installed")


def run_tool(argv: list[str], *, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """One command; with ``check``, its failure is an EmulationError quoting its message."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EmulationError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    if check and res.returncode != 0:
        raise EmulationError(f"`{' '.join(argv)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def run_batch(lines: list[str], *, tool: str = "ip", ns: str | None = None) -> None:
    """Many iproute2 commands in one process (`ip -batch` / `tc -batch`), failing on the first error."""
    if not lines:
        return
    argv = [tool] + (["-n", ns] if ns else []) + ["-batch", "-"]
    try:
        res = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120.0)
    except subprocess.TimeoutExpired:
        raise EmulationError(f"`{' '.join(argv)}` of {len(lines)} commands did not finish within 120 s") from None
    if res.returncode != 0:
        last = (res.stderr or res.stdout).strip().splitlines()
        raise EmulationError(f"`{' '.join(argv)}` failed: {last[0] if last else 'no message'}")


def run_per_namespace(cmds: list[tuple[str | None, str]], tool: str = "ip") -> None:
    """(namespace, command) pairs as one batch per namespace (None: the root namespace), in order."""
    by_ns: dict[str | None, list[str]] = {}
    for ns, cmd in cmds:
        by_ns.setdefault(ns, []).append(cmd)
    for ns, lines in by_ns.items():
        run_batch(lines, tool=tool, ns=ns)
