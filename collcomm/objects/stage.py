"""Reduce stages: partial sums made while their inputs are still arriving.

A stage fills one output copy with ``op`` over its inputs: *upstreams* (copies on other
processes: the partial sums of the stages before it, or an input object itself, each pulled into
a landing buffer; the first lands in the output buffer itself) and *locals* (copies in this
process's store, or bytes at hand). Whenever every input has more bytes, that range is reduced
and the output advances: its own reader (the next stage, or the root) streams it on at once, so
a chain of stages pipelines end to end. A stage whose upstream fails fails its output with the
rank whose loss caused it (:class:`~collcomm.objects.pull.UpstreamFailed`), so the failure
travels down the chain to the root, which replaces that input and recomputes only the stages
after it (:mod:`collcomm.objects.reduce`).

:class:`Combiner` is the mechanism (the root runs one too); :class:`Stages` runs the stages other
processes ask this one for, and drops their outputs when the reduction ends or its deadline
passes.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np

from collcomm.coordinator.objects import Meta
from collcomm.errors import CollectiveError, CollectiveTimeout
from collcomm.objects.pull import SourceLost, UpstreamFailed, pull
from collcomm.objects.store import STAGE, Copy, ObjectStore
from collcomm.runtime.buffers import Buffer, check_reduction, numpy_dtype

log = logging.getLogger("collcomm.objects")

REAP_EVERY_S = 1.0
JOIN_S = 5.0  # how long a finished combiner waits for its pulls to end


class Upstream:
    """A copy on another process to pull: ``(rank, address, name)``."""

    def __init__(self, rank: int, address: str, name: str):
        self.rank, self.address, self.name = rank, address, name

    def as_dict(self) -> dict:
        return {"rank": self.rank, "address": self.address, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> "Upstream":
        rank, address, name = d.get("rank"), d.get("address"), d.get("name")
        if not isinstance(rank, int) or not isinstance(address, str) or not isinstance(name, str):
            raise ValueError("a stage's upstream needs rank, address and name")
        return cls(rank, address, name)


class Combiner:
    """Fill ``out`` with ``op`` over ``upstreams`` (pulled) and ``locals`` (copies here)."""

    def __init__(self, out: Copy, upstreams: list[Upstream], locals_: list[Copy], op: str, *,
                 token: bytes, me: int, deadline: float, telemetry=None, divide: int = 0, fail_out: bool = True,
                 land_in_out: bool = True):
        self.fail_out = fail_out  # on failure, fail ``out`` (its readers get the error)
        self.land_in_out = land_in_out  # the first upstream lands in out's buffer (not after a repair:
        # the pulls of the attempt before may still be writing)
        self.out, self.upstreams, self.locals, self.op = out, upstreams, locals_, op
        self.token, self.me, self.deadline, self.telemetry, self.divide = token, me, deadline, telemetry, divide
        dtype = out.meta.dtype
        self.itemsize = numpy_dtype(dtype).itemsize
        probe = Buffer(np.empty(0, numpy_dtype(dtype)), dtype)
        check_reduction(op, probe)
        self.reduce_into = probe.reducer(op)
        self._dtype = dtype
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._landings: list[Copy] = []
        self._stop = False
        self._sockets: list = []  # the pulls' connections (shut down when the combiner ends)

    def _typed(self, array: np.ndarray) -> np.ndarray:
        return array.view(numpy_dtype(self._dtype))

    def run(self) -> None:
        """Reduce until ``out`` is whole; on failure, fail ``out`` and raise."""
        out = self.out
        threads: list[threading.Thread] = []
        try:
            if not self.upstreams and not self.locals:
                raise ValueError("a reduce stage needs at least one input")
            for i, up in enumerate(self.upstreams):
                array = out.array if i == 0 and self.land_in_out else np.empty(out.size, np.uint8)
                self._landings.append(Copy(up.name, out.meta, array, "landing", cond=self._cond))
            threads = [threading.Thread(target=self._pull, args=(up, land), daemon=True,
                                        name=f"collcomm-stage-pull-r{self.me}")
                       for up, land in zip(self.upstreams, self._landings)]
            for t in threads:
                t.start()
            self._combine()
        except BaseException as e:
            if self.fail_out:
                out.fail(e)
            raise
        finally:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
                sockets = list(self._sockets)
            for sock in sockets:  # pulls still running (after a failure) end now, not a chunk later
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            end = time.monotonic() + JOIN_S
            for t in threads:  # so none writes into a landing (out's buffer) once we return
                t.join(max(0.0, end - time.monotonic()))

    def _pull(self, up: Upstream, land: Copy) -> None:
        try:
            pull(land, up.address, up.rank, up.name, token=self.token, me=self.me, deadline=self.deadline,
                 telemetry=self.telemetry, cancelled=lambda: self._stop, opened=self._opened)
        except SourceLost as e:
            self._failed(UpstreamFailed(f"reduce stage lost rank {e.rank}: {e}", e.rank))
        except BaseException as e:  # UpstreamFailed passes on its rank; timeouts and the rest as they are
            self._failed(e)

    def _opened(self, sock) -> None:
        with self._cond:
            self._sockets.append(sock)
            stop = self._stop
        if stop:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _failed(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    def _available(self) -> int:
        avail = self.out.size
        for land in self._landings:
            avail = min(avail, land.progress)
        for c in self.locals:
            if c.error is not None:
                raise c.error
            avail = min(avail, c.progress)
        if avail < self.out.size:
            avail -= avail % self.itemsize
        return avail

    def _combine(self) -> None:
        out, size = self.out, self.out.size
        typed_out = self._typed(out.array)
        first_landed = bool(self._landings) and self._landings[0].array is out.array
        copies_first = not first_landed  # nothing landed in out's buffer: the first input is copied
        done = 0
        while done < size or size == 0:
            with self._cond:
                while True:
                    if self._error is not None:
                        raise self._error
                    avail = self._available()
                    if avail > done or size == 0:
                        break
                    left = self.deadline - time.monotonic()
                    if left <= 0:
                        raise CollectiveTimeout(f"reduce stage '{out.name}': inputs stopped at {done} of {size} "
                                                f"bytes")
                    self._cond.wait(min(left, 0.02))  # locals advance under their own locks: look again soon
            a, b = done // self.itemsize, avail // self.itemsize
            dst = typed_out[a:b]
            inputs = (self._landings[1:] if first_landed else self._landings) + self.locals
            for j, c in enumerate(inputs):
                src = self._typed(c.array)[a:b]
                if j == 0 and copies_first:
                    np.copyto(dst, src)
                else:
                    self.reduce_into(dst, src)
            if self.divide:
                Buffer(dst, self._dtype).divide(self.divide)
            done = avail
            out.advance(done)
            if size == 0:
                break


class Stages:
    """The reduce stages this process runs for others (``stage`` requests of the object server)."""

    def __init__(self, store: ObjectStore, token: bytes, me: int, telemetry=None):
        self.store, self.token, self.me, self.telemetry = store, token, me, telemetry
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, daemon=True, name=f"collcomm-stage-reaper-r{me}")
        self._reaper.start()

    def start(self, request: dict) -> None:
        """Start the stage ``request`` describes (see :meth:`request`); raises ValueError if malformed."""
        name, op = request.get("name"), request.get("reduce")
        size, dtype, shape = request.get("size"), request.get("dtype"), request.get("shape", [])
        seconds, locals_ = request.get("seconds"), request.get("locals", [])
        if not (isinstance(name, str) and isinstance(op, str) and isinstance(size, int) and size >= 0
                and isinstance(dtype, str) and isinstance(seconds, (int, float)) and 0 < seconds <= 7 * 86400
                and isinstance(locals_, list)):
            raise ValueError("malformed stage request")
        numpy_dtype(dtype)
        upstreams = [Upstream.from_dict(u) for u in request.get("upstreams", [])]
        mine = []
        for key in locals_:
            c = self.store.lookup(key, 5.0) if isinstance(key, str) else None
            if c is None or c.size != size:
                raise ValueError(f"this process holds no copy of object '{key}' of {size} bytes")
            mine.append(c)
        deadline = time.monotonic() + float(seconds)
        out = self.store.create(name, Meta(size, dtype, tuple(shape)), STAGE)
        with self._lock:
            self._expiry[name] = deadline + 5.0
        combiner = Combiner(out, upstreams, mine, op, token=self.token, me=self.me, deadline=deadline,
                            telemetry=self.telemetry)
        threading.Thread(target=self._run, args=(combiner,), daemon=True, name=f"collcomm-stage-r{self.me}").start()

    @staticmethod
    def _run(combiner: Combiner) -> None:
        try:
            combiner.run()
        except BaseException as e:  # the output carries the error to its reader
            log.info("reduce stage %s failed: %s", combiner.out.name, e)

    @staticmethod
    def request(name: str, meta: Meta, op: str, upstreams: list[Upstream], locals_: list[str],
                seconds: float) -> dict:
        return {"op": "stage", "name": name, "reduce": op, "size": meta.size, "dtype": meta.dtype,
                "shape": list(meta.shape), "upstreams": [u.as_dict() for u in upstreams], "locals": locals_,
                "seconds": seconds}

    def forget(self, names) -> None:
        with self._lock:
            for n in names:
                self._expiry.pop(n, None)

    def _reap(self) -> None:
        while not self._closed.wait(REAP_EVERY_S):
            now = time.monotonic()
            with self._lock:
                expired = [n for n, t in self._expiry.items() if t <= now]
                for n in expired:
                    del self._expiry[n]
            for n in expired:
                c = self.store.get(n)
                if c is not None:
                    c.fail(CollectiveError(f"reduce stage '{n}' passed its deadline"))
                self.store.drop(n)

    def close(self) -> None:
        self._closed.set()
        self._reaper.join(2.0)
