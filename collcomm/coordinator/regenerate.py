"""Regenerate ``coordinator_pb2.py`` and ``coordinator_pb2_grpc.py`` from ``coordinator.proto``.

::

    pip install grpcio-tools==1.74.0      # a build tool only, never a runtime dependency
    python -m collcomm.coordinator.regenerate          # rewrite the generated modules
    python -m collcomm.coordinator.regenerate --check  # exit 1 if they differ from the .proto

protoc runs with the repository root as its include path, so the generated service module
imports ``collcomm.coordinator.coordinator_pb2`` (no bare ``import coordinator_pb2``).

The generated code sets the runtime floors: grpcio-tools 1.74.0 bundles protoc 31.1, whose code
needs protobuf >= 6.31.1, and its service stubs need grpcio >= 1.74.0. A different grpcio-tools
moves those floors, so this script warns when it is not the pinned version.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PINNED_GRPCIO_TOOLS = "1.74.0"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent.parent
PROTO = PACKAGE_DIR / "coordinator.proto"
GENERATED = ("coordinator_pb2.py", "coordinator_pb2_grpc.py")
QUALIFIED_IMPORT = "from collcomm.coordinator import coordinator_pb2"


def generate(out_root: Path) -> list[Path]:
    """Run protoc on the .proto; return the generated files under ``out_root``."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit("regenerate: grpc_tools is missing; "
                         f"pip install grpcio-tools=={PINNED_GRPCIO_TOOLS}")
    import grpc_tools
    from importlib.metadata import version

    found = version("grpcio-tools")
    if found != PINNED_GRPCIO_TOOLS:
        print(f"regenerate: warning: grpcio-tools {found}, pinned {PINNED_GRPCIO_TOOLS}; "
              "the runtime floors of grpcio/protobuf in pyproject.toml may change", file=sys.stderr)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    relative = PROTO.relative_to(REPO_ROOT)
    status = protoc.main(["grpc_tools.protoc", f"-I{REPO_ROOT}", f"-I{well_known}",
                          f"--python_out={out_root}", f"--grpc_python_out={out_root}", str(PROTO)])
    if status != 0:
        raise SystemExit(f"regenerate: protoc failed with status {status}")
    files = [out_root / relative.parent / name for name in GENERATED]
    service = files[1].read_text()
    if QUALIFIED_IMPORT not in service:
        raise SystemExit(f"regenerate: {files[1].name} does not contain '{QUALIFIED_IMPORT}'")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collcomm.coordinator.regenerate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed modules instead of rewriting them")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for path in generate(Path(tmp)):
            target = PACKAGE_DIR / path.name
            fresh = path.read_text()
            if args.check:
                if not target.exists() or target.read_text() != fresh:
                    stale.append(target.name)
            else:
                target.write_text(fresh)
                print(f"wrote {target}")
    if stale:
        print(f"regenerate: out of date: {', '.join(stale)}; run python -m collcomm.coordinator.regenerate",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
