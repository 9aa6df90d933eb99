"""LiveState folds the coordinator's events into what the dashboard shows."""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import pytest

from fedcare.dashboard import MAX_FAILURES, LiveState
from fedcare.errors import ConfigError
from fedcare.plan import parse_plan

NODES = ["cleveland", "hungary", "switzerland"]


def _plan(**extra: Any) -> Any:
    return parse_plan({"name": "heart-test", "task": "tabular-logistic", "rounds": 3,
                       "dataset": {"name": "heart-disease"}, **extra})


def _run_start(t: float = 100.0, rounds: int = 3) -> dict[str, Any]:
    return {"time": t, "event": "run_start", "run_id": "run-1", "plan_hash": "abc", "nodes": NODES,
            "rounds": rounds, "first_round": 1}


def _round_end(number: int, *, ok: list[str] | None = None, epsilon: dict[str, float] | None = None) -> dict[str, Any]:
    ok = NODES if ok is None else ok
    event: dict[str, Any] = {
        "time": 100.0 + 10 * number, "event": "round_end", "round": number, "nodes_ok": ok,
        "nodes_failed": sorted(set(NODES) - set(ok)), "num_examples": 300, "train_loss": 0.5 / number,
        "duration_s": 1.5, "bytes": {n: {"down": 1000, "up": 200} for n in ok},
    }
    if epsilon is not None:
        event["dp_epsilon"] = epsilon
    return event


def _evaluation(number: int, accuracy: float) -> dict[str, Any]:
    sites = {n: {"accuracy": accuracy, "roc_auc": 0.8, "roc_tpr@0": 0.1, "roc_tpr@1": 1.0} for n in NODES}
    return {"time": 101.0 + 10 * number, "event": "evaluation", "round": number, "sites": sites,
            "examples": {n: 50 for n in NODES}, "mean": {"accuracy": accuracy, "roc_tpr@0": 0.1},
            "pooled": {"accuracy": accuracy}, "bytes": {n: {"down": 10, "up": 5} for n in NODES}}


def test_phase_follows_run_from_normalization_to_finished() -> None:
    state = LiveState(_plan())
    phases = [state.snapshot()["phase"]]
    for event in [
        _run_start(),
        {"time": 101.0, "event": "normalization", "nodes": 3, "num_examples": 300, "bytes": {}},
        {"time": 102.0, "event": "round_start", "round": 1, "nodes": NODES},
        _round_end(1),
        {"time": 111.0, "event": "phase", "round": 1, "phase": "evaluation"},
        _evaluation(1, 0.7),
        {"time": 115.0, "event": "run_end", "rounds_completed": 1, "wall_s": 15.0},
    ]:
        state.on_event(event)
        phases.append(state.snapshot()["phase"])
    assert phases == ["starting", "normalization", "starting", "training", "training", "evaluation", "evaluation",
                      "finished"]


def test_phase_waits_for_approval_while_a_site_is_pending() -> None:
    state = LiveState(_plan())
    state.on_event(_run_start())
    state.on_event({"time": 101.0, "event": "approval", "approved": ["cleveland"], "pending": ["hungary"],
                    "rejected": {"switzerland": "no ethics approval"}, "refused": {}})
    snap = state.snapshot()
    assert snap["phase"] == "waiting for approval"
    by_id = {n["id"]: n for n in snap["nodes"]}
    assert by_id["hungary"]["status"] == "pending"
    assert (by_id["switzerland"]["status"], by_id["switzerland"]["reason"]) == ("rejected", "no ethics approval")
    state.on_event({"time": 102.0, "event": "approval", "approved": ["cleveland", "hungary"], "pending": [],
                    "rejected": {"switzerland": "no ethics approval"}, "refused": {}})
    assert state.snapshot()["phase"] == "normalization"


def test_round_advances_and_records_training_history() -> None:
    state = LiveState(_plan())
    state.on_event(_run_start())
    for number in (1, 2):
        state.on_event({"time": 100.0 + number, "event": "round_start", "round": number, "nodes": NODES})
        state.on_event(_round_end(number, ok=NODES if number == 1 else ["cleveland", "hungary"]))
    snap = state.snapshot()
    assert (snap["round"], snap["rounds_completed"], snap["rounds_planned"]) == (2, 2, 3)
    assert [t["round"] for t in snap["training"]] == [1, 2]
    assert snap["training"][1]["nodes_failed"] == ["switzerland"]
    trained = {n["id"]: n["last_round_trained"] for n in snap["nodes"]}
    assert trained == {"cleveland": 2, "hungary": 2, "switzerland": 1}


