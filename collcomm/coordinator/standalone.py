"""The coordinator as a program: ``collcomm coordinator`` and ``python -m collcomm.coordinator``.

Both take the same options (:func:`add_arguments`) and run :func:`serve_forever` until a Shutdown
call, SIGTERM or Ctrl-C::

    --host H --port P          where to listen (default 0.0.0.0:29400; port 0: any free port)
    --tls-cert C --tls-key K   serve TLS (both or neither); ranks verify it with COLLCOMM_TLS_CA
    --token-file PATH          the job token: read from PATH if it exists (a file only its owner
                               may read), else generated and written to PATH (created with mode 0600)

Without ``--token-file`` the token is ``$COLLCOMM_TOKEN``; without either, one is generated and
written to a new file (mode 0600, a random name in ``$XDG_RUNTIME_DIR`` or the temporary
directory) that is removed when the coordinator stops. The token is never printed, and
``--token`` is refused (argv is visible to every user in ``ps``). Output: the first line is
``collcomm coordinator listening on HOST:PORT`` (with TLS, `` with TLS (certificate names:
...)`` follows); a generated token adds ``job token written to PATH (mode 0600) ...``.

This module imports nothing heavy at load time: the ``collcomm`` command line builds its parser
from :func:`add_arguments` without loading grpc.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading
from typing import TextIO

log = logging.getLogger("collcomm.coordinator")

_LOOPBACK = ("127.", "localhost", "::1", "[::1]")
MAX_HOST_CHARS = 253  # a DNS name
# RFC 1123 labels (and "_", which some container networks use), dot-separated.
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?", re.ASCII)


def check_host(value: str) -> str:
    """``value`` when it is an IP address (an IPv6 one bare or in brackets) or a DNS name of
    letters, digits, ``-``, ``_`` and dots, at most 253 characters; ValueError otherwise."""
    inner = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if 0 < len(value) <= MAX_HOST_CHARS and value.isascii():
        try:
            ipaddress.ip_address(inner)
            return value
        except ValueError:
            if inner == value and _HOSTNAME.fullmatch(value):
                return value
    from collcomm.inputs.messages import shown

    raise ValueError(f"expected an IP address or a host name, got {shown(value)}")


def _host_argument(value: str) -> str:
    try:
        return check_host(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _path_argument(value: str) -> str:
    from collcomm.inputs.messages import shown

    if not value or "\0" in value:
        raise argparse.ArgumentTypeError(f"expected a path, got {shown(value)}")
    return value


def _port_argument(value: str) -> int:
    from collcomm.inputs.messages import shown

    digits = value.strip()
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 5 and int(digits) <= 65535):
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535 (0: any free port), got {shown(value)}")
    return int(digits)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``collcomm coordinator`` (and ``python -m collcomm.coordinator``); their types
    refuse a bad host or port while the command line is parsed (one line naming the option)."""
    parser.add_argument("--host", type=_host_argument, default="0.0.0.0",
                        help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=_port_argument, default=29400, help="port (default 29400; 0: any free port)")
    parser.add_argument("--tls-cert", type=_path_argument, metavar="CERT.pem",
                        help="serve TLS with this certificate (PEM; a chain may follow it); needs --tls-key. Its "
                             "subjectAltName must name the host ranks connect to (an IP address entry for ranks "
                             "that connect by IP)")
    parser.add_argument("--tls-key", type=_path_argument, metavar="KEY.pem",
                        help="the certificate's private key (PEM, unencrypted)")
    parser.add_argument("--token-file", type=_path_argument, metavar="PATH",
                        help="the job token: read from PATH if it exists (it must be closed to other users: mode "
                             "0600), else generated and written to PATH with mode 0600. Default: $COLLCOMM_TOKEN, "
                             "else a generated token in a new mode-0600 file whose path is printed")
    parser.add_argument("--token", help=argparse.SUPPRESS)  # refused: argv is visible to every user


