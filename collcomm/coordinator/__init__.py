"""The coordinator: the job's control plane, a small gRPC service with a protobuf contract.

Ranks register their data listeners and get the peer table (rendezvous), form groups by name
(only the members call), report failed ranks (every group of the rank moves to a new epoch),
poll a group's status to learn which rank failed, and share small values through a key-value
store with waiting gets and atomic counters. Every call proves the job token.

- ``coordinator.proto``: the contract (package ``collcomm.coordinator.v1``); the generated
  ``coordinator_pb2*.py`` are committed; regenerate with
  ``python -m collcomm.coordinator.regenerate`` (needs ``grpcio-tools``, a build tool only).
- :mod:`.state`: the decisions as pure data and functions, testable without a network.
- :mod:`.server`: :class:`CoordinatorServer` (plaintext, or TLS with a certificate and key).
- :mod:`.client`: :class:`CoordinatorClient`, with typed, one-line errors; verifies a TLS
  coordinator with ``COLLCOMM_TLS_CA``.
- :mod:`.tls`: reading and checking certificates, keys and CA files; what a failed TLS handshake
  means, in one line.
- :mod:`.tokens`: the job token outside the process (``COLLCOMM_TOKEN``, token files of mode 0600);
  never in argv, logs or error messages.
- :mod:`.standalone`: :func:`serve_forever` and the options of ``collcomm coordinator``.

Names are imported lazily, so ``import collcomm.coordinator.state`` needs no gRPC.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CoordinatorClient": "client", "CoordinatorError": "client", "CoordinatorUnavailable": "client",
    "CoordinatorServer": "server", "serve_forever": "standalone",
    "ClientTLS": "tls", "ServerTLS": "tls", "TLSConfigError": "tls", "TokenError": "tokens",
    "CoordinatorState": "state", "DeadRank": "state", "FailureOutcome": "state",
    "GroupInfo": "state", "Peer": "state", "PeerTable": "state", "Summary": "state",
    "WORLD_GROUP_ID": "state", "EXTERNAL_REPORTER": "state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'collcomm.coordinator' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
