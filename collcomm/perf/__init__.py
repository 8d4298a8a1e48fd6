"""``collcomm-perf``: an nccl-tests-style microbenchmark (all_reduce_perf and friends) over collcomm.

::

    collcomm-perf allreduce -b 1K -e 64M -f 2 -np 4                 # 4 local ranks, 1 KiB .. 64 MiB
    collcomm-perf alltoall -b 4K -e 16M -f 4 -np 3 -d int32 --json a2a.json --plot a2a.png
    collcomm-perf reduce -o max -r 1 -np 4 --compare gloo           # and torch.distributed's gloo
    collcomm-perf -b 4K -e 64M -f 16 -np 2 --compare gloo,mpi       # and MPI (mpiexec starts the ranks)
    collcomm-perf -b 4K -e 64M -f 16 -np 4 --compare mpi-tcp         # and Open MPI over TCP
    collcomm run -n 4 collcomm-perf broadcast -b 1M -e 1M            # ranks started by another launcher

Collectives (positional or ``-C``): allreduce, allgather, reduce_scatter, broadcast, reduce,
alltoall. Flags as in nccl-tests: ``-b``/``-e`` min/max bytes (K, M, G = powers of 1024;
fractions such as 1.5M), ``-f`` step factor, ``-i`` step bytes (when ``-f`` is 1), ``-n``
iterations, ``-w`` warm-up iterations, ``-c`` check iterations (0: #wrong prints N/A), ``-o``
sum|prod|max|min|avg|all, ``-d`` int8 uint8 int32 uint32 int64 uint64 half float double
bfloat16 (needs torch) or all, ``-r`` root, ``-a`` 0 rank 0 / 1 average / 2 min / 3 max of the
ranks' times, ``-N`` repeat the sweep (0, forever, is refused: every run is bounded), ``-T``
seconds per collective call. Besides: ``-np`` ranks to launch, ``--algorithm``
forestcoll|ring|tree|halving_doubling (default: the planner's choice per size),
``--topology T.json`` (or ``probe``), ``--emulate T.json [--scale BW=RATE] [--prefix NAME]``
(network namespaces, exactly as ``collcomm run --emulate``: the fabric ``collcomm emulate up``
built under that prefix when it is the same, else one built for the run and removed after it),
``--compare gloo[,mpi|,mpi-tcp]`` (mpi: MPI's default transport, Open MPI's shared memory on
one machine; mpi-tcp: Open MPI's TCP transport, ``--mca pml ob1 --mca btl tcp,self``; either
starts the ranks with mpiexec; see :mod:`collcomm.perf.mpi` for the setup), ``--json FILE``,
``--plot IMAGE``.

The table is nccl-tests' (size, count, type, redop, root, then time (us), algbw, busbw (GB/s,
1e9 bytes) and #wrong out-of-place and in-place; root -1 and redop none where they do not
apply; see :mod:`collcomm.perf.collectives` for counts, bandwidth factors and what the
variants mean; the time is each rank's median iteration, combined by ``-a``: see
:mod:`collcomm.perf.sweep`), followed by ``# Out of bounds values : W OK|FAILED`` (wrong elements, all rows
and libraries) and ``# Avg bus bandwidth    : X`` (mean busbw of every row, out-of-place and
in-place). ``--compare LIB`` adds LIB's out-of-place and in-place columns, the ratio columns
collcomm busbw / LIB busbw, and ``# Avg bus bandwidth    : Y (LIB)``. Only the table reaches
stdout (rank 0 reports to the launching process, which prints it without rank prefixes). A
progress bar appears on stderr for sweeps that take more than a second, when stderr is a
terminal and ``--json`` is not given.

JSON (``--json FILE``, format ``collcomm.perf/1``)::

    {"format": "collcomm.perf/1",
     "config": {"collective", "dtype", "op", "minbytes", "maxbytes", "stepfactor", "stepbytes",
                "iters", "warmup_iters", "check_iters", "root", "average", "average_name",
                "repeat", "nprocs", "algorithm", "topology", "emulate", "scale", "prefix", "compare", "timeout",
                "argv", "world_size", "fabric", "libraries", "machine": {"hostname", "platform",
                "cpus", "python", "numpy", "torch"?}, "date"},
     "ranks": [{"rank", "pid", "host"}, ...],
     "rows": [{"size": bytes, "count": elements, "type": "float", "redop": "sum" | "none",
               "root": -1 | r,
               "out_of_place": {"time": us, "alg_bw": GB/s, "bus_bw": GB/s, "nwrong": int | null},
               "in_place": {... the same ...},
               "compare": {"gloo": {"out_of_place": {...}, "in_place": {...},
                                    "bus_bw_ratio": {"out_of_place": x | null, "in_place": x | null}}}
              }, ...],                      # "compare" only with --compare
     "avg_bus_bw": mean bus_bw over rows and both variants,
     "out_of_bounds": wrong elements in all,
     "compare_avg_bus_bw": {"gloo": ...}}  # only with --compare

``nwrong`` is null when ``-c 0``. ``config.algorithm`` is null when the planner chooses.
``config.scale`` and ``config.prefix`` are the emulated fabric's (defaults filled in), null
without ``--emulate``.

Exit status: 0; 1 when an element was wrong or a rank failed; 2 for bad input (one line on
stderr: ``collcomm-perf: error: ...``). ``COLLCOMM_PERF_CORRUPT=RANK[:INDEX[:LIBRARY]]`` is
a fault-injection hook for testing the checker (see :mod:`collcomm.perf.sweep`).
"""

from collcomm.perf.main import main

__all__ = ["main"]
