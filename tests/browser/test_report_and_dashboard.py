"""report.html and the live dashboard, opened in headless Chromium.

One real federation (the demo's: four hospitals, secure aggregation, DP-SGD,
five rounds) runs in a thread with the dashboard attached; the dashboard test
watches it live, the report test opens the ``report.html`` the run leaves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedcare.cli import demo_plan_path
from fedcare.plan import load_plan
from tests.browser.conftest import assert_plots_rendered

SITES = ["cleveland", "hungary", "switzerland", "va-long-beach"]


@dataclass
class LiveRun:
    out_dir: Path
    url: str
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    def wait(self) -> None:
        self.thread.join(timeout=240)
        assert not self.thread.is_alive(), "the federation did not finish in 240 s"
        assert not self.errors, self.errors


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    from fedcare.dashboard import start_dashboard
    from fedcare.simulation import simulate

    plan = load_plan(demo_plan_path(private=True))
    out_dir = tmp_path_factory.mktemp("demo-run")
    server, state = start_dashboard(plan, listen="127.0.0.1:0", token="test-token-not-secret")
    started = threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        state.on_event(event)
        started.set()
        if event["event"] == "round_end":
            time.sleep(0.6)  # rounds take about a second here: let the page see more than one of them

    run = LiveRun(out_dir=out_dir, url=server.url_with_token(), thread=threading.Thread(target=lambda: None))

    def target() -> None:
        try:
            simulate(plan, out_dir=out_dir, on_event=on_event)
        except BaseException as exc:  # noqa: BLE001 - reported by the tests
            run.errors.append(exc)

    run.thread = threading.Thread(target=target, name="demo-run", daemon=True)
    run.thread.start()
    started.wait(timeout=60)
    try:
        yield run
    finally:
        run.thread.join(timeout=240)
        server.close()


def test_the_live_dashboard_follows_the_run_and_shows_every_site(live_run: LiveRun, page: Any, artifacts: Path) -> None:
    page.goto(live_run.url)
    rounds_seen: set[str] = set()
    deadline = time.monotonic() + 240
    while live_run.thread.is_alive() and time.monotonic() < deadline:
        text = page.locator("#round").text_content() or ""
        rounds_seen.add(text.strip())
        time.sleep(0.2)
    live_run.wait()
    page.wait_for_function("document.querySelector('#phase').textContent.includes('finished')", timeout=15_000)
    page.wait_for_function("document.querySelectorAll('#site-metrics tbody tr').length === 4", timeout=15_000)
    page.wait_for_function(
        "[...document.querySelectorAll('img.plot')].filter(i => i.offsetParent !== null && i.naturalWidth > 0).length >= 3",
        timeout=20_000,
    )
    page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)

    live = [value for value in rounds_seen if value and value[0].isdigit()]
    assert len(set(live)) >= 2, f"the page showed only {sorted(rounds_seen)} while the run went on"
    rows = page.locator("#site-metrics tbody tr")
    assert sorted(rows.nth(i).locator("td").first.text_content().strip() for i in range(rows.count())) == SITES
    assert_plots_rendered(page, at_least=3)


def test_report_html_renders_its_plots_and_one_row_per_site(live_run: LiveRun, page: Any, artifacts: Path) -> None:
    live_run.wait()
    report = live_run.out_dir / "report.html"
    assert report.exists(), "the run left no report.html"
    blocked: list[str] = []
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:")) else (blocked.append(route.request.url), route.abort()))
    page.goto(report.as_uri())
    page.screenshot(path=str(artifacts / "report.png"), full_page=True)

    rows = page.locator("#site-metrics tbody tr")
    assert rows.count() == len(SITES)
    assert sorted(rows.nth(i).locator("td").first.text_content().strip() for i in range(rows.count())) == SITES
    names = assert_plots_rendered(page, at_least=5)
    assert len(set(names)) == len(names)
    assert blocked == [], f"the report reached outside itself: {blocked}"
