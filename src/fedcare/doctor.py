"""``fedcare node doctor``: check everything a site can get wrong before it joins, and say what to fix.

Each check is a function that returns :class:`CheckResult` objects (status
``ok``, ``warn``, ``fail`` or ``skip``, a message and a fix in plain words),
so tests and other tools call them directly; :func:`diagnose` runs them all
for a node.yaml. The checks: the certificate (present, readable, signed by
the CA, valid now and not expiring soon, matching the key, naming the
node), the clock, the coordinator (something listening, a TLS handshake
with the site's certificate, the coordinator's name, admission), every
dataset (readable, counts per split) and its label mapping, free disk space
where the node writes, and the accelerator.

Messages hold counts, label names and file names inside ``certs/``, never
data paths or records.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import math
import shutil
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fedcare.errors import ConfigError, DataError, FedcareError, PolicyViolation, TransportError

if TYPE_CHECKING:
    from cryptography import x509

    from fedcare.deployment import NodeConfig
    from fedcare.federation.policy import NodePolicy
    from fedcare.plan import Plan

__all__ = [
    "CheckResult",
    "ClockReading",
    "check_accelerator",
    "check_certificates",
    "check_clock",
    "check_coordinator",
    "check_coordinator_pin",
    "check_data",
    "check_disk",
    "diagnose",
    "failure_error",
]

Status = Literal["ok", "warn", "fail", "skip"]

#: Warn when the node's certificate expires within this many days.
EXPIRY_WARNING_DAYS = 14
#: A clock this many seconds from the coordinator's (at least, after the call's round trip) is a warning ...
CLOCK_WARN_S = 60.0
#: ... and this many a failure: certificates, audit logs and ledgers all read the clock.
CLOCK_FAIL_S = 300.0
_NTP_FIX = "set the clock right and keep it synchronised (NTP: timedatectl set-ntp true)"
#: Warn below this much free disk where the node writes (bytes), fail below a tenth of it.
MIN_FREE_BYTES = 2 * 1024**3

_ERROR_OF_AREA: dict[str, type[FedcareError]] = {
    "certificate": ConfigError,
    "clock": ConfigError,
    "coordinator": TransportError,
    "admission": PolicyViolation,
    "data": DataError,
    "labels": DataError,
    "disk": FedcareError,
    "accelerator": ConfigError,
}


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes
    ----------
    check : str
        What was checked, e.g. ``certificate validity``, ``coordinator tls``,
        ``labels chest-xray``.
    status : {"ok", "warn", "fail", "skip"}
        ``skip``: not checked (an earlier check failed, or nothing to check against).
    message : str
        What was found, in plain words.
    fix : str
        What to do about it (empty when nothing).
    area : str
        ``certificate``, ``clock``, ``coordinator``, ``admission``, ``data``,
        ``labels``, ``disk`` or ``accelerator``: the kind of error a failure
        is (:func:`failure_error`).

    Examples
    --------
    >>> CheckResult("disk", "ok", "120 GiB free", area="disk").to_dict()["status"]
    'ok'
    """

    check: str
    status: Status
    message: str
    fix: str = ""
    area: str = ""

    def to_dict(self) -> dict[str, str]:
        """A JSON-able form."""
        return asdict(self)


def failure_error(results: Sequence[CheckResult]) -> FedcareError | None:
    """The error of the first failed check (its exit code is the command's), or None when none failed.

    Examples
    --------
    >>> failure_error([CheckResult("data x", "fail", "no records", area="data")]).__class__.__name__
    'DataError'
    >>> failure_error([CheckResult("disk", "warn", "1 GiB free", area="disk")]) is None
    True
    """
    for result in results:
        if result.status == "fail":
            return _ERROR_OF_AREA.get(result.area, FedcareError)(f"{result.check}: {result.message}")
    return None


# -- the certificate ----------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.fromtimestamp(_wall_time(), dt.timezone.utc)


def _wall_time() -> float:
    """This machine's clock, seconds since the epoch (one place, so tests can set it wrong)."""
    return time.time()


