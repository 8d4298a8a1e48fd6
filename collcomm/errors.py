"""Typed errors of collcomm.

Every error a user can meet is a subclass of :class:`CollectiveError`, carries the
facts (which rank, which link, which entry of a file) and reads as one line that
says what is wrong.
"""

from __future__ import annotations


class CollectiveError(Exception):
    """Base class of every collcomm error."""


class UsageError(CollectiveError, ValueError):
    """A call's argument cannot be used: a rank out of range, a timeout that cannot be honoured,
    an unsupported reduction, buffers whose sizes do not fit. Raised on the calling rank before
    anything is sent (the job is unharmed: its next call runs as if this one never happened).
    ``argument`` names the argument. A ValueError, so callers that catch ValueError still do."""

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class UsageTypeError(UsageError, TypeError):
    """A call's argument is of a kind that cannot be used (a list for a buffer, a float or a bool
    for a rank, a string for a timeout, an unsupported dtype): a UsageError and a TypeError."""


class TopologyError(CollectiveError, ValueError):
    """A topology is malformed, or a fabric cannot carry the requested collective."""


class ScheduleError(CollectiveError, ValueError):
    """A schedule is malformed or does not fit its topology."""


class CollectiveTimeout(CollectiveError, TimeoutError):
    """A blocking call did not complete within its timeout."""


class PeerFailure(CollectiveError):
    """A peer rank died or its connection broke."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


class LinkFailure(PeerFailure):
    """The connection to a live peer loses what is sent on it: the peer answered that a frame never
    reached it more often than the retransmission bound (a link that drops everything, a "black
    hole"). ``rank`` is the peer at the other end of the link; its process may well be alive."""


class EvictedError(CollectiveError):
    """This rank was declared failed (it hung or was cut off) and its group went on without it at a
    new epoch: whatever it still sends carries the old epoch and is refused."""

    def __init__(self, message: str, rank: int | None = None, epoch: int | None = None):
        super().__init__(message)
        self.rank = rank
        self.epoch = epoch


class MismatchError(CollectiveError):
    """Ranks disagree on the collective, size, dtype or reduction. The message names this rank's
    operation and a peer's that differs ("rank 0 runs allreduce of ... but rank 1 runs broadcast
    of ..."); ``rank`` is that peer, when known."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


class AuthenticationError(CollectiveError):
    """A peer could not prove knowledge of the job token."""


class CorruptionError(CollectiveError):
    """A piece of an operation failed its payload checksum more often than the retransmission bound:
    the link corrupts data. ``rank`` is the peer at the other end of the link."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


class ObjectError(CollectiveError):
    """An operation on a named object failed; ``key`` names the object."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class ObjectExists(ObjectError, ValueError):
    """A key was put again before it was deleted."""


class ObjectDeleted(ObjectError, KeyError):
    """The object was deleted (or never existed, for a call that does not wait for it)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ObjectLost(ObjectError):
    """Every copy of the object is gone (its holders died)."""


class ObjectStoreFull(ObjectError, MemoryError):
    """A bounded store (this process's, ``COLLCOMM_OBJECT_STORE_BYTES``, or the directory's,
    ``COLLCOMM_DIRECTORY_BYTES``) has no room for the object; nothing in it was evicted."""


class NcclUnavailable(CollectiveError):
    """A GPU entry point cannot run here: no NCCL library (the ``gpu`` extra is not installed), a
    library that is not NCCL, no CUDA driver, or no GPU. The message names what is missing."""
