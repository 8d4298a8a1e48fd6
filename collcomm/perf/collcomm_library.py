"""collcomm itself as the library a sweep measures."""

from __future__ import annotations

import numpy as np

from collcomm.perf.library import Library, as_bfloat16


class Collcomm(Library):
    """collcomm's public API. allreduce, reduce and broadcast take a result buffer (``out=``, as
    MPI's allreduce and reduce, and NCCL's broadcast, do)."""

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
            cc.allreduce(out if inplace else inp, op, out=None if inplace else out)
        elif coll == "allgather":
            cc.allgather(out, inp)
        elif coll == "reduce_scatter":
            cc.reduce_scatter(out, inp, op)
        elif coll == "alltoall":
            cc.alltoall(out, inp)
        elif coll == "broadcast":
            cc.broadcast(out if inplace else inp, root, out=None if inplace else out)
        elif coll == "reduce":
            cc.reduce(out if inplace else inp, root, op, out=None if inplace else out)
        else:  # pragma: no cover - options.py admits only the six
            raise ValueError(coll)

    def barrier(self) -> None:
        self.cc.barrier()
