"""The planner: which schedule a group runs for a collective and a message size.

For each group the planner holds the group's fabric — the job's topology
(``--topology`` / ``COLLCOMM_TOPOLOGY``) cut down to the group's ranks, or, without
one, a flat switch model of the hosts the ranks run on — and the candidate
schedules of every algorithm that has a plan on it (ForestColl, ring, double binary
tree, recursive halving-doubling). It picks, per collective and message size, the
candidate with the smallest alpha-beta estimate (:func:`collcomm.schedules.evaluate.
estimate_seconds`): latency-bound small messages favour shallow trees, large ones the
highest bandwidth. Schedules and choices are cached.
"""

from __future__ import annotations

import threading
from fractions import Fraction

from collcomm.errors import CollectiveError, TopologyError
from collcomm.schedules import evaluate, generate
from collcomm.schedules.ir import ALLGATHER, ALLREDUCE, REDUCE_SCATTER, Phase, Schedule
from collcomm.topology.model import COMPUTE, SWITCH, Link, Node, Topology

CANDIDATES = ("forestcoll", "ring", "tree", "halving-doubling")
# Nominal speeds of the flat model (GB/s, microseconds): only their ratios matter for choosing.
LOCAL_BANDWIDTH = Fraction(8)
LOCAL_LATENCY_US = 5.0
NETWORK_BANDWIDTH = Fraction(5, 4)
NETWORK_LATENCY_US = 20.0


def flat_topology(hostnames: list[str], name: str = "flat") -> Topology:
    """Ranks on one host share a host switch; hosts share one network switch."""
    hosts = list(dict.fromkeys(hostnames))
    nodes = [Node(f"rank{i}", COMPUTE, f"host{hosts.index(h)}") for i, h in enumerate(hostnames)]
    links = []
    for hi in range(len(hosts)):
        nodes.append(Node(f"host{hi}.switch", SWITCH, f"host{hi}"))
    for i, h in enumerate(hostnames):
        links.append(Link(f"rank{i}", f"host{hosts.index(h)}.switch", LOCAL_BANDWIDTH, LOCAL_LATENCY_US))
    if len(hosts) > 1:
        nodes.append(Node("network", SWITCH))
        for hi, h in enumerate(hosts):
            per_host = sum(1 for x in hostnames if x == h)
            links.append(Link(f"host{hi}.switch", "network", NETWORK_BANDWIDTH * per_host, NETWORK_LATENCY_US))
    return Topology(name, nodes, links)


def restrict(topo: Topology, ranks: list[int], name: str) -> Topology:
    """The fabric of a group: its ranks (in group order), the switches, and the links among them.
    Raises TopologyError when the group's ranks cannot reach each other without other ranks."""
    if ranks == list(range(topo.num_ranks)):
        return topo
    keep = [topo.compute[r] for r in ranks]
    keep_set = set(keep) | set(topo.switches)
    links = [l for l in topo.links if l.src in keep_set and l.dst in keep_set]
    used = {l.src for l in links} | {l.dst for l in links}
    nodes = [topo.node[c] for c in keep] + [topo.node[s] for s in topo.switches if s in used]
    return Topology(name, nodes, links)


class Planner:
    """Schedules for one group's fabric, chosen per collective and size."""

    def __init__(self, topo: Topology, alpha_us: float = 30.0, chunk_bytes: int = 1 << 20):
        self.topo = topo
        self.alpha_us = alpha_us
        self.chunk_bytes = chunk_bytes
        self._schedules: dict[tuple[str, str], Schedule | None] = {}
        self._choice: dict[tuple[str, int], Schedule] = {}
        self._lock = threading.Lock()

    def candidates(self, collective: str) -> list[Schedule]:
        out = []
        for name in CANDIDATES:
            key = (collective, name)
            if key not in self._schedules:
                try:
                    self._schedules[key] = generate(self.topo, collective, name)
                except (CollectiveError, ImportError):
                    self._schedules[key] = None  # this algorithm has no plan on this fabric
            if self._schedules[key] is not None:
                out.append(self._schedules[key])
        if not out:
            raise TopologyError(f"no algorithm has a {collective} plan on {self.topo.name}")
        return out

    def schedule(self, collective: str, nbytes: int, algorithm: str | None = None,
                 root: int | None = None) -> Schedule:
        """The schedule to run ``collective`` on a buffer of ``nbytes`` (or the named algorithm's).

        ``root`` (a rank of the fabric): only that root's trees will run, moving all ``nbytes``
        (a broadcast on an allgather plan, a reduce on a reduce-scatter plan), so the candidates
        are compared on those trees alone: the allgather that is best when every rank sends its
        part may send a single root's buffer over its one link n - 1 times (ForestColl on a star),
        where a ring's chain from the root crosses every link once."""
        if collective not in (ALLGATHER, REDUCE_SCATTER, ALLREDUCE):
            raise ValueError(f"no schedule for {collective}")
        if root is not None and not 0 <= root < self.topo.num_ranks:
            raise ValueError(f"root {root} is not a rank of {self.topo.name}")
        with self._lock:
            cands = self.candidates(collective)
            if algorithm is not None:
                for s in cands:
                    if s.algorithm == algorithm:
                        return s
                raise TopologyError(f"algorithm {algorithm!r} has no {collective} plan on {self.topo.name}")
            bucket = max(nbytes, 1).bit_length()
            key = (collective, bucket, root)
            if key not in self._choice:
                size = 1 << bucket
                if root is None:
                    self._choice[key] = min(cands, key=lambda s: evaluate.estimate_seconds(
                        s, self.topo, size, self.chunk_bytes, self.alpha_us))
                else:
                    self._choice[key] = min(cands, key=lambda s: self._rooted_seconds(s, root, size))
            return self._choice[key]

    def _rooted_seconds(self, schedule: Schedule, root: int, nbytes: int) -> float:
        """The estimate for ``root``'s trees alone carrying ``nbytes`` (its shard is the whole buffer)."""
        root_id = self.topo.compute[root]
        phase = schedule.phases[0]
        alone = Phase(phase.collective, [t for t in phase.trees if t.root == root_id])
        return evaluate.estimate_phase_seconds(alone, self.topo, nbytes * self.topo.num_ranks,
                                               self.chunk_bytes, self.alpha_us)