def test_metrics_keep_scalars_latest_and_history_without_curve_points() -> None:
    state = LiveState()
    state.on_event(_run_start())
    state.on_event(_evaluation(1, 0.6))
    state.on_event(_evaluation(2, 0.75))
    snap = state.snapshot()
    assert snap["metrics"]["round"] == 2
    assert snap["metrics"]["sites"]["hungary"] == {"accuracy": 0.75, "roc_auc": 0.8}
    assert snap["metrics"]["mean"] == {"accuracy": 0.75}
    assert snap["metrics"]["examples"]["cleveland"] == 50
    assert [h["mean"]["accuracy"] for h in snap["history"]] == [0.6, 0.75]


def test_non_finite_metric_becomes_null_and_snapshot_is_strict_json() -> None:
    state = LiveState()
    event = _evaluation(1, 0.6)
    event["sites"]["cleveland"]["roc_auc"] = math.nan
    state.on_event(event)
    snap = state.snapshot()
    assert snap["metrics"]["sites"]["cleveland"]["roc_auc"] is None
    json.dumps(snap, allow_nan=False)  # raises on NaN


def test_epsilon_so_far_and_planned_epsilon_with_record_level_dp() -> None:
    state = LiveState(_plan(privacy={"record_level": {"enabled": True, "epsilon": 2.0, "noise_multiplier": 1.1}}))
    state.on_event(_run_start())
    state.on_event(_round_end(1, epsilon={"cleveland": 0.4, "hungary": 0.5}))
    state.on_event(_round_end(2, ok=["cleveland"], epsilon={"cleveland": 0.7}))
    privacy = state.snapshot()["privacy"]
    assert privacy["record_level"] is True
    assert privacy["epsilon_planned"] == 2.0
    assert privacy["epsilon_spent"] == {"cleveland": 0.7, "hungary": 0.5}


def test_no_planned_epsilon_without_record_level_dp() -> None:
    state = LiveState(_plan())
    privacy = state.snapshot()["privacy"]
    assert (privacy["record_level"], privacy["epsilon_planned"], privacy["epsilon_spent"]) == (False, None, {})


def test_failures_are_listed_and_capped_to_the_latest() -> None:
    state = LiveState()
    state.on_event(_run_start())
    state.on_event({"time": 1.0, "event": "node_late", "round": 1, "node_id": "hungary", "job_id": "j"})
    for index in range(MAX_FAILURES + 5):
        state.on_event({"time": 2.0 + index, "event": "node_failed", "round": 2, "node_id": "cleveland",
                        "kind": "train", "error": f"error {index}"})
    failures = state.snapshot()["failures"]
    assert len(failures) == MAX_FAILURES
    assert failures[-1]["error"] == f"error {MAX_FAILURES + 4}"
    assert failures[-1]["kind"] == "train" and failures[-1]["node_id"] == "cleveland"


def test_late_node_is_a_failure() -> None:
    state = LiveState()
    state.on_event({"time": 1.0, "event": "node_late", "round": 3, "node_id": "hungary", "job_id": "j"})
    failure = state.snapshot()["failures"][0]
    assert (failure["round"], failure["node_id"], failure["kind"]) == (3, "hungary", "late")


def test_round_failed_marks_run_failed() -> None:
    state = LiveState()
    state.on_event(_run_start())
    state.on_event({"time": 2.0, "event": "round_start", "round": 1, "nodes": NODES})
    state.on_event({"time": 3.0, "event": "round_failed", "round": 1, "nodes_ok": ["cleveland"]})
    snap = state.snapshot()
    assert snap["phase"] == "failed"
    assert snap["failures"][-1]["round"] == 1 and "round failed" in snap["failed_reason"]


def test_node_refused_shows_as_refused_with_reason() -> None:
    state = LiveState()
    state.on_event({"time": 1.0, "event": "node_refused", "reason": "REVOKED",
                    "detail": "certificate revoked", "node_id": "intruder"})
    node = state.snapshot()["nodes"][0]
    assert (node["id"], node["status"], node["reason"]) == ("intruder", "refused", "certificate revoked")


