"""Alltoall: a pairwise exchange of blocks on the group's connections, without a schedule (or,
when every member is on this machine, through shared memory: collcomm.runtime.local)."""

from __future__ import annotations

import numpy as np

from collcomm.errors import CollectiveError, MismatchError
from collcomm.runtime import arguments
from collcomm.runtime.group import Group
from collcomm.runtime.operation import OperationEvents
from collcomm.transport import frames
from collcomm.transport.frames import Header


def alltoall(rt, group: Group, out, x, timeout: float) -> None:
    """Block j of ``x`` goes to group rank j and lands there as block ``group.me`` of ``out``.

    A pairwise exchange on the group's connections: in step k = 1..n-1 this rank sends its
    block to member (me + k) mod n and receives from member (me - k) mod n, so in every step
    each member sends to a different peer. Sends are queued on the links' sender threads and
    every receive lands straight in ``out`` (registered before the first send), so no order of
    arrival can deadlock. ``out`` may be ``x`` itself (the input is then copied first)."""
    dst, src = arguments.exchanged(out, x, group.size)  # (Buffers the API checked pass as they are)
    n, me = group.size, group.me
    block = src.count // n
    local = group.local_path(timeout) if block and n > 1 else None
    if local is not None:  # every member on this machine: through shared memory (in place too)
        local.alltoall(dst, src, timeout)
        return
    data = src.array
    if np.may_share_memory(data, dst.array):
        data = data.copy()  # in place: blocks arrive over blocks not sent yet
    dst.array[me * block:(me + 1) * block] = data[me * block:(me + 1) * block]
    if block == 0 or n == 1:
        return
    seq = group.next_seq()
    itemsize = data.dtype.itemsize
    chunk_elems = max(1, group.chunk_bytes // itemsize)
    desc = frames.describe(group.id, group.epoch, "alltoall", dst.dtype, dst.count, "", -1)
    links: dict[int, object] = {}
    op = Alltoall(links=links.__getitem__, member_of=group.member_index, me=me, n=n, group=group.id,
                  epoch=group.epoch, op_seq=seq, desc=desc, describe=f"alltoall of {dst.count} {dst.dtype}",
                  send=data, recv=dst.array, block=block, chunk_elems=chunk_elems)
    group.execute(op, seq, [(me + k) % n for k in range(1, n)], links, timeout)


class Alltoall(OperationEvents):
    """An alltoall as frame events (an operation without a schedule): for every other
    member, the chunks of the block to send and of the block to receive. Frames carry tree 0 and
    the chunk number; a frame is accepted only from the member whose block it is, with exactly
    the chunk's length and this operation's description (else MismatchError, as everywhere)."""

    def __init__(self, *, links, member_of, me: int, n: int, group: int, epoch: int, op_seq: int, desc: int,
                 describe: str, send: np.ndarray, recv: np.ndarray, block: int, chunk_elems: int):
        chunks = -(-block // chunk_elems)
        super().__init__(links=links, member_of=member_of, me=me, group=group, epoch=epoch, op_seq=op_seq,
                         desc=desc, describe=describe, events=2 * (n - 1) * chunks,
                         from_peer={p: chunks for p in range(n) if p != me})
        self.n = n
        self.itemsize = send.dtype.itemsize
        self.send_bytes, self.recv_bytes = send.view(np.uint8), recv.view(np.uint8)
        self.block, self.chunk_elems, self.chunks = block, chunk_elems, chunks
        self._seen: set[tuple[int, int]] = set()

    def _span(self, member: int, chunk: int) -> tuple[int, int]:
        """Byte range of ``chunk`` of block ``member``."""
        lo = member * self.block + chunk * self.chunk_elems
        hi = min(lo + self.chunk_elems, (member + 1) * self.block)
        return lo * self.itemsize, hi * self.itemsize

    def start(self) -> None:
        for k in range(1, self.n):  # pairwise order: step k sends to me + k
            peer = (self.me + k) % self.n
            for c in range(self.chunks):
                if self.error is not None:
                    return  # a failed operation sends nothing more
                lo, hi = self._span(peer, c)
                view = memoryview(self.send_bytes[lo:hi])
                try:
                    link = self._links(peer)
                    link.send(frames.data_header(self.group, self.epoch, self.op_seq, 0, c, self.desc, view,
                                                 verified=link.payload_verified(view.nbytes)), view, self._event_done)
                except CollectiveError as e:
                    self.failed(e)
                    return

    def destination(self, header: Header, world_peer: int) -> memoryview:
        peer = self._member_of(world_peer)
        if header.desc != self.desc:  # (its words come from the coordinator: failures.explain_mismatch)
            raise MismatchError(f"rank {world_peer} runs another operation #{self.op_seq} than {self.describe}",
                                rank=world_peer)
        c = header.chunk
        lo, hi = self._span(peer, c) if 0 <= c < self.chunks else (0, -1)
        with self._lock:
            fresh = (peer, c) not in self._seen
            self._seen.add((peer, c))
        if header.tree != 0 or header.length != hi - lo or not fresh:
            raise MismatchError(f"rank {world_peer} sent an unexpected piece (chunk {c}, {header.length} bytes) for "
                                f"{self.describe} #{self.op_seq}", rank=world_peer)
        return memoryview(self.recv_bytes[lo:hi])

    def delivered(self, header: Header, view: memoryview, world_peer: int) -> None:
        self._event_done(self._member_of(world_peer))
