"""The dashboard over TLS with the federation's own certificates."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcare.dashboard import DashboardServer, LiveState, dashboard_tls_context, start_dashboard
from fedcare.errors import ConfigError
from fedcare.plan import parse_plan
from fedcare.transport import pki


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    pki.init_ca(directory, federation="test")
    pki.issue_certificate(directory, role="server", name="coordinator", hosts=("localhost", "127.0.0.1"))
    pki.issue_certificate(directory, role="node", name="cleveland")
    pki.issue_certificate(directory, role="node", name="hungary")
    pki.revoke_certificate(directory, "hungary")
    return directory


def _client(certs: Path, node: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(certs / "ca.pem"))
    if node is not None:
        context.load_cert_chain(str(certs / f"{node}.pem"), str(certs / f"{node}.key"))
    return context


@pytest.fixture
def mutual(certs: Path) -> Iterator[DashboardServer]:
    tls = dashboard_tls_context(certs, require_client_cert=True)
    with DashboardServer(LiveState(), host="127.0.0.1", tls=tls) as running:
        yield running


def test_url_is_https(mutual: DashboardServer) -> None:
    assert mutual.url.startswith("https://127.0.0.1:")


def test_client_with_node_certificate_connects(mutual: DashboardServer, certs: Path) -> None:
    with urllib.request.urlopen(mutual.url + "api/health", context=_client(certs, "cleveland"), timeout=10) as answer:
        assert json.load(answer) == {"ok": True}


def test_client_without_certificate_is_refused_when_required(mutual: DashboardServer, certs: Path) -> None:
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        with urllib.request.urlopen(mutual.url + "api/health", context=_client(certs, None), timeout=10) as answer:
            answer.read()


def test_revoked_node_certificate_is_refused(mutual: DashboardServer, certs: Path) -> None:
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        with urllib.request.urlopen(mutual.url + "api/health", context=_client(certs, "hungary"), timeout=10) as answer:
            answer.read()


def test_server_keeps_serving_after_a_refused_handshake(mutual: DashboardServer, certs: Path) -> None:
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(mutual.url + "api/health", context=_client(certs, None), timeout=10).read()
    with urllib.request.urlopen(mutual.url + "api/health", context=_client(certs, "cleveland"), timeout=10) as answer:
        assert answer.status == 200


def test_plain_http_to_tls_port_gets_no_page(mutual: DashboardServer) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{mutual.port}/api/health", timeout=10).read()


def test_tls_without_client_certificates_admits_any_client(certs: Path) -> None:
    tls = dashboard_tls_context(certs, require_client_cert=False)
    with DashboardServer(LiveState(), tls=tls) as running:
        with urllib.request.urlopen(running.url + "api/health", context=_client(certs, None), timeout=10) as answer:
            assert answer.status == 200


def test_non_loopback_with_tls_and_no_token_is_allowed(certs: Path) -> None:
    tls = dashboard_tls_context(certs, require_client_cert=True)
    with DashboardServer(LiveState(), host="0.0.0.0", tls=tls) as running:
        url = f"https://127.0.0.1:{running.port}/api/health"
        with urllib.request.urlopen(url, context=_client(certs, "cleveland"), timeout=10) as answer:
            assert answer.status == 200


def test_missing_server_key_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, federation="test")
    with pytest.raises(ConfigError) as info:
        dashboard_tls_context(tmp_path, require_client_cert=True)
    assert info.value.field == "dashboard.certs_dir" and "server.pem" in info.value.message
    assert str(tmp_path) not in info.value.message


def test_start_dashboard_with_certs_requires_client_certificates(certs: Path) -> None:
    plan = parse_plan({"task": "tabular-logistic", "rounds": 1, "dataset": {"name": "heart-disease"}})
    server, _ = start_dashboard(plan, listen="127.0.0.1:0", certs_dir=certs)
    try:
        assert server.url.startswith("https://")
        with urllib.request.urlopen(server.url + "api/health", context=_client(certs, "cleveland"), timeout=10) as ok:
            assert ok.status == 200
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(server.url + "api/health", context=_client(certs, None), timeout=10).read()
    finally:
        server.close()
