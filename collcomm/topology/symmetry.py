"""Automorphisms of a fabric and the symmetry group the schedule generator exploits.

An automorphism is a permutation of the nodes that maps compute nodes to compute
nodes, switches to switches and every directed edge to an edge of the same
bandwidth. Candidates come from the topology (presets attach generators; files may
list them) and from the ``host`` grouping (a cyclic shift of identical boxes); every
candidate is verified before use, so a wrong hint can never produce a wrong plan.

The generator uses a group that acts *freely* on the compute nodes (no element other
than the identity fixes a rank): then every rank orbit has exactly ``|G|`` members, a
plan built for one representative root maps to every root of its orbit, and the
max-flow checks need only one sink per orbit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Iterable

import numpy as np

from collcomm.errors import TopologyError

if TYPE_CHECKING:  # pragma: no cover
    from collcomm.topology.model import Topology


def verify_automorphism(topo: "Topology", mapping: dict[str, str], where: str = "automorphism") -> dict[str, str]:
    """Check that ``mapping`` (moved nodes only; the rest stay) is an automorphism.

    Returns the mapping without fixed points; raises TopologyError naming the problem.
    """
    for a, b in mapping.items():
        for nid in (a, b):
            if nid not in topo.index:
                raise TopologyError(f"{where}: unknown node {nid!r}")
    perm = {nid: mapping.get(nid, nid) for nid in topo.order}
    if len(set(perm.values())) != len(perm):
        raise TopologyError(f"{where}: not a permutation (two nodes map to the same node)")
    for a, b in perm.items():
        if topo.node[a].kind != topo.node[b].kind:
            raise TopologyError(f"{where}: maps {topo.node[a].kind} {a!r} to {topo.node[b].kind} {b!r}")
    for (u, v), bw in topo.capacity.items():
        image = topo.capacity.get((perm[u], perm[v]))
        if image != bw:
            raise TopologyError(f"{where}: edge {u} -> {v} ({bw} GB/s) maps to {perm[u]} -> {perm[v]} "
                                f"({image if image is not None else 'no edge'})")
    return {a: b for a, b in perm.items() if a != b}


def _as_index_perm(topo: "Topology", mapping: dict[str, str]) -> np.ndarray:
    perm = np.arange(len(topo.order), dtype=np.int64)
    for a, b in mapping.items():
        perm[topo.index[a]] = topo.index[b]
    return perm


def host_shift_candidate(topo: "Topology") -> dict[str, str] | None:
    """The cyclic shift box i -> box i+1 of identically built hosts, if the hosts look alike."""
    groups: "OrderedDict[str, list]" = OrderedDict()
    for n in topo.nodes:
        if n.host is not None:
            groups.setdefault(n.host, []).append(n)
    if len(groups) < 2:
        return None
    members = list(groups.values())
    shape = [n.kind for n in members[0]]
    if any([n.kind for n in m] != shape for m in members):
        return None
    mapping = {}
    for i, m in enumerate(members):
        nxt = members[(i + 1) % len(members)]
        for a, b in zip(m, nxt):
            mapping[a.id] = b.id
    return mapping


class SymmetryGroup:
    """A finite group of node permutations acting freely on the ranks.

    ``elements[g]`` is an index permutation (over ``topo.order``); row 0 is the identity.
    """

    def __init__(self, topo: "Topology", elements: np.ndarray, generators: list[np.ndarray] | None = None):
        self.topo = topo
        self.elements = np.asarray(elements, dtype=np.int64)
        self.generators: list[np.ndarray] = list(generators or [])
        self.order = len(self.elements)
        n = topo.num_ranks
        # Orbit representatives of the ranks: the smallest index of each orbit.
        seen = np.zeros(n, dtype=bool)
        reps = []
        for c in range(n):
            if not seen[c]:
                reps.append(c)
                seen[self.elements[:, c]] = True
        self.rank_representatives: list[int] = reps

    @property
    def trivial(self) -> bool:
        return self.order == 1

    def __repr__(self) -> str:
        return f"SymmetryGroup(order={self.order}, rank orbits={len(self.rank_representatives)})"


def _closure(gens: list[np.ndarray], n_nodes: int, limit: int) -> np.ndarray | None:
    """All products of ``gens`` (as rows), or None when the group exceeds ``limit`` elements."""
    identity = np.arange(n_nodes, dtype=np.int64)
    elems = [identity]
    seen = {identity.tobytes()}
    frontier = [identity]
    while frontier:
        nxt = []
        for e in frontier:
            for g in gens:
                p = g[e]  # apply e, then g
                key = p.tobytes()
                if key not in seen:
                    seen.add(key)
                    elems.append(p)
                    nxt.append(p)
                    if len(elems) > limit:
                        return None
        frontier = nxt
    return np.stack(elems)


def _acts_freely(elements: np.ndarray, n_ranks: int) -> bool:
    if len(elements) == 1:
        return True
    ranks = np.arange(n_ranks)
    return bool(np.all(elements[1:, :n_ranks] != ranks))


def symmetry_group(topo: "Topology", use: bool = True) -> SymmetryGroup:
    """The largest group generated greedily by the verified candidate automorphisms
    that still acts freely on the ranks (the trivial group when ``use`` is False)."""
    n_nodes = len(topo.order)
    identity = np.arange(n_nodes, dtype=np.int64)[None, :]
    if not use:
        return SymmetryGroup(topo, identity)
    candidates: list[dict[str, str]] = list(topo.automorphisms)
    shift = host_shift_candidate(topo)
    if shift is not None:
        try:
            candidates.append(verify_automorphism(topo, shift))
        except TopologyError:
            pass
    gens: list[np.ndarray] = []
    elements = identity
    for cand in candidates:
        if not cand:
            continue
        g = _as_index_perm(topo, cand)
        if any(np.array_equal(g, e) for e in elements):
            continue
        trial = _closure(gens + [g], n_nodes, limit=topo.num_ranks)
        if trial is not None and _acts_freely(trial, topo.num_ranks):
            gens.append(g)
            elements = trial
    return SymmetryGroup(topo, elements, gens)


def subgroups(group: SymmetryGroup) -> list[SymmetryGroup]:
    """The distinct groups generated by proper, non-empty subsets of ``group``'s generators,
    largest first, then the trivial group."""
    from itertools import combinations

    gens = group.generators
    n_nodes = group.elements.shape[1]
    found: list[SymmetryGroup] = []
    seen = {frozenset(e.tobytes() for e in group.elements)}
    for size in range(len(gens) - 1, 0, -1):
        for subset in combinations(gens, size):
            elems = _closure(list(subset), n_nodes, limit=group.order)
            key = frozenset(e.tobytes() for e in elems)
            if key not in seen:
                seen.add(key)
                found.append(SymmetryGroup(group.topo, elems, list(subset)))
    found.sort(key=lambda g: -g.order)
    identity = np.arange(n_nodes, dtype=np.int64)[None, :]
    return found + [SymmetryGroup(group.topo, identity)]


def orbit_partition(group: SymmetryGroup, items: Iterable[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
    """Split tuples of node indices into orbits under ``group`` (each orbit listed once)."""
    remaining = list(dict.fromkeys(items))
    done: set[tuple[int, ...]] = set()
    orbits = []
    for t in remaining:
        if t in done:
            continue
        arr = group.elements[:, list(t)]
        orbit = list(dict.fromkeys(tuple(int(x) for x in row) for row in arr))
        done.update(orbit)
        orbits.append(orbit)
    return orbits