def refuse_token_argument(command: str, value) -> None:
    """A token given on the command line is refused (TokenError: one line, exit status 2)."""
    if value is not None:
        from collcomm.coordinator.tokens import TokenError

        raise TokenError(f"{command}: --token would show the job token to every user of this machine (ps); set "
                         "COLLCOMM_TOKEN or use --token-file PATH (mode 0600) instead")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Serve with the options of :func:`add_arguments`; return the exit status."""
    tls = check_arguments(args)
    return serve_forever(args.host, args.port, out=out, tls=tls, token_file=args.token_file)


def check_arguments(args: argparse.Namespace):
    """The checks of :func:`add_arguments`' options that need the system, before anything is
    served: ``--token`` refused, ``--host``/``--port`` free to listen on, the TLS certificate and
    key loaded (returned; None without them)."""
    from collcomm.coordinator.tls import load_server_files

    refuse_token_argument("coordinator", args.token)
    check_listen_address(args.host, args.port)
    return load_server_files(args.tls_cert, args.tls_key)


def check_listen_address(host: str, port: int) -> None:
    """CollectiveError (one line) when ``host`` does not resolve to an address of this machine or
    ``port`` is taken there: found with a plain socket, before gRPC tries (it would log lines of
    its own on stderr besides the error)."""
    from collcomm.errors import CollectiveError

    name = host[1:-1] if host.startswith("[") else host
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        raise CollectiveError(f"--host {host}: cannot resolve it ({getattr(e, 'strerror', None) or e})") from None
    refusal = None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a listener does: TIME_WAIT is no obstacle
            try:
                s.bind(sockaddr)
                return
            except OSError as e:
                refusal = e
    raise CollectiveError(f"cannot listen on {host}:{port} for the coordinator: "
                          f"{getattr(refusal, 'strerror', None) or 'no address'}")


def serve_forever(host: str = "0.0.0.0", port: int = 29400, token: str | None = None, out: TextIO | None = None,
                  *, tls=None, token_file: str | None = None) -> int:
    """Run the coordinator until a Shutdown call, SIGTERM or Ctrl-C; return an exit status.

    The token is ``token``, else the content of ``token_file`` if it exists, else
    ``$COLLCOMM_TOKEN`` (when no ``token_file`` is named), else a fresh one written to
    ``token_file`` or to a new temporary file (removed on exit). ``tls``: as for
    :class:`~collcomm.coordinator.server.CoordinatorServer`. Prints ``collcomm coordinator
    listening on HOST:PORT`` first, never the token.
    """
    from collcomm.coordinator import tokens
    from collcomm.coordinator.protocol import check_token
    from collcomm.coordinator.server import CoordinatorServer

    out = out or sys.stdout
    written = None  # a token file this call created
    generated = False
    if token:
        token = check_token(token)
    elif token_file and os.path.lexists(token_file):
        token = tokens.read_token_file(token_file)
    elif not token_file:
        token = tokens.token_from(None)
    if not token:
        token, generated = tokens.generate(), True
        if token_file:  # before binding, so that a bad path fails without serving
            written = tokens.write_new_token_file(token, token_file)
    try:
        server = CoordinatorServer(token, host, port, tls=tls)
        address = server.start()
    except BaseException:
        if written is not None:
            written.unlink(missing_ok=True)
        raise
    temporary = None
    try:
        if generated and written is None:
            written = temporary = tokens.write_new_token_file(token, port=int(address.rpartition(":")[2]))
        extra = ""
        if server.tls is not None:
            names = ", ".join(server.tls.names) or "none: clients must set COLLCOMM_TLS_SERVER_NAME"
            extra = f" with TLS (certificate names: {names})"
        print(f"collcomm coordinator listening on {address}{extra}", file=out)
        if written is not None:
            print(f"job token written to {written} (mode 0600); give it to every rank as COLLCOMM_TOKEN, e.g. "
                  f"COLLCOMM_TOKEN=$(cat {shlex.quote(str(written))})", file=out)
        out.flush()
        if server.tls is None and not host.startswith(_LOOPBACK):
            log.warning("collcomm coordinator: serving without TLS on %s: the job token crosses the network in "
                        "plaintext; use --tls-cert and --tls-key for jobs that span machines", address)
        return _wait(server)
    finally:
        server.stop(0)
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def _wait(server) -> int:
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.stop).start())
    try:
        while not server.wait_stopped(1.0):
            pass
    except KeyboardInterrupt:
        server.stop()
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
