"""``fedcare node doctor``: a healthy site passes; each problem, broken one at a time, is named with its fix.

The coordinator is a real gRPC server over mutual TLS on 127.0.0.1 (the
transport ``fedcare serve`` runs), with real certificates from
:mod:`fedcare.transport.pki`.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.doctor import CheckResult, check_clock, check_disk, diagnose
from fedcare.plan import parse_plan
from fedcare.site_setup import init_site
from fedcare.transport import pki
from fedcare.transport.grpc_server import GrpcTransport

from tests.sites.site_files import issue_expired, make_federation, write_pngs

runner = CliRunner()
SITES = ("hospital-a", "hospital-b", "hospital-c")


@dataclass(frozen=True)
class Federation:
    ca: Path
    address: str


def _serve(ca: Path) -> GrpcTransport:
    plan = parse_plan({
        "task": "image-cnn", "rounds": 1, "nodes": list(SITES),
        "dataset": {"name": "chest-xray", "labels": ["normal", "pneumonia"], "input_shape": [1, 16, 16]},
    })  # fmt: skip
    return GrpcTransport(plan, listen="127.0.0.1:0", certs_dir=ca)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    ca = make_federation(tmp_path_factory.mktemp("federation"), nodes=(*SITES, "stranger"))
    transport = _serve(ca)
    try:
        yield Federation(ca, f"127.0.0.1:{transport.port}")
    finally:
        transport.close()


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pngs(tmp_path_factory.mktemp("pngs") / "xrays", {"NORMAL": 6, "PNEUMONIA": 6})


@pytest.fixture
def site(tmp_path: Path, federation: Federation, pngs: Path) -> Path:
    """A fresh site set up with fedcare node init: its node.yaml."""
    shutil.copytree(pngs, tmp_path / "xrays")
    ca = federation.ca
    init_site(tmp_path / "xrays", name="hospital-a", dataset="chest-xray", labels=["normal", "pneumonia"],
              cert=ca / "hospital-a.pem", key=ca / "hospital-a.key", ca=ca / "ca.pem",
              coordinator=federation.address, out=tmp_path / "node.yaml")  # fmt: skip
    return tmp_path / "node.yaml"


def _by_check(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.check: r for r in results}


def _failed(results: list[CheckResult]) -> list[str]:
    return [r.check for r in results if r.status == "fail"]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_healthy_site_passes_every_check(site: Path) -> None:
    done = runner.invoke(app, ["node", "doctor", str(site), "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    statuses = {c["check"]: c["status"] for c in report["checks"]}
    assert report["ok"] and set(statuses.values()) == {"ok"}, statuses
    for check in ("certificate validity", "coordinator tls", "coordinator admission", "clock", "data chest-xray",
                  "labels chest-xray", "disk", "accelerator"):  # fmt: skip
        assert check in statuses
    clock = next(c for c in report["checks"] if c["check"] == "clock")
    assert "of the coordinator's clock" in clock["message"]  # read from the real coordinator's heartbeat reply


def test_an_expired_certificate_is_named_and_the_coordinator_refuses_it(site: Path, federation: Federation) -> None:
    cert, key = issue_expired(federation.ca, "hospital-a")
    try:
        shutil.copy(cert, site.parent / "certs" / "hospital-a.pem")
        shutil.copy(key, site.parent / "certs" / "hospital-a.key")
    finally:
        pki.issue_certificate(federation.ca, role="node", name="hospital-a")  # other tests' sites get a valid one
    results = _by_check(diagnose(site))
    assert results["certificate validity"].status == "fail"
    assert "expired on" in results["certificate validity"].message and "new one" in results["certificate validity"].fix
    assert results["coordinator tls"].status == "fail" and "refused this site's certificate" in results["coordinator tls"].message
    done = runner.invoke(app, ["node", "doctor", str(site), "--json"])
    assert done.exit_code == 2  # the first failure: the certificate (a node.yaml/set-up problem)


def test_a_certificate_expiring_soon_is_a_warning(site: Path, federation: Federation) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = pki.issue_certificate(federation.ca, role="node", name="hospital-b", not_valid_after=now + dt.timedelta(days=3))
    certs = site.parent / "certs"
    shutil.copy(cert, certs / "hospital-a.pem")
    shutil.copy(key, certs / "hospital-a.key")
    results = _by_check(diagnose(site, coordinator="none:1"))
    assert results["certificate validity"].status == "warn" and "expires in 2 day(s)" in results["certificate validity"].message
    assert results["certificate name"].status == "fail" and "'hospital-b'" in results["certificate name"].message


def test_a_wrong_coordinator_address_is_named(site: Path) -> None:
    port = _closed_port()
    results = diagnose(site, coordinator=f"127.0.0.1:{port}")
    assert _failed(results) == ["coordinator tcp"]
    assert "nothing is listening on 127.0.0.1:" in _by_check(results)["coordinator tcp"].message
    done = runner.invoke(app, ["node", "doctor", str(site), "--coordinator", f"127.0.0.1:{port}", "--json"])
    assert done.exit_code == 5


def test_a_coordinator_of_another_federation_is_untrusted(site: Path, tmp_path: Path) -> None:
    other = make_federation(tmp_path / "other-ca", nodes=(), hosts=("fl.example.org",))
    transport = _serve(other)
    try:
        untrusted = _by_check(diagnose(site, coordinator=f"127.0.0.1:{transport.port}"))
        assert untrusted["coordinator tls"].status == "fail" and "not trusted" in untrusted["coordinator tls"].message
    finally:
        transport.close()


def test_a_server_certificate_without_the_dialled_name_is_a_name_mismatch(site: Path, federation: Federation, tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    shutil.copytree(federation.ca, ca)
    pki.issue_certificate(ca, role="server", name="coordinator", hosts=("fl.example.org",))
    transport = _serve(ca)
    try:
        results = _by_check(diagnose(site, coordinator=f"127.0.0.1:{transport.port}"))
    finally:
        transport.close()
    assert results["coordinator tls"].status == "ok"
    assert results["coordinator name"].status == "fail" and "for fl.example.org, not 127.0.0.1" in results["coordinator name"].message


def test_a_node_the_plan_does_not_admit_is_named(site: Path, federation: Federation) -> None:
    certs = site.parent / "certs"
    shutil.copy(federation.ca / "stranger.pem", certs / "stranger.pem")
    shutil.copy(federation.ca / "stranger.key", certs / "stranger.key")
    site.write_text(site.read_text().replace("name: hospital-a", "name: stranger"))
    results = _by_check(diagnose(site))
    assert results["coordinator admission"].status == "fail"
    assert "not admitted by the plan" in results["coordinator admission"].message
    assert runner.invoke(app, ["node", "doctor", str(site), "--json"]).exit_code == 6


def test_unreadable_data_is_named(site: Path) -> None:
    (site.parent / "xrays").rename(site.parent / "moved")
    results = _by_check(diagnose(site))
    assert results["data chest-xray"].status == "fail" and "does not exist" in results["data chest-xray"].message
    assert results["labels chest-xray"].status == "skip"
    assert runner.invoke(app, ["node", "doctor", str(site), "--json"]).exit_code == 3


def test_a_corrupt_png_is_counted_as_skipped(site: Path) -> None:
    image = next((site.parent / "xrays" / "NORMAL").glob("*.png"))
    image.write_bytes(image.read_bytes()[:60])
    results = _by_check(diagnose(site))
    assert results["data chest-xray"].status == "warn"
    assert "1 truncated or corrupt" in results["data chest-xray"].message
    assert image.name not in results["data chest-xray"].message  # counts, never file names


def test_an_unmapped_label_is_named_with_its_count(site: Path) -> None:
    write_pngs(site.parent / "xrays", {"QA_phantom": 2})
    results = diagnose(site)
    assert _failed(results) == ["labels chest-xray"]
    labels = _by_check(results)["labels chest-xray"]
    assert "QA_phantom (2)" in labels.message and "label_map" in labels.fix


def test_a_clock_behind_the_certificates_is_named(federation: Federation) -> None:
    issued = pki.load_certificate(federation.ca / "hospital-a.pem").not_valid_before_utc
    behind = check_clock([("the node's certificate", issued)], now=issued - dt.timedelta(days=3))
    assert behind.status == "fail" and "behind by at least 3 days" in behind.message and "NTP" in behind.fix


@pytest.mark.parametrize(
    ("skew_s", "status", "words"),
    [(600.0, "fail", "10 minute(s) ahead of the coordinator's"), (150.0, "warn", "2 minute(s) ahead of the coordinator's")],
)
def test_a_clock_running_ahead_of_the_coordinator_is_named(
    site: Path, monkeypatch: pytest.MonkeyPatch, skew_s: float, status: str, words: str
) -> None:
    """Certificates cannot show a clock running ahead; the coordinator's own clock, on its heartbeat reply, does."""
    import time

    import fedcare.doctor

    monkeypatch.setattr(fedcare.doctor, "_wall_time", lambda: time.time() + skew_s)
    results = diagnose(site)
    clock = _by_check(results)["clock"]
    assert clock.status == status and words in clock.message and "NTP" in clock.fix
    assert [r.check for r in results if r.status != "ok"] == ["clock"]  # the certificates still read as valid


