"""Brute-force references: the exact optimum by enumerating every cut."""

from fractions import Fraction
from itertools import combinations

from collcomm.topology.model import Topology


def brute_force_x_star(topo: Topology) -> Fraction:
    """min over node sets S (holding a rank, not all ranks) of B+(S) / |S ∩ ranks|."""
    nodes = list(topo.order)
    ranks = set(topo.compute)
    best = None
    for size in range(1, len(nodes) + 1):
        for subset in combinations(nodes, size):
            s = set(subset)
            inside = len(s & ranks)
            if inside == 0 or inside == len(ranks):
                continue
            ratio = topo.out_bandwidth(s) / inside
            if best is None or ratio < best:
                best = ratio
    return best
