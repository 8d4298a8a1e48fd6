"""The shared memory of one group: a segment per member, step counters, and waiting.

Every member owns one segment (:mod:`collcomm.transport.shm.segment`): a 4 KiB control page
and a data area of two halves. Only the owner writes its segment; the others read it. A
collective is a sequence of *steps*: a member writes what its peers need into one half of its
data area, then publishes the step's number in its control page, then waits until every peer
has published the same number (:meth:`Arena.wait`), then reads from its peers' halves in
place. Because every member takes the same steps in the same order, one counter per member is
the whole protocol: no locks, no queues, a single writer per word. The two halves alternate by
round, and a round's first wait proves that every peer finished reading the round before the
previous one, so a half is never overwritten while it is read.

Ordering: the data is stored before the step counter, and x86-64 keeps stores in order and
loads in order, so a peer that sees the step sees the data (which is why the arena is used on
x86-64 only; see :data:`SUPPORTED`).

Waiting spins briefly (when there are cores for every member), then yields the core, then
sleeps on a futex (:mod:`collcomm.transport.shm.futex`) that publishers wake. While it sleeps
it watches the peers' processes (a pidfd per peer: a killed peer is a PeerFailure at once), the
peers' abort words (a peer that failed writes why into its control page) and the caller's
``poll`` (the coordinator's view: failures seen elsewhere), and never waits past the deadline.

Each operation also writes its description (a hash and a short text) into one of two slots by
the parity of its number; the first wait of an operation compares the peers' with its own, so
ranks that run different operations get a MismatchError naming both, never a wrong result.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import time

import numpy as np

from collcomm.errors import CollectiveError, CollectiveTimeout, MismatchError, PeerFailure
from collcomm.transport.frames import error_from_abort
from collcomm.transport.shm import cma, futex
from collcomm.transport.shm.arena_support import X86_64
from collcomm.transport.shm.fence import fence
from collcomm.transport.shm.segment import Segment

SUPPORTED = X86_64

HEADER = 4096
MAGIC = 0x31304D4853434343  # "CCCSHM01" little-endian
# int64 words of the control page
W_MAGIC, W_PID, W_GROUP, W_EPOCH, W_RANK, W_GEN, W_CAP = 0, 1, 2, 3, 4, 5, 6
W_STEP, W_DESC0, W_DESC1, W_ABORT = 8, 9, 10, 11       # one cache line: what peers poll
W_ALPHA = 16                                            # nanoseconds per step, measured at formation
W_BUF = 17                                              # address of the buffer peers read directly (cma)
W_SELF = 18                                             # address of the owner's own mapping (the cma probe)
W_CMA = 19                                              # from what size this member reads peers directly; -1: never
W_OUT = 20                                              # address of the buffer a result lands in (cma; W_BUF in place)
W_STREAM = 21                                           # from what result size this member streams copies; -1: never
W_SLEEP = 24                                            # the owner sleeps on its futex
FUTEX_BYTE = 256                                        # u32 futex word
DESC_TEXT = (512, 768)                                  # u16 length + text, by operation parity
DESC_TEXT_MAX = 250
ABORT_TEXT = 1024                                       # u32 length + "kind|culprit|message"
ABORT_TEXT_MAX = HEADER - ABORT_TEXT - 4

POLL_SECONDS = 0.25    # how often a sleeping waiter asks ``poll`` (the coordinator)
ALIVE_SECONDS = 0.02   # how often it looks at its peers' processes
SLEEP_SECONDS = 0.002  # the longest futex sleep (bounds the cost of a lost wake-up)


def segment_size(capacity: int) -> int:
    """Bytes of a member's segment whose halves hold ``capacity`` bytes each."""
    return HEADER + 2 * capacity


