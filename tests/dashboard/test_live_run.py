"""A real simulated federation feeds the dashboard while a client polls it."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.request
from importlib.resources import files
from typing import Any

from PIL import Image

from fedcare.dashboard import PLOT_NAMES, DashboardServer, LiveState
from fedcare.plan import load_plan
from fedcare.simulation import simulate

ROUNDS = 3


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.load(answer)


def test_dashboard_follows_a_simulated_heart_disease_run() -> None:
    plan = load_plan(str(files("fedcare") / "plans" / "heart_disease.yaml"))
    plan = plan.model_copy(update={"rounds": ROUNDS})
    state = LiveState(plan)
    errors: list[BaseException] = []

    def on_event(event: dict[str, Any]) -> None:
        state.on_event(event)
        if event["event"] in ("round_start", "round_end"):
            time.sleep(0.3)  # hold each step long enough for the poller to see it, however loaded the machine

    def run() -> None:
        try:
            simulate(plan, on_event=on_event, max_concurrency=2)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    with DashboardServer(state) as server:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        rounds_seen: set[int] = set()
        phases_seen: list[str] = []
        deadline = time.monotonic() + 60
        snap: dict[str, Any] = {}
        while time.monotonic() < deadline:
            snap = _json(server.url + "api/status")
            if snap["round"] is not None:
                rounds_seen.add(snap["round"])
            if not phases_seen or phases_seen[-1] != snap["phase"]:
                phases_seen.append(snap["phase"])
            if snap["phase"] in ("finished", "failed") or not worker.is_alive():
                break
            time.sleep(0.05)
        worker.join(timeout=30)
        assert not errors, errors
        snap = _json(server.url + "api/status")
        if phases_seen[-1] != snap["phase"]:
            phases_seen.append(snap["phase"])

        assert len(rounds_seen) >= 2, rounds_seen  # the round advanced while we watched
        assert "training" in phases_seen and phases_seen[-1] == "finished", phases_seen
        assert (snap["phase"], snap["rounds_completed"], snap["round"]) == ("finished", ROUNDS, ROUNDS)
        assert snap["plan_name"] == "heart-disease-fedavg" and snap["rounds_planned"] == ROUNDS
        sites = snap["metrics"]["sites"]
        assert sorted(sites) == ["cleveland", "hungary", "switzerland", "va-long-beach"]
        assert all(0.0 <= m["accuracy"] <= 1.0 for m in sites.values())
        assert [h["round"] for h in snap["history"]] == list(range(1, ROUNDS + 1))
        assert snap["bytes"]["down"] > 0 and snap["bytes"]["up"] > 0
        assert snap["events_seen"] == len(_json(server.url + "api/events?since=0")["events"])

        for name in PLOT_NAMES:
            url = server.url + f"api/plots/{name}.png?v={snap['events_seen']}"
            with urllib.request.urlopen(url, timeout=60) as answer:
                body = answer.read()
                status = answer.status
            if name == "epsilon" and status == 204:  # no differential privacy in this plan: nothing to draw
                continue
            assert status == 200, name
            image = Image.open(io.BytesIO(body))
            image.verify()
            assert image.format == "PNG", name
