"""The HTML page: escaping network text, dashes for missing metrics, optional sections."""

from __future__ import annotations

from typing import Any

from fedcare.report import RunRecord, build_report

HOSTILE = '<script>alert("x")</script>'


def hostile_run() -> list[dict[str, Any]]:
    return [
        {"time": 1.0, "event": "run_start", "run_id": "r1", "nodes": [HOSTILE, "quiet"], "rounds": 1, "first_round": 1},
        {"time": 1.1, "event": "round_start", "round": 1, "nodes": [HOSTILE, "quiet"]},
        {"time": 1.2, "event": "node_failed", "round": 1, "node_id": "quiet", "kind": "train",
         "error": '<img src=x onerror="alert(1)">'},
        {"time": 2.0, "event": "round_end", "round": 1, "nodes_ok": [HOSTILE], "nodes_failed": ["quiet"],
         "train_loss": 0.3, "duration_s": 0.5, "bytes": {HOSTILE: {"down": 10, "up": 5}},
         "dp_epsilon": {HOSTILE: 0.7}},
        {"time": 2.5, "event": "evaluation", "round": 1, "sites": {HOSTILE: {"accuracy": 0.75}},
         "examples": {HOSTILE: 8, "quiet": 4}, "mean": {"accuracy": 0.75}, "pooled": {}},
    ]  # fmt: skip


def test_hostile_site_names_and_error_texts_are_escaped() -> None:
    page = build_report(RunRecord.from_events(hostile_run(), plan={"name": "<b>plan</b>", "task": "t", "rounds": 1}))
    assert "<script" not in page
    assert "onerror=" not in page.replace("onerror=&quot;", "")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert "<b>plan</b>" not in page and "&lt;b&gt;plan&lt;/b&gt;" in page


def test_site_without_metrics_shows_dashes() -> None:
    page = build_report(RunRecord.from_events(hostile_run()))
    row = page.split("<td>quiet</td>", 1)[1].split("</tr>", 1)[0]
    assert row == "<td>4</td>" + "<td>–</td>" * 6


def test_epsilon_section_appears_only_when_epsilon_was_spent() -> None:
    with_dp = build_report(RunRecord.from_events(hostile_run()))
    assert '<table id="epsilon">' in with_dp and "0.700" in with_dp
    events = [e for e in hostile_run() if e["event"] != "round_end"]
    assert '<table id="epsilon">' not in build_report(RunRecord.from_events(events))


def test_run_not_yet_evaluated_still_renders_a_page() -> None:
    page = build_report(RunRecord.from_events(hostile_run()[:2]))
    assert "No evaluation was logged yet." in page
    assert "incomplete" in page
