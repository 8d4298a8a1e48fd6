"""The collectives on a group: allreduce, allgather, reduce-scatter, broadcast, reduce, barrier.

Each turns the user's buffer into a flat view (:mod:`collcomm.runtime.buffers`), checks what it
can check locally, and runs the planner's schedule for it on the group
(:meth:`~collcomm.runtime.group.Group.run_schedule`): allreduce, allgather and reduce-scatter
their own plans; broadcast an allgather plan with the root's shard only, reduce a
reduce-scatter plan into the root's shard (each plan chosen for the root's trees alone), each
followed by an agreement on what the operation was (:func:`_rooted`). Barrier is an allreduce of one integer.
"""

from __future__ import annotations

import numpy as np

from collcomm.errors import MismatchError, PeerFailure
from collcomm.runtime import arguments, failures
from collcomm.runtime.buffers import Buffer, as_buffer
from collcomm.runtime.executor import shard_layout
from collcomm.runtime.group import Group
from collcomm.runtime.operation import describe_fields
from collcomm.schedules.ir import ALLGATHER, ALLREDUCE, REDUCE_SCATTER
from collcomm.transport import frames
from collcomm.transport.frames import error_from_abort


def allreduce(rt, group: Group, x, op: str, timeout: float, watch_previous: bool = False,
              out: Buffer | None = None) -> None:
    """Reduce ``x`` in place, or into ``out`` (a Buffer of ``x``'s dtype and count sharing no
    memory with it; ``x`` is then only read)."""
    buf = x if type(x) is Buffer else as_buffer(x)  # (the API's is checked)
    reducer = buf.reducer(op)
    if buf.count == 0 or group.size == 1:
        if out is not None:
            np.copyto(out.array, buf.array)
        return
    local = group.local_path(timeout)
    if local is not None:
        local.allreduce(buf, op, timeout, out)
        return
    if out is not None:  # over sockets every path reduces in place: the result's buffer starts as the input
        np.copyto(out.array, buf.array)
        buf = out
    hierarchy = group.hierarchy_path(timeout) if not watch_previous else None
    if hierarchy is not None:  # shared memory inside each machine, sockets between them
        hierarchy.allreduce(buf, op, timeout)
        return
    fields = ("allreduce", buf.dtype, buf.count, op, -1)
    if not rt.algorithm and one_shot_over_sockets(group.size, buf.nbytes):
        # Small: every member gathers every input and reduces them all itself, in rank order (the
        # same bits everywhere): one round of frames instead of a reduce-scatter and an allgather.
        n, count = group.size, buf.count
        gathered = group.scratch(n * count, buf.array.dtype)
        gathered[group.me * count:(group.me + 1) * count] = buf.array
        group.run_schedule(ALLGATHER, buf, gathered, {r: (r * count, count) for r in range(n)}, reducer=None,
                           chained=False, desc_fields=fields, timeout=timeout, nbytes=gathered.nbytes,
                           watch_previous=watch_previous)
        buf.array[:] = gathered[:count]
        for r in range(1, n):
            reducer(buf.array, gathered[r * count:(r + 1) * count])
    else:
        shards = dict(enumerate(shard_layout(buf.count, group.size)))
        group.run_schedule(ALLREDUCE, buf, buf.array, shards, reducer=reducer, chained=True, desc_fields=fields,
                           timeout=timeout, nbytes=buf.nbytes, watch_previous=watch_previous)
    if op == "avg":
        buf.divide(group.size)


# The alpha-beta model of an allreduce over sockets on this kind of machine (bench/RESULTS.md,
# issue 16): a round of frames costs about ALPHA, a byte on a socket about BETA.
SOCKET_ALPHA, SOCKET_BETA, ONE_SHOT_MAX_BYTES = 150e-6, 1e-9, 64 << 10


def one_shot_over_sockets(n: int, nbytes: int) -> bool:
    """Whether gathering every input (one round, (n-1) x the bytes per member) beats a reduce-scatter
    and an allgather (two rounds, 2 (n-1)/n x the bytes) by the model; small inputs only."""
    if nbytes > ONE_SHOT_MAX_BYTES:
        return False
    one = SOCKET_ALPHA + (n - 1) * nbytes * SOCKET_BETA
    two = 2 * SOCKET_ALPHA + 2 * (n - 1) / n * nbytes * SOCKET_BETA
    return one <= two


def allgather(rt, group: Group, dst: Buffer, src: Buffer, timeout: float) -> None:
    """``dst``, ``src``: the output and the input, checked (collcomm.runtime.arguments.gathered)."""
    n = src.count
    local = group.local_path(timeout) if n and group.size > 1 else None
    if local is not None:  # (copies this member's own block itself, when it suits its path)
        local.allgather(dst, src, timeout)
        return
    dst.array[group.me * n:(group.me + 1) * n] = src.array
    if n == 0 or group.size == 1:
        return
    shards = {r: (r * n, n) for r in range(group.size)}
    group.run_schedule(ALLGATHER, dst, dst.array, shards, reducer=None, chained=False,
                       desc_fields=("allgather", dst.dtype, n, "", -1), timeout=timeout, nbytes=dst.nbytes)


