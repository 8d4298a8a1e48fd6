"""Reading the small files the coordinator's users hand it (token files, TLS certificates and keys):
regular files only, opened without blocking (a FIFO is refused, not waited on), read up to a bound,
every error one line naming the file and never quoting its contents."""

from __future__ import annotations

import os
import stat
from typing import Callable


def read_small_file(path: str, label: str, limit: int, error: type[Exception], *, too_large: str = "",
                    check: Callable[[os.stat_result], None] | None = None) -> bytes:
    """The bytes of ``path``; ``error`` is raised with ``label`` first ("token file job.token",
    "--tls-cert cert.pem") when the file is missing, unreadable, not a regular file or larger than
    ``limit`` bytes (``too_large`` says why that cannot be right). ``check`` may refuse the file
    by its status (its mode) before anything is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{label}: no such file") from None
    except PermissionError:
        raise error(f"{label}: permission denied") from None
    except OSError as e:
        raise error(f"{label}: cannot open ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{label}: not a regular file")
        if check is not None:
            check(info)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise error(f"{label}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    if size > limit:
        raise error(f"{label}: larger than {limit} bytes{too_large}")
    return b"".join(chunks)
