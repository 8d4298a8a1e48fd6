"""Allreduce of a group that spans machines with several members on some: shared memory inside
each machine, sockets between them.

A flat plan over sockets would move every member's bytes through the kernel even between the
members of one machine. Here each machine's members reduce over shared memory to their first
member (the machine's *leader*), the leaders allreduce over sockets with the planner's plan, and
each leader broadcasts the result over shared memory. Every member ends with the same bits (one
reduction per element among the leaders, copied out). The two kinds of subgroup are formed
once per group and epoch (``<group>/box<i>`` and ``<group>/leaders``). When any phase fails,
the member that saw it aborts its machine's arena with the error, so the members waiting there
raise the same typed error instead of waiting out their timeout.
"""

from __future__ import annotations

from collcomm.errors import CollectiveError
from collcomm.runtime import local_settings
from collcomm.transport import frames


def boxes(rt, group) -> list[list[int]]:
    """The group's members by machine (world ranks, in group order): the job's fabric boxes
    when it has one, else the registered hosts."""
    if rt.has_fabric:
        topo = rt.world_topology()
        key = {m: topo.host_of(topo.compute[m]) or topo.compute[m] for m in group.members}
    else:
        key = {m: rt.hostnames.get(m) for m in group.members}
    out: dict = {}
    for m in group.members:
        out.setdefault(key[m], []).append(m)
    return list(out.values())


def eligible(rt, group) -> bool:
    """Several machines, and at least one with several members (else there is nothing to share)."""
    if group.size < 3 or not local_settings.enabled() or rt.transport.faults is not None or rt.algorithm:
        return False
    by_box = boxes(rt, group)
    return len(by_box) > 1 and any(len(b) > 1 for b in by_box)


class Hierarchy:
    """The subgroups of one group: this member's machine and, for leaders, the leaders."""

    def __init__(self, group, box, leaders):
        self.group, self.box, self.leaders = group, box, leaders

    @classmethod
    def form(cls, rt, group, timeout: float) -> "Hierarchy":
        by_box = boxes(rt, group)
        mine = next(i for i, b in enumerate(by_box) if rt.rank in b)
        base = f"{group.name}#{group.id}e{group.epoch}"
        box = rt.new_group(by_box[mine], f"{base}/box{mine}", timeout) if len(by_box[mine]) > 1 else None
        heads = [b[0] for b in by_box]
        leaders = rt.new_group(heads, f"{base}/leaders", timeout) if rt.rank in heads else None
        return cls(group, box, leaders)

    def allreduce(self, buf, op: str, timeout: float) -> None:
        from collcomm.runtime import collectives

        rt = self.group.runtime
        try:
            if self.box is not None:
                collectives.reduce(rt, self.box, buf.array, 0, "sum" if op == "avg" else op, timeout)
            if self.leaders is not None:
                collectives.allreduce(rt, self.leaders, buf.array, "sum" if op == "avg" else op, timeout)
            if self.box is not None:
                collectives.broadcast(rt, self.box, buf.array, 0, timeout)
        except CollectiveError as e:
            shared = self.box._local if self.box is not None else None
            if shared:  # the members waiting on this machine raise the same error at once
                shared.arena.abort(frames.abort_text(e))
                self.box.drop_local(shared)
            raise
        if op == "avg":
            buf.divide(self.group.size)

    def close(self) -> None:
        for g in (self.box, self.leaders):
            if g is not None:
                g.close()
