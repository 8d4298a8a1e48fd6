"""Shared-memory segments: files in /dev/shm, named per job, group, epoch and rank.

Each rank of a group creates one segment of its own (``O_EXCL``, mode 0600) and maps its peers'.
Once every member has mapped every segment the names are unlinked: the memory lives on in the
mappings and goes with the last process that holds it, so a rank killed later (even by SIGKILL)
leaves nothing behind. Only the short window between creating a segment and the group's
agreement that all are mapped can leave a name, and the launcher removes what a finished job
left (:func:`remove_job`): every name starts with ``collcomm-<job tag>-``, the tag being a hash
of the job's coordinator address and token, so nothing outside the job's own names is touched.

The directory is ``COLLCOMM_SHM_DIR`` (default ``/dev/shm``).
"""

from __future__ import annotations

import glob
import hashlib
import mmap
import os

PREFIX = "collcomm-"


def directory() -> str:
    return os.environ.get("COLLCOMM_SHM_DIR") or "/dev/shm"


def job_tag(coordinator: str, token: str) -> str:
    """The part of every segment name that is the job's: 12 hex digits of a hash (the token
    itself is never written anywhere)."""
    return hashlib.sha256(f"collcomm-shm|{coordinator}|{token}".encode()).hexdigest()[:12]


def name(tag: str, group: int, epoch: int, generation: int, rank: int) -> str:
    return f"{PREFIX}{tag}-g{group}e{epoch}n{generation}-r{rank}"


class Segment:
    """One mapped segment (its own or a peer's)."""

    def __init__(self, path: str, mm: mmap.mmap, owner: bool):
        self.path, self.mm, self.owner = path, mm, owner
        self.size = len(mm)

    @classmethod
    def create(cls, seg_name: str, size: int) -> "Segment":
        path = os.path.join(directory(), seg_name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserve the pages now: a full /dev/shm (a container's 64 MB) is then an error here,
            # not a SIGBUS at the first write into a sparse file.
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        return cls(path, mm, True)

    @classmethod
    def attach(cls, seg_name: str, size: int) -> "Segment":
        path = os.path.join(directory(), seg_name)
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != size:
                raise OSError(f"{path} has {os.fstat(fd).st_size} bytes, expected {size}")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(path, mm, False)

    def unlink(self) -> None:
        """Remove the name (the owner does, once every peer mapped it); the memory stays mapped."""
        if self.owner:
            _unlink(self.path)
            self.owner = False

    def close(self) -> None:
        self.unlink()
        try:
            self.mm.close()
        except BufferError:  # a view still points into it: the mapping goes with the last view
            pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_job(tag: str) -> list[str]:
    """Remove every segment name a job (``tag``) left (after the job ended); returns the paths."""
    removed = []
    for path in glob.glob(os.path.join(directory(), f"{PREFIX}{tag}-*")):
        _unlink(path)
        removed.append(path)
    return removed
