"""The process group behind the torch.distributed backend "collcomm" (registered by
:mod:`collcomm.integrations.torch`), and the backend's creator, :func:`create_process_group`.

* Every collective PyTorch dispatches for CPU tensors checks its arguments at the call (raising
  ValueError or TypeError there), then returns at once with a :class:`~.work.Work` and runs on the
  collcomm group in the group's lane (:mod:`.work`); point-to-point messages run in lanes of their
  own.
* Timeouts: the group's timeout (``init_process_group(timeout=...)``), or ``opts.timeout`` where
  set, bounds every operation inside the runtime.
* Types: reductions as :mod:`.reductions` allows; data movement (broadcast, gathers, scatters,
  all-to-all, send/recv) takes any dtype; non-contiguous tensors are copied to a contiguous buffer
  and back (:mod:`.tensors`). Uneven all-gathers and all-to-alls travel padded to the largest block.
"""

from __future__ import annotations

import itertools
import time

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as _c10d

import collcomm as cc
from collcomm import api
from collcomm.integrations.torch import rendezvous, timeouts
from collcomm.integrations.torch.errors import torch_error
from collcomm.integrations.torch.reductions import reduction, scale
from collcomm.integrations.torch.tensors import (check_cpu, contiguous, copy_back, move_view, reduce_view,
                                                 same_dtype, single)
from collcomm.integrations.torch.work import Lane, Work, p2p_lane


def _options(opts, cls):
    """The call's c10d options: ``cls()`` when none were given, one carrying the op when a bare
    ReduceOp was."""
    if opts is None:
        return cls()
    if isinstance(opts, (dist.ReduceOp, dist.ReduceOp.RedOpType)):
        o = cls()
        o.reduceOp = opts
        return o
    return opts


def create_process_group(store, group_rank: int, group_size: int, timeout) -> ProcessGroupCollcomm:
    """The backend's creator: ``(store, group_rank, group_size, timeout)`` -> a ProcessGroup."""
    seconds = timeouts.seconds(timeout, timeouts.DEFAULT_TIMEOUT)
    group, default = rendezvous.collcomm_group(store, group_rank, group_size, seconds)
    return ProcessGroupCollcomm(group, group_rank, group_size, seconds, default=default)


