"""Emulated fabrics: a topology built on this machine from Linux network namespaces, veth pairs
and ``tc tbf``: a lab tool for running real jobs on a fabric that is not there (needs root).

Every node of the topology, compute or switch, becomes a network namespace; every pair of nodes
joined by a link gets one veth pair, each end shaped to the scaled bandwidth of the direction
leaving it; switches are routers; ranks run in the namespaces of their compute nodes and reach
the coordinator over a separate management bridge. The pieces:

* :mod:`.plan`: :func:`plan`, everything that will be created, computed without touching the
  system (testable without root); ``--scale`` and ``--prefix`` checks;
* :mod:`.netns`: :func:`up` applies a plan, :func:`down` removes everything that carries the
  prefix and nothing else, whether or not a plan or a state file survived; :func:`current` is
  the fabric that is up under a prefix;
* :mod:`.shaping` (tbf rates) and :mod:`.faults` (:func:`fault`: a link down, throttled, up);
* :mod:`.ranks`: a rank's environment and command inside its namespace;
* :mod:`.options`: the ``--emulate``/``--scale``/``--prefix`` options every command shares;
* :mod:`.iproute`: running ``ip`` and ``tc``, and :func:`require_root`.
"""

from collcomm.emulation.faults import FAULT_MODES, fault, parse_percent, resolve_node
from collcomm.emulation.iproute import require_root
from collcomm.emulation.netns import STATE_DIR, current, down, leftovers, state_file, up
from collcomm.emulation.plan import (DEFAULT_PREFIX, DEFAULT_SCALE, MGMT_OCTETS, MTU, REVERSE_TRICKLE_BITS,
                                     WIRE_PER_PAYLOAD, EmulationError, FabricPlan, Veth, check_prefix, parse_scale,
                                     plan)
from collcomm.emulation.ranks import rank_environment, wrap_command
from collcomm.emulation.shaping import TBF_LATENCY_MS, set_rate

__all__ = [
    "DEFAULT_PREFIX", "DEFAULT_SCALE", "FAULT_MODES", "MGMT_OCTETS", "MTU", "REVERSE_TRICKLE_BITS", "STATE_DIR",
    "TBF_LATENCY_MS", "WIRE_PER_PAYLOAD", "EmulationError", "FabricPlan", "Veth", "check_prefix", "current",
    "down", "fault", "leftovers", "parse_percent", "parse_scale", "plan", "rank_environment", "require_root",
    "resolve_node", "set_rate", "state_file", "up", "wrap_command",
]
