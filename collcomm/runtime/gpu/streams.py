"""Issuing a rank's lowered program onto its streams, from one host thread, in an order that is
safe on a GPU. Written against an abstract :class:`Stream` (a CUDA stream with its lane's NCCL
communicator behind it, or a fake in the tests); pure, no CUDA.

Why the order matters, although each lane is a stream of its own:

* ``cudaStreamWaitEvent`` waits for the work the event captured when it was last *recorded on
  the host*: a wait issued before its record waits for nothing. Every ``Record`` is issued
  before the ``Wait`` on it, and every event is recorded once.
* NCCL kernels of different communicators may not all fit on the GPU at once, and then run in
  the order they were issued; two ranks that issue them in different orders can deadlock
  (NCCL's "using multiple communicators concurrently"). Each group carries its time step
  (:mod:`collcomm.runtime.gpu.lowering`), and matched groups share it on both ranks; issuing
  every lane's groups merged by (step, lane) gives every rank the same order, and even a GPU that
  runs one kernel at a time then completes every step before the next.
* ncclGroupStart/End bracket host calls, not streams: a group is issued whole, and only NCCL
  calls go inside it (a kernel launched inside one would run before the group's communication).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, Union

from collcomm.errors import ScheduleError
from collcomm.runtime.gpu.lowering import GroupEnd, GroupStart, RankProgram, Record, Recv, Reduce, Send, Wait


class Stream(Protocol):
    """What the issuing needs of one lane: launch work in order, record and wait for events."""

    def enqueue(self, work: "Group | Reduce") -> None:
        """Launch ``work`` (an NCCL group of sends and receives, or a reduction kernel) after
        everything enqueued on this stream before."""

    def record(self, event: Any) -> None:
        """Record ``event`` here: it completes when the work enqueued so far has run."""

    def wait(self, event: Any) -> None:
        """Hold this stream's later work until ``event``'s latest record has completed."""


@dataclass(frozen=True)
class Group:
    """One NCCL group: its sends and receives, issued between ncclGroupStart and ncclGroupEnd."""

    step: int
    ops: tuple[Union[Send, Recv], ...]


@dataclass(frozen=True)
class Issue:
    """One host call of the program: ``item`` on ``lane``, belonging to time step ``step``."""

    lane: int
    step: int
    item: Union[Group, Reduce, Record, Wait]


def lane_issues(steps: Sequence, lane: int, rank: int = -1) -> list[Issue]:
    """A lane's steps as host calls: waits take the step of the group they precede, reductions and
    records the step of the group they follow. Raises ScheduleError for a malformed lane (a group
    that does not close, a kernel or event inside a group, a send outside one, steps not rising)."""
    where = f"rank {rank} lane {lane}"
    out: list[Issue] = []
    pending_waits: list[Wait] = []
    group: list | None = None
    group_step = last_step = -1
    for i, s in enumerate(steps):
        if isinstance(s, GroupStart):
            if group is not None:
                raise ScheduleError(f"{where} step {i}: a group opens inside the group opened at step {group_step}")
            if s.step <= last_step:
                raise ScheduleError(f"{where} step {i}: group of time step {s.step} after time step {last_step}")
            group, group_step = [], s.step
            out.extend(Issue(lane, s.step, w) for w in pending_waits)
            pending_waits = []
        elif isinstance(s, GroupEnd):
            if group is None:
                raise ScheduleError(f"{where} step {i}: GroupEnd without a GroupStart")
            out.append(Issue(lane, group_step, Group(group_step, tuple(group))))
            last_step, group = group_step, None
        elif isinstance(s, (Send, Recv)):
            if group is None:
                raise ScheduleError(f"{where} step {i}: {type(s).__name__} outside a group")
            group.append(s)
        elif isinstance(s, (Reduce, Record, Wait)):
            if group is not None:
                raise ScheduleError(f"{where} step {i}: {type(s).__name__} inside the group opened at "
                                    f"time step {group_step}: only sends and receives go in a group")
            if isinstance(s, Wait):
                pending_waits.append(s)
            else:
                out.append(Issue(lane, last_step, s))
        else:
            raise ScheduleError(f"{where} step {i}: unknown step {s!r}")
    if group is not None:
        raise ScheduleError(f"{where}: the group of time step {group_step} does not close")
    out.extend(Issue(lane, last_step, w) for w in pending_waits)
    return out


def issue_order(program: RankProgram) -> list[Issue]:
    """Every lane's host calls merged by (time step, lane), each lane's in its own order; checked
    that each event is recorded once and before any wait on it."""
    tagged = []
    for lane, steps in enumerate(program.lanes):
        tagged.extend(((iss.step, lane, i), iss) for i, iss in enumerate(lane_issues(steps, lane, program.rank)))
    order = [iss for _, iss in sorted(tagged, key=lambda t: t[0])]
    recorded: set[int] = set()
    for iss in order:
        if isinstance(iss.item, Record):
            if iss.item.event in recorded:
                raise ScheduleError(f"rank {program.rank} lane {iss.lane}: event {iss.item.event} is recorded twice")
            recorded.add(iss.item.event)
        elif isinstance(iss.item, Wait) and iss.item.event not in recorded:
            raise ScheduleError(f"rank {program.rank} lane {iss.lane}: waits at time step {iss.step} for event "
                                f"{iss.item.event}, which no earlier step records (the wait would be a no-op)")
    return order


def issue(program: RankProgram, streams: Sequence[Stream], new_event: Callable[[], Any]) -> dict[int, Any]:
    """Issue ``program`` onto ``streams`` (one per lane) in :func:`issue_order`; ``new_event``
    makes an event (torch.cuda.Event, cupy.cuda.Event, a fake). Returns the events by id."""
    if len(streams) != len(program.lanes):
        raise ScheduleError(f"rank {program.rank}: {len(program.lanes)} lanes need as many streams, "
                            f"got {len(streams)}")
    events: dict[int, Any] = {}
    for iss in issue_order(program):
        stream, item = streams[iss.lane], iss.item
        if isinstance(item, Record):
            events[item.event] = new_event()
            stream.record(events[item.event])
        elif isinstance(item, Wait):
            stream.wait(events[item.event])
        else:
            stream.enqueue(item)
    return events


__all__ = ["Group", "Issue", "Stream", "issue", "issue_order", "lane_issues"]
