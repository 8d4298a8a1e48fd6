"""TLS for the coordinator: loading and checking certificates, and explaining handshake failures.

The coordinator serves TLS with ``collcomm coordinator --tls-cert CERT.pem --tls-key KEY.pem``
(:func:`load_server_files`, :meth:`ServerTLS.credentials`); every client (ranks, the launcher,
``collcomm status``) verifies it with the CA certificate named by ``COLLCOMM_TLS_CA``
(:func:`client_tls_from_env`). Without ``COLLCOMM_TLS_CA`` clients connect in plaintext. The TLS
itself is grpc's own (``grpc.ssl_server_credentials``, ``grpc.ssl_channel_credentials``); this
module only reads and checks the PEM files (with ``cryptography``) so that a bad file is one line
at start-up rather than a handshake that never completes, and turns grpc's handshake errors into
one-line messages (:func:`explain_connect_failure`).

Clients check the server's name as well as its signature: the certificate must name the host the
client connects to in its subjectAltName, as a DNS name (``localhost``, ``coord.example``) or, for
a client that connects by IP address (``COLLCOMM_COORDINATOR=10.0.0.1:29400``), as an IP address
entry. ``COLLCOMM_TLS_SERVER_NAME=NAME`` makes clients expect NAME instead of the host they
connect to (grpc's ``grpc.ssl_target_name_override``). The client is not asked for a certificate:
the job token authenticates it, and TLS keeps that token private on the wire.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field

from collcomm.coordinator.files import read_small_file
from collcomm.errors import CollectiveError

CA_ENV = "COLLCOMM_TLS_CA"
SERVER_NAME_ENV = "COLLCOMM_TLS_SERVER_NAME"
MAX_PEM_BYTES = 1 << 20  # a CA bundle, a chain or a key is far smaller


class TLSConfigError(CollectiveError, ValueError):
    """A TLS certificate, key or CA file is missing, unreadable or not what it should be."""


# ------------------------------------------------------------------------------ reading PEM files
def read_pem(path: str, label: str) -> bytes:
    """The bytes of the PEM file ``path``; ``label`` starts every error ("--tls-cert cert.pem",
    "COLLCOMM_TLS_CA=ca.pem"). Read up to MAX_PEM_BYTES, without blocking (see files.py)."""
    return read_small_file(path, label, MAX_PEM_BYTES, TLSConfigError, too_large=", not a PEM file")


def _certificates(data: bytes, label: str) -> list:
    from cryptography import x509

    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TLSConfigError(f"{label}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(f"{label}: not a valid PEM certificate ({_reason(e)})") from None


def _check_dates(cert, label: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise TLSConfigError(f"{label}: the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        raise TLSConfigError(f"{label}: the certificate is not valid before "
                             f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)")


def _reason(err: Exception) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def certificate_names(cert) -> list[str]:
    """The subjectAltName entries a client can match (``DNS:name``, ``IP:address``)."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return ([f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
            + [f"IP:{a}" for a in san.get_values_for_type(x509.IPAddress)])


# -------------------------------------------------------------------------------- the server's side
@dataclass(frozen=True)
class ServerTLS:
    """A checked certificate chain and its private key, as grpc takes them (PEM bytes)."""

    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    names: tuple[str, ...] = ()  # the leaf's subjectAltName entries, for the operator

    def credentials(self):
        import grpc

        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def check_server_pair(cert_pem: bytes, key_pem: bytes, cert_label: str = "the TLS certificate",
                      key_label: str = "the TLS key") -> ServerTLS:
    """A :class:`ServerTLS` from PEM bytes: the chain parses, its first certificate is valid now,
    the key parses, is not encrypted and belongs to that certificate. Raises TLSConfigError
    starting with the label of the file at fault."""
    from cryptography.hazmat.primitives import serialization

    leaf = _certificates(cert_pem, cert_label)[0]
    _check_dates(leaf, cert_label)
    if b"PRIVATE KEY-----" not in key_pem:
        raise TLSConfigError(f"{key_label}: no PEM private key in it (-----BEGIN PRIVATE KEY-----)")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise TLSConfigError(f"{key_label}: the key is encrypted; give it unencrypted (mode 0600): the "
                             "coordinator cannot ask for a passphrase") from None
    except Exception as e:  # noqa: BLE001 - ValueError, UnsupportedAlgorithm: all one answer
        raise TLSConfigError(f"{key_label}: not a usable PEM private key ({_reason(e)})") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise TLSConfigError(f"{key_label} is not the private key of {cert_label}: give the key the "
                             "certificate was issued for")
    return ServerTLS(cert_pem, key_pem, tuple(certificate_names(leaf)))


def load_server_files(cert_path: str | None, key_path: str | None) -> ServerTLS | None:
    """``--tls-cert`` and ``--tls-key`` (both or neither; None: no TLS), read and checked."""
    if not cert_path and not key_path:
        return None
    if not cert_path or not key_path:
        given, missing = ("--tls-cert", "--tls-key") if cert_path else ("--tls-key", "--tls-cert")
        raise TLSConfigError(f"{given} needs {missing} too: give the certificate and its private key together")
    cert_label, key_label = f"--tls-cert {cert_path}", f"--tls-key {key_path}"
    return check_server_pair(read_pem(cert_path, cert_label), read_pem(key_path, key_label), cert_label, key_label)


