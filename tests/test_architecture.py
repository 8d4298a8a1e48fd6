"""The house as docs/ARCHITECTURE.md draws it: the modules it names exist, the tiers import only
downwards, the model tier is pure, and no source file grows past 700 lines."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "collcomm"
DOC = REPO / "docs" / "ARCHITECTURE.md"
MAX_LINES = 700
GENERATED = {"collcomm/coordinator/coordinator_pb2.py", "collcomm/coordinator/coordinator_pb2_grpc.py"}

# Each tier imports only the tiers below it (docs/ARCHITECTURE.md, "Tiers"); the longest prefix wins.
TIERS = {
    "collcomm.errors": 0, "collcomm._version": 0, "collcomm.refusals": 0, "collcomm.inputs": 0,
    "collcomm.topology": 1, "collcomm.schedules": 1, "collcomm.faults": 1,
    "collcomm.transport": 2, "collcomm.coordinator": 2,
    "collcomm.runtime": 3,
    "collcomm.objects": 3,
    "collcomm": 4,  # the faces: __init__, api, integrations, cli, perf, probing, emulation, launcher, sweep
}
MODEL = ("collcomm.topology", "collcomm.schedules")
ABOVE_MODEL = ("collcomm.transport", "collcomm.runtime", "collcomm.api", "collcomm.faults", "collcomm.coordinator")


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _tier(module: str) -> int:
    best = max((p for p in TIERS if module == p or module.startswith(p + ".")), key=len)
    return TIERS[best]


def _imports(path: Path) -> set[str]:
    """The collcomm modules ``path`` imports, at module level or inside functions."""
    found = set()
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m == "collcomm" or m.startswith("collcomm.")}


def test_the_architecture_names_only_paths_that_exist():
    text = DOC.read_text()
    named = set(re.findall(r"(?<![\w/.])(collcomm/[\w/.]*\w/?)", text))
    assert len(named) > 60, "the layer picture names the modules"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_package_is_in_the_architecture():
    text = DOC.read_text()
    packages = sorted(str(d.relative_to(REPO)) + "/" for d in PACKAGE.rglob("*") if (d / "__init__.py").exists())
    absent = [p for p in packages if p not in text]
    assert not absent, f"packages missing from docs/ARCHITECTURE.md: {absent}"


def test_tiers_import_only_downwards():
    wrong = []
    for path in _sources():
        me = _module(path)
        for target in _imports(path):
            if _tier(target) > _tier(me):
                wrong.append(f"{me} (tier {_tier(me)}) imports {target} (tier {_tier(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_tier_check_sees_an_upward_import(tmp_path):
    fake = tmp_path / "collcomm" / "topology" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from collcomm.runtime import Runtime\n")
    targets = {t for t in _imports_at(fake, tmp_path)}
    assert "collcomm.runtime" in targets and _tier("collcomm.runtime") > _tier("collcomm.topology.bad")


def _imports_at(path: Path, root: Path) -> set[str]:
    global REPO
    saved, REPO = REPO, root
    try:
        return _imports(path)
    finally:
        REPO = saved


def test_no_source_file_is_over_700_lines():
    long = {str(p.relative_to(REPO)): n for p in _sources()
            if str(p.relative_to(REPO)) not in GENERATED and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


PURE_PROBE = r"""
import importlib, os, pkgutil, socket, subprocess, sys, threading

def refuse(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"importing the model tier tried to {what}")
    return fail

socket.socket.__init__ = refuse("open a socket")
socket.create_connection = refuse("open a connection")
subprocess.Popen.__init__ = refuse("start a process")
os.fork = refuse("fork")
os.posix_spawn = refuse("spawn a process")
threading.Thread.start = refuse("start a thread")

import collcomm.topology, collcomm.schedules
first = sorted(m for m in sys.modules if m.startswith("collcomm"))
for package in (collcomm.topology, collcomm.schedules):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
every = sorted(m for m in sys.modules if m.startswith("collcomm"))
print(repr((first, every)))
"""


@pytest.mark.timeout(120)
def test_the_model_tier_is_pure_and_loads_nothing_above_it():
    """`import collcomm.topology, collcomm.schedules` loads no module of the transport, the
    runtime, the API, the faults or the coordinator; importing every module of both (plots
    included) opens no socket, starts no process and no thread."""
    out = subprocess.run([sys.executable, "-c", PURE_PROBE], capture_output=True, text=True, timeout=100,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    first, every = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    for loaded in (first, every):
        above = [m for m in loaded if m.startswith(ABOVE_MODEL)]
        assert not above, f"the model tier loaded {above}"
    assert any(m.startswith("collcomm.schedules.forestcoll") for m in every)


def test_the_public_api_loads_on_first_use():
    out = subprocess.run([sys.executable, "-c", "import collcomm as cc, sys; assert 'collcomm.api' not in sys.modules;"
                          " f = cc.allreduce; assert 'collcomm.api' in sys.modules; from collcomm import init;"
                          " print(f.__module__, init.__module__, cc.__version__)"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["collcomm.api", "collcomm.api"]