class ProcessGroupCollcomm(dist.ProcessGroup):
    """A torch.distributed process group whose collectives run on a collcomm group."""

    _ids = itertools.count()

    def __init__(self, group, rank: int, size: int, timeout: float, *, default: bool = False):
        super().__init__(rank, size)
        self._group = group
        self._members = list(group.members)
        self._timeout = float(timeout)
        self._default = default
        self._name = ""
        self._desc = ""
        self._closed = False
        self._lane = Lane(f"collcomm-torch-pg{next(self._ids)}")

    # ------------------------------------------------------------------ identity
    def getBackendName(self) -> str:
        return "collcomm"

    def name(self) -> str:
        return "collcomm"

    def _set_group_name(self, name: str) -> None:
        self._name = name
        try:
            super()._set_group_name(name)
        except Exception:  # noqa: BLE001 - older bindings
            pass

    def setGroupName(self, name: str) -> None:
        self._name = name

    def getGroupName(self) -> str:
        return self._name

    @property
    def group_name(self) -> str:
        return self._name

    def _set_group_desc(self, desc: str) -> None:
        self._desc = desc
        try:
            super()._set_group_desc(desc)
        except Exception:  # noqa: BLE001
            pass

    def setGroupDesc(self, desc: str) -> None:
        self._desc = desc

    def getGroupDesc(self) -> str:
        return self._desc

    @property
    def group_desc(self) -> str:
        return self._desc

    @property
    def collcomm_group(self):
        """The collcomm Group underneath (usable with the collcomm API)."""
        return self._group

    def __repr__(self) -> str:
        return f"ProcessGroupCollcomm(rank={self.rank()}, size={self.size()}, members={self._members})"

    # ------------------------------------------------------------------ running
    def _op_timeout(self, opts) -> float:
        return timeouts.seconds(getattr(opts, "timeout", None), self._timeout)

    def _submit(self, what: str, outputs: list, fn, lane: Lane | None = None) -> Work:
        if self._closed:
            raise RuntimeError(f"collcomm: {what} on a process group that was shut down")
        work = Work(what, outputs)

        def job():
            try:
                fn(work)
            except BaseException as e:  # noqa: BLE001 - every failure reaches the waiter
                error = torch_error(e, what, self)
                return lambda: work._fail(error)
            return work._complete

        (lane or self._lane).put(job)
        return work

    def _check_root(self, root: int, what: str) -> int:
        if not 0 <= root < self.size():
            raise ValueError(f"collcomm: {what}: root rank {root} is not in a group of size {self.size()}")
        return root

    def _check_peer(self, peer: int, what: str) -> int:
        if not 0 <= peer < self.size() or peer == self.rank():
            raise ValueError(f"collcomm: {what}: peer {peer} must be another rank of the group (size {self.size()})")
        return self._members[peer]

    def _max(self, value: int, timeout: float) -> int:
        """The maximum of ``value`` over the group (for padded uneven exchanges)."""
        x = torch.tensor([value], dtype=torch.int64)
        cc.allreduce(x, "max", group=self._group, timeout=timeout)
        return int(x[0])

    # ------------------------------------------------------------------ reductions
    def allreduce(self, tensors, opts=None):
        opts = _options(opts, _c10d.AllreduceOptions)
        t = single(tensors, "allreduce")
        name, factor = reduction(opts.reduceOp, t.dtype, "allreduce")
        timeout = self._op_timeout(opts)

        def run(_):
            work, orig = contiguous(t)
            if factor is not None:
                scale(work, factor)
            cc.allreduce(reduce_view(work), name, group=self._group, timeout=timeout)
            copy_back(work, orig)

        return self._submit("allreduce", [t], run)

    def allreduce_coalesced(self, tensors, opts=None):
        opts = _options(opts, _c10d.AllreduceCoalescedOptions)
        tensors = list(tensors)
        check_cpu(tensors, "allreduce_coalesced")
        for t in tensors:
            reduction(opts.reduceOp, t.dtype, "allreduce_coalesced")
        timeout = self._op_timeout(opts)

        def run(_):
            deadline = time.monotonic() + timeout
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for t in tensors:  # one flat buffer per dtype, in order of first appearance
                by_dtype.setdefault(t.dtype, []).append(t)
            for dtype, ts in by_dtype.items():
                name, factor = reduction(opts.reduceOp, dtype, "allreduce_coalesced")
                flat = torch.cat([t.detach().reshape(-1) for t in ts]) if ts else torch.empty(0, dtype=dtype)
                if factor is not None:
                    scale(flat, factor)
                cc.allreduce(reduce_view(flat), name, group=self._group,
                             timeout=max(deadline - time.monotonic(), 0.001))
                offset = 0
                for t in ts:
                    n = t.numel()
                    t.detach().copy_(flat[offset:offset + n].view(t.shape))
                    offset += n

        return self._submit("allreduce_coalesced", tensors, run)

    def reduce(self, tensors, opts=None):
        opts = _options(opts, _c10d.ReduceOptions)
        t = single(tensors, "reduce")
        root = self._check_root(opts.rootRank, "reduce")
        name, factor = reduction(opts.reduceOp, t.dtype, "reduce")
        timeout = self._op_timeout(opts)

        def run(_):
            work, orig = contiguous(t)
            if factor is not None:
                if self.rank() != root:
                    work, orig = work.clone(), None  # only the root's tensor changes
                scale(work, factor)
            cc.reduce(reduce_view(work), root, name, group=self._group, timeout=timeout)
            if self.rank() == root:
                copy_back(work, orig)

        return self._submit("reduce", [t], run)

    def _reduce_scatter_flat(self, out: torch.Tensor, flat_in: torch.Tensor, name: str, factor, timeout: float,
                             copied: bool) -> None:
        """``out`` = this rank's block of the reduction of ``flat_in`` (group size x out.numel())."""
        if factor is not None:
            flat_in = flat_in if copied else flat_in.clone()
            scale(flat_in, factor)
        work, orig = contiguous(out)
        cc.reduce_scatter(reduce_view(work), reduce_view(flat_in), name, group=self._group, timeout=timeout)
        copy_back(work, orig)

    def reduce_scatter(self, outputs, input_lists, opts=None):
        opts = _options(opts, _c10d.ReduceScatterOptions)
        out = single(outputs, "reduce_scatter")
        if len(input_lists) != 1 or len(input_lists[0]) != self.size():
            raise ValueError(f"collcomm: reduce_scatter needs one list of {self.size()} input tensors")
        ins = list(input_lists[0])
        check_cpu(ins, "reduce_scatter")
        same_dtype(ins, out.dtype, "reduce_scatter")
        name, factor = reduction(opts.reduceOp, out.dtype, "reduce_scatter")
        timeout = self._op_timeout(opts)
        even = all(i.numel() == out.numel() for i in ins)

        def run(_):
            flat = torch.cat([i.detach().reshape(-1) for i in ins])
            if even:
                self._reduce_scatter_flat(out, flat, name, factor, timeout, copied=True)
                return
            if factor is not None:  # uneven blocks: allreduce everything, keep this rank's block
                scale(flat, factor)
            cc.allreduce(reduce_view(flat), name, group=self._group, timeout=timeout)
            offset = sum(i.numel() for i in ins[:self.rank()])
            out.detach().copy_(flat[offset:offset + out.numel()].view(out.shape))

        return self._submit("reduce_scatter", [out], run)

    def _check_rs_single(self, out, inp, what):
        check_cpu([out, inp], what)
        same_dtype([inp], out.dtype, what)
        if inp.numel() != out.numel() * self.size():
            raise ValueError(f"collcomm: {what}: input has {inp.numel()} elements, needs group size "
                             f"{self.size()} x output's {out.numel()}")

    def reduce_scatter_single(self, output, input, opts=None):
        opts = _options(opts, _c10d.ReduceScatterOptions)
        self._check_rs_single(output, input, "reduce_scatter_tensor")
        name, factor = reduction(opts.reduceOp, output.dtype, "reduce_scatter_tensor")
        timeout = self._op_timeout(opts)

        def run(_):
            src, copied = contiguous(input)
            self._reduce_scatter_flat(output, src, name, factor, timeout, copied=copied is not None)

        return self._submit("reduce_scatter_tensor", [output], run)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        opts = _options(opts, _c10d.ReduceScatterOptions)
        outputs, inputs = list(outputs), list(inputs)
        if len(outputs) != len(inputs):
            raise ValueError(f"collcomm: reduce_scatter_tensor_coalesced: {len(outputs)} outputs, {len(inputs)} inputs")
        for o, i in zip(outputs, inputs):
            self._check_rs_single(o, i, "reduce_scatter_tensor_coalesced")
            reduction(opts.reduceOp, o.dtype, "reduce_scatter_tensor_coalesced")
        timeout = self._op_timeout(opts)

        def run(_):
            deadline = time.monotonic() + timeout
            for o, i in zip(outputs, inputs):
                name, factor = reduction(opts.reduceOp, o.dtype, "reduce_scatter_tensor_coalesced")
                src, copied = contiguous(i)
                self._reduce_scatter_flat(o, src, name, factor, max(deadline - time.monotonic(), 0.001),
                                          copied=copied is not None)

        return self._submit("reduce_scatter_tensor_coalesced", outputs, run)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    # ------------------------------------------------------------------ data movement
    def broadcast(self, tensors, opts=None):
        opts = _options(opts, _c10d.BroadcastOptions)
        t = single(tensors, "broadcast")
        root = self._check_root(opts.rootRank, "broadcast")
        timeout = self._op_timeout(opts)

        def run(_):
            work, orig = contiguous(t)
            cc.broadcast(move_view(work), root, group=self._group, timeout=timeout)
            copy_back(work, orig)

        return self._submit("broadcast", [t], run)

    def _gather_into(self, inp: torch.Tensor, sizes: list[int], timeout: float) -> tuple[torch.Tensor, int]:
        """Every rank's ``inp`` (rank r's holds sizes[r] elements) in one buffer, block r at r x block."""
        block = max(sizes) if sizes else 0
        src, _ = contiguous(inp)
        if inp.numel() != block:  # uneven: pad to the largest
            padded = torch.zeros(block, dtype=inp.dtype)
            padded[:inp.numel()] = src.reshape(-1)
            src = padded
        buf = torch.empty(block * self.size(), dtype=inp.dtype)
        cc.allgather(move_view(buf), move_view(src), group=self._group, timeout=timeout)
        return buf, block

    def allgather(self, output_lists, inputs, opts=None):
        opts = _options(opts, _c10d.AllgatherOptions)
        inp = single(inputs, "allgather")
        if len(output_lists) != 1 or len(output_lists[0]) != self.size():
            raise ValueError(f"collcomm: allgather needs one list of {self.size()} output tensors")
        outs = list(output_lists[0])
        check_cpu(outs, "allgather")
        same_dtype(outs, inp.dtype, "allgather")
        if outs[self.rank()].numel() != inp.numel():
            raise ValueError(f"collcomm: allgather: output {self.rank()} has {outs[self.rank()].numel()} elements, "
                             f"the input {inp.numel()}")
        timeout = self._op_timeout(opts)

        def run(_):
            sizes = [o.numel() for o in outs]
            buf, block = self._gather_into(inp, sizes, timeout)
            for r, o in enumerate(outs):
                o.detach().copy_(buf[r * block:r * block + sizes[r]].view(o.shape))

        return self._submit("allgather", outs, run)

    def _check_ag_single(self, out, inp, what):
        check_cpu([out, inp], what)
        same_dtype([inp], out.dtype, what)
        if out.numel() != inp.numel() * self.size():
            raise ValueError(f"collcomm: {what}: output has {out.numel()} elements, needs group size "
                             f"{self.size()} x input's {inp.numel()}")

    def _allgather_flat(self, out, inp, timeout):
        src, _ = contiguous(inp)
        work, orig = contiguous(out)
        cc.allgather(move_view(work), move_view(src), group=self._group, timeout=timeout)
        copy_back(work, orig)

    def all_gather_single(self, output, input, opts=None):
        opts = _options(opts, _c10d.AllgatherOptions)
        self._check_ag_single(output, input, "all_gather_into_tensor")
        timeout = self._op_timeout(opts)
        return self._submit("all_gather_into_tensor", [output],
                            lambda _: self._allgather_flat(output, input, timeout))

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        opts = _options(opts, _c10d.AllgatherOptions)
        outputs, inputs = list(outputs), list(inputs)
        if len(outputs) != len(inputs):
            raise ValueError(f"collcomm: all_gather_into_tensor_coalesced: {len(outputs)} outputs, "
                             f"{len(inputs)} inputs")
        for o, i in zip(outputs, inputs):
            self._check_ag_single(o, i, "all_gather_into_tensor_coalesced")
        timeout = self._op_timeout(opts)

        def run(_):
            deadline = time.monotonic() + timeout
            for o, i in zip(outputs, inputs):
                self._allgather_flat(o, i, max(deadline - time.monotonic(), 0.001))

        return self._submit("all_gather_into_tensor_coalesced", outputs, run)

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def allgather_coalesced(self, output_lists, inputs, opts=None):
        """output_lists[r][j] receives rank r's inputs[j]; travels as one byte buffer per rank."""
        opts = _options(opts, _c10d.AllgatherOptions)
        inputs = list(inputs)
        check_cpu(inputs, "allgather_coalesced")
        if len(output_lists) != self.size() or any(len(row) != len(inputs) for row in output_lists):
            raise ValueError(f"collcomm: allgather_coalesced needs {self.size()} output lists of {len(inputs)} "
                             "tensors each")
        for row in output_lists:
            check_cpu(row, "allgather_coalesced")
            for o, i in zip(row, inputs):
                if o.dtype != i.dtype:
                    raise TypeError(f"collcomm: allgather_coalesced: output dtype {o.dtype} for input {i.dtype}")
        timeout = self._op_timeout(opts)
        flat_outs = [o for row in output_lists for o in row]

        def nbytes(t):
            return t.numel() * t.element_size()

        def run(_):
            mine = torch.cat([contiguous(i)[0].reshape(-1).view(torch.uint8) for i in inputs]) if inputs else \
                torch.empty(0, dtype=torch.uint8)
            sizes = [sum(nbytes(o) for o in row) for row in output_lists]
            buf, block = self._gather_into(mine, sizes, timeout)
            for r, row in enumerate(output_lists):
                offset = r * block
                for o in row:
                    n = nbytes(o)
                    o.detach().copy_(buf[offset:offset + n].view(o.dtype).view(o.shape))
                    offset += n

        return self._submit("allgather_coalesced", flat_outs, run)

    def _root_list(self, lists, root: int, mine: torch.Tensor, what: str, role: str, other: str) -> list:
        """The root's list of one tensor per rank for gather (outputs) or scatter (inputs),
        checked against this rank's own tensor ``mine``; [] on the other ranks."""
        if self.rank() != root:
            if lists and any(len(row) for row in lists):
                raise ValueError(f"collcomm: {what}: only the root passes {role} tensors")
            return []
        if len(lists) != 1 or len(lists[0]) != self.size():
            raise ValueError(f"collcomm: {what} needs one list of {self.size()} {role} tensors on the root")
        tensors = list(lists[0])
        check_cpu(tensors, what)
        same_dtype(tensors, mine.dtype, what)
        for t in tensors:
            if t.numel() != mine.numel():
                raise ValueError(f"collcomm: {what}: {role} tensors must have the {other}'s {mine.numel()} elements, "
                                 f"got {t.numel()}")
        return tensors

    def gather(self, output_lists, inputs, opts=None):
        opts = _options(opts, _c10d.GatherOptions)
        inp = single(inputs, "gather")
        root = self._check_root(opts.rootRank, "gather")
        outs = self._root_list(output_lists, root, inp, "gather", "output", "input")
        timeout = self._op_timeout(opts)

        def run(_):
            buf, block = self._gather_into(inp, [inp.numel()] * self.size(), timeout)
            for r, o in enumerate(outs):
                o.detach().copy_(buf[r * block:(r + 1) * block].view(o.shape))

        return self._submit("gather", outs, run)

    def scatter(self, outputs, input_lists, opts=None):
        opts = _options(opts, _c10d.ScatterOptions)
        out = single(outputs, "scatter")
        root = self._check_root(opts.rootRank, "scatter")
        ins = self._root_list(input_lists, root, out, "scatter", "input", "output")
        timeout = self._op_timeout(opts)

        def run(_):
            m = out.numel()
            buf = torch.cat([i.detach().reshape(-1) for i in ins]) if ins else \
                torch.empty(m * self.size(), dtype=out.dtype)
            cc.broadcast(move_view(buf), root, group=self._group, timeout=timeout)
            me = self.rank()
            out.detach().copy_(buf[me * m:(me + 1) * m].view(out.shape))

        return self._submit("scatter", [out], run)

    def _alltoall_padded(self, blocks_in: list[torch.Tensor], sizes_out: list[int], dtype: torch.dtype,
                         timeout: float) -> tuple[torch.Tensor, int]:
        """Block j of ``blocks_in`` (1-D) goes to group rank j; every block padded to the group's largest.
        Returns (received buffer, block size): rank j's block starts at j x block."""
        deadline = time.monotonic() + timeout
        n = self.size()
        block = self._max(max([b.numel() for b in blocks_in] + sizes_out + [0]), timeout)
        send = torch.zeros(n * block, dtype=dtype)
        for j, b in enumerate(blocks_in):
            send[j * block:j * block + b.numel()] = b
        recv = torch.empty(n * block, dtype=dtype)
        if block:
            cc.alltoall(move_view(recv), move_view(send), group=self._group,
                        timeout=max(deadline - time.monotonic(), 0.001))
        return recv, block

    def alltoall(self, output_tensors, input_tensors, opts=None):
        opts = _options(opts, _c10d.AllToAllOptions)
        outs, ins = list(output_tensors), list(input_tensors)
        n = self.size()
        if len(outs) != n or len(ins) != n:
            raise ValueError(f"collcomm: alltoall needs {n} input and {n} output tensors")
        check_cpu(outs + ins, "alltoall")
        same_dtype(outs + ins, ins[0].dtype, "alltoall")
        timeout = self._op_timeout(opts)

        def run(_):
            blocks = [contiguous(i)[0].reshape(-1) for i in ins]
            recv, block = self._alltoall_padded(blocks, [o.numel() for o in outs], ins[0].dtype, timeout)
            for j, o in enumerate(outs):
                o.detach().copy_(recv[j * block:j * block + o.numel()].view(o.shape))

        return self._submit("alltoall", outs, run)

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, opts=None):
        opts = _options(opts, _c10d.AllToAllOptions)
        check_cpu([output, input], "all_to_all_single")
        same_dtype([input], output.dtype, "all_to_all_single")
        n = self.size()
        out_splits, in_splits = list(output_split_sizes or []), list(input_split_sizes or [])
        timeout = self._op_timeout(opts)
        if not out_splits and not in_splits:
            if input.numel() != output.numel() or input.numel() % n:
                raise ValueError(f"collcomm: all_to_all_single: input ({input.numel()} elements) and output "
                                 f"({output.numel()}) must be equal and divisible by the group size {n}")

            def even(_):
                src, _ = contiguous(input)
                work, orig = contiguous(output)
                cc.alltoall(move_view(work), move_view(src), group=self._group, timeout=timeout)
                copy_back(work, orig)

            return self._submit("all_to_all_single", [output], even)

        def splits(given, t, what):
            rows = t.shape[0] if t.dim() else 1
            if not given:
                if rows % n:
                    raise ValueError(f"collcomm: all_to_all_single: {what} has {rows} rows, not divisible by {n}")
                return [rows // n] * n
            if len(given) != n or sum(given) != rows or min(given) < 0:
                raise ValueError(f"collcomm: all_to_all_single: {what} split sizes {given} do not split {rows} rows "
                                 f"into {n} parts")
            return [int(s) for s in given]

        in_splits, out_splits = splits(in_splits, input, "input"), splits(out_splits, output, "output")
        row_in = input.numel() // max(input.shape[0], 1) if input.dim() else 1
        row_out = output.numel() // max(output.shape[0], 1) if output.dim() else 1
        if input.dim() and output.dim() and input.shape[1:] != output.shape[1:]:
            raise ValueError(f"collcomm: all_to_all_single: input rows {tuple(input.shape[1:])} and output rows "
                             f"{tuple(output.shape[1:])} differ")

        def uneven(_):
            src = contiguous(input)[0].reshape(-1)
            blocks, offset = [], 0
            for s in in_splits:
                blocks.append(src[offset:offset + s * row_in])
                offset += s * row_in
            recv, block = self._alltoall_padded(blocks, [s * row_out for s in out_splits], input.dtype, timeout)
            work, orig = contiguous(output)
            flat, offset = work.reshape(-1), 0
            for j, s in enumerate(out_splits):
                flat[offset:offset + s * row_out] = recv[j * block:j * block + s * row_out]
                offset += s * row_out
            copy_back(work, orig)

        return self._submit("all_to_all_single", [output], uneven)

    alltoall_base = all_to_all_single

    def barrier(self, opts=None):
        opts = _options(opts, _c10d.BarrierOptions)
        timeout = self._op_timeout(opts)
        return self._submit("barrier", [], lambda _: cc.barrier(group=self._group, timeout=timeout))

    # ------------------------------------------------------------------ point to point
    def send(self, tensors, dstRank: int, tag: int = 0):
        t = single(tensors, "send")
        dst = self._check_peer(dstRank, "send")
        timeout = self._timeout

        def run(_):
            work, _ = contiguous(t)
            cc.send(move_view(work), dst, tag=tag, timeout=timeout)

        return self._submit("send", [t], run, lane=p2p_lane("send", dst))

    def recv(self, tensors, srcRank: int, tag: int = 0):
        t = single(tensors, "recv")
        src = self._check_peer(srcRank, "recv")
        timeout = self._timeout

        def run(work_handle):
            work, orig = contiguous(t)
            cc.recv(move_view(work), src, tag=tag, timeout=timeout)
            copy_back(work, orig)
            work_handle._source = srcRank

        return self._submit("recv", [t], run, lane=p2p_lane("recv", src))

    def recv_anysource(self, tensors, tag: int = 0):
        t = single(tensors, "recv_anysource")
        peers = [(r, self._members[r]) for r in range(self.size()) if r != self.rank()]
        timeout = self._timeout

        def run(work_handle):
            from collcomm.runtime.p2p import recv_any

            work, orig = contiguous(t)
            world_src = recv_any(api.runtime(), move_view(work), [g for _, g in peers], tag, timeout)
            copy_back(work, orig)
            work_handle._source = self._members.index(world_src)

        return self._submit("recv_anysource", [t], run, lane=p2p_lane("recv", -1))

    # ------------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        """Called by destroy_process_group: stop the lane; the default group also leaves the collcomm
        job when this module joined it."""
        if self._closed:
            return
        self._closed = True
        self._lane.close()
        if self._default:
            rendezvous.leave()

    def abort(self) -> None:
        self.shutdown()
