"""Folding run events into a RunRecord: participation, resumption, status and damaged logs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from fedcare.errors import DataError
from fedcare.report import Problem, RunRecord, Traffic

SITES = ["alpha", "beta", "gamma", "delta"]


def start(first_round: int = 1, rounds: int = 3) -> dict[str, Any]:
    return {"time": 1.0, "event": "run_start", "run_id": "r1", "plan_hash": "h", "nodes": SITES, "rounds": rounds,
            "first_round": first_round}  # fmt: skip


def round_end(number: int, ok: list[str], failed: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
    return {"time": 2.0 + number, "event": "round_end", "round": number, "nodes_ok": ok, "nodes_failed": list(failed),
            "num_examples": 10 * len(ok), "train_loss": 0.5 / number, "duration_s": 0.1,
            "bytes": {s: {"down": 100, "up": 40} for s in ok + list(failed)}, **extra}  # fmt: skip


def troubled_run() -> list[dict[str, Any]]:
    """Round 1: delta refused at approval, gamma fails; round 2: beta is late; round 3: alpha not selected."""
    return [
        start(),
        {"time": 1.1, "event": "approval", "pending": [], "approved": ["alpha", "beta", "gamma"], "rejected": {},
         "refused": {"delta": "plan asks for more epsilon than the site's budget"}},
        {"time": 1.2, "event": "round_start", "round": 1, "nodes": ["alpha", "beta", "gamma"]},
        {"time": 1.3, "event": "node_failed", "round": 1, "node_id": "gamma", "kind": "train", "error": "CUDA out of memory"},
        round_end(1, ["alpha", "beta"], ["gamma"]),
        {"time": 3.1, "event": "round_start", "round": 2, "nodes": ["alpha", "beta", "gamma"]},
        {"time": 3.2, "event": "node_late", "round": 2, "node_id": "beta", "job_id": "2-train-beta-1a2b3c4d"},
        round_end(2, ["alpha", "gamma"], ["beta"]),
        {"time": 4.1, "event": "round_start", "round": 3, "nodes": ["beta", "gamma"]},
        {"time": 4.2, "event": "brand_new_event", "round": 3, "whatever": [1, 2]},
        round_end(3, ["beta", "gamma"]),
        {"time": 6.0, "event": "run_end", "rounds_completed": 3, "wall_s": 5.0},
    ]


def test_participation_records_failed_late_refused_and_not_selected_sites() -> None:
    record = RunRecord.from_events(troubled_run())
    assert record.participation == {
        1: {"alpha": "trained", "beta": "trained", "gamma": "failed", "delta": "refused"},
        2: {"alpha": "trained", "beta": "late", "gamma": "trained", "delta": "refused"},
        3: {"alpha": "not selected", "beta": "trained", "gamma": "trained", "delta": "refused"},
    }


def test_problems_list_each_failure_straggler_and_refusal_with_round_and_reason() -> None:
    record = RunRecord.from_events(troubled_run())
    assert record.problems == (
        Problem(round=None, node_id="delta", state="refused", reason="plan asks for more epsilon than the site's budget"),
        Problem(round=1, node_id="gamma", state="failed", reason="CUDA out of memory", kind="train"),
        Problem(round=2, node_id="beta", state="late", reason="no answer before the round deadline", kind="train"),
    )


def test_unknown_events_are_ignored_and_the_run_counts_as_completed() -> None:
    record = RunRecord.from_events(troubled_run())
    assert (record.status, record.rounds_completed, record.wall_s) == ("completed", 3, 5.0)
    assert record.train_loss == {1: 0.5, 2: 0.25, 3: 0.5 / 3}


def test_connection_refused_at_the_transport_marks_the_site_refused() -> None:
    events = [
        start(rounds=1),
        {"time": 1.1, "event": "node_refused", "reason": "REVOKED", "detail": "certificate revoked", "node_id": "delta"},
        {"time": 1.2, "event": "round_start", "round": 1, "nodes": ["alpha", "beta", "gamma"]},
        round_end(1, ["alpha", "beta", "gamma"]),
    ]
    record = RunRecord.from_events(events)
    assert record.participation[1]["delta"] == "refused"
    assert record.problems == (Problem(round=None, node_id="delta", state="refused", reason="certificate revoked"),)
    assert record.status == "incomplete"  # no run_end


def test_resumed_run_replaces_the_interrupted_round_with_the_redone_one() -> None:
    events = [
        start(),
        {"time": 1.2, "event": "round_start", "round": 1, "nodes": SITES},
        round_end(1, SITES),
        {"time": 3.1, "event": "round_start", "round": 2, "nodes": SITES},
        # the coordinator stops here; later it resumes from the checkpoint of round 1
        start(first_round=2),
        {"time": 7.0, "event": "round_start", "round": 2, "nodes": SITES},
        round_end(2, SITES),
        {"time": 8.0, "event": "round_start", "round": 3, "nodes": SITES},
        round_end(3, SITES),
        {"time": 9.0, "event": "run_end", "rounds_completed": 3, "wall_s": 2.5},
    ]
    record = RunRecord.from_events(events)
    assert record.resumed_at == (2,)
    assert record.status == "completed" and record.rounds_completed == 3
    assert set(record.participation) == {1, 2, 3}
    assert all(state == "trained" for row in record.participation.values() for state in row.values())
    assert any("resumed" in note and "round 2" in note for note in record.notes)


def test_round_that_ended_short_marks_the_run_failed() -> None:
    events = [
        start(),
        {"time": 1.2, "event": "round_start", "round": 1, "nodes": SITES},
        round_end(1, SITES),
        {"time": 3.1, "event": "round_start", "round": 2, "nodes": SITES},
        {"time": 3.2, "event": "node_failed", "round": 2, "node_id": "alpha", "kind": "train", "error": "disk full"},
        {"time": 3.3, "event": "round_failed", "round": 2, "nodes_ok": ["beta"]},
    ]
    record = RunRecord.from_events(events)
    assert (record.status, record.rounds_completed) == ("failed", 1)
    assert record.participation[2] == {"alpha": "failed", "beta": "trained", "gamma": "failed", "delta": "failed"}


def test_epsilon_and_evaluation_bytes_fold_into_their_round() -> None:
    events = [
        start(rounds=1),
        {"time": 1.0, "event": "normalization", "nodes": 2, "num_examples": 20,
         "bytes": {"alpha": {"down": 7, "up": 3}, "beta": {"down": 7, "up": 3}}},
        {"time": 1.2, "event": "round_start", "round": 1, "nodes": ["alpha", "beta"]},
        round_end(1, ["alpha", "beta"], dp_epsilon={"alpha": 0.4, "beta": 0.5}),
        {"time": 4.0, "event": "evaluation", "round": 1, "sites": {"alpha": {"accuracy": 0.9}, "beta": {"accuracy": None}},
         "examples": {"alpha": 5, "beta": 6}, "mean": {"accuracy": 0.9}, "pooled": {},
         "bytes": {"alpha": {"down": 1, "up": 2}}},
    ]
    record = RunRecord.from_events(events)
    assert record.traffic[0]["alpha"] == Traffic(down=7, up=3)
    assert record.traffic[1]["alpha"] == Traffic(down=101, up=42)
    assert record.total_traffic()["alpha"] == Traffic(down=108, up=45)
    assert record.epsilon == {"alpha": {1: 0.4}, "beta": {1: 0.5}}
    assert record.final is not None and record.final.examples == {"alpha": 5, "beta": 6}
    assert record.final.sites["beta"]["accuracy"] != record.final.sites["beta"]["accuracy"]  # null became NaN


def write_log(tmp_path: Path, lines: list[str]) -> Path:
    (tmp_path / "metrics.jsonl").write_text("".join(lines), encoding="utf-8")
    return tmp_path


def test_truncated_last_line_is_skipped_and_noted(tmp_path: Path) -> None:
    lines = [json.dumps(e) + "\n" for e in troubled_run()[:5]]
    run = write_log(tmp_path, [*lines, '{"time": 5.0, "event": "round_st'])
    record = RunRecord.from_run_dir(run)
    assert record.participation[1]["gamma"] == "failed"
    assert record.status == "incomplete"
    assert any("line 6" in note and "skipped" in note for note in record.notes)


def test_malformed_line_in_the_middle_is_a_data_error_naming_file_and_line(tmp_path: Path) -> None:
    lines = [json.dumps(e) + "\n" for e in troubled_run()]
    lines[3] = "{not json\n"
    run = write_log(tmp_path, lines)
    with pytest.raises(DataError, match=r"metrics\.jsonl line 4 is not valid JSON"):
        RunRecord.from_run_dir(run)


def test_missing_run_directory_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no run directory 'gone'"):
        RunRecord.from_run_dir(tmp_path / "gone")


def test_missing_metrics_log_is_a_data_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="has no metrics.jsonl"):
        RunRecord.from_run_dir(tmp_path)


def test_plan_summary_states_strategy_options_and_privacy_in_words() -> None:
    plan = {
        "name": "p", "task": "tabular-logistic", "rounds": 4, "dataset": {"name": "heart-disease"},
        "strategy": {"name": "fedadam", "server_learning_rate": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.001,
                     "proximal_mu": 0.5},
        "secure_aggregation": {"enabled": False},
        "privacy": {"record_level": {"enabled": True, "epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.5},
                    "site_level": {"enabled": False}},
    }  # fmt: skip
    summary = dict(RunRecord.from_events([], plan=plan).plan_summary)
    assert summary["strategy"] == "fedadam (server learning rate 0.1, beta1 0.9, beta2 0.99, tau 0.001)"
    assert summary["record-level DP"].startswith("on (DP-SGD at every site): epsilon 2 per site")
    assert "gradient clip 1.5" in summary["record-level DP"]
    assert summary["site-level DP"] == "off"
    assert summary["secure aggregation"].startswith("off")


def test_failed_evaluation_is_listed_but_the_site_still_trained_that_round() -> None:
    events = [
        start(rounds=1),
        {"time": 1.2, "event": "round_start", "round": 1, "nodes": SITES},
        round_end(1, SITES),
        {"time": 3.5, "event": "node_late", "round": 1, "node_id": "beta", "job_id": "1-evaluate-beta-0a1b2c3d"},
        {"time": 3.6, "event": "node_failed", "round": 1, "node_id": "gamma", "kind": "evaluate", "error": "no test split"},
    ]
    record = RunRecord.from_events(events)
    assert record.participation[1] == dict.fromkeys(SITES, "trained")
    assert [(p.node_id, p.state, p.kind) for p in record.problems] == [("beta", "late", "evaluate"), ("gamma", "failed", "evaluate")]


def test_site_awaiting_approval_is_pending_until_it_approves() -> None:
    events = [
        start(rounds=2),
        {"time": 1.1, "event": "approval", "pending": ["delta"], "approved": ["alpha", "beta", "gamma"], "rejected": {},
         "refused": {}},
        {"time": 1.2, "event": "round_start", "round": 1, "nodes": ["alpha", "beta", "gamma"]},
        round_end(1, ["alpha", "beta", "gamma"]),
        {"time": 3.1, "event": "approval", "pending": [], "approved": SITES, "rejected": {}, "refused": {}},
        {"time": 3.2, "event": "round_start", "round": 2, "nodes": SITES},
        round_end(2, SITES),
    ]
    record = RunRecord.from_events(events)
    assert record.participation[1]["delta"] == "pending"
    assert record.participation[2]["delta"] == "trained"
    assert [(p.node_id, p.state) for p in record.problems] == [("delta", "pending")]
