"""Plot routes: drawn lazily, once per new event, and absent plots reported plainly."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from PIL import Image

from fedcare.dashboard import PLOT_NAMES, DashboardServer, LiveState
from fedcare.dashboard import server as server_module

SAMPLE_EVENTS: list[dict[str, Any]] = [
    {"time": 1.0, "event": "run_start", "run_id": "r", "plan_hash": "h", "nodes": ["a", "b"], "rounds": 2,
     "first_round": 1},
    {"time": 2.0, "event": "round_start", "round": 1, "nodes": ["a", "b"]},
    {"time": 3.0, "event": "round_end", "round": 1, "nodes_ok": ["a", "b"], "nodes_failed": [], "num_examples": 20,
     "train_loss": 0.6, "duration_s": 1.0, "bytes": {"a": {"down": 100, "up": 50}, "b": {"down": 100, "up": 50}},
     "dp_epsilon": {"a": 0.3, "b": 0.4}},
    {"time": 3.5, "event": "phase", "round": 1, "phase": "evaluation"},
    {"time": 4.0, "event": "evaluation", "round": 1,
     "sites": {s: {"accuracy": 0.7, "roc_auc": 0.75, "roc_tpr@0": 0.0, "roc_tpr@0.5": 0.8, "roc_tpr@1": 1.0}
               for s in ("a", "b")},
     "examples": {"a": 10, "b": 10}, "mean": {"accuracy": 0.7}, "pooled": {"accuracy": 0.7},
     "bytes": {"a": {"down": 10, "up": 5}, "b": {"down": 10, "up": 5}}},
]


def _status(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read(), answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("Content-Type", "")


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[DashboardServer, list[int]]]:
    calls: list[int] = []

    def draw(record: Any) -> bytes | None:
        calls.append(len(record))
        return b"\x89PNG fake" if record else None

    def load(name: str) -> tuple[Callable[[Any], bytes | None], Callable[..., Any]]:
        return draw, lambda events, plan=None: list(events)

    monkeypatch.setattr(server_module, "_load_plots", load)
    with DashboardServer(LiveState()) as running:
        yield running, calls


def test_plot_is_drawn_once_per_event_count(counted: tuple[DashboardServer, list[int]]) -> None:
    server, calls = counted
    server.state.on_event(SAMPLE_EVENTS[0])
    for _ in range(3):
        assert _status(server.url + "api/plots/roc.png?v=1")[0] == 200
    assert calls == [1]
    server.state.on_event(SAMPLE_EVENTS[1])
    assert _status(server.url + "api/plots/roc.png?v=2")[0] == 200
    assert calls == [1, 2]


def test_plot_without_data_is_204(counted: tuple[DashboardServer, list[int]]) -> None:
    server, _ = counted
    status, body, _ = _status(server.url + "api/plots/traffic.png")
    assert (status, body) == (204, b"")


def test_plots_missing_report_package_is_503(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(name: str) -> Any:
        raise server_module._PlotsUnavailable()

    monkeypatch.setattr(server_module, "_load_plots", unavailable)
    with DashboardServer(LiveState()) as running:
        status, body, _ = _status(running.url + "api/plots/roc.png")
    assert status == 503 and json.loads(body)["error"] == "plots unavailable"


def test_plot_that_raises_is_500_and_server_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(record: Any) -> bytes | None:
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(server_module, "_load_plots", lambda name: (broken, lambda events, plan=None: events))
    with DashboardServer(LiveState()) as running:
        assert _status(running.url + "api/plots/epsilon.png")[0] == 500
        assert _status(running.url + "api/health")[0] == 200


@pytest.mark.parametrize("name", PLOT_NAMES)
def test_real_plot_decodes_as_png(name: str) -> None:
    state = LiveState()
    for event in SAMPLE_EVENTS:
        state.on_event(event)
    with DashboardServer(state) as running:
        status, body, content_type = _status(running.url + f"api/plots/{name}.png?v=5")
    assert status == 200 and content_type == "image/png"
    image = Image.open(io.BytesIO(body))
    image.verify()
    assert image.format == "PNG" and image.size[0] > 100


def test_real_plot_before_any_event_has_no_data() -> None:
    with DashboardServer(LiveState()) as running:
        assert _status(running.url + "api/plots/roc.png")[0] == 204