class Arena:
    """One member's view of the group's segments (``segments[i]`` is group rank i's)."""

    def __init__(self, segments: list[Segment], me: int, ranks: list[int], capacity: int, *, spin: int, yields: int):
        self.segments, self.me, self.ranks, self.capacity = segments, me, ranks, capacity
        self.n = len(segments)
        self.ctl = [memoryview(s.mm)[:HEADER].cast("q") for s in segments]
        self.data = [np.frombuffer(s.mm, np.uint8, count=2 * capacity, offset=HEADER) for s in segments]
        self.mine = self.ctl[me]
        self._raw = memoryview(segments[me].mm)[:HEADER]
        self._texts: list = [None, None]  # the description texts last written, by parity
        self._futex = memoryview(segments[me].mm)[FUTEX_BYTE:FUTEX_BYTE + 4].cast("I")
        self._futex_peer = [memoryview(s.mm)[FUTEX_BYTE:FUTEX_BYTE + 4].cast("I") for s in segments]
        self._addr = [_address(s) + FUTEX_BYTE for s in segments]
        self.mine[W_SELF] = self._addr[me] - FUTEX_BYTE
        self.pids = [ctl[W_PID] for ctl in self.ctl]
        self.peers = [i for i in range(self.n) if i != me]
        self._peer_ctl = [self.ctl[i] for i in self.peers]
        self.spin, self.yields = spin, yields
        self.step = 0       # the last step published
        self.round = 0      # data rounds so far (the half in use is round & 1)
        self.operation = 0  # operations so far (the description slot is operation & 1)
        self._views: dict = {}
        self._pidfds: dict[int, int] = {}
        self.closed = False

    # ------------------------------------------------------------------ setup
    @staticmethod
    def initialize(seg: Segment, *, group: int, epoch: int, rank: int, generation: int, capacity: int) -> None:
        """Write the control page of this rank's new segment."""
        ctl = memoryview(seg.mm)[:HEADER].cast("q")
        for word, value in ((W_PID, os.getpid()), (W_GROUP, group), (W_EPOCH, epoch), (W_RANK, rank),
                            (W_GEN, generation), (W_CAP, capacity)):
            ctl[word] = value
        ctl[W_MAGIC] = MAGIC
        ctl.release()

    @staticmethod
    def verify(seg: Segment, *, group: int, epoch: int, rank: int, generation: int, capacity: int) -> int:
        """Check a peer's segment is the one this group generation expects; its owner's pid."""
        ctl = memoryview(seg.mm)[:HEADER].cast("q")
        try:
            want = {W_MAGIC: MAGIC, W_GROUP: group, W_EPOCH: epoch, W_RANK: rank, W_GEN: generation,
                    W_CAP: capacity}
            for word, value in want.items():
                if ctl[word] != value:
                    raise OSError(f"{seg.path}: word {word} is {ctl[word]}, expected {value} (a stale segment)")
            return ctl[W_PID]
        finally:
            ctl.release()

    def watch_processes(self) -> None:
        """Open a pidfd on every peer's process (a dead peer is then seen without waiting)."""
        for i in self.peers:
            pid = self.ctl[i][W_PID]
            try:
                self._pidfds[i] = os.pidfd_open(pid)
            except (OSError, AttributeError):
                pass  # another pid namespace, or no pidfd: the coordinator's view still covers it

    # ------------------------------------------------------------------ data
    def view(self, member: int, half: int, dtype: np.dtype) -> np.ndarray:
        """Half ``half`` of ``member``'s data area as a flat array of ``dtype`` (cached)."""
        key = (member, half, dtype)
        v = self._views.get(key)
        if v is None:
            raw = self.data[member][half * self.capacity:(half + 1) * self.capacity]
            v = self._views[key] = raw[:self.capacity // dtype.itemsize * dtype.itemsize].view(dtype)
        return v

    def next_half(self) -> int:
        self.round += 1
        return self.round & 1

    # ------------------------------------------------------------------ operations
    def begin(self, desc: int, text: bytes) -> int:
        """Start an operation: write its description; the slot's parity is returned."""
        self.operation += 1
        parity = self.operation & 1
        if self._texts[parity] is not text:  # a loop of one operation writes its text twice, not each time
            start = DESC_TEXT[parity]
            raw = self._raw
            raw[start:start + 2] = len(text).to_bytes(2, "little")
            raw[start + 2:start + 2 + len(text)] = text
            self._texts[parity] = text
        self.mine[W_DESC0 + parity] = desc
        return parity

    def publish(self) -> int:
        """Publish the next step (the data written before it is visible to the peers). Only the
        last member to publish a step completes anyone's wait, so only it wakes the sleepers
        (with the fence, two members publishing at once cannot both miss being last; without
        it every publisher wakes every sleeper)."""
        step = self.step = self.step + 1
        self.mine[W_STEP] = step
        if fence is not None:
            fence()
            for ctl in self._peer_ctl:
                if ctl[W_STEP] < step:
                    return step
        for i, ctl in zip(self.peers, self._peer_ctl):
            if ctl[W_SLEEP]:
                self._futex_peer[i][0] = (self._futex_peer[i][0] + 1) & 0xFFFFFFFF
                futex.wake(self._addr[i])
        return step

    def sync(self, deadline: float, poll=None, desc: tuple | None = None) -> None:
        """Publish the next step and wait until every peer published it. ``desc`` (parity, hash,
        own text): compare the peers' operation with this one (the first step of an operation)."""
        target = self.publish()
        ctls = self._peer_ctl
        k, n, spins = 0, len(ctls), self.spin
        while k < n:
            if ctls[k][W_STEP] >= target:
                k += 1
            elif spins > 0:
                spins -= 1
            else:
                self._slow_wait(k, target, deadline, poll)
                break
        if desc is not None:
            self._compare(desc)

    def _slow_wait(self, k: int, target: int, deadline: float, poll) -> None:
        ctls, n = self._peer_ctl, len(self._peer_ctl)
        yields = self.yields
        now = time.monotonic()
        next_poll, next_alive = now + POLL_SECONDS, now + ALIVE_SECONDS
        mine, word = self.mine, self._futex
        while True:
            while k < n and ctls[k][W_STEP] >= target:
                k += 1
            if k == n:
                return
            if yields > 0:
                if not yields & 7:  # a peer's abort is seen within a few yields (each costs a look)
                    self._check_aborts()
                yields -= 1
                os.sched_yield()
                continue
            self._check_aborts()
            now = time.monotonic()
            if now >= deadline:
                raise CollectiveTimeout(f"rank {self.ranks[self.peers[k]]} did not reach step {target} of this "
                                        f"operation in time (shared memory)")
            if now >= next_alive:
                self._check_alive()
                next_alive = now + ALIVE_SECONDS
            if poll is not None and now >= next_poll:
                error = poll()
                if error is not None:
                    raise error
                next_poll = time.monotonic() + POLL_SECONDS
            expected = word[0]
            mine[W_SLEEP] = 1
            if fence is not None:
                fence()  # "asleep" is visible before the steps are read (see publish)
            if ctls[k][W_STEP] < target:
                futex.wait(self._addr[self.me], expected, min(SLEEP_SECONDS, max(deadline - now, 0.0)))
            mine[W_SLEEP] = 0

    def _compare(self, desc: tuple) -> None:
        parity, mine, text = desc
        for i, ctl in zip(self.peers, self._peer_ctl):
            if ctl[W_DESC0 + parity] != mine:
                raise self.mismatch(i, parity, text)

    def mismatch(self, member: int, parity: int, text: bytes) -> MismatchError:
        """The error for a peer that runs another operation than this member's ``text``: it names
        both ranks by number ("rank 0 runs ... but rank 1 runs ..."), so it reads true on any rank
        it reaches (a peer that learns of it from this member's abort words)."""
        return MismatchError(f"rank {self.ranks[self.me]} runs {text.decode(errors='replace')} but rank "
                             f"{self.ranks[member]} runs {self._text(member, parity)}", rank=self.ranks[member])

    def differing(self, parity: int, desc: int) -> int | None:
        """The first peer whose description of the current operation (slot ``parity``) is not ``desc``."""
        for i, ctl in zip(self.peers, self._peer_ctl):
            if ctl[W_DESC0 + parity] != desc:
                return i
        return None

    def _text(self, member: int, parity: int) -> str:
        raw = memoryview(self.segments[member].mm)
        start = DESC_TEXT[parity]
        length = min(int.from_bytes(raw[start:start + 2], "little"), DESC_TEXT_MAX)
        return bytes(raw[start + 2:start + 2 + length]).decode(errors="replace")

    def calibrate(self, deadline: float, rounds: int = 16) -> float:
        """Measure the cost of one step (alpha, seconds) and agree on it: every member takes the
        largest member's, so every member's choice of algorithm is the same."""
        for _ in range(4):  # members arrive from formation at different times: not timed
            self.sync(deadline)
        start = time.perf_counter()
        for _ in range(rounds):
            self.sync(deadline)
        self.mine[W_ALPHA] = max(1, int((time.perf_counter() - start) / rounds * 1e9))
        self.sync(deadline)
        return max(ctl[W_ALPHA] for ctl in self.ctl) / 1e9

    def agree_thresholds(self, deadline: float, threshold: int | None,
                         stream: int | None = None) -> tuple[int | None, int | None]:
        """From what size on the members read each other's buffers directly (:mod:`cma`), or
        None, and from what size of result their copies stream past the cache
        (:mod:`stream`), or None. For the first each member tries to read the start of each
        peer's control page in the peer's own process and offers its ``threshold`` (None: it will
        not); it offers ``stream`` for the second. Every member takes the same answers: the
        largest offer, or None when any member offered none."""
        # the identity words (magic, pid, group, epoch, rank, generation, half size) as the peer's
        # own process has them: a process that is not the peer (another pid namespace) has not
        ok = threshold is not None and all(
            cma.probe(self.pids[i], self.ctl[i][W_SELF], self.ctl[i][:W_CAP + 1].tobytes()) for i in self.peers)
        self.mine[W_CMA] = threshold if ok else -1
        self.mine[W_STREAM] = -1 if stream is None else stream
        self.sync(deadline)

        def agreed(word: int) -> int | None:
            offers = [ctl[word] for ctl in self.ctl]
            return None if min(offers) < 0 else max(offers)

        return agreed(W_CMA), agreed(W_STREAM)

    def read_direct(self, member: int, offset: int, out: np.ndarray, word: int = W_BUF) -> None:
        """Copy ``out.nbytes`` bytes from ``offset`` bytes into the buffer ``member`` published
        (``word``: W_BUF, or W_OUT for its result's) for this operation, out of its process; a
        peer gone is a PeerFailure."""
        self._direct(cma.read, "reading", member, offset, out, word)

    def write_direct(self, member: int, offset: int, src: np.ndarray) -> None:
        """Copy ``src`` to ``offset`` bytes into the buffer ``member`` published, in its process."""
        self._direct(cma.write, "writing", member, offset, src, W_BUF)

    def _direct(self, move, what: str, member: int, offset: int, here: np.ndarray, word: int) -> None:
        try:
            move(self.pids[member], self.ctl[member][word] + offset, here)
        except OSError as e:
            self._check_aborts()
            if e.errno == errno.ESRCH:
                raise PeerFailure(f"rank {self.ranks[member]} died (its process is gone) during a shared-memory "
                                  f"operation", rank=self.ranks[member]) from None
            raise CollectiveError(f"{what} rank {self.ranks[member]}'s buffer failed: {e}") from None

    # ------------------------------------------------------------------ failures
    def abort(self, text: str) -> None:
        """This member failed its operation: say why in its control page and wake every peer."""
        data = text.encode(errors="replace")[:ABORT_TEXT_MAX]
        raw = memoryview(self.segments[self.me].mm)
        raw[ABORT_TEXT:ABORT_TEXT + 4] = len(data).to_bytes(4, "little")
        raw[ABORT_TEXT + 4:ABORT_TEXT + 4 + len(data)] = data
        self.mine[W_ABORT] = self.operation + 1
        for i in self.peers:
            self._futex_peer[i][0] = (self._futex_peer[i][0] + 1) & 0xFFFFFFFF
            futex.wake(self._addr[i])

    def _check_aborts(self) -> None:
        for i, ctl in zip(self.peers, self._peer_ctl):
            if ctl[W_ABORT]:
                raw = memoryview(self.segments[i].mm)
                length = min(int.from_bytes(raw[ABORT_TEXT:ABORT_TEXT + 4], "little"), ABORT_TEXT_MAX)
                text = bytes(raw[ABORT_TEXT + 4:ABORT_TEXT + 4 + length]).decode(errors="replace")
                raise error_from_abort(text, self.ranks[i])

    def _check_alive(self) -> None:
        if not self._pidfds:
            return
        readable, _, _ = select.select(list(self._pidfds.values()), [], [], 0)
        for i, fd in self._pidfds.items():
            if fd in readable:
                raise PeerFailure(f"rank {self.ranks[i]} died (its process exited) during a shared-memory "
                                  f"operation", rank=self.ranks[i])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()
        self._views.clear()
        self.data = []
        for mv in self.ctl + [self._futex, self._raw] + self._futex_peer:
            mv.release()
        self.ctl, self._peer_ctl, self._futex_peer = [], [], []
        for s in self.segments:
            s.close()


def _address(seg: Segment) -> int:
    buf = ctypes.c_char.from_buffer(seg.mm)
    try:
        return ctypes.addressof(buf)
    finally:
        del buf