def reduce_scatter(rt, group: Group, dst: Buffer, src: Buffer, op: str, timeout: float) -> None:
    """``dst``, ``src``: the output and the input, checked (collcomm.runtime.arguments.scattered)."""
    m = dst.count
    reducer = src.reducer(op)
    local = group.local_path(timeout) if m and group.size > 1 else None
    if local is not None:  # reduces straight out of the members' segments into the output
        local.reduce_scatter(dst, src, op, timeout)
        return
    work = src.array.copy()  # the input stays as the caller gave it
    if m and group.size > 1:
        shards = {r: (r * m, m) for r in range(group.size)}
        group.run_schedule(REDUCE_SCATTER, src, work, shards, reducer=reducer, chained=False,
                           desc_fields=("reduce_scatter", src.dtype, m, op, -1), timeout=timeout,
                           nbytes=src.nbytes)
    dst.array[:] = work[group.me * m:(group.me + 1) * m]
    if op == "avg":
        dst.divide(group.size)


def broadcast(rt, group: Group, x, root: int, timeout: float, out: Buffer | None = None) -> None:
    """The root's ``x`` into every member's ``x``, or into every member's ``out`` (a Buffer of
    ``x``'s dtype and count sharing no memory with it; ``x`` is then only read)."""
    buf = x if type(x) is Buffer else as_buffer(x)  # (the API's is checked)
    check_root(group, root, "broadcast")
    if buf.count == 0 or group.size == 1:
        if out is not None:
            np.copyto(out.array, buf.array)
        return
    local = group.local_path(timeout)
    if local is not None:  # every member compares the operation at its first step: no agreement after
        local.broadcast(buf, root, timeout, out)
        return
    if out is not None:  # over sockets the result's buffer is what travels: the root's starts as its input
        if group.me == root:
            np.copyto(out.array, buf.array)
        buf = out
    fields = ("broadcast", buf.dtype, buf.count, "", root)
    _rooted(rt, group, fields, timeout, lambda: group.run_schedule(
        ALLGATHER, buf, buf.array, {root: (0, buf.count)}, reducer=None, chained=False, desc_fields=fields,
        timeout=timeout, nbytes=buf.nbytes, root=root))


def reduce(rt, group: Group, x, root: int, op: str, timeout: float, out: Buffer | None = None) -> None:
    """Reduce ``x`` into the root's ``x``, or into the root's ``out`` (as :func:`allreduce`'s)."""
    buf = x if type(x) is Buffer else as_buffer(x)  # (the API's is checked)
    check_root(group, root, "reduce")
    reducer = buf.reducer(op)
    if out is not None and group.me != root:
        out = None  # (only the root's result lands anywhere)
    if buf.count == 0 or group.size == 1:
        if out is not None:
            np.copyto(out.array, buf.array)
        return
    local = group.local_path(timeout)
    if local is not None:
        local.reduce(buf, root, op, timeout, out)
        return
    if out is not None:
        np.copyto(out.array, buf.array)
        buf = out
    work = buf.array if group.me == root else buf.array.copy()  # only the root's buffer changes
    fields = ("reduce", buf.dtype, buf.count, op, root)
    _rooted(rt, group, fields, timeout, lambda: group.run_schedule(
        REDUCE_SCATTER, buf, work, {root: (0, buf.count)}, reducer=reducer, chained=False, desc_fields=fields,
        timeout=timeout, nbytes=buf.nbytes, root=root))
    if op == "avg" and group.me == root:
        buf.divide(group.size)


def _rooted(rt, group: Group, fields: tuple, timeout: float, run) -> None:
    """Run a rooted collective, then agree on what it was.

    In a broadcast or reduce some ranks only send, so the rank that finds a disagreement may be
    the only one to see it while the others return. After the operation every rank allreduces
    (max) the hash of its description and its negation; the allreduce also watches the abort
    record of the operation itself. A rank whose operation failed does not take part: the
    others learn of it from that record. A disagreement is a MismatchError on every rank, naming
    its own operation and a peer's that differs (failures.explain_mismatch)."""
    mine = frames.describe(*fields) >> 1  # fits int64
    run()
    seq = group.last_seq  # the rooted operation's number (what a disagreement is explained under)
    seen = np.array([mine, -mine], dtype=np.int64)
    try:
        allreduce(rt, group, seen, "max", timeout, watch_previous=True)
    except MismatchError as e:  # the rooted operation failed elsewhere: a disagreement about it
        raise _explain(rt, group, seq, fields, e) from e
    except PeerFailure as e:  # the rank that saw the disagreement raised it and left at once
        record = failures.recorded_abort(rt, group, seq)
        if record is None or not record[1].startswith("mismatch|"):
            raise
        raise _explain(rt, group, seq, fields, error_from_abort(record[1], record[0])) from e
    if int(seen[0]) != mine or int(seen[1]) != -mine:
        raise _explain(rt, group, seq, fields, MismatchError(f"the members of {group.name!r} disagree on "
                                                             f"operation #{seq}"))


def _explain(rt, group: Group, seq: int, fields: tuple, error: MismatchError) -> MismatchError:
    """``error`` in this rank's terms: its rooted operation ``seq`` (``fields``) and a peer's."""
    return failures.explain_mismatch(rt, group, seq, error, frames.describe(group.id, group.epoch, *fields),
                                     describe_fields(fields))


def barrier(rt, group: Group, timeout: float) -> None:
    local = group.local_path(timeout) if group.size > 1 else None
    if local is not None:
        local.barrier(timeout)
        return
    token = np.zeros(1, dtype=np.int32)
    allreduce(rt, group, token, "sum", timeout)


def check_root(group: Group, root: int, kind: str) -> None:
    if type(root) is not int or not 0 <= root < group.size:  # (the API's root is checked: an int in range)
        arguments.root(root, group, kind)
