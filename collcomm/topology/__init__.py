"""Fabrics: the Topology model, its JSON format, presets, symmetry, inference from measurements and
plots. Pure: values in, values out (a test checks that importing it opens no socket and starts no
process or thread)."""

from collcomm.topology.jsonio import FORMAT, dumps, from_dict, load, loads, save, to_dict
from collcomm.topology.model import COMPUTE, SWITCH, Link, Node, Topology
from collcomm.topology.presets import PRESETS, make_preset
from collcomm.topology.symmetry import SymmetryGroup, symmetry_group

__all__ = [
    "COMPUTE", "SWITCH", "FORMAT", "Link", "Node", "Topology", "PRESETS", "SymmetryGroup",
    "dumps", "from_dict", "load", "loads", "make_preset", "save", "symmetry_group", "to_dict",
]
