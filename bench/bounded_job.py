"""Running a benchmark's job as a subprocess that cannot outlive its time limit.

``collcomm run``'s own timeout bounds the collectives, not the wall time of the job; these
benchmarks start the job in a session of its own and, at the limit, SIGTERM the launcher (it
forwards the signal to its ranks), then SIGKILL whatever of its process tree is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    out, frontier = [], [pid]
    while frontier:
        for c in children.get(frontier.pop(), []):
            out.append(c)
            frontier.append(c)
    return out


def run_bounded(argv: list[str], env: dict, timeout: float, log: Path,
                cwd: str | None = None) -> tuple[int | None, float]:
    """Run ``argv`` with output to ``log``, at most ``timeout`` s; (exit code or None, seconds)."""
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            family = descendants(proc.pid)
            proc.send_signal(signal.SIGTERM)  # the launcher forwards it to its ranks
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            for pid in [proc.pid] + family:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
    return code, time.monotonic() - t0