def as_server_tls(tls) -> ServerTLS | None:
    """What ``CoordinatorServer(tls=...)`` accepts: None, a ServerTLS, or ``(cert_pem, key_pem)``."""
    if tls is None or isinstance(tls, ServerTLS):
        return tls
    try:
        cert_pem, key_pem = tls
    except (TypeError, ValueError):
        raise TypeError("tls must be None, a ServerTLS or a (cert_pem, key_pem) pair of bytes") from None
    if not isinstance(cert_pem, bytes) or not isinstance(key_pem, bytes):
        raise TypeError("tls must be a (cert_pem, key_pem) pair of bytes (PEM contents, not paths)")
    return check_server_pair(cert_pem, key_pem)


# -------------------------------------------------------------------------------- the clients' side
@dataclass(frozen=True)
class ClientTLS:
    """How a client verifies the coordinator: the CA certificates (PEM) it trusts, where they came
    from (for messages), and optionally the name the server's certificate must carry."""

    ca_pem: bytes = field(repr=False)
    ca_path: str = "(given)"
    server_name: str | None = None

    def credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem)

    def channel_options(self) -> tuple:
        return (("grpc.ssl_target_name_override", self.server_name),) if self.server_name else ()


def load_ca(path: str, server_name: str | None = None, label: str | None = None) -> ClientTLS:
    """The CA file ``path`` (PEM, one or more certificates), read and checked; ``label`` starts
    errors (default ``COLLCOMM_TLS_CA=path``)."""
    label = label or f"{CA_ENV}={path}"
    data = read_pem(path, label)
    for cert in _certificates(data, label):
        _check_dates(cert, label)
    return ClientTLS(data, path, server_name or None)


def client_tls_from_env(environ=None) -> ClientTLS | None:
    """The TLS settings of ``COLLCOMM_TLS_CA`` and ``COLLCOMM_TLS_SERVER_NAME`` (None: plaintext)."""
    environ = os.environ if environ is None else environ
    path = (environ.get(CA_ENV) or "").strip()
    name = (environ.get(SERVER_NAME_ENV) or "").strip()
    if not path:
        if name:
            raise TLSConfigError(f"{SERVER_NAME_ENV} is set but {CA_ENV} is not: set {CA_ENV} to the coordinator's "
                                 f"CA certificate too, or unset {SERVER_NAME_ENV}")
        return None
    return load_ca(path, name or None)


# ------------------------------------------------------------------ what a failed connection means
_VERIFY = re.compile(r"CERTIFICATE_VERIFY_FAILED:?\s*([^:]*)")
_SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)")
_NOT_SIGNED = ("unable to get local issuer", "unable to get issuer", "self signed", "self-signed")


def explain_connect_failure(details: str, address: str, tls: ClientTLS | None) -> tuple[str, bool] | None:
    """What grpc's last connection error (``details`` of a failed call) says about TLS, as
    ``(one-line message, certain)``; None when it is not about TLS (a refused connection: the
    coordinator may still be starting). ``certain`` is False for a plaintext client whose
    connection was closed before the server spoke: a TLS server does that, and so, rarely, does
    a server going away; the caller waits for several such failures in a row before believing it."""
    text = " ".join((details or "").split())
    host = address.rpartition(":")[0].strip("[]")
    if tls is not None:
        name = tls.server_name or host
        if "Hostname Verification" in text or "No match found for server name" in text:
            if tls.server_name:
                return (f"the TLS certificate of the coordinator at {address} does not name {name!r}, the name "
                        f"{SERVER_NAME_ENV} asks for (hostname verification failed); set {SERVER_NAME_ENV} to a DNS "
                        "name or IP address in the certificate's subjectAltName", True)
            return (f"the TLS certificate of the coordinator at {address} does not name {name!r} (hostname "
                    "verification failed); connect by a DNS name or IP address in its subjectAltName, or set "
                    f"{SERVER_NAME_ENV} to one of them", True)
        verify = _VERIFY.search(text)
        if verify:
            reason = verify.group(1).strip() or "certificate verification failed"
            verdict = "is not signed by" if any(n in reason for n in _NOT_SIGNED) else "failed verification against"
            return (f"the TLS certificate of the coordinator at {address} {verdict} {CA_ENV} ({tls.ca_path}): "
                    f"{reason}; {CA_ENV} must be the CA certificate that signed the coordinator's --tls-cert", True)
        if "handshake failed" in text.lower():
            found = _SSL_REASON.search(text)
            reason = found.group(1) if found else "handshake failed"
            hint = " (it does not speak TLS)" if reason == "WRONG_VERSION_NUMBER" else ""
            return (f"the coordinator at {address} did not complete a TLS handshake{hint}: {reason}; start it with "
                    f"--tls-cert and --tls-key, or unset {CA_ENV} to connect in plaintext", True)
        return None
    if text.endswith("Socket closed") or "Connection reset by peer" in text:
        return (f"the coordinator at {address} closed the connection before speaking gRPC: it probably requires "
                f"TLS; set {CA_ENV} to the CA certificate that signed its --tls-cert", False)
    return None

