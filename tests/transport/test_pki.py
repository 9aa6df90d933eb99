"""The federation's CA, certificates, revocation and admission, with real certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedcare.errors import ConfigError, PolicyViolation
from fedcare.transport.pki import (
    AdmissionReason,
    AdmissionRefused,
    check_peer_certificate,
    classify_handshake_failure,
    common_name,
    init_ca,
    issue_certificate,
    list_certificates,
    load_certificate,
    load_revoked_serials,
    read_pem,
    revoke_certificate,
)

try:  # grpcio is not a core dependency; only the mutual-TLS tests need it
    import grpc
except ImportError:  # pragma: no cover
    grpc = None

needs_grpc = pytest.mark.skipif(grpc is None, reason="grpcio is not installed")
UTC = dt.timezone.utc

UNKNOWN_CA_LINE = (
    "I1203 19:59:13.892159   17490 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: "
    "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"
)
EXPIRED_LINE = (
    "I1203 19:59:13.892159   17490 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: "
    "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired"
)
NO_CERTIFICATE_LINE = (
    "I1203 19:59:13.892159   17490 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: "
    "error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: "
    "Invalid certificate verification context"
)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    init_ca(directory, federation="test")
    return directory


@pytest.fixture
def ca(certs: Path) -> x509.Certificate:
    return load_certificate(certs / "ca.pem")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- the CA and issuing


def test_ca_key_is_private_to_its_owner(certs):
    assert mode_of(certs / "ca.key") == 0o600


def test_ca_key_is_private_even_under_a_permissive_umask(tmp_path):
    previous = os.umask(0)
    try:
        init_ca(tmp_path / "certs", federation="test")
    finally:
        os.umask(previous)
    assert mode_of(tmp_path / "certs" / "ca.key") == 0o600


def test_issued_keys_are_private_to_their_owner(certs):
    _, node_key = issue_certificate(certs, role="node", name="site-a")
    _, server_key = issue_certificate(certs, role="server", name="coordinator")
    assert mode_of(node_key) == 0o600
    assert mode_of(server_key) == 0o600


def test_ca_is_self_signed_certificate_authority(certs, ca):
    assert common_name(ca) == "test federation CA"
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)


def test_ca_key_is_pkcs8_pem(certs):
    assert read_pem(certs / "ca.key").startswith(b"-----BEGIN PRIVATE KEY-----")


def test_new_ca_has_an_empty_signed_revocation_list(certs):
    assert load_revoked_serials(certs) == frozenset()


def test_ca_refuses_to_overwrite_existing_ca(certs, tmp_path):
    before = (certs / "ca.pem").read_bytes()
    with pytest.raises(ConfigError) as caught:
        init_ca(certs, federation="other")
    message = str(caught.value)
    assert "ca.key" in message or "ca.pem" in message
    assert str(tmp_path) not in message
    assert (certs / "ca.pem").read_bytes() == before


def test_ca_refuses_lifetime_below_one_day(tmp_path):
    with pytest.raises(ConfigError) as caught:
        init_ca(tmp_path / "certs", federation="test", lifetime_days=0)
    assert caught.value.field == "lifetime_days"
    assert not (tmp_path / "certs" / "ca.key").exists()


def test_issued_node_certificate_verifies_against_ca_and_is_for_clients(certs, ca):
    cert_path, key_path = issue_certificate(certs, role="node", name="site-a")
    assert (cert_path.name, key_path.name) == ("site-a.pem", "site-a.key")
    cert = load_certificate(cert_path)
    cert.verify_directly_issued_by(ca)
    assert common_name(cert) == "site-a"
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca


def test_issued_key_matches_its_certificate(certs):
    cert_path, key_path = issue_certificate(certs, role="node", name="site-a")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == load_certificate(cert_path).public_key().public_numbers()


def test_server_certificate_names_hosts_and_is_for_servers(certs, ca):
    cert_path, key_path = issue_certificate(
        certs, role="server", name="coordinator", hosts=["fl.example.org", "10.0.0.5", "::1"]
    )
    assert (cert_path.name, key_path.name) == ("server.pem", "server.key")
    cert = load_certificate(cert_path)
    cert.verify_directly_issued_by(ca)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "site a", "x" * 65, "ca", "crl", "..", "hôpital"])
def test_issue_refuses_unsafe_or_reserved_names(certs, name):
    with pytest.raises(ConfigError) as caught:
        issue_certificate(certs, role="node", name=name)
    assert caught.value.field == "name"


def test_issue_refuses_node_named_like_the_server_file(certs):
    with pytest.raises(ConfigError, match="server"):
        issue_certificate(certs, role="node", name="server")


def test_issue_refuses_lifetime_below_one_day(certs):
    with pytest.raises(ConfigError) as caught:
        issue_certificate(certs, role="node", name="site-a", lifetime_days=0)
    assert caught.value.field == "lifetime_days"
    assert not (certs / "site-a.key").exists()


def test_issue_refuses_certificate_outliving_the_ca(certs):
    with pytest.raises(ConfigError, match="after the CA"):
        issue_certificate(certs, role="node", name="site-a", lifetime_days=400)


def test_issue_without_ca_names_missing_file_only(tmp_path):
    with pytest.raises(ConfigError) as caught:
        issue_certificate(tmp_path, role="node", name="site-a")
    assert "ca.pem" in str(caught.value)
    assert str(tmp_path) not in str(caught.value)


def test_reissue_replaces_certificate_and_keeps_key_private(certs):
    first, _ = issue_certificate(certs, role="node", name="site-a")
    old_serial = load_certificate(first).serial_number
    cert_path, key_path = issue_certificate(certs, role="node", name="site-a")
    assert load_certificate(cert_path).serial_number != old_serial
    assert mode_of(key_path) == 0o600
    assert not [p.name for p in certs.iterdir() if p.name.startswith(".")]


def test_explicit_validity_window_is_used(certs):
    start = dt.datetime(2021, 1, 1, tzinfo=UTC)
    end = dt.datetime(2021, 2, 1, tzinfo=UTC)
    cert_path, _ = issue_certificate(certs, role="node", name="old", not_valid_before=start, not_valid_after=end)
    cert = load_certificate(cert_path)
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (start, end)


def test_explicit_validity_window_must_be_timezone_aware(certs):
    with pytest.raises(ConfigError) as caught:
        issue_certificate(certs, role="node", name="old", not_valid_after=dt.datetime(2021, 2, 1))
    assert caught.value.field == "not_valid_after"


# ---------------------------------------------------------------- admission


def test_valid_admitted_node_is_admitted_under_its_name(certs, ca):
    cert_path, _ = issue_certificate(certs, role="node", name="site-a")
    node_id = check_peer_certificate(
        read_pem(cert_path), ca_certificate=ca, revoked=load_revoked_serials(certs), admitted={"site-a", "site-b"}
    )
    assert node_id == "site-a"


def test_any_ca_signed_node_is_admitted_when_plan_admits_all(certs, ca):
    cert_path, _ = issue_certificate(certs, role="node", name="site-z")
    assert check_peer_certificate(read_pem(cert_path), ca_certificate=ca, revoked=(), admitted=None) == "site-z"


@pytest.mark.parametrize("pem", [None, b""])
def test_missing_certificate_is_refused_as_no_certificate(ca, pem):
    with pytest.raises(AdmissionRefused) as caught:
        check_peer_certificate(pem, ca_certificate=ca, revoked=(), admitted=None)
    assert caught.value.reason is AdmissionReason.NO_CERTIFICATE
    assert caught.value.node_id is None
    assert isinstance(caught.value, PolicyViolation)


def test_certificate_from_another_ca_is_refused_as_unknown_ca(ca, tmp_path):
    other = tmp_path / "other"
    init_ca(other, federation="test")  # same federation name: same issuer name, different key
    cert_path, _ = issue_certificate(other, role="node", name="site-a")
    with pytest.raises(AdmissionRefused) as caught:
        check_peer_certificate(read_pem(cert_path), ca_certificate=ca, revoked=(), admitted={"site-a"})
    assert caught.value.reason is AdmissionReason.UNKNOWN_CA
    assert caught.value.node_id == "site-a"


def test_certificate_from_differently_named_ca_is_refused_as_unknown_ca(ca, tmp_path):
    other = tmp_path / "other"
    init_ca(other, federation="elsewhere")
    cert_path, _ = issue_certificate(other, role="node", name="site-a")
    with pytest.raises(AdmissionRefused) as caught:
        check_peer_certificate(read_pem(cert_path), ca_certificate=ca, revoked=(), admitted=None)
    assert caught.value.reason is AdmissionReason.UNKNOWN_CA


def test_garbage_certificate_is_refused_as_unknown_ca(ca):
    with pytest.raises(AdmissionRefused) as caught:
        check_peer_certificate(b"-----BEGIN CERTIFICATE-----\nnope\n", ca_certificate=ca, revoked=(), admitted=None)
    assert caught.value.reason is AdmissionReason.UNKNOWN_CA


def test_expired_certificate_is_refused_as_expired(certs, ca):
    now = dt.datetime.now(UTC)
    cert_path, _ = issue_certificate(
        certs,
        role="node",
        name="site-a",
        not_valid_before=now - dt.timedelta(days=10),
        not_valid_after=now - dt.timedelta(days=1),
    )
    with pytest.raises(AdmissionRefused) as caught:
        check_peer_certificate(read_pem(cert_path), ca_certificate=ca, revoked=(), admitted={"site-a"})
    assert caught.value.reason is AdmissionReason.EXPIRED
    assert caught.value.node_id == "site-a"


def test_not_yet_valid_certificate_is_refused_as_expired(certs, ca):
    cert_path, _ = issue_certificate(certs, role="node", name="site-a")
    before = load_certificate(cert_path).not_valid_before_utc - dt.timedelta(seconds=1)
    with pytest.raises(AdmissionRefused) as caught:
        check_peer_certificate(read_pem(cert_path), ca_certificate=ca, revoked=(), admitted=None, now=before)
    assert caught.value.reason is AdmissionReason.EXPIRED


def test_revoked_certificate_is_refused_as_revoked(certs, ca):
    cert_path, _ = issue_certificate(certs, role="node", name="site-a")
    revoke_certificate(certs, "site-a")
    with pytest.raises(AdmissionRefused) as caught:
        check_peer_certificate(
            read_pem(cert_path), ca_certificate=ca, revoked=load_revoked_serials(certs), admitted={"site-a"}
        )
    assert caught.value.reason is AdmissionReason.REVOKED


def test_node_missing_from_plan_is_refused_as_not_in_plan(certs, ca):
    cert_path, _ = issue_certificate(certs, role="node", name="site-c")
    with pytest.raises(AdmissionRefused) as caught:
        check_peer_certificate(read_pem(cert_path), ca_certificate=ca, revoked=(), admitted={"site-a", "site-b"})
    assert caught.value.reason is AdmissionReason.NOT_IN_PLAN
    assert caught.value.node_id == "site-c"


def test_expiry_is_reported_before_revocation_and_plan(certs, ca):
    now = dt.datetime.now(UTC)
    cert_path, _ = issue_certificate(
        certs, role="node", name="site-c", not_valid_before=now - dt.timedelta(days=2), not_valid_after=now
    )
    serial = revoke_certificate(certs, "site-c")
    with pytest.raises(AdmissionRefused) as caught:
        check_peer_certificate(
            read_pem(cert_path),
            ca_certificate=ca,
            revoked={serial},
            admitted=set(),
            now=now + dt.timedelta(seconds=1),
        )
    assert caught.value.reason is AdmissionReason.EXPIRED


def test_admission_check_refuses_naive_time(certs, ca):
    cert_path, _ = issue_certificate(certs, role="node", name="site-a")
    with pytest.raises(ConfigError) as caught:
        check_peer_certificate(read_pem(cert_path), ca_certificate=ca, revoked=(), admitted=None, now=dt.datetime(2030, 1, 1))
    assert caught.value.field == "now"


# ---------------------------------------------------------------- revocation list


def test_revocation_list_keeps_earlier_entries_across_two_revocations(certs, ca):
    first, _ = issue_certificate(certs, role="node", name="site-a")
    second, _ = issue_certificate(certs, role="node", name="site-b")
    serial_a = revoke_certificate(certs, "site-a")
    serial_b = revoke_certificate(certs, "site-b")
    assert serial_a == load_certificate(first).serial_number
    assert serial_b == load_certificate(second).serial_number
    assert load_revoked_serials(certs) == {serial_a, serial_b}
    crl = x509.load_pem_x509_crl(read_pem(certs / "crl.pem"))
    assert crl.is_signature_valid(ca.public_key())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3


def test_revoking_twice_keeps_one_entry(certs):
    issue_certificate(certs, role="node", name="site-a")
    assert revoke_certificate(certs, "site-a") == revoke_certificate(certs, "site-a")
    assert len(x509.load_pem_x509_crl(read_pem(certs / "crl.pem"))) == 1


def test_server_certificate_is_revoked_by_its_common_name(certs):
    cert_path, _ = issue_certificate(certs, role="server", name="coordinator")
    serial = revoke_certificate(certs, "coordinator")
    assert serial == load_certificate(cert_path).serial_number
    assert serial in load_revoked_serials(certs)


def test_revoking_unknown_name_is_a_config_error(certs):
    with pytest.raises(ConfigError, match="no certificate named 'site-x'"):
        revoke_certificate(certs, "site-x")


def test_revocation_list_signed_by_another_ca_is_refused(certs, tmp_path):
    other = tmp_path / "other"
    init_ca(other, federation="test")
    issue_certificate(other, role="node", name="site-a")
    revoke_certificate(other, "site-a")
    (certs / "crl.pem").write_bytes((other / "crl.pem").read_bytes())
    with pytest.raises(ConfigError, match="crl.pem is not signed by the federation CA"):
        load_revoked_serials(certs)


def test_list_reports_roles_and_revocation(certs):
    issue_certificate(certs, role="server", name="coordinator")
    issue_certificate(certs, role="node", name="site-b")
    issue_certificate(certs, role="node", name="site-a")
    revoke_certificate(certs, "site-b")
    listed = [(item.name, item.role, item.revoked) for item in list_certificates(certs)]
    assert listed == [("coordinator", "server", False), ("site-a", "node", False), ("site-b", "node", True)]


# ---------------------------------------------------------------- handshake log lines


def test_handshake_failure_lines_map_to_admission_reasons():
    assert classify_handshake_failure(UNKNOWN_CA_LINE) is AdmissionReason.UNKNOWN_CA
    assert classify_handshake_failure(EXPIRED_LINE) is AdmissionReason.EXPIRED
    assert classify_handshake_failure(NO_CERTIFICATE_LINE) is AdmissionReason.NO_CERTIFICATE
    not_yet = EXPIRED_LINE.replace("certificate has expired", "certificate is not yet valid")
    assert classify_handshake_failure(not_yet) is AdmissionReason.EXPIRED


@pytest.mark.parametrize(
    "line",
    [
        "",
        "I1203 19:59:13.892159   17490 server.cc:1200] Server started",
        "W1203 19:59:13.892159   17490 log.cc:102] Log level INFO is not suitable for production.",
        "I1203 19:59:13.892159   17490 ssl_transport_security.cc:2563] Handshake failed with error "
        "SSL_ERROR_SSL: error:10000410:SSL routines:OPENSSL_internal:SSLV3_ALERT_HANDSHAKE_FAILURE",
        "unable to get local issuer certificate",
    ],
)
def test_other_log_lines_are_not_classified(line):
    assert classify_handshake_failure(line) is None


# ---------------------------------------------------------------- the command line


def fedcare(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "fedcare.cli", "certs", *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def test_certs_commands_work_end_to_end(tmp_path):
    out = fedcare("init", "--federation", "cardiology", "--out", "pki", "--lifetime-days", "90", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ca.pem" in out.stdout
    ca = load_certificate(tmp_path / "pki" / "ca.pem")
    assert common_name(ca) == "cardiology federation CA"
    assert mode_of(tmp_path / "pki" / "ca.key") == 0o600

    out = fedcare("issue", "--role", "server", "--name", "coordinator", "--certs", "pki",
                  "--host", "fl.example.org", "--host", "10.1.2.3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "server.pem" in out.stdout and "server.key" in out.stdout
    names = load_certificate(tmp_path / "pki" / "server.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]

    for name in ("site-a", "site-b"):
        out = fedcare("issue", "--role", "node", "--name", name, "--certs", "pki", "--lifetime-days", "7", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    site_a = load_certificate(tmp_path / "pki" / "site-a.pem")
    site_a.verify_directly_issued_by(ca)
    assert site_a.not_valid_after_utc - site_a.not_valid_before_utc < dt.timedelta(days=7, minutes=6)

    out = fedcare("revoke", "site-b", "--certs", "pki", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    serial_b = load_certificate(tmp_path / "pki" / "site-b.pem").serial_number
    assert load_revoked_serials(tmp_path / "pki") == {serial_b}

    out = fedcare("list", "--certs", "pki", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {line.split("│")[1].strip(): line for line in out.stdout.splitlines() if line.count("│") >= 6}
    assert set(rows) >= {"coordinator", "site-a", "site-b"}
    assert "server" in rows["coordinator"]
    assert "yes" in rows["site-b"] and "yes" not in rows["site-a"]
    assert f"{serial_b:x}" in rows["site-b"]

    everything = out.stdout + "".join(fedcare("list", "--certs", "pki", cwd=tmp_path).stderr)
    assert "PRIVATE KEY" not in everything


def test_certs_commands_never_print_key_material(tmp_path):
    outputs = [
        fedcare("init", "--federation", "x", "--out", "pki", cwd=tmp_path),
        fedcare("issue", "--role", "node", "--name", "site-a", "--certs", "pki", cwd=tmp_path),
    ]
    assert all(out.returncode == 0 for out in outputs), [out.stderr for out in outputs]
    key_body = (tmp_path / "pki" / "site-a.key").read_text().splitlines()[1]
    for out in outputs:
        assert "PRIVATE KEY" not in out.stdout + out.stderr
        assert key_body not in out.stdout + out.stderr


def test_certs_init_refuses_existing_ca_with_config_exit_code(tmp_path):
    assert fedcare("init", "--federation", "x", "--out", "pki", cwd=tmp_path).returncode == 0
    out = fedcare("init", "--federation", "x", "--out", "pki", cwd=tmp_path)
    assert out.returncode == 2
    assert "already exists" in out.stderr


def test_certs_issue_refuses_unknown_role_with_config_exit_code(tmp_path):
    assert fedcare("init", "--federation", "x", "--out", "pki", cwd=tmp_path).returncode == 0
    out = fedcare("issue", "--role", "admin", "--name", "site-a", "--certs", "pki", cwd=tmp_path)
    assert out.returncode == 2
    assert "--role" in out.stderr
    assert not (tmp_path / "pki" / "site-a.pem").exists()


# ---------------------------------------------------------------- real mutual TLS over gRPC

@pytest.fixture
def whoami_server(certs):
    """A gRPC server with mutual TLS that answers each call with the caller's certificate name."""
    server_cert, server_key = issue_certificate(certs, role="server", name="coordinator")

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        return bytes(context.auth_context()["x509_common_name"][0])

    handler = grpc.method_handlers_generic_handler(
        "fedcare.test.Identity", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(read_pem(server_key), read_pem(server_cert))],
        root_certificates=read_pem(certs / "ca.pem"),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port > 0
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def call_whoami(address: str, *, ca_pem: bytes, cert_path: Path, key_path: Path) -> bytes:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=read_pem(key_path), certificate_chain=read_pem(cert_path)
    )
    with grpc.secure_channel(address, credentials) as channel:
        result: bytes = channel.unary_unary("/fedcare.test.Identity/WhoAmI")(b"", timeout=10)
        return result


