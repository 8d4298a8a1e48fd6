"""TLS for the coordinator, over real sockets: a throwaway CA and server certificate (made here with
``cryptography``'s x509 builder), a real grpc server, real clients and rank processes.

* a client that trusts the right CA registers and uses the store; a 2-rank job runs an allreduce
  against `collcomm coordinator --tls-cert --tls-key`, and `collcomm status` reads it;
* a client with the wrong CA, a plaintext client against TLS, a TLS client against plaintext, a
  certificate that does not name the host: AuthenticationError in one line, within a second or so
  of a 30 s budget (grpc alone retries a failed handshake until the deadline);
* COLLCOMM_TLS_CA naming a missing or malformed file, and bad --tls-cert/--tls-key: one line
  naming the variable or option and the path (exit 2 for the commands).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from collcomm.coordinator import CoordinatorClient, CoordinatorServer, PeerTable
from collcomm.coordinator.tls import CA_ENV, SERVER_NAME_ENV, TLSConfigError, load_ca
from collcomm.errors import AuthenticationError

REPO = Path(__file__).resolve().parent.parent
TOKEN = "tls-test-token-8e1d"
BUDGET = 30.0  # every call's timeout; the failures below must come far sooner


# ------------------------------------------------------------------------------ certificates
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer: x509.Name, signer, *, ca: bool, sans=(), days: float = 1.0):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=2))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class PKI:
    """Two unrelated CAs and server certificates signed by the first, as files and bytes."""

    def __init__(self, root: Path):
        self.root = root
        ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        self.ca = self._write("ca.pem", _cert("test CA", ca_key, _name("test CA"), ca_key, ca=True))
        self.other_ca = self._write("other-ca.pem", _cert("other CA", other_key, _name("other CA"), other_key,
                                                          ca=True))
        key = ec.generate_private_key(ec.SECP256R1())
        self.key_pem = _pem_key(key)
        self.key = self._write("key.pem", self.key_pem)
        local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        self.cert_pem = _cert("coordinator", key, _name("test CA"), ca_key, ca=False, sans=local)
        self.cert = self._write("cert.pem", self.cert_pem)
        # Names only a DNS name no resolver knows: reachable by IP with COLLCOMM_TLS_SERVER_NAME only.
        self.dns_only_pem = _cert("coordinator", key, _name("test CA"), ca_key, ca=False,
                                  sans=[x509.DNSName("coordinator.test")])
        self.expired = self._write("expired.pem", _cert("coordinator", key, _name("test CA"), ca_key, ca=False,
                                                         sans=local, days=-0.5))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server(pki):
    with CoordinatorServer(TOKEN, tls=(pki.cert_pem, pki.key_pem)) as server:
        yield server


def port_of(server: CoordinatorServer) -> int:
    return int(server.address.rpartition(":")[2])


def timed(fn):
    """(what fn returned or raised, seconds it took)."""
    started = time.monotonic()
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - handed to the test
        result = err
    return result, time.monotonic() - started


def assert_one_line(err, *needles):
    text = str(err)
    assert "\n" not in text and all(n in text for n in needles), text


# ------------------------------------------------------------------------------ in-process
@pytest.mark.timeout(60)
def test_a_client_that_trusts_the_ca_registers_and_uses_the_store(pki, tls_server, monkeypatch):
    client = CoordinatorClient(tls_server.address, TOKEN, timeout=BUDGET, tls=load_ca(str(pki.ca)))
    table = client.register(0, 1, "127.0.0.1:40000")
    assert isinstance(table, PeerTable) and table[0].address == "127.0.0.1:40000"
    client.kv_set("k", b"over tls")
    assert client.kv_get("k") == b"over tls" and client.kv_add("n", 5) == 5
    assert "TLS" in repr(client) and "TLS" in repr(tls_server) and TOKEN not in repr(client) + repr(tls_server)
    # From the environment, by host name (the certificate names both localhost and 127.0.0.1).
    monkeypatch.setenv(CA_ENV, str(pki.ca))
    by_name = CoordinatorClient(f"localhost:{port_of(tls_server)}", TOKEN, timeout=BUDGET)
    assert by_name.tls is not None and by_name.kv_get("k") == b"over tls"
    # tls=False: plaintext whatever the environment says, refused by a TLS coordinator.
    assert CoordinatorClient(tls_server.address, TOKEN, tls=False).tls is None
    for c in (client, by_name):
        c.close()


@pytest.mark.timeout(60)
def test_a_client_with_the_wrong_ca_is_refused_at_once_naming_the_variable(pki, tls_server):
    client = CoordinatorClient(tls_server.address, TOKEN, timeout=BUDGET, tls=load_ca(str(pki.other_ca)))
    err, took = timed(lambda: client.register(0, 2, "127.0.0.1:40001"))
    assert isinstance(err, AuthenticationError), err
    assert_one_line(err, CA_ENV, str(pki.other_ca), "not signed by", tls_server.address)
    assert took < 5, f"{took:.1f} s to refuse (the budget was {BUDGET} s)"
    assert tls_server.wait_until(lambda s: not s.peers, 1)  # nothing reached the server


@pytest.mark.timeout(60)
def test_plaintext_and_tls_mismatches_fail_with_one_line_not_a_hang(pki, tls_server):
    plain_client = CoordinatorClient(tls_server.address, TOKEN, timeout=BUDGET, tls=False)
    err, took = timed(plain_client.ping)
    assert isinstance(err, AuthenticationError), err
    assert_one_line(err, "requires TLS", CA_ENV)
    assert took < 5, took
    with CoordinatorServer(TOKEN) as plain_server:
        tls_client = CoordinatorClient(plain_server.address, TOKEN, timeout=BUDGET, tls=load_ca(str(pki.ca)))
        err, took = timed(lambda: tls_client.kv_get("k"))
        assert isinstance(err, AuthenticationError), err
        assert_one_line(err, "does not speak TLS", CA_ENV, "--tls-cert")
        assert took < 5, took


@pytest.mark.timeout(60)
def test_the_certificate_must_name_the_host_unless_the_server_name_is_given(pki):
    with CoordinatorServer(TOKEN, tls=(pki.dns_only_pem, pki.key_pem)) as server:
        by_ip = CoordinatorClient(server.address, TOKEN, timeout=BUDGET, tls=load_ca(str(pki.ca)))
        err, took = timed(by_ip.ping)
        assert isinstance(err, AuthenticationError) and took < 5, (err, took)
        assert_one_line(err, "does not name '127.0.0.1'", "subjectAltName", SERVER_NAME_ENV)
        wrong = CoordinatorClient(server.address, TOKEN, timeout=BUDGET, tls=load_ca(str(pki.ca), "elsewhere.test"))
        err, _ = timed(wrong.ping)
        assert isinstance(err, AuthenticationError), err
        assert_one_line(err, "'elsewhere.test'", SERVER_NAME_ENV)
        named = CoordinatorClient(server.address, TOKEN, timeout=BUDGET,
                                  tls=load_ca(str(pki.ca), "coordinator.test"))
        assert named.ping().world_size == 0


@pytest.mark.timeout(30)
def test_a_bad_ca_file_is_one_line_naming_the_variable_and_the_path(pki, tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    cases = {tmp_path / "missing.pem": "no such file", garbage: "not a valid PEM certificate",
             pki.key: "no PEM certificate", tmp_path: "not a regular file", pki.expired: "expired"}
    for path, why in cases.items():
        monkeypatch.setenv(CA_ENV, str(path))
        with pytest.raises(TLSConfigError) as raised:
            CoordinatorClient("127.0.0.1:1", TOKEN, timeout=1)
        assert_one_line(raised.value, f"{CA_ENV}={path}", why)
    monkeypatch.delenv(CA_ENV)
    monkeypatch.setenv(SERVER_NAME_ENV, "coordinator.test")
    with pytest.raises(TLSConfigError, match=f"{SERVER_NAME_ENV} is set but {CA_ENV} is not"):
        CoordinatorClient("127.0.0.1:1", TOKEN, timeout=1)


@pytest.mark.timeout(30)
def test_the_server_refuses_certificates_it_cannot_serve(pki):
    with pytest.raises(TLSConfigError, match="not the private key of"):
        CoordinatorServer(TOKEN, tls=(pki.ca.read_bytes(), pki.key_pem))
    with pytest.raises(TLSConfigError, match="expired"):
        CoordinatorServer(TOKEN, tls=(pki.expired.read_bytes(), pki.key_pem))
    with pytest.raises(TypeError, match="not paths"):
        CoordinatorServer(TOKEN, tls=(str(pki.cert), str(pki.key)))


# ------------------------------------------------------------------------------ processes
def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COLLCOMM_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}, **extra)
    return env


def collcomm(*args) -> list[str]:
    return [sys.executable, "-m", "collcomm.cli", *map(str, args)]


class Lines:
    """A process whose stdout and stderr lines are collected as they come (one queue for both)."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.queue: queue.Queue = queue.Queue()
        self.text: list[str] = []
        self._pumps = [threading.Thread(target=self._pump, args=(s,), daemon=True)
                       for s in (self.proc.stdout, self.proc.stderr)]
        for t in self._pumps:
            t.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.text.append(line)
            self.queue.put(line)

    def wait_line(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s: {''.join(self.text)}") from None
            if m := re.search(pattern, line):
                return m

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout} s: {''.join(self.text)}") from None
        for t in self._pumps:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


