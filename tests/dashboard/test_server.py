"""The dashboard's HTTP server: routes, methods, headers, token and binding rules."""

from __future__ import annotations

import http.client
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from fedcare.dashboard import DashboardServer, LiveState, new_token, parse_listen, start_dashboard
from fedcare.errors import ConfigError
from fedcare.plan import parse_plan

TOKEN = "s3cret-token-for-tests-0123456789abcdefghijkl"


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _state() -> LiveState:
    state = LiveState(parse_plan({"name": "demo-plan", "task": "tabular-logistic", "rounds": 2,
                                  "dataset": {"name": "heart-disease"}}))
    state.on_event({"time": 1.0, "event": "run_start", "run_id": "r1", "plan_hash": "h", "nodes": ["a", "b"],
                    "rounds": 2, "first_round": 1})
    state.on_event({"time": 2.0, "event": "round_start", "round": 1, "nodes": ["a", "b"]})
    return state


@pytest.fixture
def server() -> Iterator[DashboardServer]:
    with DashboardServer(_state()) as running:
        yield running


@pytest.fixture
def guarded() -> Iterator[DashboardServer]:
    with DashboardServer(_state(), token=TOKEN) as running:
        yield running


def test_health_answers_ok(server: DashboardServer) -> None:
    status, _, body = _get(server.url + "api/health")
    assert (status, json.loads(body)) == (200, {"ok": True})