def test_a_coordinator_pin_is_checked_and_a_wrong_one_named(site: Path, federation: Federation) -> None:
    import yaml

    right = pki.certificate_sha256((federation.ca / "server.pem").read_bytes())
    for pinned, status in ((right, "ok"), ("ab" * 32, "fail")):
        config = yaml.safe_load(site.read_text())
        config.setdefault("policy", {})["coordinator_fingerprint"] = pinned
        site.write_text(yaml.safe_dump(config))
        results = diagnose(site)
        pin = _by_check(results)["coordinator pin"]
        assert pin.status == status, pin
        assert _failed(results) == ([] if status == "ok" else ["coordinator pin"])
    assert "not the pinned abababab" in pin.message and "policy.coordinator_fingerprint" in pin.fix
    done = runner.invoke(app, ["node", "doctor", str(site), "--json"])
    assert done.exit_code == 6  # a policy matter: the node would refuse this coordinator


def test_a_refused_node_still_reads_the_coordinators_clock(federation: Federation) -> None:
    from fedcare.doctor import check_coordinator

    results, _, clock = check_coordinator(federation.address, certs_dir=federation.ca, name="stranger")
    assert _by_check(results)["coordinator admission"].status == "fail"
    assert clock is not None and abs(clock.offset_s) < 5 and 0 <= clock.uncertainty_s < 5


def test_low_free_disk_is_a_warning_then_a_failure(tmp_path: Path) -> None:
    import shutil as sh

    free = sh.disk_usage(tmp_path).free
    assert check_disk([tmp_path / "ledger"], min_free_bytes=free * 2)[0].status == "warn"
    assert check_disk([tmp_path / "ledger"], min_free_bytes=free * 20)[0].status == "fail"


def test_a_clock_reading_takes_the_middle_of_the_call_and_ignores_nonsense() -> None:
    from fedcare.doctor import _clock_reading

    reading = _clock_reading((("other", "1"), ("fedcare-time", "1000.0")), 1100.0, 1102.0)
    assert reading is not None and reading.offset_s == 101.0 and reading.uncertainty_s == 1.0
    for value in ("nan", "inf", "soon", ""):
        assert _clock_reading((("fedcare-time", value),), 0.0, 1.0) is None
    assert _clock_reading((), 0.0, 1.0) is None and _clock_reading(None, 0.0, 1.0) is None
