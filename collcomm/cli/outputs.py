"""Files a command writes where the user asked: checked before any work, written with a one-line
error (exit status 2) when the system refuses; a drawing that a missing plotting library
prevents is a one-line failure (exit status 1)."""

from __future__ import annotations

import os
from pathlib import Path

from collcomm.cli.errors import CommandFailed, UsageError


def check_output(path: str, flag: str, image: bool = False) -> None:
    """Fail before any work when an output cannot be written where asked."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, not a file")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{flag} {path}: {str(parent)!r} is not a directory")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {str(parent)!r} does not exist")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{flag} {path}: the file is not writable")
    if not p.exists() and not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: directory {str(parent)!r} is not writable")
    if image:
        suffix = p.suffix.lower().lstrip(".")
        supported = {"png", "pdf", "svg", "svgz", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp"}
        if suffix not in supported:
            raise UsageError(f"{flag} {path}: unknown image format {p.suffix or '(none)'!r}; use .png, .svg or .pdf")


def write_text(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def draw(fn, path: str, *args, **kwargs) -> None:
    try:
        fn(*args, path=path, **kwargs)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    except ImportError as e:  # a plotting dependency (matplotlib, scipy for some layouts) is not installed
        raise CommandFailed(f"cannot draw {path}: {e}") from None
