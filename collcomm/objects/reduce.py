"""Reduce on arrival: the root of ``reduce_objects``, placing inputs on chains as they become ready.

The shape (:func:`chain_count`) comes from the object size against the bandwidth-latency product
(Hoplite's rule): inputs of ``size`` bytes form chains of ``ceil(size / BL)`` inputs, so a large
object goes down one chain (every link carries it once, pipelined) and small ones down a shallow
tree whose leaves are chains (latency dominates). Inputs fill slots in the order they become
ready (the ``i``-th ready input goes to chain ``i % m``): the first input of a chain is read as
it is; each later one gets a *stage* on its holder (:mod:`collcomm.objects.stage`) that pulls the
partial sum before it, adds its own object and streams the sum on, while inputs are still
arriving. The caller (the root) pulls the chains' tails, adds what it holds itself (and inputs
small enough to live in the directory), and fills ``out_key``, which is published as a partial
copy from the first byte: a ``get(out_key)`` elsewhere pipelines behind the reduction.

Faults: when a holder dies, the failure travels down its chain to the root naming the rank; the
root cuts the chain there, keeps the stages before it (their partial sums stand), puts a spare
input (or the next one to become ready) in the dead input's place, re-stages the inputs after it
and restarts its own sum (readers of ``out_key`` start again from byte 0). Objects of at most
the directory's inline size are reduced at the root from the directory (a star).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from collcomm.coordinator.objects import Info, Meta
from collcomm.errors import CollectiveError, CollectiveTimeout, MismatchError, ObjectLost
from collcomm.objects import wire
from collcomm.objects.pull import UpstreamFailed
from collcomm.objects.stage import Combiner, Stages, Upstream
from collcomm.objects.store import PRIMARY, Copy
from collcomm.runtime.buffers import REDUCTIONS, Buffer, check_reduction, numpy_dtype

log = logging.getLogger("collcomm.objects")

BL_BYTES = 1 << 20  # bandwidth x latency (Hoplite: ~1.3 GB/s x 750 us); above it chains win
_ids = itertools.count()


def chain_count(size: int, inputs: int, bl_bytes: int = BL_BYTES) -> int:
    """How many chains ``inputs`` objects of ``size`` bytes are reduced along (pure)."""
    if inputs <= 1:
        return 1
    length = max(1, min(inputs, math.ceil(size / max(1, bl_bytes))))
    return math.ceil(inputs / length)


@dataclass
class Slot:
    key: str
    rank: int
    address: str
    name: str  # what the next stage pulls: the key itself (first of a chain) or a stage's output


class Reduction:
    """One ``reduce_objects`` call at its root (this process)."""

    def __init__(self, layer, keys: list[str], out_key: str, op: str, num_required: int | None, timeout: float):
        if isinstance(keys, str) or not keys:
            raise ValueError("reduce_objects needs a non-empty list of keys")
        keys = list(keys)
        if len(set(keys)) != len(keys):
            raise ValueError(f"reduce_objects: keys repeat in {keys[:8]}")
        if out_key in keys:
            raise ValueError(f"reduce_objects: out_key '{out_key}' is also an input")
        if op not in REDUCTIONS:
            raise ValueError(f"unknown reduction {op!r}; choose one of {', '.join(REDUCTIONS)}")
        k = len(keys) if num_required is None else int(num_required)
        if not 1 <= k <= len(keys):
            raise ValueError(f"num_required={num_required} must be between 1 and {len(keys)}")
        self.layer, self.keys, self.out_key, self.op, self.k = layer, keys, out_key, op, k
        self.deadline = time.monotonic() + timeout
        self.id = f"{layer.rank}.{os.getpid()}.{next(_ids)}"
        self.infos: dict[str, Info] = {}
        self.order: list[str] = []          # keys in the order they became ready
        self.used: list[str] = []           # inputs placed, in that order
        self.lost: set[str] = set()
        self.dead: set[int] = set()
        self.chains: list[list[Slot]] = []
        self.at_root: list[str] = []        # inputs the root adds itself
        self.meta: Meta | None = None
        self.out: Copy | None = None
        self.stages: list[Slot] = []        # every stage started (to drop at the end)
        self._stage_no = itertools.count()

    # ------------------------------------------------------------------ the whole call
    def run(self) -> list[str]:
        try:
            self._gather()
            if self.meta.size <= self.layer.inline_limit:
                self._reduce_small()
            else:
                self._reduce_streaming()
            return list(self.used)
        except BaseException as e:
            self._abandon(e)
            raise
        finally:
            self._drop_stages()

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CollectiveTimeout(f"reduce_objects into '{self.out_key}': {len(self.used)} of {self.k} inputs "
                                    f"placed when its timeout passed")
        return left

    def _gather(self) -> None:
        """Place inputs as they become ready until ``k`` are (again, after a repair)."""
        while len(self.used) < self.k:
            spare = [key for key in self.order if key not in self.used and self._usable(key)]
            if spare:
                self._place(spare[0])
                continue
            if len(self.order) == len(self.keys):
                missing = sorted(self.lost) or [k for k in self.order if not self._usable(k)] or ["?"]
                raise ObjectLost(f"reduce_objects into '{self.out_key}': input '{missing[0]}' was lost with its "
                                 f"holder and no spare input is left ({len(self.used)} of {self.k} usable)",
                                 missing[0])
            ready = self.layer.client.object_ready(self.keys, known=len(self.order), timeout=self._left())
            for info in ready:
                if info.key not in self.infos:
                    self._check_meta(info)
                    self.infos[info.key] = info
                    self.order.append(info.key)

    def _check_meta(self, info: Info) -> None:
        if self.meta is None:
            dtype = info.meta.dtype
            try:
                check_reduction(self.op, Buffer(np.empty(0, numpy_dtype(dtype)), dtype))
            except (TypeError, ValueError) as e:
                raise type(e)(f"reduce_objects: object '{info.key}': {e}") from None
            self.meta = info.meta
            if self.meta.size > self.layer.inline_limit:
                self._publish()
            return
        m = self.meta
        if info.meta.size != m.size or info.meta.dtype != m.dtype:
            first = self.order[0] if self.order else "?"
            raise MismatchError(f"reduce_objects: object '{info.key}' ({info.meta.size} bytes of {info.meta.dtype}) "
                                f"differs from '{first}' ({m.size} bytes of {m.dtype})")

    def _usable(self, key: str) -> bool:
        info = self.infos[key]
        if info.inline is not None:
            return True
        return any(l.holder.rank not in self.dead for l in info.locations)

    # ------------------------------------------------------------------ small objects: a star
    def _reduce_small(self) -> None:
        arrays = [self.layer.get(key, timeout=self._left()) for key in self.used]
        result = np.array(arrays[0], copy=True)
        out = Copy(self.out_key, self.meta, result.reshape(-1).view(np.uint8), PRIMARY)
        locals_ = [Copy(k, self.meta, np.ascontiguousarray(a).reshape(-1).view(np.uint8), "input")
                   for k, a in zip(self.used, arrays)]
        for c in locals_:
            c.progress = c.size
        Combiner(out, [], locals_, self.op, token=self.layer.token, me=self.layer.rank, deadline=self.deadline,
                 divide=self.k if self.op == "avg" else 0).run()
        self.layer.publish_inline(self.out_key, self.meta, out.array, timeout=self._left())

    # ------------------------------------------------------------------ large objects: chains
    def _publish(self) -> None:
        self.out = self.layer.store.create(self.out_key, self.meta, PRIMARY)
        try:
            self.layer.client.object_put(self.out_key, self.meta, self.layer.holder, timeout=self._left())
        except BaseException:
            self.layer.store.drop(self.out_key)
            self.out = None
            raise

    def _place(self, key: str) -> None:
        info = self.infos[key]
        live = [l for l in info.locations if l.holder.rank not in self.dead]
        if info.inline is not None or any(l.holder.rank == self.layer.rank for l in live):
            self.at_root.append(key)
            self.used.append(key)
            return
        if not self.chains:
            self.chains = [[] for _ in range(chain_count(self.meta.size, self.k))]
        best = min(live, key=lambda l: (not l.complete, l.holder.rank))
        placed = len(self.used) - len(self.at_root)
        self._append(self.chains[placed % len(self.chains)], key, best.holder.rank, best.holder.address)
        self.used.append(key)

    def _append(self, chain: list[Slot], key: str, rank: int, address: str) -> None:
        if not chain:
            chain.append(Slot(key, rank, address, key))
            return
        before = chain[-1]
        name = f"~reduce/{self.id}/{next(self._stage_no)}"
        request = Stages.request(name, self.meta, "sum" if self.op == "avg" else self.op,
                                 [Upstream(before.rank, before.address, before.name)], [key], self._left())
        slot = Slot(key, rank, address, name)
        self.stages.append(slot)
        chain.append(slot)
        try:
            wire.call(address, self.layer.token, self.layer.rank, rank, request, time.monotonic() + min(30.0, self._left()))
        except wire.Refused as e:  # alive, and cannot: no room for the stage, or the input left its store
            raise CollectiveError(f"reduce_objects into '{self.out_key}': a stage for '{key}' was refused: {e}") from None
        except (OSError, CollectiveError) as e:
            if isinstance(e, CollectiveTimeout) and time.monotonic() >= self.deadline:
                raise
            # Its holder is gone: the root's sum fails on it and the chain is repaired there.
            log.info("reduce %s: stage on rank %d failed to start: %s", self.id, rank, e)

    def _reduce_streaming(self) -> None:
        for attempt in itertools.count():
            upstreams = [Upstream(c[-1].rank, c[-1].address, c[-1].name) for c in self.chains if c]
            locals_ = [self._root_input(key) for key in self.at_root]
            combiner = Combiner(self.out, upstreams, locals_, "sum" if self.op == "avg" else self.op,
                                token=self.layer.token, me=self.layer.rank, deadline=self.deadline,
                                telemetry=self.layer.telemetry, divide=self.k if self.op == "avg" else 0,
                                fail_out=False,  # a lost input is repaired, not a failure of out_key
                                land_in_out=attempt == 0)
            gen = self.out.generation
            try:
                combiner.run()
                break
            except UpstreamFailed as e:
                if e.rank is None or e.rank == self.layer.rank or e.rank in self.dead:
                    raise
                log.info("reduce %s: rank %d lost; repairing its chain", self.id, e.rank)
                self._repair(e.rank)
                if self.out.generation == gen:
                    self.out.restart()  # its readers start again from byte 0
        self.layer.client.object_update(self.out_key, self.layer.rank, "complete", timeout=self._left())

    def _root_input(self, key: str) -> Copy:
        info = self.infos[key]
        if info.inline is not None:
            c = Copy(key, self.meta, np.frombuffer(bytearray(info.inline), np.uint8), "input")
            c.progress = c.size
            return c
        c = self.layer.store.get(key)
        if c is None:  # deleted here meanwhile
            raise ObjectLost(f"reduce_objects: input '{key}' left this process's store", key)
        return c

    def _repair(self, rank: int) -> None:
        """``rank`` died: cut each chain at its first slot there and rebuild from that point."""
        self.dead.add(rank)
        redo: list[tuple[int, list[str]]] = []
        for c, chain in enumerate(self.chains):
            cut = next((j for j, s in enumerate(chain) if s.rank == rank), None)
            if cut is None:
                continue
            removed = chain[cut:]
            del chain[cut:]
            for s in removed:
                self.used.remove(s.key)
                if s.rank == rank and not self._usable(s.key):
                    self.lost.add(s.key)
            redo.append((c, [s.key for s in removed if s.key not in self.lost]))
            self._drop([s for s in removed if s.name != s.key and s.rank != rank])
        for c, keys in redo:  # the inputs after the cut go back on their chain, re-staged
            for key in keys:
                info = self.infos[key]
                live = [l for l in info.locations if l.holder.rank not in self.dead]
                best = min(live, key=lambda l: (not l.complete, l.holder.rank))
                self._append(self.chains[c], key, best.holder.rank, best.holder.address)
                self.used.append(key)
        self._gather()  # spares (or the next input to become ready) for the lost ones

    # ------------------------------------------------------------------ cleaning up
    def _drop(self, slots: list[Slot]) -> None:
        by_rank: dict[tuple[int, str], list[str]] = {}
        for s in slots:
            if s.rank not in self.dead:
                by_rank.setdefault((s.rank, s.address), []).append(s.name)
        for (rank, address), names in by_rank.items():
            threading.Thread(target=self._drop_at, args=(rank, address, names), daemon=True,
                             name="collcomm-reduce-drop").start()

    def _drop_at(self, rank: int, address: str, names: list[str]) -> None:
        try:
            wire.call(address, self.layer.token, self.layer.rank, rank, {"op": "drop", "names": names},
                      time.monotonic() + 10.0)
        except (OSError, CollectiveError):
            pass  # a dead holder frees nothing; a live one's stages expire at their deadline

    def _drop_stages(self) -> None:
        self._drop([s for s in self.stages if s.name != s.key])

    def _abandon(self, error: BaseException) -> None:
        if self.out is not None:
            self.out.fail(error)
            try:
                self.layer.client.object_delete(self.out_key, timeout=5.0)
            except CollectiveError:
                pass
            self.layer.store.drop(self.out_key)
