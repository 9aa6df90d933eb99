"""A small certificate authority for one federation, and the admission check.

Hospitals' nodes dial out to the coordinator over gRPC with mutual TLS. Every
party holds a certificate signed by the federation's own CA: the coordinator a
*server* certificate (``server.pem``), each node a *node* certificate whose
subject common name is the node's identity (``{name}.pem``). The CA directory
holds::

    ca.pem     the CA certificate (public; give it to every party)
    ca.key     the CA private key (mode 0600; keep it off the nodes)
    crl.pem    revoked serial numbers, signed by the CA
    server.pem / server.key
    {name}.pem / {name}.key

Keys are EC P-256, signatures SHA-256, files PEM; private keys are PKCS8,
unencrypted, created with mode 0600 so they are never readable by others, not
even for an instant. Nothing here logs or returns key material, and error
messages name files, never full paths (a hospital path can identify a patient).

Admission happens in two places. The TLS handshake refuses a certificate that
is missing, expired or not signed by the CA before any Python code runs; gRPC
only logs the refusal, and :func:`classify_handshake_failure` reads such a log
line back into an :class:`AdmissionReason`. Once a call arrives,
:func:`check_peer_certificate` repeats those checks and adds the ones TLS
cannot do: revocation and admission by the plan.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcare.errors import ConfigError, PolicyViolation

__all__ = [
    "AdmissionReason",
    "AdmissionRefused",
    "IssuedCertificate",
    "certificate_sha256",
    "check_peer_certificate",
    "classify_handshake_failure",
    "common_name",
    "init_ca",
    "issue_certificate",
    "list_certificates",
    "load_certificate",
    "load_revoked_serials",
    "read_pem",
    "revoke_certificate",
]

logger = logging.getLogger(__name__)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CRL_FILE = "crl.pem"
SERVER_STEM = "server"

#: Certificates start this long before they are issued, so a peer whose clock
#: runs a little behind still accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)

_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: File stems the CA directory already uses for something else.
_RESERVED_STEMS = frozenset({"ca", "crl"})
_HASH = hashes.SHA256()


class AdmissionReason(enum.Enum):
    """Why a peer was refused admission to the federation.

    Examples
    --------
    >>> AdmissionReason.REVOKED.value
    'certificate revoked'
    >>> AdmissionReason("no client certificate") is AdmissionReason.NO_CERTIFICATE
    True
    """

    NO_CERTIFICATE = "no client certificate"
    UNKNOWN_CA = "certificate not signed by the federation CA"
    EXPIRED = "certificate expired or not yet valid"
    REVOKED = "certificate revoked"
    NOT_IN_PLAN = "node not admitted by the plan"


_WHAT_TO_DO = {
    AdmissionReason.NO_CERTIFICATE: "configure the node with its certificate and key",
    AdmissionReason.UNKNOWN_CA: "issue the node a certificate with this federation's CA (fedcare certs issue)",
    AdmissionReason.EXPIRED: "issue the node a fresh certificate (fedcare certs issue) or check its clock",
    AdmissionReason.REVOKED: "issue a new certificate if the node should rejoin",
    AdmissionReason.NOT_IN_PLAN: "add the node to the plan if it should take part",
}


class AdmissionRefused(PolicyViolation):
    """The coordinator refuses a peer: its certificate does not admit it.

    Parameters
    ----------
    reason : AdmissionReason
        The first check the certificate failed.
    node_id : str, optional
        The name the certificate claims (its subject common name), when there
        is one. For ``UNKNOWN_CA`` it is unverified: anyone can claim a name.
    detail : str, optional
        What exactly was wrong, e.g. the validity window.

    Examples
    --------
    >>> err = AdmissionRefused(AdmissionReason.NOT_IN_PLAN, node_id="hospital-x")
    >>> err.reason is AdmissionReason.NOT_IN_PLAN, err.node_id
    (True, 'hospital-x')
    >>> isinstance(err, PermissionError)
    True
    >>> str(err)
    "[node 'hospital-x'] node not admitted by the plan; add the node to the plan if it should take part"
    """

    def __init__(self, reason: AdmissionReason, *, node_id: str | None = None, detail: str | None = None) -> None:
        self.reason = reason
        body = reason.value if detail is None else f"{reason.value} ({detail})"
        super().__init__(f"{body}; {_WHAT_TO_DO[reason]}", node_id=node_id)


@dataclasses.dataclass(frozen=True)
class IssuedCertificate:
    """One certificate found in a CA directory, as :func:`list_certificates` reports it.

    Parameters
    ----------
    name : str
        The subject common name: the node's identity, or the server's name.
    role : {"server", "node"}
        Which side of the connection the certificate is for.
    serial : int
        The certificate's serial number.
    not_valid_after : datetime.datetime
        When it expires (UTC).
    revoked : bool
        Whether its serial is on the CA's revocation list.

    Examples
    --------
    >>> import datetime as dt
    >>> IssuedCertificate(name="site-a", role="node", serial=7,
    ...                   not_valid_after=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc),
    ...                   revoked=False).role
    'node'
    """

    name: str
    role: Literal["server", "node"]
    serial: int
    not_valid_after: dt.datetime
    revoked: bool


# ---------------------------------------------------------------- helpers


def read_pem(path: str | os.PathLike[str]) -> bytes:
    """Read a PEM file's bytes, e.g. to hand them to ``grpc.ssl_*_credentials``.

    Parameters
    ----------
    path : path-like
        The file to read.

    Returns
    -------
    bytes
        The file's contents.

    Raises
    ------
    ConfigError
        If the file is missing, unreadable or not PEM. The message names the
        file, not its full path.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> certs = pathlib.Path(tempfile.mkdtemp())
    >>> read_pem(init_ca(certs, federation="demo")).startswith(b"-----BEGIN CERTIFICATE-----")
    True
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path.name} does not exist; check the certificates directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path.name} ({exc.strerror}); check its permissions") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{path.name} is not a PEM file; expected '-----BEGIN ...' armour")
    return data


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Load one PEM certificate from a file.

    Parameters
    ----------
    path : path-like
        A PEM file; if it holds a chain, the first certificate is returned.

    Returns
    -------
    cryptography.x509.Certificate

    Raises
    ------
    ConfigError
        If the file is missing or holds no valid certificate (the message names
        the file only).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> certs = pathlib.Path(tempfile.mkdtemp())
    >>> common_name(load_certificate(init_ca(certs, federation="demo")))
    'demo federation CA'
    """
    path = Path(path)
    data = read_pem(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path.name} holds no valid PEM certificate; re-issue it") from None


def certificate_sha256(pem: bytes | str) -> str:
    """The SHA-256 fingerprint (lower-case hex) of a PEM certificate's DER encoding.

    This is what a site pins as its policy's ``coordinator_fingerprint``
    (``fedcare certs fingerprint`` prints it).
    """
    data = pem.encode() if isinstance(pem, str) else pem
    cert = x509.load_pem_x509_certificate(data)
    return cert.fingerprint(hashes.SHA256()).hex()


def common_name(cert: x509.Certificate) -> str:
    """The subject common name (CN) of a certificate: for a node, its identity.

    Parameters
    ----------
    cert : cryptography.x509.Certificate

    Returns
    -------
    str

    Raises
    ------
    ConfigError
        If the subject has no common name.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> certs = pathlib.Path(tempfile.mkdtemp())
    >>> _ = init_ca(certs, federation="demo")
    >>> cert_path, _ = issue_certificate(certs, role="node", name="site-a")
    >>> common_name(load_certificate(cert_path))
    'site-a'
    """
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        raise ConfigError(f"certificate with serial {cert.serial_number} has no subject common name")
    value = attributes[0].value
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _check_lifetime(lifetime_days: int) -> None:
    if isinstance(lifetime_days, bool) or not isinstance(lifetime_days, int) or lifetime_days < 1:
        raise ConfigError(f"must be an integer >= 1 (days), got {lifetime_days!r}", field="lifetime_days")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or _NAME_PATTERN.fullmatch(name) is None:
        raise ConfigError(
            f"must be 1-64 characters of letters, digits, '.', '_' or '-', got {name!r}",
            field="name",
        )
    if name in _RESERVED_STEMS or name in (".", ".."):
        raise ConfigError(f"{name!r} is reserved for the CA's own files; choose another name", field="name")


def _check_aware(value: dt.datetime, field: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ConfigError(f"must be timezone-aware (e.g. tzinfo=datetime.timezone.utc), got {value!r}", field=field)
    return value.astimezone(dt.timezone.utc)


def _write_file(path: Path, data: bytes, *, mode: int, exclusive: bool) -> None:
    """Write ``data`` to ``path``, created with ``mode`` from the start.

    With ``exclusive`` the file must not exist yet. Otherwise a fresh file is
    written beside it and renamed over it, so the old file is replaced
    atomically and its permissions cannot carry over to the new contents.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    target = path if exclusive else path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(target, flags, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if not exclusive:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _load_ca(certs_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = load_certificate(certs_dir / CA_CERT_FILE)
    key_pem = read_pem(certs_dir / CA_KEY_FILE)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{CA_KEY_FILE} holds no unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{CA_KEY_FILE} is not an EC key; create the CA with fedcare certs init")
    if key.public_key().public_numbers() != _ec_public(cert).public_numbers():
        raise ConfigError(f"{CA_KEY_FILE} does not belong to {CA_CERT_FILE}; restore the matching pair")
    return cert, key


def _ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ConfigError(f"certificate with serial {cert.serial_number} does not hold an EC public key")
    return public


def _sign_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    revoked: Sequence[x509.RevokedCertificate],
    number: int,
    now: dt.datetime,
) -> x509.CertificateRevocationList:
    next_update = max(ca_cert.not_valid_after_utc, now + dt.timedelta(days=1))
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(private_key=ca_key, algorithm=_HASH)


# ---------------------------------------------------------------- the CA


def init_ca(out_dir: str | os.PathLike[str], *, federation: str, lifetime_days: int = 365) -> Path:
    """Create a federation's certificate authority in ``out_dir``.

    Writes ``ca.pem`` (self-signed, ``CN = "{federation} federation CA"``),
    ``ca.key`` (PKCS8 PEM, mode 0600 from creation) and an empty ``crl.pem``
    signed by the CA and valid as long as the CA.

    Parameters
    ----------
    out_dir : path-like
        The CA directory; created (with parents) if missing.
    federation : str
        The federation's name, used in the CA's common name.
    lifetime_days : int, default 365
        How long the CA is valid, in days (>= 1). It starts 5 minutes in the
        past to tolerate clock skew.

    Returns
    -------
    pathlib.Path
        The path of ``ca.pem``.

    Raises
    ------
    ConfigError
        If a CA already exists there (``ca.pem``, ``ca.key`` or ``crl.pem``;
        the message names the file), ``federation`` is empty, or
        ``lifetime_days`` < 1.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> certs = pathlib.Path(tempfile.mkdtemp()) / "certs"
    >>> init_ca(certs, federation="cardiology").name
    'ca.pem'
    >>> sorted(p.name for p in certs.iterdir())
    ['ca.key', 'ca.pem', 'crl.pem']
    >>> oct((certs / "ca.key").stat().st_mode & 0o777)
    '0o600'
    >>> init_ca(certs, federation="cardiology")
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: ca.key already exists; a CA is already set up there. Choose another directory, or remove the old CA's files to start a new federation
    """
    _check_lifetime(lifetime_days)
    if not isinstance(federation, str) or not federation.strip():
        raise ConfigError(f"must be a non-empty name, got {federation!r}", field="federation")
    out = Path(out_dir)
    for existing in (CA_KEY_FILE, CA_CERT_FILE, CRL_FILE):
        if (out / existing).exists():
            raise ConfigError(
                f"{existing} already exists; a CA is already set up there. Choose another directory, "
                "or remove the old CA's files to start a new federation"
            )
    out.mkdir(parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    now = _utcnow()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} federation CA")])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=lifetime_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(private_key=key, algorithm=_HASH)
    )
    crl = _sign_crl(cert, key, revoked=(), number=1, now=now)

    # The key first and exclusively: if two inits race, one of them fails here.
    try:
        _write_file(out / CA_KEY_FILE, _private_key_pem(key), mode=0o600, exclusive=True)
    except FileExistsError:
        raise ConfigError(f"{CA_KEY_FILE} already exists; a CA is already set up there") from None
    _write_file(out / CA_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, exclusive=True)
    _write_file(out / CRL_FILE, crl.public_bytes(serialization.Encoding.PEM), mode=0o644, exclusive=True)
    logger.info("federation CA created", extra={"serial": cert.serial_number, "lifetime_days": lifetime_days})
    return out / CA_CERT_FILE


