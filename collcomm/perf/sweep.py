"""The sweep inside each rank: for every type, reduction and size, time and check each variant of
each library, combine the ranks' times, and (rank 0) report a row.

Per size, library and variant (out-of-place, then in-place), as nccl-tests does: one untimed
operation, a barrier, then ``-n`` timed operations back to back. Unlike nccl-tests (elapsed / n)
each operation is timed on its own and a rank's time is their median: on a machine shared with
other work, or with more ranks than cores, one preempted iteration moves a mean of 20 by several
per cent and a median not at all (bench/plain_gloo.py and bench/plain_mpi.py time each library
alone the same way; bench/peers_harness_check.py compares). The ranks' times are combined by
``-a`` (an allreduce of the times: average, min or max; or rank 0's own). Then ``-c`` check
iterations on patterned data (see collectives.py), for every library alike; #wrong is the
number of wrong elements summed over the check iterations and the ranks. Libraries alternate
per size, the compared ones first and collcomm last. ``-w`` warm-up operations run at the largest and the smallest size first.

Fault injection (for testing the checker): ``COLLCOMM_PERF_CORRUPT=RANK[:INDEX[:LIBRARY]]`` makes
rank RANK flip the lowest bit of element INDEX (default 0, modulo the output size) of every
result of LIBRARY (default collcomm; or a compared one: gloo, mpi, mpi-tcp) it checks, after the
operation and before the comparison; #wrong then counts it.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import sys
import time
from typing import Callable

import numpy as np

from collcomm.perf import collectives as C
from collcomm.perf.libraries import make
from collcomm.perf.library import Library
from collcomm.perf.options import Options, UsageError, check_world

CORRUPT_ENV = "COLLCOMM_PERF_CORRUPT"
VARIANTS = (("out_of_place", False), ("in_place", True))


def corruption(me: int) -> tuple[int, str] | None:
    """The element index this rank corrupts and the library whose results it corrupts, or None."""
    raw = os.environ.get(CORRUPT_ENV, "").strip()
    if not raw:
        return None
    rank, _, rest = raw.partition(":")
    index, _, library = rest.partition(":")
    try:
        rank_i, index_i = int(rank), int(index or 0)
    except ValueError:
        raise UsageError(f"{CORRUPT_ENV}={raw!r}: expected RANK, RANK:INDEX or RANK:INDEX:LIBRARY") from None
    return (index_i, library.strip().lower() or "collcomm") if rank_i == me else None


def machine() -> dict:
    import numpy

    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "numpy": numpy.__version__}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
    return info


class Sweep:
    def __init__(self, opts: Options, libs: list[Library], me: int, n: int):
        self.opts, self.libs, self.me, self.n = opts, libs, me, n
        self.coll = opts.collective
        self.corrupt_at = corruption(me)
        import collcomm

        self.cc = collcomm

    # ------------------------------------------------------------------ one library, one variant
    def _buffers(self, lay: C.Layout, dtype: str, op: str) -> tuple[np.ndarray, np.ndarray]:
        return C.neutral(dtype, op, lay.send), C.neutral(dtype, op, lay.recv)

    def _time(self, lib: Library, inplace: bool, dtype: str, op: str, send, recv) -> float:
        o = self.opts
        ws, wr = lib.wrap(send, dtype), lib.wrap(recv, dtype)
        inp, out = C.views(self.coll, inplace, ws, wr, self.me, self.n)
        lib.run(self.coll, inplace, inp, out, op, o.root)
        lib.barrier()
        times = []
        for _ in range(o.iters):
            start = time.perf_counter()
            lib.run(self.coll, inplace, inp, out, op, o.root)
            times.append(time.perf_counter() - start)
        lib.barrier()  # the end of the library's turn (see Library.barrier)
        return statistics.median(times)

    def _check(self, lib: Library, inplace: bool, dtype: str, op: str, send, recv, mine, want) -> int:
        o, coll, me = self.opts, self.coll, self.me
        inp, out = C.views(coll, inplace, lib.wrap(send, dtype), lib.wrap(recv, dtype), me, self.n)
        np_inp, np_out = C.views(coll, inplace, send, recv, me, self.n)
        bad_want = C.flipped(want) if want is not None else None
        wrong = 0
        for _ in range(o.check):
            if bad_want is not None:
                np_out[:] = bad_want
            if C.input_used(coll, me, o.root):
                np_inp[:] = mine
            lib.run(coll, inplace, inp, out, op, o.root)
            if want is None:
                continue
            if self.corrupt_at is not None and lib.name == self.corrupt_at[1]:
                C.corrupt(np_out, self.corrupt_at[0])
            wrong += C.count_wrong(np_out, want)
        lib.barrier()
        return wrong

    # ------------------------------------------------------------------ sizes
    def warmup(self, dtype: str, op: str) -> None:
        sizes = self.opts.sizes
        if not self.opts.warmup or not sizes:
            return
        for nbytes in dict.fromkeys((max(sizes), min(sizes))):
            lay = C.layout(self.coll, nbytes, dtype, self.n)
            for lib in self.libs:
                send, recv = self._buffers(lay, dtype, op)
                inp, out = C.views(self.coll, False, lib.wrap(send, dtype), lib.wrap(recv, dtype), self.me, self.n)
                for _ in range(self.opts.warmup):
                    lib.run(self.coll, False, inp, out, op, self.opts.root)
                lib.barrier()

    def measure(self, nbytes: int, dtype: str, op: str) -> dict:
        o, coll, me, n = self.opts, self.coll, self.me, self.n
        lay = C.layout(coll, nbytes, dtype, n)
        mine = want = None
        if o.check:
            mine = C.pattern(dtype, op, me, lay.send, 0, n)
            want = C.expected(coll, dtype, op, me, n, o.root, lay)
        # The compared libraries take their turn before collcomm's at each size, so whatever a
        # turn leaves behind (caches, pages, threads) falls on collcomm, not on the peer it is
        # compared with (bench/RESULTS.md, issue 16: gloo x4 reads 0.75-0.89 of its plain script
        # in the harness either way; the cause is not found).
        times, wrongs = [0.0] * (2 * len(self.libs)), [0] * (2 * len(self.libs))
        for li in [*range(1, len(self.libs)), 0]:
            lib = self.libs[li]
            for vi, (_, inplace) in enumerate(VARIANTS):
                send, recv = self._buffers(lay, dtype, op)
                times[2 * li + vi] = self._time(lib, inplace, dtype, op, send, recv)
                wrongs[2 * li + vi] = self._check(lib, inplace, dtype, op, send, recv, mine, want) if o.check else 0
        t = np.array(times, np.float64)
        if o.average:
            self.cc.allreduce(t, {1: "avg", 2: "min", 3: "max"}[o.average])
        w = np.array(wrongs, np.int64)
        if o.check:
            self.cc.allreduce(w, "sum")
        factor = C.busbw_factor(coll, n)

        def side(i: int) -> dict:
            sec = float(t[i])
            alg = lay.size / sec / 1e9 if sec > 0 else 0.0
            return {"time": sec * 1e6, "alg_bw": alg, "bus_bw": alg * factor,
                    "nwrong": int(w[i]) if o.check else None}

        row = {"size": lay.size, "count": lay.count, "type": dtype, "redop": op, "root": C.root_of(coll, o.root),
               "out_of_place": side(0), "in_place": side(1)}
        if len(self.libs) > 1:
            row["compare"] = {}
            for k, lib in enumerate(self.libs[1:], start=1):
                entry = {v: side(2 * k + j) for j, (v, _) in enumerate(VARIANTS)}
                entry["bus_bw_ratio"] = {v: (row[v]["bus_bw"] / entry[v]["bus_bw"] if entry[v]["bus_bw"] else None)
                                         for v, _ in VARIANTS}
                row["compare"][lib.name] = entry
        return row


def run(opts: Options, emit: Callable[[dict], None] | None) -> None:
    """The rank's whole job: join, sweep, report through ``emit`` (rank 0), leave."""
    import collcomm as cc

    if os.environ.get("COLLCOMM_PERF_RANK_FROM_MPI"):
        from collcomm.perf.mpi import rank_from_mpi

        rank_from_mpi()
    cc.init(timeout=opts.timeout, topology=opts.topology, algorithm=opts.algorithm)
    libs: list[Library] = []
    try:
        me, n = cc.rank(), cc.world_size()
        check_world(opts, n)
        libs.append(make("collcomm", me, n, opts))
        for name in opts.compare:
            libs.append(make(name, me, n, opts))
        pids = np.zeros(n, np.int64)
        cc.allgather(pids, np.array([os.getpid()], np.int64))
        rt = cc.api.runtime()
        if me == 0 and emit is not None:
            emit({"event": "start", "config": opts.as_dict(), "world_size": n,
                  "algorithm": opts.algorithm or "planner's choice per size", "fabric": rt.world.planner.topo.name,
                  "libraries": [lib.name for lib in libs], "machine": machine(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "ranks": [{"rank": r, "pid": int(pids[r]), "host": rt.hostnames[r]} for r in range(n)],
                  "rows_total": opts.repeat * len(opts.combos()) * len(opts.sizes)})
        sweep = Sweep(opts, libs, me, n)
        for _ in range(opts.repeat):
            for dtype, op in opts.combos():
                sweep.warmup(dtype, op)
                for nbytes in opts.sizes:
                    row = sweep.measure(nbytes, dtype, op)
                    if me == 0 and emit is not None:
                        emit({"event": "row", "row": row})
        if me == 0 and emit is not None:
            emit({"event": "end"})
    finally:
        for lib in reversed(libs[1:]):
            lib.close()
        cc.shutdown()
