"""The job token outside the process: where the commands get it and where a generated one goes.

The token proves membership of the job on every coordinator call and every connection between
ranks, so it never travels in argv (``ps`` shows argv to every user), in a log line or in an error
message. It comes from ``COLLCOMM_TOKEN`` (a process's environment is readable by its user only)
or from a token file that only its owner may read (:func:`read_token_file`); a coordinator that
generates one writes it to a new file created with mode 0600 (:func:`write_new_token_file`) and
prints only the file's path.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path

from collcomm.coordinator.files import read_small_file
from collcomm.coordinator.protocol import check_token
from collcomm.errors import CollectiveError

TOKEN_ENV = "COLLCOMM_TOKEN"
MAX_TOKEN_FILE_BYTES = 4096


class TokenError(CollectiveError, ValueError):
    """The job token cannot be had: a token file is missing, unreadable, open to other users, empty
    or not a token, or ``COLLCOMM_TOKEN`` is not a token. The message never quotes a token."""


def generate() -> str:
    """A fresh random job token (128 bits, hex)."""
    return secrets.token_hex(16)


def read_token_file(path: str | os.PathLike) -> str:
    """The token in ``path`` (surrounding whitespace dropped): a regular file that neither its
    group nor others may read or write. Never blocks (a FIFO is refused, not waited on); errors
    name the file, never its contents."""
    path = os.fspath(path)

    def private(info: os.stat_result) -> None:
        if info.st_mode & 0o077:
            raise TokenError(f"token file {path} is open to other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                             f"run chmod 600 {path}, and use a new token if others could read it")

    data = read_small_file(path, f"token file {path}", MAX_TOKEN_FILE_BYTES, TokenError,
                           too_large="; a token is one short line", check=private)
    text = data.decode("ascii", "replace").strip()
    if not text:
        raise TokenError(f"token file {path} is empty")
    try:
        return check_token(text)
    except ValueError:
        raise TokenError(f"token file {path} does not hold a token (one line of printable ASCII without "
                             "spaces)") from None


def default_directory() -> str:
    """Where a generated token file goes: ``$XDG_RUNTIME_DIR`` (per user, mode 0700, cleared at
    logout) when it is a directory of ours closed to others, else the temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            info = os.stat(runtime)
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077:
                return runtime
        except OSError:
            pass
    return tempfile.gettempdir()


def write_new_token_file(token: str, path: str | os.PathLike | None = None, *, port: int | None = None) -> Path:
    """Write ``token`` to a file that did not exist, created with mode 0600, and return its path:
    ``path``, or a new file with a random name in :func:`default_directory` (``port`` goes into the
    name). Refuses to replace an existing file or to follow a symbolic link."""
    check_token(token)
    if path is None:
        fd, name = tempfile.mkstemp(prefix=f"collcomm-coordinator-{port if port is not None else 'job'}-",
                                    suffix=".token", dir=default_directory())  # mode 0600, O_EXCL
    else:
        name = os.fspath(path)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o600)
        except FileExistsError:
            raise TokenError(f"token file {name} already exists") from None
        except OSError as e:
            raise TokenError(f"token file {name}: cannot create ({e.strerror})") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode("ascii"))
    except OSError as e:
        os.close(fd)
        os.unlink(name)
        raise TokenError(f"token file {name}: cannot write ({e.strerror})") from None
    os.close(fd)
    return Path(name)


def token_from(token_file: str | os.PathLike | None, environ=None) -> str | None:
    """The token of a command that talks to a job: from ``token_file`` when given (it wins over the
    environment), else ``$COLLCOMM_TOKEN``; None when neither gives one."""
    if token_file:
        return read_token_file(token_file)
    environ = os.environ if environ is None else environ
    token = environ.get(TOKEN_ENV) or ""
    if not token:
        return None
    try:
        return check_token(token)
    except ValueError:
        raise TokenError(f"{TOKEN_ENV} is not a token (one line of printable ASCII without spaces)") from None
