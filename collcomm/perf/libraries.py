"""The libraries a sweep can run, by name: collcomm itself, and the ones ``--compare`` adds (gloo,
mpi, mpi-tcp). Each lives in its own module on :class:`collcomm.perf.library.Library`; only this
registry knows them all."""

from __future__ import annotations

from collcomm.perf.collcomm_library import Collcomm
from collcomm.perf.gloo import Gloo
from collcomm.perf.library import Library
from collcomm.perf.mpi import Mpi


def make(name: str, rank: int, world: int, options) -> Library:
    """The library ``name`` ready to run (a compared library joins its own process group here)."""
    if name == "collcomm":
        return Collcomm(rank, world)
    if name == "gloo":
        return Gloo(rank, world, timeout=options.timeout)
    if name in ("mpi", "mpi-tcp"):  # one library; mpiexec's flags chose the transport
        return Mpi(rank, world, name)
    raise ValueError(f"unknown library {name!r}")
