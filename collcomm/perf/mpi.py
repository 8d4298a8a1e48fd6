"""MPI (mpi4py) as a compared library: ``--compare mpi`` runs it over MPI's default transport
(Open MPI on one machine: its shared-memory BTL, vader), ``--compare mpi-tcp`` over Open MPI's
TCP transport (``mpiexec --mca pml ob1 --mca btl tcp,self``: ob1 is the PML that uses BTLs, so
the choice holds even where UCX would otherwise be picked).

Setup, once per machine (the ``mpi`` extra of pyproject.toml)::

    apt-get install -y openmpi-bin libopenmpi-dev     # the system Open MPI: mpiexec and libmpi
    pip install mpi4py                                 # into collcomm's environment

How it runs: MPI ranks must be started by MPI, so the launching process starts a collcomm
coordinator and runs ``mpiexec -n N FLAGS python -m collcomm.perf ...`` (:func:`mpiexec_command`)
instead of collcomm's launcher; each rank takes its collcomm rank from ``MPI.COMM_WORLD``
(:func:`rank_from_mpi`) and joins collcomm through the coordinator, so the libraries run in the
same processes, one after the other per size. mpiexec's other defaults stay as a plain ``mpiexec``
has them, so MPI measures here as it does alone (bench/peers_harness_check.py): Open MPI binds a
job of 2 ranks one rank to a core (more ranks: to a socket; oversubscribed: not at all), and so
binds that rank's collcomm and gloo threads too. MPI has real out-of-place allreduce and reduce,
so its out-of-place variant does not copy; avg is SUM then a division (timed); MPI has no half or
bfloat16 (refused on the command line).

Open MPI 4.1's AVX reductions (its ``op/avx`` component) saturate int8 and uint8 sums instead of
wrapping them (open-mpi/ompi#8045): ``-d int8 -o sum`` (and uint8, and ``-d all``) count #wrong for
MPI once a sum leaves the type's range, which the check data do; ``OMPI_MCA_op=^avx`` in the
environment turns that component off and the sums wrap.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import numpy as np

from collcomm.perf.library import Library

RANK_FROM_MPI = "COLLCOMM_PERF_RANK_FROM_MPI"  # set by the launching process for mpiexec'd ranks
TCP_FLAGS = ("--mca", "pml", "ob1", "--mca", "btl", "tcp,self")  # --compare mpi-tcp (Open MPI)


def mpiexec() -> str | None:
    """The launcher's name as found on PATH, run by that name as a user types it: Open MPI's takes
    the directory of an absolute argv[0] as its installation prefix, and fails when that is /bin."""
    return next((name for name in ("mpiexec", "mpirun") if shutil.which(name)), None)


@functools.lru_cache(maxsize=None)
def mpiexec_flavour() -> str:
    """"openmpi", "mpich", or what ``mpiexec --version`` says first (its flags differ by MPI)."""
    path = mpiexec()
    if path is None:
        return "missing"
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"unusable ({e})"
    if "Open MPI" in text or "OpenRTE" in text or "open-mpi.org" in text:
        return "openmpi"
    if "HYDRA" in text.upper() or "MPICH" in text.upper():
        return "mpich"
    first = text.strip().splitlines()[0] if text.strip() else "unknown"
    return f"an unknown MPI ({first!r})"


def mpiexec_command(library: str, nprocs: int) -> tuple[list[str], dict[str, str]]:
    """The mpiexec command line (before the program) and the environment it needs for ``library``
    (mpi or mpi-tcp) with ``nprocs`` ranks on this machine.

    Open MPI: as root it refuses to start unless OMPI_ALLOW_RUN_AS_ROOT and its _CONFIRM say so
    (set only when this process is root); more ranks than cores need ``--oversubscribe`` (it
    refuses otherwise), which also makes its waits yield the core (mpi_yield_when_idle) instead of
    spinning against the rank that is computing. MPICH's Hydra needs none of that."""
    path = mpiexec()
    if path is None:
        raise FileNotFoundError("no mpiexec or mpirun on PATH")
    argv, env = [path, "-n", str(nprocs)], {}
    if mpiexec_flavour() == "openmpi":
        if nprocs > (os.cpu_count() or 1):
            argv.append("--oversubscribe")
        if os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        if library == "mpi-tcp":
            argv += TCP_FLAGS
    return argv, env


def rank_from_mpi() -> None:
    """In a rank started by mpiexec: take COLLCOMM_RANK from MPI before collcomm.init()."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    os.environ["COLLCOMM_RANK"] = str(comm.Get_rank())
    os.environ.setdefault("COLLCOMM_WORLD_SIZE", str(comm.Get_size()))


class Mpi(Library):
    name = "mpi"  # or "mpi-tcp": the same calls, another transport (chosen by mpiexec's flags)

    def __init__(self, rank: int, world: int, name: str = "mpi"):
        super().__init__(rank, world)
        from mpi4py import MPI

        self.name = name
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        if self.comm.Get_size() != world or self.comm.Get_rank() != rank:
            raise RuntimeError(f"--compare {name}: MPI rank {self.comm.Get_rank()} of {self.comm.Get_size()} is not "
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

    def close(self) -> None:
        """A barrier, then MPI_Finalize. Finalize here because a rank that imported torch leaves with
        os._exit (collcomm/perf/main.py), which skips mpi4py's finalization at exit, and Open MPI's
        mpiexec fails a job whose rank exits without it. The barrier first because mpi4py's
        Finalize holds the GIL while it waits for the other ranks (its Barrier releases it): a rank
        whose last collcomm allreduce returned while its frame to a slower peer still sat in
        collcomm's sender thread would stop that thread, the peer would never finish the allreduce
        nor reach Finalize, and both hung (4 ranks on 2 busy cores, about one run in four). In the
        barrier the sender thread runs, and every rank is past its last collcomm operation."""
        if not self.MPI.Is_finalized():
            self.comm.Barrier()
            self.MPI.Finalize()
