"""What a library that a sweep runs provides (collcomm itself, and the ones ``--compare`` adds).

A library takes the benchmark's NumPy buffers in its own form (``wrap``), runs one operation of a
variant on (input, output) views (see :mod:`collcomm.perf.collectives` for what the variants
mean) and has a barrier. Its blocking calls return when the operation is complete on this rank,
which need not mean that the other ranks can complete it without this one: so every turn of a
library (warm-up, timed iterations, checks) ends with its own barrier before another library
runs (see :meth:`Library.barrier`).
"""

from __future__ import annotations

import numpy as np


class Library:
    name = "?"

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def wrap(self, arr: np.ndarray, dtype: str):
        """The library's view of a storage array (no copy)."""
        return arr

    def run(self, coll: str, inplace: bool, inp, out, op: str, root: int) -> None:
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait for every rank, in this library. The sweep calls it at the end of each of the library's
        turns too, not only before timing: an MPI library progresses only inside MPI calls (Open MPI
        has no progress thread by default), and an operation that has returned on this rank may still
        need this rank's progress to complete on another (a control message it left queued, such as
        the FIN of a single-copy transfer). A rank that went straight on to collcomm's allreduce of
        the times would leave that peer waiting in MPI, and itself waiting for that peer; MPI's
        barrier keeps this rank progressing until every rank is through."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def as_bfloat16(arr: np.ndarray):
    """A torch bfloat16 tensor over the bits of ``arr`` (uint16)."""
    import torch

    return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