def issue_certificate(
    certs_dir: str | os.PathLike[str],
    *,
    role: Literal["server", "node"],
    name: str,
    lifetime_days: int = 30,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    not_valid_before: dt.datetime | None = None,
    not_valid_after: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue a server or node certificate signed by the CA in ``certs_dir``.

    Parameters
    ----------
    certs_dir : path-like
        A directory made by :func:`init_ca`.
    role : {"server", "node"}
        ``"node"``: a client certificate (extended key usage CLIENT_AUTH) whose
        common name is the node's identity, written to ``{name}.pem`` and
        ``{name}.key``. ``"server"``: the coordinator's certificate (SERVER_AUTH,
        with ``hosts`` as subject alternative names), written to ``server.pem``
        and ``server.key``.
    name : str
        The subject common name: 1-64 letters, digits, ``.``, ``_`` or ``-``
        (``ca`` and ``crl`` are reserved; a node may not be called ``server``).
    lifetime_days : int, default 30
        Validity in days (>= 1), starting 5 minutes ago to tolerate clock skew.
    hosts : sequence of str, default ("localhost", "127.0.0.1")
        Server only: the DNS names and IP addresses clients dial. Ignored for
        nodes.
    not_valid_before, not_valid_after : datetime.datetime, optional
        For tests and rotation: an explicit, timezone-aware validity window
        that overrides ``lifetime_days`` (each side independently). It may lie
        in the past, which makes an expired certificate.

    Returns
    -------
    tuple of pathlib.Path
        ``(certificate path, key path)``. The key file has mode 0600.

    Raises
    ------
    ConfigError
        If the name, role, lifetime, hosts or window is invalid, the CA is
        missing or expired, or the certificate would outlive the CA.

    Notes
    -----
    Issuing a name again replaces its files atomically (rotation). The old
    certificate stays valid until it expires: revoke it first with
    :func:`revoke_certificate` if it must stop working now.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from cryptography.x509.oid import ExtendedKeyUsageOID
    >>> certs = pathlib.Path(tempfile.mkdtemp())
    >>> _ = init_ca(certs, federation="demo")
    >>> cert_path, key_path = issue_certificate(certs, role="node", name="st-mary.icu")
    >>> cert_path.name, key_path.name, oct(key_path.stat().st_mode & 0o777)
    ('st-mary.icu.pem', 'st-mary.icu.key', '0o600')
    >>> usage = load_certificate(cert_path).extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    >>> list(usage.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    True
    >>> issue_certificate(certs, role="server", name="coordinator", hosts=["fl.example.org", "10.0.0.5"])[0].name
    'server.pem'
    >>> issue_certificate(certs, role="node", name="../etc")
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: name: must be 1-64 characters of letters, digits, '.', '_' or '-', got '../etc'
    """
    if role not in ("server", "node"):
        raise ConfigError(f"must be 'server' or 'node', got {role!r}", field="role")
    _check_name(name)
    if role == "node" and name == SERVER_STEM:
        raise ConfigError("'server' is the server certificate's file name; choose another node name", field="name")
    _check_lifetime(lifetime_days)
    directory = Path(certs_dir)
    ca_cert, ca_key = _load_ca(directory)

    now = _utcnow()
    start = now - CLOCK_SKEW if not_valid_before is None else _check_aware(not_valid_before, "not_valid_before")
    end = now + dt.timedelta(days=lifetime_days) if not_valid_after is None else _check_aware(not_valid_after, "not_valid_after")
    if end <= start:
        raise ConfigError(
            f"the validity window is empty: not_valid_after {end.isoformat()} is not after "
            f"not_valid_before {start.isoformat()}",
            field="not_valid_after",
        )
    if ca_cert.not_valid_after_utc < now:
        raise ConfigError(
            f"the CA expired on {ca_cert.not_valid_after_utc.isoformat()}; create a new one (fedcare certs init)"
        )
    if end > ca_cert.not_valid_after_utc:
        raise ConfigError(
            f"the certificate would expire on {end.date().isoformat()}, after the CA "
            f"({ca_cert.not_valid_after_utc.date().isoformat()}); shorten the lifetime or rotate the CA",
            field="lifetime_days",
        )

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if role == "server":
        builder = builder.add_extension(x509.SubjectAlternativeName(_alternative_names(hosts)), critical=False)
    cert = builder.sign(private_key=ca_key, algorithm=_HASH)

    stem = SERVER_STEM if role == "server" else name
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    _write_file(key_path, _private_key_pem(key), mode=0o600, exclusive=False)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, exclusive=False)
    logger.info(
        "certificate issued",
        extra={"role": role, "node_id": name, "serial": cert.serial_number},
    )
    return cert_path, key_path


def _alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(hosts, str) or not hosts:
        raise ConfigError(f"must be a non-empty list of DNS names or IP addresses, got {hosts!r}", field="hosts")
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not isinstance(host, str) or not host.strip():
            raise ConfigError(f"must be DNS names or IP addresses, got {host!r}", field="hosts")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def revoke_certificate(certs_dir: str | os.PathLike[str], name: str) -> int:
    """Add a certificate's serial to the CA's ``crl.pem`` and re-sign it.

    Parameters
    ----------
    certs_dir : path-like
        A directory made by :func:`init_ca`.
    name : str
        A node's name (``{name}.pem``), or the server's common name (or
        ``"server"``) to revoke ``server.pem``.

    Returns
    -------
    int
        The revoked serial number. Revoking it again changes nothing and
        returns the same serial.

    Raises
    ------
    ConfigError
        If no certificate of that name is in ``certs_dir``, it was not issued
        by this CA, or the CA or its CRL is missing or invalid.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> certs = pathlib.Path(tempfile.mkdtemp())
    >>> _ = init_ca(certs, federation="demo")
    >>> cert_path, _ = issue_certificate(certs, role="node", name="site-a")
    >>> serial = revoke_certificate(certs, "site-a")
    >>> serial == load_certificate(cert_path).serial_number
    True
    >>> serial in load_revoked_serials(certs)
    True
    """
    _check_name(name)
    directory = Path(certs_dir)
    ca_cert, ca_key = _load_ca(directory)
    cert_path = directory / f"{name}.pem"
    if not cert_path.is_file():
        server_path = directory / f"{SERVER_STEM}.pem"
        if server_path.is_file() and common_name(load_certificate(server_path)) == name:
            cert_path = server_path
        else:
            raise ConfigError(f"no certificate named {name!r} in the certificates directory; see fedcare certs list")
    cert = load_certificate(cert_path)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"{cert_path.name} was not issued by this directory's CA; nothing to revoke here") from None

    crl = _load_crl(directory, ca_cert)
    serial = cert.serial_number
    if crl.get_revoked_certificate_by_serial_number(serial) is not None:
        return serial
    now = _utcnow()
    entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    except x509.ExtensionNotFound:
        number = 1
    updated = _sign_crl(ca_cert, ca_key, revoked=[*crl, entry], number=number, now=now)
    _write_file(directory / CRL_FILE, updated.public_bytes(serialization.Encoding.PEM), mode=0o644, exclusive=False)
    logger.info("certificate revoked", extra={"node_id": name, "serial": serial})
    return serial


def _load_crl(directory: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    data = read_pem(directory / CRL_FILE)
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        raise ConfigError(f"{CRL_FILE} holds no valid PEM revocation list; restore it from a backup") from None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(_ec_public(ca_cert)):
        raise ConfigError(
            f"{CRL_FILE} is not signed by the federation CA in {CA_CERT_FILE}; it may have been tampered with, "
            "restore it from a backup"
        )
    return crl


def load_revoked_serials(certs_dir: str | os.PathLike[str]) -> frozenset[int]:
    """The serial numbers on the CA's revocation list, after checking its signature.

    Parameters
    ----------
    certs_dir : path-like
        A directory holding ``ca.pem`` and ``crl.pem`` (the CA key is not
        needed, so the coordinator can run without it).

    Returns
    -------
    frozenset of int

    Raises
    ------
    ConfigError
        If either file is missing or malformed, or ``crl.pem`` is not signed
        by the CA in ``ca.pem``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> certs = pathlib.Path(tempfile.mkdtemp())
    >>> _ = init_ca(certs, federation="demo")
    >>> load_revoked_serials(certs)
    frozenset()
    """
    directory = Path(certs_dir)
    ca_cert = load_certificate(directory / CA_CERT_FILE)
    crl = _load_crl(directory, ca_cert)
    next_update = crl.next_update_utc
    if next_update is not None and next_update < _utcnow():
        logger.warning("revocation list is past its next update; the CA needs rotating")
    return frozenset(entry.serial_number for entry in crl)


def list_certificates(certs_dir: str | os.PathLike[str]) -> list[IssuedCertificate]:
    """The server and node certificates in a CA directory, sorted by name.

    Files that are not certificates issued by this directory's CA are skipped.

    Parameters
    ----------
    certs_dir : path-like
        A directory made by :func:`init_ca`.

    Returns
    -------
    list of IssuedCertificate

    Raises
    ------
    ConfigError
        If the CA certificate or the revocation list is missing or invalid.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> certs = pathlib.Path(tempfile.mkdtemp())
    >>> _ = init_ca(certs, federation="demo")
    >>> _ = issue_certificate(certs, role="server", name="coordinator")
    >>> _ = issue_certificate(certs, role="node", name="site-a")
    >>> _ = revoke_certificate(certs, "site-a")
    >>> [(c.name, c.role, c.revoked) for c in list_certificates(certs)]
    [('coordinator', 'server', False), ('site-a', 'node', True)]
    """
    directory = Path(certs_dir)
    ca_cert = load_certificate(directory / CA_CERT_FILE)
    revoked = frozenset(entry.serial_number for entry in _load_crl(directory, ca_cert))
    found: list[IssuedCertificate] = []
    for path in sorted(directory.glob("*.pem")):
        if path.name in (CA_CERT_FILE, CRL_FILE) or path.name.startswith("."):
            continue
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            cert.verify_directly_issued_by(ca_cert)
            name = common_name(cert)
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            continue
        role: Literal["server", "node"] = "server" if ExtendedKeyUsageOID.SERVER_AUTH in usages else "node"
        found.append(
            IssuedCertificate(
                name=name,
                role=role,
                serial=cert.serial_number,
                not_valid_after=cert.not_valid_after_utc,
                revoked=cert.serial_number in revoked,
            )
        )
    return sorted(found, key=lambda item: (item.role != "server", item.name))


# ---------------------------------------------------------------- admission


def check_peer_certificate(
    pem: bytes | None,
    *,
    ca_certificate: x509.Certificate,
    revoked: Collection[int],
    admitted: Collection[str] | None,
    now: dt.datetime | None = None,
) -> str:
    """Decide whether a peer's certificate admits it; return its node id.

    The checks run in this order and the first failure is reported: a
    certificate is present; it is signed directly by the federation CA; ``now``
    is inside its validity window; its serial is not revoked; its common name
    is in ``admitted``.

    Parameters
    ----------
    pem : bytes or None
        The peer's PEM certificate, e.g. gRPC's
        ``context.auth_context()["x509_pem_cert"][0]``; None or empty if the
        peer sent none.
    ca_certificate : cryptography.x509.Certificate
        The federation CA (``load_certificate(certs / "ca.pem")``).
    revoked : collection of int
        Revoked serial numbers (:func:`load_revoked_serials`).
    admitted : collection of str or None
        Node ids the plan admits; None admits any node the CA vouches for.
    now : datetime.datetime, optional
        The time to check validity at (timezone-aware); default the current
        UTC time.

    Returns
    -------
    str
        The node id: the certificate's subject common name.

    Raises
    ------
    AdmissionRefused
        With ``.reason`` set to the failed check. A certificate that cannot be
        parsed counts as ``UNKNOWN_CA``; one without a common name as
        ``NOT_IN_PLAN``.
    ConfigError
        If ``now`` is naive.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> certs = pathlib.Path(tempfile.mkdtemp())
    >>> ca = load_certificate(init_ca(certs, federation="demo"))
    >>> cert_path, _ = issue_certificate(certs, role="node", name="site-a")
    >>> check_peer_certificate(read_pem(cert_path), ca_certificate=ca, revoked=(), admitted=["site-a"])
    'site-a'
    >>> try:
    ...     check_peer_certificate(read_pem(cert_path), ca_certificate=ca, revoked=(), admitted=["site-b"])
    ... except AdmissionRefused as err:
    ...     print(err.reason.name, err.node_id)
    NOT_IN_PLAN site-a
    """
    moment = _utcnow() if now is None else _check_aware(now, "now")
    if not pem:
        raise AdmissionRefused(AdmissionReason.NO_CERTIFICATE)
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise AdmissionRefused(AdmissionReason.UNKNOWN_CA, detail="not a valid PEM certificate") from None
    claimed = _claimed_name(cert)
    try:
        cert.verify_directly_issued_by(ca_certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise AdmissionRefused(AdmissionReason.UNKNOWN_CA, node_id=claimed) from None
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= moment <= end:
        raise AdmissionRefused(
            AdmissionReason.EXPIRED,
            node_id=claimed,
            detail=f"valid {start.isoformat()} to {end.isoformat()}, checked at {moment.isoformat()}",
        )
    if cert.serial_number in revoked:
        raise AdmissionRefused(AdmissionReason.REVOKED, node_id=claimed, detail=f"serial {cert.serial_number}")
    if claimed is None:
        raise AdmissionRefused(AdmissionReason.NOT_IN_PLAN, detail="the certificate names no node")
    if admitted is not None and claimed not in admitted:
        raise AdmissionRefused(AdmissionReason.NOT_IN_PLAN, node_id=claimed)
    return claimed


def _claimed_name(cert: x509.Certificate) -> str | None:
    try:
        return common_name(cert)
    except ConfigError:
        return None


#: (marker that must appear in the line, AdmissionReason) in the order checked.
#: BoringSSL's verify errors as gRPC core logs them, e.g. from grpcio 1.85:
#: ``... ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL:
#: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:
#: unable to get local issuer certificate``.
_HANDSHAKE_VERIFY_DETAILS: tuple[tuple[str, AdmissionReason], ...] = (
    ("certificate has expired", AdmissionReason.EXPIRED),
    ("certificate is not yet valid", AdmissionReason.EXPIRED),
    ("certificate revoked", AdmissionReason.REVOKED),
    ("unable to get local issuer certificate", AdmissionReason.UNKNOWN_CA),
    ("unable to get issuer certificate", AdmissionReason.UNKNOWN_CA),
    ("unable to verify the first certificate", AdmissionReason.UNKNOWN_CA),
    ("self signed certificate", AdmissionReason.UNKNOWN_CA),
    ("self-signed certificate", AdmissionReason.UNKNOWN_CA),
    ("certificate signature failure", AdmissionReason.UNKNOWN_CA),
)


def classify_handshake_failure(log_line: str) -> AdmissionReason | None:
    """Read a gRPC TLS handshake failure log line back into an AdmissionReason.

    gRPC refuses bad client certificates during the handshake, before any
    Python code sees them, and only logs why (to stderr, at INFO verbosity).
    This maps such a line to the reason :func:`check_peer_certificate` would
    give.

    Parameters
    ----------
    log_line : str
        One line of gRPC core's log.

    Returns
    -------
    AdmissionReason or None
        None if the line is not a handshake failure this function recognises.

    Examples
    --------
    >>> classify_handshake_failure(
    ...     "I1203 19:59:13.892159   17490 ssl_transport_security.cc:2563] Handshake failed with error "
    ...     "SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
    ...     "certificate has expired")
    <AdmissionReason.EXPIRED: 'certificate expired or not yet valid'>
    >>> classify_handshake_failure("I1203 19:59:13.892159 17490 server.cc:100] server started") is None
    True
    """
    if "Handshake failed" not in log_line:
        return None
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log_line:
        return AdmissionReason.NO_CERTIFICATE
    if "CERTIFICATE_VERIFY_FAILED" not in log_line:
        return None
    detail = log_line.rsplit("CERTIFICATE_VERIFY_FAILED", 1)[1].lower()
    for marker, reason in _HANDSHAKE_VERIFY_DETAILS:
        if marker in detail:
            return reason
    return None
