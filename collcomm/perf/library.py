"""What a library that a sweep runs provides (collcomm itself, and the ones ``--compare`` adds).

A library takes the benchmark's NumPy buffers in its own form (``wrap``), runs one operation of a
variant on (input, output) views (see :mod:`collcomm.perf.collectives` for what the variants
mean) and has a barrier. Its blocking calls return when the operation is complete on this rank.
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
        raise NotImplementedError

    def close(self) -> None:
        pass


def as_bfloat16(arr: np.ndarray):
    """A torch bfloat16 tensor over the bits of ``arr`` (uint16)."""
    import torch

    return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
