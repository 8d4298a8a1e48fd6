"""A simulator of lowered GPU programs (collcomm.runtime.gpu.lowering) on NumPy buffers, with NCCL's
semantics as the lowering relies on them:

* a stream runs its steps in order; a Wait holds it until the event's Record has run;
* a group's sends and receives are posted together when the stream reaches it, and the group
  completes (the stream moves on) when every one of them has been matched and moved;
* the k-th send from a to b on a communicator (a lane) matches b's k-th receive from a on it,
  whatever the groups; a send moves its data only when its receive is posted (rendezvous: the
  strictest NCCL behaviour; a program right under it is right when small sends are eager too);
* Send/Recv outside a group is a group of one.

Which runnable action goes next is ``rng``'s choice (a hypothesis-drawn Random in the tests).
When nothing can run and a stream is unfinished, :class:`Deadlock` says who waits for what.
"""

from __future__ import annotations

import random

import numpy as np

from collcomm.runtime.gpu.lowering import GroupEnd, GroupStart, Record, Recv, Reduce, Send, Wait


class Deadlock(AssertionError):
    """No step can run and some stream is not finished."""


class Mismatch(AssertionError):
    """A send met a receive of another size (NCCL: an error or truncation) or another piece."""


class Simulator:
    """``streams[r]``: rank r's streams, each a list of (lane, step); ``output[r]``: its buffer."""

    def __init__(self, streams: list[list[list[tuple[int, object]]]], output: list[np.ndarray],
                 chunk_elems: int, strict: bool = True):
        self.streams, self.output, self.chunk_elems, self.strict = streams, output, chunk_elems, strict
        self.pc = {(r, s): 0 for r, ss in enumerate(streams) for s in range(len(ss))}
        self.active: dict[tuple[int, int], set] = {}  # stream -> its open group's unmatched ops
        self.end: dict[tuple[int, int], int] = {}  # stream -> index of its open group's GroupEnd
        self.posted: dict[tuple, dict[int, tuple]] = {}  # (lane, src, dst, "send"|"recv") -> seq -> op
        self.count: dict[tuple, int] = {}
        self.recorded: set[tuple[int, int]] = set()
        self.scratch: dict[tuple[int, int, int], np.ndarray] = {}
        self.moved: list[tuple[int, int, int, int]] = []  # (phase, src, dst, elements) of every transfer

    # ------------------------------------------------------------------ stepping
    def head(self, key):
        r, s = key
        steps = self.streams[r][s]
        return steps[self.pc[key]] if self.pc[key] < len(steps) else None

    def actions(self) -> list[tuple]:
        out = []
        for key in self.pc:
            if key in self.active:
                continue
            h = self.head(key)
            if h is None:
                continue
            lane, step = h
            if isinstance(step, Wait) and (key[0], step.event) not in self.recorded:
                continue
            if isinstance(step, GroupStart) and self._group_end(key) is None:
                continue  # NCCL launches nothing before ncclGroupEnd
            out.append(("step", key))
        for (lane, src, dst, kind), ops in self.posted.items():
            if kind != "send":
                continue
            recvs = self.posted.get((lane, src, dst, "recv"), {})
            out.extend(("move", (lane, src, dst), seq) for seq in ops if seq in recvs)
        return out

    def run(self, rng: random.Random) -> None:
        """Run to the end. Each lane gets a random priority and each run a random greed: how often
        the most favoured lane's action goes next instead of any action. A greedy run lets some
        lanes race ahead of others on every rank, where a missing event would show."""
        lanes = {lane for ss in self.streams for st in ss for lane, _ in st}
        favour = {lane: rng.random() for lane in sorted(lanes)}
        greed = rng.choice([0.0, 0.5, 0.95])
        while True:
            acts = self.actions()
            if not acts:
                break
            if rng.random() < greed:
                act = max(acts, key=lambda a: favour[self._lane(a)])
            else:
                act = acts[rng.randrange(len(acts))]
            if act[0] == "step":
                self._step(act[1])
            else:
                self._move(act[1], act[2])
        unfinished = [k for k in self.pc if k in self.active or self.head(k) is not None]
        if unfinished:
            raise Deadlock(self._explain(unfinished))

    def _lane(self, act) -> int:
        return act[1][0] if act[0] == "move" else self.head(act[1])[0]

    def _group_end(self, key) -> int | None:
        r, s = key
        steps = self.streams[r][s]
        for i in range(self.pc[key] + 1, len(steps)):
            if isinstance(steps[i][1], GroupEnd):
                return i
            if isinstance(steps[i][1], GroupStart):
                return None
        return None

    def _step(self, key) -> None:
        r = key[0]
        lane, step = self.head(key)
        if isinstance(step, GroupStart):
            end = self._group_end(key)
            ops = [self.streams[r][key[1]][i] for i in range(self.pc[key] + 1, end)]
            self._post(key, ops, end)
        elif isinstance(step, (Send, Recv)):
            self._post(key, [(lane, step)], self.pc[key])
        elif isinstance(step, Reduce):
            buf = self.scratch[(r, lane, step.slot)]
            self.output[r][step.offset:step.offset + step.count] += buf[:step.count]
            self.pc[key] += 1
        elif isinstance(step, Record):
            self.recorded.add((r, step.event))
            self.pc[key] += 1
        elif isinstance(step, Wait):
            self.pc[key] += 1
        else:  # a GroupEnd with no GroupStart, or anything else: NCCL would refuse it
            raise Mismatch(f"rank {r} stream {key[1]} step {self.pc[key]}: unexpected {step!r}")

    def _post(self, key, ops, end: int) -> None:
        r = key[0]
        pending = set()
        for lane, op in ops:
            if not isinstance(op, (Send, Recv)):
                raise Mismatch(f"rank {r} stream {key[1]}: {op!r} inside a group")
            kind = "send" if isinstance(op, Send) else "recv"
            chan = (lane, r, op.peer, kind) if kind == "send" else (lane, op.peer, r, kind)
            seq = self.count.get(chan, 0)
            self.count[chan] = seq + 1
            self.posted.setdefault(chan, {})[seq] = (key, op)
            pending.add((chan, seq))
        self.end[key] = end
        self.active[key] = pending
        self._maybe_close(key)

    def _maybe_close(self, key) -> None:
        if not self.active[key]:
            del self.active[key]
            self.pc[key] = self.end.pop(key) + 1

    def _move(self, pair, seq: int) -> None:
        lane, src, dst = pair
        skey, send = self.posted[(lane, src, dst, "send")].pop(seq)
        rkey, recv = self.posted[(lane, src, dst, "recv")].pop(seq)
        if send.count != recv.count or (self.strict and (send.phase, send.tree, send.chunk) !=
                                        (recv.phase, recv.tree, recv.chunk)):
            raise Mismatch(f"lane {lane}: rank {src}'s send #{seq} to rank {dst} ({send}) met {recv}")
        data = self.output[src][send.offset:send.offset + send.count].copy()
        if recv.into == "scratch":
            buf = self.scratch.setdefault((dst, lane, recv.slot),
                                          np.zeros(self.chunk_elems, dtype=self.output[dst].dtype))
            if recv.count > self.chunk_elems:
                raise Mismatch(f"rank {dst}: {recv} overflows a scratch chunk of {self.chunk_elems}")
            buf[:recv.count] = data
        else:
            self.output[dst][recv.offset:recv.offset + recv.count] = data
        self.moved.append((send.phase, src, dst, send.count))
        for key, chan in ((skey, (lane, src, dst, "send")), (rkey, (lane, src, dst, "recv"))):
            self.active[key].discard((chan, seq))
            self._maybe_close(key)

    def _explain(self, unfinished) -> str:
        lines = []
        for key in unfinished[:6]:
            r, s = key
            if key in self.active:
                waits = []
                for (lane, src, dst, kind), seq in sorted(self.active[key])[:3]:
                    _, op = self.posted[(lane, src, dst, kind)][seq]
                    other = dst if kind == "send" else src
                    waits.append(f"{kind} #{seq} {'to' if kind == 'send' else 'from'} rank {other} on lane {lane} "
                                 f"(phase {op.phase} tree {op.tree} chunk {op.chunk}) has no match")
                lines.append(f"rank {r} stream {s}: group at step {self.end[key]} waits: " + "; ".join(waits))
            else:
                _, step = self.head(key)
                if isinstance(step, GroupStart) and self._group_end(key) is None:
                    lines.append(f"rank {r} stream {s} step {self.pc[key]}: the group never closes")
                else:
                    lines.append(f"rank {r} stream {s} step {self.pc[key]}: blocked at {step!r}")
        more = f" (and {len(unfinished) - 6} more)" if len(unfinished) > 6 else ""
        return "deadlock: " + " | ".join(lines) + more


def lane_streams(program) -> list[list[tuple[int, object]]]:
    """A rank program as the simulator's streams: one per lane."""
    return [[(lane, s) for s in steps] for lane, steps in enumerate(program.lanes)]


def serialized_stream(program) -> list[list[tuple[int, object]]]:
    """A rank program as one stream in its host issue order: a GPU that runs one kernel at a time."""
    from collcomm.runtime.gpu.streams import Group, issue_order

    out: list[tuple[int, object]] = []
    for iss in issue_order(program):
        if isinstance(iss.item, Group):
            out.append((iss.lane, GroupStart(iss.item.step)))
            out.extend((iss.lane, op) for op in iss.item.ops)
            out.append((iss.lane, GroupEnd()))
        else:
            out.append((iss.lane, iss.item))
    return [out]
