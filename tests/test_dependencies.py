"""Every third-party module that collcomm imports is declared in pyproject.toml; the README's test
command is what .ci/run runs; topology plotting (networkx's Kamada-Kawai layout, which needs scipy)
works in the test install.

A fresh clone, a fresh venv and the README's install must be enough: a module that only happened to
be installed where the code was written (scipy, once) fails here rather than on a newcomer's machine.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "collcomm"

# Needed at run time but imported by a dependency, not by collcomm's own code, so the import scan
# cannot see them: module -> why.
INDIRECT = {
    "scipy": "networkx.kamada_kawai_layout (collcomm/topology/plot.py: collcomm topology --plot)",
}


def imported_modules(source_root: Path) -> dict[str, set[str]]:
    """Top-level module of every absolute import in the .py files under source_root (nested ones
    included) -> the files (relative to source_root's parent) that import it."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in sorted(source_root.rglob("*.py")):
        rel = path.relative_to(source_root.parent).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found[alias.name.partition(".")[0]].add(rel)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found[node.module.partition(".")[0]].add(rel)
    return found


def third_party(found: dict[str, set[str]], own: str) -> dict[str, set[str]]:
    return {m: files for m, files in found.items() if m not in sys.stdlib_module_names and m != own}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - pytest depends on packaging
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        assert match, f"cannot read a requirement name from {spec!r}"
        return match.group(1)
    return Requirement(spec).name


def declared(pyproject: Path) -> dict[str, str]:
    """Normalized name of every requirement in dependencies and every optional-dependencies extra
    -> where it is declared ("dependencies" or "extra NAME")."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    names: dict[str, str] = {}
    for spec in project.get("dependencies", []):
        names.setdefault(normalize(requirement_name(spec)), "dependencies")
    for extra, specs in project.get("optional-dependencies", {}).items():
        for spec in specs:
            names.setdefault(normalize(requirement_name(spec)), f"extra {extra}")
    return names


def provided_by(module: str, names: dict[str, str], installed: dict[str, list[str]]) -> str | None:
    """The declared requirement that provides module, or None. An installed module maps to its
    distributions; one not installed here (cupy, mpi4py, ...) to a declared requirement named like it
    (cupy -> cupy-cuda12x)."""
    for dist in installed.get(module, []):
        if normalize(dist) in names:
            return normalize(dist)
    mod = normalize(module)
    for name in names:
        if name == mod or name.startswith(mod + "-"):
            return name
    return None


def undeclared(source_root: Path, pyproject: Path, own: str,
               extra_modules: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Modules imported under source_root (plus extra_modules: module -> who needs it) that no
    requirement of pyproject provides -> the files importing them."""
    names = declared(pyproject)
    installed = importlib.metadata.packages_distributions()
    needed = {m: sorted(files) for m, files in third_party(imported_modules(source_root), own).items()}
    for module, why in (extra_modules or {}).items():
        needed.setdefault(module, []).append(why)
    return {m: files for m, files in sorted(needed.items()) if provided_by(m, names, installed) is None}


def test_every_third_party_import_is_declared():
    missing = undeclared(ROOT / PACKAGE, ROOT / "pyproject.toml", PACKAGE, INDIRECT)
    assert not missing, "imported but declared neither in dependencies nor in an extra of pyproject.toml:\n" + \
        "\n".join(f"  {m}: {', '.join(files)}" for m, files in missing.items())


def test_scan_sees_the_known_imports():
    """The scan itself works on the real tree: nested imports (mpi4py, torch inside functions) count."""
    found = third_party(imported_modules(ROOT / PACKAGE), PACKAGE)
    assert {"numpy", "networkx", "matplotlib", "grpc", "mpi4py", "torch"} <= set(found)
    assert "collcomm/perf/mpi.py" in found["mpi4py"]
    assert "os" not in found and PACKAGE not in found


def test_the_checker_reports_an_undeclared_import(tmp_path):
    pkg = tmp_path / "demo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import os\nimport numpy as np\nfrom . import sub\nfrom demo.sub import x\n")
    (pkg / "sub" / "__init__.py").write_text("x = 1\n")
    (pkg / "sub" / "deep.py").write_text("def f():\n    from surely_undeclared_mod.inner import thing\n    return thing\n")
    (pkg / "sub" / "gpu.py").write_text("import cupy\nimport json\n")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "demo"\nversion = "0"\ndependencies = ["numpy>=1"]\n'
        '[project.optional-dependencies]\ngpu = ["cupy-cuda12x>=13"]\n')
    missing = undeclared(pkg, tmp_path / "pyproject.toml", "demo", {"also_missing_mod": "someone's layout"})
    assert missing == {"also_missing_mod": ["someone's layout"],
                       "surely_undeclared_mod": ["demo/sub/deep.py"]}
    with_it = tmp_path / "with.toml"
    with_it.write_text('[project]\ndependencies = ["numpy", "Surely_Undeclared.Mod"]\n'
                       '[project.optional-dependencies]\ngpu = ["cupy-cuda12x"]\n')
    assert undeclared(pkg, with_it, "demo") == {}


def _readme_test_command() -> str:
    block = (ROOT / "README.md").read_text(encoding="utf-8").split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines() if "pytest" in line]
    assert len(lines) == 1, f"expected one test command in the README's first block, got {lines}"
    return lines[0]


def test_ci_runs_the_readme_test_command_in_its_own_venv():
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    command = _readme_test_command()
    assert command.startswith(venv), f"the README's test command should make and activate .venv first: {command}"
    install_and_test = command[len(venv):]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = [line.strip() for line in ci.splitlines()]
    assert install_and_test in lines, f".ci/run does not run the README's {install_and_test!r}"
    assert "set -euo pipefail" in lines
    assert re.search(r'^python3 -m venv "\$\w+"$', ci, re.M), ".ci/run should make a venv of its own"
    assert "system-site-packages" not in ci
    assert lines.index(install_and_test) > max(i for i, line in enumerate(lines) if "/bin/activate" in line)


def test_topology_plot_draws_a_ring(tmp_path):
    import collcomm.topology.plot  # noqa: F401

    png = tmp_path / "ring.png"
    proc = subprocess.run([sys.executable, "-m", "collcomm.cli", "topology", "--preset", "ring", "--ranks", "4",
                           "--plot", str(png)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