@dataclass(frozen=True)
class ClockReading:
    """This machine's clock against the coordinator's, read from one heartbeat.

    The coordinator stamps its time on every heartbeat reply, refusals
    included (:data:`fedcare.transport.wire.TIME_METADATA_KEY`); the reading
    takes it as the coordinator's time at the middle of the call.

    Attributes
    ----------
    offset_s : float
        This machine's clock minus the coordinator's, in seconds (positive: ahead).
    uncertainty_s : float
        Half the call's round trip: the true offset is within this of ``offset_s``.
    """

    offset_s: float
    uncertainty_s: float


def check_certificates(certs_dir: Path, *, name: str, now: dt.datetime | None = None) -> list[CheckResult]:
    """Check the node's certificate files in ``certs_dir``: ``ca.pem``, ``NAME.pem``, ``NAME.key``.

    Parameters
    ----------
    certs_dir : Path
        The node's certificates folder.
    name : str
        The node's name (node.yaml's ``name``).
    now : datetime, optional
        The time to check validity at (default: this machine's clock).

    Returns
    -------
    list of CheckResult
        ``certificate files``, ``certificate issuer``, ``certificate validity``,
        ``certificate key``, ``certificate name``; the checks after a failed
        ``files`` or ``issuer`` are skipped.

    Examples
    --------
    >>> import tempfile
    >>> [(r.check, r.status) for r in check_certificates(Path(tempfile.mkdtemp()), name="site-a")][:2]
    [('certificate files', 'fail'), ('certificate issuer', 'skip')]
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    from fedcare.transport import pki

    now = now or _now()
    later = ("certificate issuer", "certificate validity", "certificate key", "certificate name")

    def skipped(after: str) -> list[CheckResult]:
        return [CheckResult(check, "skip", f"not checked: {after}", area="certificate") for check in later]

    files = {"ca.pem": certs_dir / "ca.pem", f"{name}.pem": certs_dir / f"{name}.pem", f"{name}.key": certs_dir / f"{name}.key"}
    missing = [label for label, path in files.items() if not path.is_file()]
    if missing:
        return [CheckResult(
            "certificate files", "fail", f"missing in the certificates folder: {', '.join(missing)}",
            f"copy the files the federation's operator sent: fedcare node init ... --cert {name}.pem --key {name}.key "
            "--ca ca.pem --force, or set certs_dir in node.yaml", area="certificate",
        ), *skipped("files missing")]  # fmt: skip
    try:
        ca = x509.load_pem_x509_certificate(pki.read_pem(files["ca.pem"]))
        cert = x509.load_pem_x509_certificate(pki.read_pem(files[f"{name}.pem"]))
        key = serialization.load_pem_private_key(pki.read_pem(files[f"{name}.key"]), password=None)
    except (ConfigError, ValueError, TypeError) as exc:
        detail = exc.message if isinstance(exc, ConfigError) else "a file holds no valid certificate or unencrypted key"
        return [CheckResult("certificate files", "fail", f"cannot read: {detail}",
                            "ask the federation's operator to send the certificate files again", area="certificate"),
                *skipped("files unreadable")]  # fmt: skip
    mode = files[f"{name}.key"].stat().st_mode & 0o777
    results = [CheckResult("certificate files", "ok", f"ca.pem, {name}.pem, {name}.key present and readable", area="certificate")]
    if mode & 0o077:
        results[0] = CheckResult(
            "certificate files", "warn", f"{name}.key can be read by other users (mode {oct(mode)})",
            f"chmod 600 {name}.key", area="certificate",
        )  # fmt: skip
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return [*results, CheckResult(
            "certificate issuer", "fail", f"{name}.pem is not signed by the CA in ca.pem",
            "ask the federation's operator for this federation's ca.pem, or a certificate issued by it", area="certificate",
        ), *skipped("wrong CA")[1:]]  # fmt: skip
    results.append(CheckResult("certificate issuer", "ok", f"signed by {pki.common_name(ca)}", area="certificate"))
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now > end:
        results.append(CheckResult(
            "certificate validity", "fail", f"the certificate expired on {end:%Y-%m-%d %H:%M} UTC",
            f"ask the federation's operator for a new one (fedcare certs issue --role node --name {name}), "
            "then fedcare node init ... --force", area="certificate",
        ))  # fmt: skip
    elif now < start:
        results.append(CheckResult(
            "certificate validity", "fail", f"the certificate is valid only from {start:%Y-%m-%d %H:%M} UTC",
            "set this machine's clock right (see the clock check)", area="certificate",
        ))  # fmt: skip
    elif end - now < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        results.append(CheckResult(
            "certificate validity", "warn", f"the certificate expires in {(end - now).days} day(s), on {end:%Y-%m-%d}",
            "ask the federation's operator for a new one before then", area="certificate",
        ))  # fmt: skip
    else:
        results.append(CheckResult("certificate validity", "ok", f"valid until {end:%Y-%m-%d}", area="certificate"))
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != cert.public_key().public_bytes(serialization.Encoding.DER, spki):
        results.append(CheckResult(
            "certificate key", "fail", f"{name}.key does not belong to {name}.pem",
            "install the key that was issued with the certificate", area="certificate",
        ))  # fmt: skip
    else:
        results.append(CheckResult("certificate key", "ok", "the key matches the certificate", area="certificate"))
    claimed = pki._claimed_name(cert)
    if claimed != name:
        results.append(CheckResult(
            "certificate name", "fail", f"the certificate names {claimed!r}, node.yaml names {name!r}",
            f"set name: {claimed} in node.yaml, or ask for a certificate named {name}", area="certificate",
        ))  # fmt: skip
    else:
        results.append(CheckResult("certificate name", "ok", f"names {name}, as node.yaml does", area="certificate"))
    return results


# -- the clock ----------------------------------------------------------------------------------


def check_clock(
    references: Sequence[tuple[str, dt.datetime]],
    *,
    now: dt.datetime | None = None,
    coordinator: ClockReading | None = None,
) -> CheckResult:
    """Check this machine's clock: not before any time signed elsewhere, and close to the coordinator's.

    The references are the start of validity of certificates issued on the
    CA's machine (the node's, the CA's, the coordinator's as seen in the TLS
    handshake): a clock behind any of them fails. ``coordinator`` is the
    coordinator's own clock as a heartbeat read it, which shows a clock
    running ahead as well as behind: more than :data:`CLOCK_WARN_S` seconds
    apart (after the round trip's uncertainty) is a warning, more than
    :data:`CLOCK_FAIL_S` a failure. Without it (the coordinator was not
    reached) a clock running ahead goes unseen.

    Parameters
    ----------
    references : sequence of (str, datetime)
        What each time is and the time (timezone-aware).
    now : datetime, optional
        This machine's time (default: its clock).
    coordinator : ClockReading, optional
        The coordinator's clock as read by the doctor's heartbeat.

    Examples
    --------
    >>> ref = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    >>> check_clock([("the node's certificate", ref)], now=ref - dt.timedelta(days=2)).status
    'fail'
    >>> check_clock([("the node's certificate", ref)], now=ref + dt.timedelta(days=2)).status
    'ok'
    >>> later = ref + dt.timedelta(days=2)
    >>> ahead = check_clock([("the node's certificate", ref)], now=later, coordinator=ClockReading(600.0, 0.01))
    >>> ahead.status, ahead.message
    ('fail', "this machine's clock is 10 minute(s) ahead of the coordinator's")
    >>> check_clock([], now=later, coordinator=ClockReading(-90.0, 0.01)).status
    'warn'
    >>> check_clock([], now=later, coordinator=ClockReading(2.0, 0.01)).message
    "2030-01-03 00:00 UTC, within 2 s of the coordinator's clock"
    """
    now = now or _now()
    if not references and coordinator is None:
        return CheckResult("clock", "skip", "nothing to compare with (no readable certificate)", area="clock")
    behind = [(what, when) for what, when in references if now < when]
    if behind:
        what, when = max(behind, key=lambda item: item[1])
        return CheckResult(
            "clock", "fail",
            f"this machine's clock reads {now:%Y-%m-%d %H:%M} UTC, before {what} was issued ({when:%Y-%m-%d %H:%M} UTC): "
            "it is behind by at least " + _duration(when - now),
            _NTP_FIX, area="clock",
        )  # fmt: skip
    if coordinator is not None:
        apart = abs(coordinator.offset_s) - coordinator.uncertainty_s  # at least this far apart
        if apart > CLOCK_WARN_S:
            direction = "ahead of" if coordinator.offset_s > 0 else "behind"
            return CheckResult(
                "clock", "fail" if apart > CLOCK_FAIL_S else "warn",
                f"this machine's clock is {_duration(dt.timedelta(seconds=round(apart)))} {direction} the coordinator's",
                f"{_NTP_FIX}; if this machine's clock is right, tell the federation's operator that the "
                "coordinator's is not", area="clock",
            )  # fmt: skip
        within = max(round(abs(coordinator.offset_s) + coordinator.uncertainty_s), 1)
        return CheckResult("clock", "ok", f"{now:%Y-%m-%d %H:%M} UTC, within {within} s of the coordinator's clock", area="clock")
    checked = ", ".join(what for what, _ in references)
    return CheckResult(
        "clock", "ok",
        f"{now:%Y-%m-%d %H:%M} UTC, after {checked} (the coordinator was not reached: a clock running ahead is not detected)",
        area="clock",
    )  # fmt: skip


def _duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    if seconds >= 7200:
        return f"{seconds // 3600} hours"
    return f"{max(seconds // 60, 1)} minute(s)"


# -- the coordinator ----------------------------------------------------------------------------


def _split_address(address: str) -> tuple[str, int] | None:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _names_in(cert: x509.Certificate) -> list[str]:
    from cryptography import x509

    try:
        alternative = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*alternative.get_values_for_type(x509.DNSName), *(str(ip) for ip in alternative.get_values_for_type(x509.IPAddress))]


def _host_matches(host: str, names: Sequence[str]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for name in names:
        if address is not None:
            try:
                if ipaddress.ip_address(name) == address:
                    return True
            except ValueError:
                continue
        elif name.startswith("*.") and "." in host and host.split(".", 1)[1].casefold() == name[2:].casefold():
            return True
        elif name.casefold() == host.casefold():
            return True
    return False


def check_coordinator(
    address: str | None, *, certs_dir: Path, name: str, timeout_s: float = 5.0
) -> tuple[list[CheckResult], x509.Certificate | None, ClockReading | None]:
    """Reach the coordinator as the node would: TCP, then TLS with the site's certificate, then admission.

    Parameters
    ----------
    address : str, optional
        ``HOST:PORT``; None: not checked (nothing configured).
    certs_dir : Path
        ``ca.pem``, ``NAME.pem``, ``NAME.key``.
    name : str
        The node's name.
    timeout_s : float
        Each step's timeout, in seconds.

    Returns
    -------
    (list of CheckResult, certificate or None, ClockReading or None)
        ``coordinator address``, ``coordinator tcp``, ``coordinator tls``,
        ``coordinator name``, ``coordinator admission``; the coordinator's
        certificate when the handshake got it, and its clock when the
        admission heartbeat got an answer (both for the clock check).

    Examples
    --------
    >>> results, _, _ = check_coordinator("nowhere", certs_dir=Path("certs"), name="a")
    >>> results[0].check, results[0].status
    ('coordinator address', 'fail')
    """
    from cryptography import x509

    if address is None:
        return [CheckResult(
            "coordinator", "skip", "no coordinator address to check",
            "give --coordinator HOST:PORT, or set coordinator: in node.yaml", area="coordinator",
        )], None, None  # fmt: skip
    parsed = _split_address(address)
    if parsed is None:
        return [CheckResult(
            "coordinator address", "fail", f"{address!r} is not HOST:PORT",
            "write it as e.g. fl.example.org:7443", area="coordinator",
        )], None, None  # fmt: skip
    host, port = parsed
    results = [CheckResult("coordinator address", "ok", f"{host}:{port}", area="coordinator")]
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except socket.gaierror:
        return [*results, CheckResult(
            "coordinator tcp", "fail", f"the name {host} does not resolve",
            "check the spelling of the coordinator's address, or this machine's DNS", area="coordinator",
        )], None, None  # fmt: skip
    except ConnectionRefusedError:
        return [*results, CheckResult(
            "coordinator tcp", "fail", f"nothing is listening on {host}:{port} (connection refused)",
            "check the address and port with the federation's operator, and that the coordinator is running",
            area="coordinator",
        )], None, None  # fmt: skip
    except OSError as exc:
        what = "no answer (timed out)" if isinstance(exc, TimeoutError) else f"cannot connect ({exc.strerror or exc})"
        return [*results, CheckResult(
            "coordinator tcp", "fail", f"{host}:{port}: {what}",
            "a firewall may block the outbound port: ask IT to allow outgoing TCP to it", area="coordinator",
        )], None, None  # fmt: skip
    results.append(CheckResult("coordinator tcp", "ok", f"{host}:{port} accepts connections", area="coordinator"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # checked below, to tell a name mismatch apart from an untrusted certificate
    try:
        context.load_verify_locations(cafile=str(certs_dir / "ca.pem"))
        context.load_cert_chain(str(certs_dir / f"{name}.pem"), str(certs_dir / f"{name}.key"))
    except (OSError, ssl.SSLError):
        raw.close()
        return [*results, CheckResult(
            "coordinator tls", "skip", "not checked: the certificate files cannot be used", area="coordinator",
        )], None, None  # fmt: skip
    context.set_alpn_protocols(["h2"])
    server: x509.Certificate | None = None
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
            server = x509.load_der_x509_certificate(der) if der else None
            tls.settimeout(timeout_s)
            try:
                # TLS 1.3: the server judges the node's certificate after the handshake; a gRPC server
                # then sends its HTTP/2 settings, or hangs up on a certificate it refuses.
                refused = tls.recv(1) == b""
            except (TimeoutError, socket.timeout):
                refused = False
            except ConnectionResetError:
                refused = True
    except ssl.SSLCertVerificationError as exc:
        return [*results, CheckResult(
            "coordinator tls", "fail", f"the coordinator's certificate is not trusted: {exc.verify_message}",
            "this may not be the federation's coordinator; check the address, and that ca.pem is this federation's",
            area="coordinator",
        )], None, None  # fmt: skip
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).replace("_", " ").lower()
        return [*results, CheckResult(
            "coordinator tls", "fail", f"the coordinator refused this site's certificate ({reason})",
            "the certificate may be expired, revoked or from another CA: ask the federation's operator", area="coordinator",
        )], None, None  # fmt: skip
    except OSError as exc:
        return [*results, CheckResult(
            "coordinator tls", "fail", f"the TLS handshake failed ({exc.strerror or exc})",
            "something on the way may not speak TLS (a proxy?): check the port with the federation's operator",
            area="coordinator",
        )], None, None  # fmt: skip
    if refused:
        return [*results, CheckResult(
            "coordinator tls", "fail", "the coordinator refused this site's certificate (it closed the connection)",
            "the certificate may be expired, revoked or from another CA: ask the federation's operator", area="coordinator",
        )], server, None  # fmt: skip
    results.append(CheckResult("coordinator tls", "ok", "TLS handshake with this site's certificate", area="coordinator"))
    names = _names_in(server) if server is not None else []
    if not _host_matches(host, names):
        results.append(CheckResult(
            "coordinator name", "fail",
            f"the coordinator's certificate is for {', '.join(names) or 'no name'}, not {host}",
            f"dial one of those names, or ask the operator to reissue the server certificate with --host {host}",
            area="coordinator",
        ))  # fmt: skip
        return results, server, None
    results.append(CheckResult("coordinator name", "ok", f"the coordinator's certificate names {host}", area="coordinator"))
    admission, clock = _check_admission(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
                                        certs_dir=certs_dir, name=name, timeout_s=timeout_s)  # fmt: skip
    results.append(admission)
    return results, server, clock


def check_coordinator_pin(server: x509.Certificate | None, *, policy: NodePolicy) -> CheckResult | None:
    """Check the coordinator's certificate against the policy's ``coordinator_fingerprint``, if the site pins one.

    The node refuses a coordinator whose certificate is not the pinned one (a
    rotated server certificate, or another coordinator) by the same rule
    (:meth:`NodePolicy.check_coordinator`), so this names it before the node
    is started. None when nothing is pinned.

    Parameters
    ----------
    server : x509.Certificate, optional
        The certificate the coordinator presented in the TLS handshake (None: not reached).
    policy : NodePolicy
        The site's policy (node.yaml's ``policy``).
    """
    pinned = policy.coordinator_fingerprint
    if pinned is None:
        return None
    if server is None:
        return CheckResult(
            "coordinator pin", "skip", "not checked: the coordinator's certificate was not received", area="admission"
        )
    from cryptography.hazmat.primitives import hashes

    seen = server.fingerprint(hashes.SHA256()).hex()
    try:
        policy.check_coordinator(seen)
    except PolicyViolation:
        return CheckResult(
            "coordinator pin", "fail",
            f"the coordinator's certificate has SHA-256 {seen[:16]}..., not the pinned {pinned[:16]}...: the node would "
            "refuse this coordinator",
            "if the federation's operator rotated the server certificate, confirm its new fingerprint with them "
            "(fedcare certs fingerprint) and update policy.coordinator_fingerprint in node.yaml; otherwise check the "
            "coordinator's address", area="admission",
        )  # fmt: skip
    return CheckResult("coordinator pin", "ok", f"the coordinator's certificate is the pinned one ({pinned[:16]}...)",
                       area="admission")  # fmt: skip


def _check_admission(
    target: str, *, certs_dir: Path, name: str, timeout_s: float
) -> tuple[CheckResult, ClockReading | None]:
    """Ask the coordinator, read-only, whether it admits this node: a heartbeat outside any run.

    A coordinator answers a heartbeat from a node that has not joined with
    FAILED_PRECONDITION, after checking its certificate (CA, validity,
    revocation, the plan's nodes); a refusal is PERMISSION_DENIED. Either
    answer carries the coordinator's clock, read here for the clock check.
    """
    import grpc

    from fedcare.transport.proto import fedcare_pb2 as pb
    from fedcare.transport.proto import fedcare_pb2_grpc as pb_grpc

    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certs_dir / "ca.pem").read_bytes(),
        private_key=(certs_dir / f"{name}.key").read_bytes(),
        certificate_chain=(certs_dir / f"{name}.pem").read_bytes(),
    )
    with grpc.secure_channel(target, credentials) as channel:
        stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
        # Connect first, so that the round trip timed below is the call's alone, not the TLS handshake's.
        with contextlib.suppress(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        sent = _wall_time()
        try:
            _, call = stub.Heartbeat.with_call(pb.HeartbeatRequest(run_id=""), timeout=timeout_s)
            clock = _clock_reading(call.trailing_metadata(), sent, _wall_time())
        except grpc.RpcError as error:
            clock = _clock_reading(error.trailing_metadata(), sent, _wall_time())
            code, details = error.code(), error.details() or ""
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                return CheckResult(
                    "coordinator admission", "ok", f"the coordinator admits {name} (not in a run yet)", area="admission"
                ), clock
            if code == grpc.StatusCode.PERMISSION_DENIED:
                return CheckResult(
                    "coordinator admission", "fail", f"the coordinator refuses {name}: {details.removeprefix('refused: ')}",
                    f"ask the federation's operator to admit {name} (the plan's nodes) or to issue a fresh certificate",
                    area="admission",
                ), clock  # fmt: skip
            return CheckResult(
                "coordinator admission", "warn", f"the coordinator did not answer ({code.name.lower()}: {details[:200]})",
                "try again when the coordinator runs a federation", area="coordinator",
            ), clock  # fmt: skip
    return CheckResult("coordinator admission", "ok", f"the coordinator admits {name}", area="admission"), clock


def _clock_reading(
    trailers: Sequence[tuple[str, str | bytes]] | None, sent: float, received: float
) -> ClockReading | None:
    """The coordinator's clock from a reply's trailing metadata; None if it sent none (or nonsense)."""
    from fedcare.transport.wire import TIME_METADATA_KEY

    for key, value in trailers or ():
        if key != TIME_METADATA_KEY:
            continue
        try:
            coordinator = float(value)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(coordinator):
            return None
        return ClockReading(offset_s=(sent + received) / 2 - coordinator, uncertainty_s=(received - sent) / 2)
    return None


# -- data, disk, accelerator --------------------------------------------------------------------


def check_data(node_yaml: Path, *, plan: Plan | None = None) -> list[CheckResult]:
    """Read every dataset of node.yaml as the node would (``fedcare data check``): readable, and every label mapped.

    Returns
    -------
    list of CheckResult
        Per dataset: ``data NAME`` (records read, counts per split, files
        skipped) and ``labels NAME`` (every local label mapped onto a
        federation label; the unmapped ones named with their counts).
    """
    from fedcare.data.check import check_site

    results: list[CheckResult] = []
    for found in check_site(node_yaml, plan=plan):
        if found.kind == "bundled":
            results.append(CheckResult(f"data {found.name}", "ok", f"bundled dataset, site {found.site}", area="data"))
            continue
        label_errors = [e for e in found.errors if e.startswith("label_map:")]
        data_errors = [e for e in found.errors if not e.startswith("label_map:")]
        report = found.report
        if data_errors:
            results.append(CheckResult(
                f"data {found.name}", "fail", "; ".join(data_errors),
                "check the dataset's path in node.yaml (relative to node.yaml) and that this user can read the files",
                area="data",
            ))  # fmt: skip
        elif report is not None:
            skipped = {reason: n for reason, n in report.read.skipped.items() if reason not in ("unmapped label",)}
            counts = f"{report.read.records_read} record(s) read; train {report.train_size}, test {report.test_size}"
            if skipped:
                listing = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
                results.append(CheckResult(
                    f"data {found.name}", "warn", f"{counts}; skipped: {listing}",
                    "replace or remove the skipped files (fedcare data check node.yaml shows the counts)", area="data",
                ))  # fmt: skip
            else:
                results.append(CheckResult(f"data {found.name}", "ok", counts, area="data"))
        if report is None:
            results.append(CheckResult(f"labels {found.name}", "skip", "not checked: the data cannot be read", area="labels"))
        elif report.unmapped or report.outside_vocabulary or label_errors:
            parts = []
            if report.unmapped:
                parts.append("local label(s) with no mapping: " + ", ".join(f"{k} ({v})" for k, v in sorted(report.unmapped.items())))
            if report.outside_vocabulary:
                parts.append("mapped onto label(s) the federation does not have: "
                             + ", ".join(f"{k} ({v})" for k, v in sorted(report.outside_vocabulary.items())))  # fmt: skip
            status: Status = "fail" if label_errors else "warn"
            results.append(CheckResult(
                f"labels {found.name}", status, "; ".join(parts) or "; ".join(label_errors),
                f"in node.yaml under datasets: {found.name}: label_map:, map each onto one of the federation's labels "
                f"({', '.join(report.vocabulary)}), or null to leave it out", area="labels",
            ))  # fmt: skip
        else:
            results.append(CheckResult(
                f"labels {found.name}", "ok", f"every local label maps onto {', '.join(report.vocabulary)}", area="labels"
            ))  # fmt: skip
    return results


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(paths: Sequence[Path], *, min_free_bytes: int = MIN_FREE_BYTES) -> list[CheckResult]:
    """Free space on each file system the node writes to (ledger, state, audit log, approvals).

    Warns below ``min_free_bytes``, fails below a tenth of it.

    Examples
    --------
    >>> check_disk([Path(".")], min_free_bytes=1)[0].status
    'ok'
    """
    results: list[CheckResult] = []
    seen: set[int] = set()
    for path in paths:
        where = _existing(Path(path))
        device = where.stat().st_dev
        if device in seen:
            continue
        seen.add(device)
        usage = shutil.disk_usage(where)
        free = f"{usage.free / 1024**3:.1f} GiB free where the node keeps {Path(path).name}"
        if usage.free < min_free_bytes // 10:
            status: Status = "fail"
        elif usage.free < min_free_bytes:
            status = "warn"
        else:
            status = "ok"
        fix = "" if status == "ok" else f"free some space (at least {min_free_bytes / 1024**3:.1f} GiB), or move ledger_dir/state_dir in node.yaml"
        results.append(CheckResult("disk", status, free, fix, area="disk"))
    return results


def check_accelerator(device: str = "auto") -> CheckResult:
    """What local training will run on: CUDA when present, else CPU threads (informational).

    Fails only when node.yaml's ``compute.device`` asks for CUDA and there is none.

    Examples
    --------
    >>> check_accelerator("cpu").status
    'ok'
    """
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cuda = None
    # Importing torch takes seconds: only where a CUDA driver is visible (or asked for) is it asked.
    driver = Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()
    if driver or device.startswith("cuda") or "torch" in sys.modules:
        try:
            import torch

            if torch.cuda.is_available():
                cuda = torch.cuda.get_device_name(0)
        except ImportError:
            pass
    if device.startswith("cuda") and cuda is None:
        return CheckResult(
            "accelerator", "fail", f"node.yaml asks for {device}, and this machine has no usable CUDA device",
            "set compute.device: auto (or cpu) in node.yaml, or install the GPU driver", area="accelerator",
        )  # fmt: skip
    if cuda is not None and device != "cpu":
        return CheckResult("accelerator", "ok", f"CUDA: {cuda}; {threads} CPU thread(s)", area="accelerator")
    return CheckResult("accelerator", "ok", f"CPU: {threads} thread(s) (no CUDA used)", area="accelerator")


# -- all of it ----------------------------------------------------------------------------------


def diagnose(
    node_yaml: str | os.PathLike[str],
    *,
    coordinator: str | None = None,
    certs_dir: str | os.PathLike[str] | None = None,
    plan: Plan | None = None,
    min_free_bytes: int = MIN_FREE_BYTES,
    timeout_s: float = 5.0,
) -> list[CheckResult]:
    """Run every check for a site's node.yaml.

    Parameters
    ----------
    node_yaml : path-like
        The site's node.yaml.
    coordinator : str, optional
        ``HOST:PORT``; default: node.yaml's ``coordinator``.
    certs_dir : path-like, optional
        Default: node.yaml's ``certs_dir``, else ``certs/`` beside node.yaml.
    plan : Plan, optional
        Check the data against this plan's labels, shape and features.
    min_free_bytes : int
        See :func:`check_disk`.
    timeout_s : float
        Each network step's timeout, in seconds.

    Returns
    -------
    list of CheckResult
        In order: certificate, coordinator, clock, data and labels, disk, accelerator.

    Raises
    ------
    ConfigError
        If node.yaml cannot be read or is invalid (nothing else can be checked).
    """
    from cryptography import x509

    from fedcare.deployment import NodeConfig, load_node_config

    path = Path(node_yaml)
    config: NodeConfig = load_node_config(path)
    certs = Path(certs_dir) if certs_dir is not None else config.certs_dir or path.resolve().parent / "certs"
    results = check_certificates(certs, name=config.name)
    network, server, clock = check_coordinator(
        coordinator or config.coordinator, certs_dir=certs, name=config.name, timeout_s=timeout_s
    )
    references: list[tuple[str, dt.datetime]] = []
    for label, file in (("the node's certificate", certs / f"{config.name}.pem"), ("the federation CA", certs / "ca.pem")):
        try:
            references.append((label, x509.load_pem_x509_certificate(file.read_bytes()).not_valid_before_utc))
        except (OSError, ValueError):
            continue
    if server is not None:
        references.append(("the coordinator's certificate", server.not_valid_before_utc))
    results += network
    pin = check_coordinator_pin(server, policy=config.policy)
    if pin is not None:
        results.append(pin)
    results.append(check_clock(references, coordinator=clock))
    results += check_data(path, plan=plan)
    writes = [p for p in (config.ledger_dir, config.state_dir, config.approvals_dir, config.audit_log) if p is not None]
    results += check_disk(writes, min_free_bytes=min_free_bytes)
    results.append(check_accelerator(config.compute.device))
    return results
