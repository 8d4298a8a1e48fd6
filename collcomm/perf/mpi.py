"""MPI (mpi4py) as a compared library (``--compare mpi``).

NOT TESTED: mpi4py (and an MPI library) are not installed where this was written, so this path
has never run; ``--compare mpi`` there stops with "mpi4py is not installed" before anything
starts. It is written against mpi4py's documented buffer API (``Allreduce``, ``Allgather``,
``Reduce_scatter_block``, ``Bcast``, ``Reduce``, ``Alltoall``, ``MPI.IN_PLACE``).

How it runs: MPI ranks must be started by MPI, so with ``--compare mpi`` the launching process
starts a collcomm coordinator and runs ``mpiexec -n N python -m collcomm.perf ...`` (instead
of collcomm's launcher); each rank takes its collcomm rank from ``MPI.COMM_WORLD``
(:func:`rank_from_mpi`) and joins collcomm through the coordinator, so both libraries run in
the same processes, alternately per size. MPI has real out-of-place allreduce and reduce, so
its out-of-place variant does not copy; avg is SUM then a division (timed); MPI has no half or
bfloat16 (refused on the command line).
"""

from __future__ import annotations

import os

import numpy as np

from collcomm.perf.library import Library

RANK_FROM_MPI = "COLLCOMM_PERF_RANK_FROM_MPI"  # set by the launching process for mpiexec'd ranks


def rank_from_mpi() -> None:
    """In a rank started by mpiexec: take COLLCOMM_RANK from MPI before collcomm.init()."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    os.environ["COLLCOMM_RANK"] = str(comm.Get_rank())
    os.environ.setdefault("COLLCOMM_WORLD_SIZE", str(comm.Get_size()))


class Mpi(Library):
    name = "mpi"

    def __init__(self, rank: int, world: int):
        super().__init__(rank, world)
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        if self.comm.Get_size() != world or self.comm.Get_rank() != rank:
            raise RuntimeError(f"--compare mpi: MPI rank {self.comm.Get_rank()} of {self.comm.Get_size()} is not "
                               f"collcomm rank {rank} of {world}; start the job with collcomm-perf -np N")
        self.ops = {"sum": MPI.SUM, "avg": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX}

    def run(self, coll: str, inplace: bool, inp, out, op: str, root: int) -> None:
        comm, MPI = self.comm, self.MPI
        mop = self.ops.get(op, MPI.SUM)
        if coll == "allreduce":
            comm.Allreduce(MPI.IN_PLACE if inplace else inp, out, mop)
        elif coll == "allgather":
            comm.Allgather(MPI.IN_PLACE if inplace else inp, out)
        elif coll == "reduce_scatter":
            if inplace:  # MPI's in-place result lands at the front of the buffer, the benchmark's at slice me
                tmp = np.empty_like(out)
                comm.Reduce_scatter_block(inp, tmp, mop)
                out[:] = tmp
            else:
                comm.Reduce_scatter_block(inp, out, mop)
        elif coll == "alltoall":
            comm.Alltoall(MPI.IN_PLACE if inplace else inp, out)
        elif coll == "broadcast":
            if not inplace and self.rank == root:
                out[:] = inp
            comm.Bcast(out, root)
        elif coll == "reduce":
            if self.rank == root:
                comm.Reduce(MPI.IN_PLACE if inplace else inp, out, mop, root)
            else:
                comm.Reduce(out if inplace else inp, None, mop, root)
        else:  # pragma: no cover
            raise ValueError(coll)
        if op == "avg" and (coll != "reduce" or self.rank == root):
            np.divide(out, self.world, out=out, casting="unsafe")

    def barrier(self) -> None:
        self.comm.Barrier()
