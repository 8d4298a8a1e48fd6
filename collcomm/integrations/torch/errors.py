"""collcomm's errors as torch.distributed's: a failed collective raises a ``DistBackendError``
(:class:`CollcommError`, :class:`CollcommTimeout`) that carries the collcomm error as ``cause``."""

from __future__ import annotations

import torch.distributed as dist

from collcomm.errors import CollectiveError, CollectiveTimeout, UsageError


class CollcommError(dist.DistBackendError):
    """A collective of the "collcomm" backend failed; ``cause`` is the collcomm error (PeerFailure,
    MismatchError, ...)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


class CollcommTimeout(CollcommError):
    """A collective of the "collcomm" backend did not complete within its timeout."""


def torch_error(e: BaseException, what: str, pg: dist.ProcessGroup) -> BaseException:
    """The error to raise for ``e``, raised by the operation ``what`` of the process group ``pg``:
    collcomm's errors (and any other but ValueError, TypeError, RuntimeError, which pass as they
    are) become :class:`CollcommError`, timeouts :class:`CollcommTimeout`, naming rank and group.
    A UsageError (a bad argument: a ValueError or TypeError) passes as it is, as PyTorch's do."""
    where = f"collcomm {what} on rank {pg.rank()} of group {pg.group_name or '?'} (size {pg.size()})"
    if isinstance(e, UsageError):
        return e
    if isinstance(e, CollectiveTimeout):
        # " Timed out " between spaces, as gloo words it: PyTorch's suite matches " (Timed out|closed|timeout) "
        err: BaseException = CollcommTimeout(f"{where}: Timed out ({e})", e)
    elif isinstance(e, CollectiveError):
        err = CollcommError(f"{where} failed: {type(e).__name__}: {e}", e)
    elif isinstance(e, (ValueError, TypeError, RuntimeError)):
        return e
    else:
        err = CollcommError(f"{where} failed: {type(e).__name__}: {e}", e)
    err.__cause__ = e
    return err