RANK = textwrap.dedent("""
    import sys, time
    import numpy as np
    import collcomm as cc

    started = time.monotonic()
    try:
        cc.init(timeout=25)
    except cc.CollectiveError as e:
        print(f"init refused after {time.monotonic() - started:.1f} s: {type(e).__name__}: {e}", flush=True)
        sys.exit(4)
    x = np.full(100, cc.rank() + 1, np.float64)
    cc.allreduce(x)
    print(f"rank {cc.rank()} of {cc.world_size()} sum {x[0]:g}", flush=True)
    cc.shutdown()
""")


@pytest.mark.timeout(90)
def test_a_job_runs_against_a_tls_coordinator_and_a_rank_with_the_wrong_ca_is_refused(pki, tmp_path):
    token_file = tmp_path / "job.token"
    coord = Lines(collcomm("coordinator", "--host", "127.0.0.1", "--port", 0, "--tls-cert", pki.cert,
                           "--tls-key", pki.key, "--token-file", token_file), clean_env())
    ranks = []
    try:
        address = coord.wait_line(r"^collcomm coordinator listening on (\S+) with TLS \(certificate names: "
                                  r"DNS:localhost, IP:127\.0\.0\.1\)$", 30).group(1)
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        token = token_file.read_text().strip()
        prog = tmp_path / "rank.py"
        prog.write_text(RANK)
        common = dict(COLLCOMM_COORDINATOR=address, COLLCOMM_TOKEN=token, COLLCOMM_WORLD_SIZE="2")
        intruder = Lines([sys.executable, str(prog)], clean_env(**common, COLLCOMM_RANK="1",
                                                                COLLCOMM_TLS_CA=str(pki.other_ca)))
        ranks = [Lines([sys.executable, str(prog)], clean_env(**common, COLLCOMM_RANK=str(r),
                                                              COLLCOMM_TLS_CA=str(pki.ca))) for r in range(2)]
        ranks.append(intruder)
        refused = intruder.wait_line(r"^init refused after ([\d.]+) s: (.*)$", 30)
        assert intruder.finish(10) == 4
        assert float(refused.group(1)) < 5, refused.group(0)  # not its 25 s timeout
        assert refused.group(2).startswith("AuthenticationError: the TLS certificate of the coordinator at "
                                           f"{address} is not signed by {CA_ENV} ({pki.other_ca})"), refused.group(2)
        for r in range(2):
            ranks[r].wait_line(rf"^rank {r} of 2 sum 3$", 60)
            assert ranks[r].finish(20) == 0, "".join(ranks[r].text)
        # `collcomm status` goes through the same client: TLS from COLLCOMM_TLS_CA, token from the file.
        status = subprocess.run(collcomm("status", "--coordinator", address, "--token-file", token_file),
                                env=clean_env(COLLCOMM_TLS_CA=str(pki.ca)), capture_output=True, text=True,
                                timeout=30, cwd=REPO)
        assert status.returncode == 1 and "no link-monitor report at" in status.stderr, status.stderr
        plain = subprocess.run(collcomm("status", "--coordinator", address, "--token-file", token_file, "--timeout",
                                        BUDGET), env=clean_env(), capture_output=True, text=True, timeout=30, cwd=REPO)
        assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "requires TLS" in plain.stderr, plain.stderr
        coord.proc.send_signal(signal.SIGTERM)
        assert coord.finish(15) == 0
        assert token not in "".join(coord.text)
    finally:
        for p in ranks + [coord]:
            p.kill()