def test_status_serves_the_snapshot(server: DashboardServer) -> None:
    status, headers, body = _get(server.url + "api/status")
    snap = json.loads(body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert (snap["plan_name"], snap["round"], snap["phase"], snap["events_seen"]) == ("demo-plan", 1, "training", 2)


def test_events_since_returns_the_later_events(server: DashboardServer) -> None:
    status, _, body = _get(server.url + "api/events?since=1")
    answer = json.loads(body)
    assert status == 200
    assert [e["event"] for e in answer["events"]] == ["round_start"]
    assert (answer["first"], answer["next"], answer["seen"]) == (1, 2, 2)


def test_events_without_since_start_at_zero(server: DashboardServer) -> None:
    answer = json.loads(_get(server.url + "api/events")[2])
    assert [e["event"] for e in answer["events"]] == ["run_start", "round_start"]


def test_events_with_bad_since_is_400(server: DashboardServer) -> None:
    status, _, body = _get(server.url + "api/events?since=-3")
    assert status == 400 and "since" in json.loads(body)["error"]


def test_page_is_self_contained_html(server: DashboardServer) -> None:
    status, headers, body = _get(server.url)
    page = body.decode("utf-8")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert 'id="site-metrics"' in page and 'class="plot"' in page
    assert "http://" not in page and "https://" not in page  # closed networks: nothing external


def test_unknown_path_is_404_json(server: DashboardServer) -> None:
    status, headers, body = _get(server.url + "nope")
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["status"] == 404


def test_unknown_plot_is_404(server: DashboardServer) -> None:
    assert _get(server.url + "api/plots/secrets.png")[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_writing_methods_are_405_with_allow(server: DashboardServer, method: str) -> None:
    status, headers, _ = _get(server.url + "api/status", method=method)
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_head_sends_headers_without_body(server: DashboardServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("HEAD", "/api/status")
    answer = connection.getresponse()
    assert answer.status == 200 and int(answer.getheader("Content-Length") or 0) > 0
    assert answer.read() == b""
    connection.close()


@pytest.mark.parametrize("path", ["", "api/status", "nope", "api/plots/nope.png"])
def test_security_headers_on_every_response(server: DashboardServer, path: str) -> None:
    _, headers, _ = _get(server.url + path)
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "img-src 'self' data:" in csp and "'unsafe-inline'" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"
    assert headers["Referrer-Policy"] == "no-referrer"


def test_malformed_request_gets_json_error_with_headers(server: DashboardServer) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"GARBAGE\r\n\r\n")
        reply = raw.recv(65536).decode("latin-1")
    assert reply.startswith("HTTP/1.0 400") and "X-Content-Type-Options: nosniff" in reply


@pytest.mark.parametrize("path", ["", "api/status", "api/health", "api/events", "api/plots/roc.png"])
def test_token_required_for_page_and_api(guarded: DashboardServer, path: str) -> None:
    status, headers, body = _get(guarded.url + path)
    assert status == 401 and "Bearer" in headers["WWW-Authenticate"]
    assert "error" in json.loads(body)


def test_wrong_token_is_401(guarded: DashboardServer) -> None:
    assert _get(guarded.url + "api/status", {"Authorization": "Bearer " + TOKEN[:-1] + "x"})[0] == 401
    assert _get(guarded.url + "api/status?token=wrong")[0] == 401


def test_token_in_header_is_accepted(guarded: DashboardServer) -> None:
    status, _, body = _get(guarded.url + "api/status", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and json.loads(body)["run_id"] == "r1"


def test_token_in_query_is_accepted(guarded: DashboardServer) -> None:
    assert _get(guarded.url_with_token())[0] == 200
    assert _get(guarded.url + f"api/status?token={TOKEN}")[0] == 200


def test_url_has_no_token_and_url_with_token_has_it(guarded: DashboardServer) -> None:
    assert TOKEN not in guarded.url
    assert guarded.url_with_token() == guarded.url + f"?token={TOKEN}"


def test_token_never_appears_in_logs(guarded: DashboardServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _get(guarded.url + f"api/status?token={TOKEN}")
    _get(guarded.url + "api/events?since=0", {"Authorization": f"Bearer {TOKEN}"})
    _get(guarded.url + "api/status?token=wrong-guess")
    records = [r for r in caplog.records if r.name.startswith("fedcare.dashboard")]
    assert records, "the server logs requests at debug level"
    for record in records:
        text = record.getMessage() + " " + json.dumps({k: str(v) for k, v in vars(record).items()})
        assert TOKEN not in text and "wrong-guess" not in text and "token=" not in text
    assert {getattr(r, "path", None) for r in records} >= {"/api/status", "/api/events"}


def test_non_loopback_without_token_or_tls_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        DashboardServer(LiveState(), host="0.0.0.0")
    assert info.value.field == "dashboard" and "token" in info.value.message


def test_non_loopback_with_token_is_allowed() -> None:
    with DashboardServer(LiveState(), host="0.0.0.0", token=TOKEN) as running:
        assert _get(f"http://127.0.0.1:{running.port}/api/health")[0] == 401


def test_empty_token_is_refused() -> None:
    with pytest.raises(ConfigError):
        DashboardServer(LiveState(), token="  ")


def test_busy_port_is_a_config_error(server: DashboardServer) -> None:
    with pytest.raises(ConfigError) as info:
        DashboardServer(LiveState(), port=server.port)
    assert info.value.field == "dashboard"


def test_close_releases_the_port() -> None:
    running = DashboardServer(LiveState())
    port = running.port
    running.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)


def test_new_token_is_long_and_random() -> None:
    tokens = {new_token() for _ in range(20)}
    assert len(tokens) == 20 and all(len(t) >= 43 for t in tokens)


@pytest.mark.parametrize("listen", ["8050", "localhost", "host:port", ":8050", "1.2.3.4:70000", "::1:80"])
def test_bad_listen_address_is_a_config_error(listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen(listen)
    assert info.value.field == "dashboard.listen"


def test_start_dashboard_serves_on_loopback_without_token() -> None:
    plan = parse_plan({"name": "p", "task": "tabular-logistic", "rounds": 4, "dataset": {"name": "heart-disease"}})
    server, state = start_dashboard(plan, listen="127.0.0.1:0", nodes_online=lambda: ["a"])
    try:
        state.on_event({"time": 1.0, "event": "run_start", "run_id": "x", "nodes": ["a"], "rounds": 4,
                        "first_round": 1})
        snap: dict[str, Any] = json.loads(_get(server.url + "api/status")[2])
        assert server.url_with_token() == server.url
        assert (snap["rounds_planned"], snap["nodes"][0]["online"]) == (4, True)
    finally:
        server.close()


def test_start_dashboard_makes_a_token_off_loopback() -> None:
    plan = parse_plan({"task": "tabular-logistic", "rounds": 1, "dataset": {"name": "heart-disease"}})
    server, _ = start_dashboard(plan, listen="0.0.0.0:0")
    try:
        assert "?token=" in server.url_with_token()
        assert _get(f"http://127.0.0.1:{server.port}/api/health")[0] == 401
        token_url = server.url_with_token().replace("0.0.0.0", "127.0.0.1") .replace("/?", "/api/health?")
        assert _get(token_url)[0] == 200
    finally:
        server.close()


def test_broken_request_line_is_not_echoed_back(guarded: DashboardServer) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as raw:
        raw.sendall(f"GET /api/status?token={TOKEN} HTTP/9.9.9\r\n\r\n".encode())
        reply = raw.recv(65536).decode("latin-1")
    assert reply.startswith("HTTP/1.0 400") and TOKEN not in reply
