"""The libraries a sweep runs: collcomm itself, and the ones ``--compare`` adds (gloo, mpi).

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


class Collcomm(Library):
    """collcomm's public API; allreduce, broadcast and reduce are in place, so their out-of-place
    variant copies the send buffer into the receive buffer first (timed)."""

    name = "collcomm"

    def __init__(self, rank: int, world: int):
        super().__init__(rank, world)
        import collcomm

        self.cc = collcomm

    def wrap(self, arr: np.ndarray, dtype: str):
        return as_bfloat16(arr) if dtype == "bfloat16" else arr

    def run(self, coll: str, inplace: bool, inp, out, op: str, root: int) -> None:
        cc = self.cc
        if coll == "allreduce":
            if not inplace:
                out[:] = inp
            cc.allreduce(out, op)
        elif coll == "allgather":
            cc.allgather(out, inp)
        elif coll == "reduce_scatter":
            cc.reduce_scatter(out, inp, op)
        elif coll == "alltoall":
            cc.alltoall(out, inp)
        elif coll == "broadcast":
            if not inplace and self.rank == root:
                out[:] = inp
            cc.broadcast(out, root)
        elif coll == "reduce":
            if not inplace:
                out[:] = inp
            cc.reduce(out, root, op)
        else:  # pragma: no cover - options.py admits only the six
            raise ValueError(coll)

    def barrier(self) -> None:
        self.cc.barrier()


def make(name: str, rank: int, world: int, options) -> Library:
    """The library ``name`` ready to run (a compared library joins its own process group here)."""
    if name == "collcomm":
        return Collcomm(rank, world)
    if name == "gloo":
        from collcomm.perf.gloo import Gloo

        return Gloo(rank, world, timeout=options.timeout)
    if name == "mpi":
        from collcomm.perf.mpi import Mpi

        return Mpi(rank, world)
    raise ValueError(f"unknown library {name!r}")
