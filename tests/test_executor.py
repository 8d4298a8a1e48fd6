"""The executor's send order, without a network: pieces of several trees that share a peer start
in proportion to their trees' sizes, and at most SEND_WINDOW frames per peer wait for their
acknowledgement, the rest going out least-advanced first as acknowledgements come in."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from collcomm.schedules.ir import ALLGATHER, Phase, Schedule, Tree, TreeEdge
from collcomm.runtime import executor
from collcomm.runtime.executor import ExecutionPlan, Operation


def two_node_schedule(shares: list[Fraction]) -> Schedule:
    """Allgather trees a -> b, all rooted at a, with these shares of a's shard."""
    trees = [Tree("a", s, (TreeEdge("a", "b", ("a", "b")),)) for s in shares]
    return Schedule(ALLGATHER, "test", "two-nodes", ["a", "b"], [Phase(ALLGATHER, trees)])


def split(weights: list[int]) -> list[Fraction]:
    total = sum(weights)
    return [Fraction(w, total) for w in weights]


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(1, 8), min_size=1, max_size=5), chunks=st.integers(1, 40))
def test_pieces_start_in_proportion_to_their_trees(weights, chunks):
    size = 24 * sum(weights) * chunks
    plan = ExecutionPlan(two_node_schedule(split(weights)), 0, {0: (0, size)}, 24)
    pieces = plan.phases[0]
    total = {}
    for pc in pieces:
        total[pc.tree] = total.get(pc.tree, 0) + 1
    assert sum(total.values()) == len(pieces) == len({(pc.tree, pc.chunk) for pc in pieces})
    seen = dict.fromkeys(total, 0)
    for pc in pieces:
        # Within a tree, chunks in order; across trees, every prefix has advanced each tree by
        # the same fraction of its chunks, within one chunk of each.
        assert pc.chunk == seen[pc.tree]
        seen[pc.tree] += 1
        done = {t: Fraction(seen[t], total[t]) for t in total}
        slack = {t: Fraction(1, total[t]) for t in total}
        for t in total:
            for u in total:
                assert done[t] - done[u] <= slack[t] + slack[u], (weights, seen)


class HeldLink:
    """Records what is sent and holds each frame's completion until acknowledge() is called."""

    def payload_verified(self, n):  # (collcomm.transport.interface.Link) payloads carry their checksum
        return False

    def __init__(self):
        self.sent: list[tuple[int, int]] = []
        self.held: list = []

    def send(self, header, payload, done):
        self.sent.append((header.tree, header.chunk))
        self.held.append(done)

    def acknowledge(self, i: int = 0) -> None:
        self.held.pop(i)()


def test_a_window_of_frames_per_peer_and_the_rest_least_advanced_first(monkeypatch):
    monkeypatch.setattr(executor, "SEND_WINDOW", 3)
    weights = [3, 1]  # tree 0: 12 chunks, tree 1: 4
    plan = ExecutionPlan(two_node_schedule(split(weights)), 0, {0: (0, 160)}, 10)
    link = HeldLink()
    op = Operation(links=lambda peer: link, member_of=lambda world: world, me=0, group=1, epoch=0, op_seq=1,
                   desc=0, describe="test allgather", work=np.zeros(160, np.float32), plan=plan, reducer=None,
                   chained=False, max_chunk_bytes=40)
    op.start()
    assert len(link.sent) == 3 and not op.done
    order = sorted(((pc.tree, pc.chunk) for pc in plan.phases[0]),
                   key=lambda k: (Fraction(2 * k[1] + 1, 2 * (12 if k[0] == 0 else 4)), k[0]))
    assert link.sent == order[:3]
    while link.held:
        assert len(link.held) <= 3
        link.acknowledge(len(link.held) - 1)  # out of order: the window only counts
    assert link.sent == order  # every piece once, least advanced first
    assert op.done and op.error is None
