"""torch.distributed's gloo backend as a compared library (``--compare gloo``).

The ranks that run collcomm also join a gloo process group, so both libraries run in the same
processes, alternately per size. Rendezvous: rank 0 opens a torch TCPStore on a port the
kernel picks (no race for a "free" port) at the address its collcomm peers reach it on, and
tells the others through a collcomm broadcast. gloo has no AVG: avg is SUM then a division,
timed. torch's allreduce, broadcast and reduce are in place; their out-of-place variant copies
first (timed), like collcomm's. all_to_all_single is not correct in place on gloo, so its
in-place variant copies the input first (timed).
"""

from __future__ import annotations

import datetime
import os

import numpy as np

from collcomm.perf.library import Library, as_bfloat16

_ADDRESS_BYTES = 256


class Gloo(Library):
    name = "gloo"

    def __init__(self, rank: int, world: int, timeout: float | None = None):
        super().__init__(rank, world)
        import torch
        import torch.distributed as dist

        import collcomm as cc
        from collcomm.api import runtime

        self.torch, self.dist = torch, dist
        wait = datetime.timedelta(seconds=timeout or runtime().timeout)
        address = np.zeros(_ADDRESS_BYTES, np.uint8)
        store = None
        if rank == 0:
            host = runtime().transport.address.partition("#@")[0].rpartition(":")[0] or "127.0.0.1"
            store = dist.TCPStore(host, 0, world, is_master=True, timeout=wait, wait_for_workers=False)
            text = f"{host}:{store.port}".encode()
            address[:len(text)] = np.frombuffer(text, np.uint8)
        cc.broadcast(address, root=0)
        host, _, port = address.tobytes().rstrip(b"\0").decode().rpartition(":")
        if store is None:
            store = dist.TCPStore(host, int(port), world, is_master=False, timeout=wait)
        if host.startswith("127.") and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo would otherwise bind the hostname's address
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=wait)
        self._store = store
        R = dist.ReduceOp
        self.ops = {"sum": R.SUM, "avg": R.SUM, "prod": R.PRODUCT, "min": R.MIN, "max": R.MAX}
        # torch 2.8+ names; the older ones warn that they are deprecated
        self.allgather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    def wrap(self, arr: np.ndarray, dtype: str):
        return as_bfloat16(arr) if dtype == "bfloat16" else self.torch.from_numpy(arr)

    def run(self, coll: str, inplace: bool, inp, out, op: str, root: int) -> None:
        dist = self.dist
        if coll == "allreduce":
            if not inplace:
                out.copy_(inp)
            dist.all_reduce(out, self.ops[op])
        elif coll == "allgather":
            self.allgather(out, inp)
        elif coll == "reduce_scatter":
            self.reduce_scatter(out, inp, self.ops[op])
        elif coll == "alltoall":
            # all_to_all_single(x, x) on gloo overwrites blocks before it sends them (this tool's check
            # counts thousands of wrong elements with 3 ranks): in place means a copy first, timed.
            dist.all_to_all_single(out, inp.clone() if inplace else inp)
        elif coll == "broadcast":
            if not inplace and self.rank == root:
                out.copy_(inp)
            dist.broadcast(out, root)
        elif coll == "reduce":
            if not inplace:
                out.copy_(inp)
            dist.reduce(out, root, self.ops[op])
        else:  # pragma: no cover
            raise ValueError(coll)
        if op == "avg" and (coll != "reduce" or self.rank == root):
            out.div_(self.world)

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        try:
            self.dist.destroy_process_group()
        except Exception:  # already gone with a failed peer
            pass