@pytest.mark.timeout(60)
def test_the_commands_refuse_bad_tls_input_with_one_line(pki, tmp_path, capsys, monkeypatch):
    from collcomm.cli import main

    p = subprocess.run(collcomm("coordinator", "--host", "127.0.0.1", "--port", 0, "--tls-cert", pki.ca,
                                "--tls-key", pki.key), env=clean_env(), capture_output=True, text=True, timeout=30,
                       cwd=REPO)  # as a user runs it: exit 2, one line, no traceback
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"collcomm: error: --tls-key {pki.key} is not the private key of --tls-cert "
                               f"{pki.ca}"), p.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    cases = [(["--tls-cert", pki.cert], "--tls-cert needs --tls-key"),
             (["--tls-key", pki.key], "--tls-key needs --tls-cert"),
             (["--tls-cert", tmp_path / "none.pem", "--tls-key", pki.key], f"--tls-cert {tmp_path / 'none.pem'}: "
                                                                          "no such file"),
             (["--tls-cert", pki.cert, "--tls-key", garbage], f"--tls-key {garbage}: no PEM private key"),
             (["--tls-cert", pki.expired, "--tls-key", pki.key], f"--tls-cert {pki.expired}: the certificate expired")]
    for args, why in cases:
        assert main(["coordinator", "--host", "127.0.0.1", "--port", "0", *map(str, args)]) == 2, args
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and why in err, (args, err)
    monkeypatch.setenv("COLLCOMM_TOKEN", TOKEN)
    monkeypatch.setenv(CA_ENV, str(garbage))
    assert main(["status", "--coordinator", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{CA_ENV}={garbage}: no PEM certificate" in err, err