@needs_grpc
def test_node_with_federation_certificate_is_known_by_its_name_over_mutual_tls(certs, whoami_server):
    cert_path, key_path = issue_certificate(certs, role="node", name="site-a")
    answer = call_whoami(whoami_server, ca_pem=read_pem(certs / "ca.pem"), cert_path=cert_path, key_path=key_path)
    assert answer == b"site-a"


@needs_grpc
def test_node_with_another_federations_certificate_is_refused_in_the_handshake(certs, whoami_server, tmp_path):
    other = tmp_path / "other"
    init_ca(other, federation="test")
    cert_path, key_path = issue_certificate(other, role="node", name="site-a")
    with pytest.raises(grpc.RpcError) as caught:
        call_whoami(whoami_server, ca_pem=read_pem(certs / "ca.pem"), cert_path=cert_path, key_path=key_path)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


HANDSHAKE_SCRIPT = r"""
import sys
from concurrent import futures
from pathlib import Path

import grpc

from fedcare.transport.pki import read_pem

certs, other = Path(sys.argv[1]), Path(sys.argv[2])
server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
port = server.add_secure_port(
    "127.0.0.1:0",
    grpc.ssl_server_credentials(
        [(read_pem(certs / "server.key"), read_pem(certs / "server.pem"))],
        root_certificates=read_pem(certs / "ca.pem"),
        require_client_auth=True,
    ),
)
server.start()
clients = {
    "unknown-ca": (other / "site-a.key", other / "site-a.pem"),
    "expired": (certs / "old.key", certs / "old.pem"),
    "none": (None, None),
}
for label, (key, cert) in clients.items():
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_pem(certs / "ca.pem"),
        private_key=None if key is None else read_pem(key),
        certificate_chain=None if cert is None else read_pem(cert),
    )
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        try:
            channel.unary_unary("/fedcare.test.Identity/WhoAmI")(b"", timeout=10)
        except grpc.RpcError as exc:
            print(label, exc.code().name, file=sys.stderr, flush=True)
server.stop(grace=None)
"""


@needs_grpc
def test_grpc_handshake_refusals_are_classified_from_its_log(certs, tmp_path):
    issue_certificate(certs, role="server", name="coordinator")
    now = dt.datetime.now(UTC)
    issue_certificate(
        certs, role="node", name="old", not_valid_before=now - dt.timedelta(days=3), not_valid_after=now - dt.timedelta(days=1)
    )
    other = tmp_path / "other"
    init_ca(other, federation="test")
    issue_certificate(other, role="node", name="site-a")
    env = {**os.environ, "GRPC_VERBOSITY": "INFO"}
    out = subprocess.run(
        [sys.executable, "-c", HANDSHAKE_SCRIPT, str(certs), str(other)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    for label in ("unknown-ca", "expired", "none"):
        assert f"{label} UNAVAILABLE" in out.stderr
    reasons = {classify_handshake_failure(line) for line in out.stderr.splitlines()} - {None}
    assert reasons == {AdmissionReason.UNKNOWN_CA, AdmissionReason.EXPIRED, AdmissionReason.NO_CERTIFICATE}