def test_nodes_online_and_statuses_callables_override_events() -> None:
    online = ["cleveland"]
    state = LiveState(nodes_online=lambda: list(online),
                      statuses=lambda: {"hungary": ("rejected", "budget exhausted")})
    state.on_event(_run_start())
    nodes = {n["id"]: n for n in state.snapshot()["nodes"]}
    assert [nodes[n]["online"] for n in NODES] == [True, False, False]
    assert (nodes["hungary"]["status"], nodes["hungary"]["reason"]) == ("rejected", "budget exhausted")
    online.append("switzerland")
    assert {n["id"]: n["online"] for n in state.snapshot()["nodes"]}["switzerland"] is True


def test_failing_callable_counts_as_unknown() -> None:
    def broken() -> list[str]:
        raise ConnectionError("transport closed")

    state = LiveState(nodes_online=broken)
    state.on_event(_run_start())
    assert {n["online"] for n in state.snapshot()["nodes"]} == {None}


def test_bytes_add_up_over_events() -> None:
    state = LiveState()
    state.on_event(_run_start())
    state.on_event(_round_end(1))
    state.on_event(_round_end(2))
    traffic = state.snapshot()["bytes"]
    assert traffic["nodes"]["cleveland"] == {"down": 2000, "up": 400}
    assert (traffic["down"], traffic["up"]) == (6000, 1200)


def test_elapsed_runs_from_run_start_to_run_end() -> None:
    state = LiveState()
    state.on_event(_run_start(t=1000.0))
    state.on_event({"time": 1042.5, "event": "run_end", "rounds_completed": 3, "wall_s": 42.5})
    assert state.snapshot()["elapsed_s"] == pytest.approx(42.5)


def test_unknown_event_is_kept_and_changes_nothing_else() -> None:
    state = LiveState()
    state.on_event(_run_start())
    before = {k: v for k, v in state.snapshot().items() if k not in ("events_seen", "elapsed_s")}
    state.on_event({"time": 103.0, "event": "brand_new_kind", "payload": [1, 2]})
    after = state.snapshot()
    assert {k: v for k, v in after.items() if k not in ("events_seen", "elapsed_s")} == before
    assert after["events_seen"] == 2 and state.events(1)[0]["event"] == "brand_new_kind"


def test_malformed_event_is_ignored_without_raising() -> None:
    state = LiveState()
    state.on_event({"time": 1.0, "event": "round_end", "round": 1, "nodes_ok": "x", "bytes": {"a": {"down": "many"}},
                    "dp_epsilon": {"a": "lots"}})
    assert state.snapshot()["events_seen"] == 1


def test_events_since_and_memory_bound() -> None:
    state = LiveState(max_events=5)
    for index in range(8):
        state.on_event({"time": float(index), "event": "tick"})
    assert [e["time"] for e in state.events(0)] == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert [e["time"] for e in state.events(6)] == [6.0, 7.0]
    assert state.events(8) == [] and state.events_seen == 8


def test_events_are_copies_the_caller_cannot_change() -> None:
    state = LiveState()
    original = _round_end(1)
    state.on_event(original)
    original["nodes_ok"].append("intruder")
    state.events(0)[0]["round"] = 99
    assert state.events(0)[0]["round"] == 1 and "intruder" not in state.events(0)[0]["nodes_ok"]


def test_events_from_many_threads_are_all_counted() -> None:
    state = LiveState()

    def feed(thread: int) -> None:
        for index in range(500):
            state.on_event({"time": float(index), "event": "node_failed", "round": 1,
                            "node_id": f"n{thread}", "error": "x"})
            state.snapshot() if index % 100 == 0 else None

    threads = [threading.Thread(target=feed, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert state.events_seen == 2000 and len(state.events(0)) == 2000


def test_mark_failed_shows_reason() -> None:
    state = LiveState()
    state.mark_failed("only 1 site approved the plan")
    snap = state.snapshot()
    assert (snap["phase"], snap["failed_reason"]) == ("failed", "only 1 site approved the plan")


def test_max_events_below_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        LiveState(max_events=0)
    assert info.value.field == "dashboard.max_events"


def test_plan_details_show_before_first_event() -> None:
    snap = LiveState(_plan()).snapshot()
    assert (snap["plan_name"], snap["task"], snap["rounds_planned"], snap["round"]) == ("heart-test", "tabular-logistic", 3, None)
