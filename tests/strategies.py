"""Hypothesis strategies for random fabrics: one-way and two-way links, parallel links, switches."""

from fractions import Fraction

from hypothesis import strategies as st

from collcomm.topology.model import COMPUTE, SWITCH, Link, Node, Topology

BANDWIDTHS = [Fraction(1), Fraction(2), Fraction(3), Fraction(1, 2), Fraction(3, 2), Fraction(5)]


@st.composite
def fabrics(draw, max_compute=5, max_switches=2, max_extra_links=8):
    """A random fabric whose ranks can all reach each other: a random ring through the ranks
    (one-way or two-way) plus random links among ranks and switches, parallel links allowed."""
    n = draw(st.integers(2, max_compute))
    s = draw(st.integers(0, max_switches))
    ranks = [f"r{i}" for i in range(n)]
    switches = [f"s{i}" for i in range(s)]
    nodes = [Node(r, COMPUTE) for r in ranks] + [Node(x, SWITCH) for x in switches]
    order = draw(st.permutations(ranks))
    links = []
    for i in range(n):
        a, b = order[i], order[(i + 1) % n]
        if n == 2 and i == 1:
            if draw(st.booleans()):
                links.append(Link(a, b, draw(st.sampled_from(BANDWIDTHS)), 1.0, draw(st.booleans())))
            continue
        links.append(Link(a, b, draw(st.sampled_from(BANDWIDTHS)), 1.0, draw(st.booleans())))
    if n == 2 and len(links) == 1 and not links[0].duplex:
        links.append(Link(links[0].dst, links[0].src, draw(st.sampled_from(BANDWIDTHS)), 1.0, False))
    everyone = ranks + switches
    for sw in switches:  # every switch is attached to something
        links.append(Link(draw(st.sampled_from(ranks)), sw, draw(st.sampled_from(BANDWIDTHS)), 1.0,
                          draw(st.booleans())))
    for _ in range(draw(st.integers(0, max_extra_links))):
        a = draw(st.sampled_from(everyone))
        b = draw(st.sampled_from([x for x in everyone if x != a]))
        links.append(Link(a, b, draw(st.sampled_from(BANDWIDTHS)), 1.0, draw(st.booleans())))
    return Topology("random", nodes, links)
