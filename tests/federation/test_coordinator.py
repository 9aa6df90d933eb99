"""The round loop: reproducibility, failures, stragglers, checkpoints and resume."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from fedcare.data.catalog import DatasetCatalog
from fedcare.errors import FederationError
from fedcare.federation import Coordinator, Node, RunDirectory
from fedcare.plan import Plan, parse_plan
from fedcare.simulation import initial_parameters, simulate
from fedcare.strategies import FedAvg
from fedcare.tasks.base import Split, TrainResult
from fedcare.tasks.registry import TaskRegistry
from fedcare.tasks.tabular import LogisticTask
from fedcare.transport.inproc import InProcTransport


def small_plan(**overrides: Any) -> Plan:
    data: dict[str, Any] = {
        "name": "test",
        "task": "tabular-logistic",
        "dataset": {"name": "breast-cancer", "num_nodes": 4},
        "rounds": 4,
        "min_nodes": 2,
        "local": {"epochs": 1, "batch_size": 16, "learning_rate": 0.05},
        "evaluation": {"every_rounds": 2},
        "seed": 3,
    }
    data.update(overrides)
    return parse_plan(data)


class FailingTask(LogisticTask):
    """Raises during training in the chosen rounds."""

    def __init__(self, rounds: set[int], counter: list[int]) -> None:
        self.rounds = rounds
        self.counter = counter  # rounds seen by this node

    def train(self, model: Any, data: Split, plan: Plan, *, seed: int, hooks: Any = ()) -> TrainResult:
        self.counter.append(1)
        if len(self.counter) in self.rounds:
            raise RuntimeError("scanner export corrupted")
        return super().train(model, data, plan, seed=seed, hooks=hooks)


class SlowTask(LogisticTask):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def train(self, model: Any, data: Split, plan: Plan, *, seed: int, hooks: Any = ()) -> TrainResult:
        time.sleep(self.delay_s)
        return super().train(model, data, plan, seed=seed, hooks=hooks)


def run_federation(plan: Plan, tasks: dict[str, Any], run_dir: RunDirectory | None = None, *, resume: bool = False):
    dataset = DatasetCatalog.bundled().get(plan.dataset.name)
    sites = dataset.load_sites(plan.dataset)
    with InProcTransport() as transport:
        for site, data in sites.items():
            transport.add_node(site, Node(site, task=tasks.get(site, LogisticTask()), data=data, plan=plan).serve)
        coordinator = Coordinator(
            plan,
            strategy=FedAvg(),
            transport=transport,
            initial_parameters=initial_parameters(LogisticTask(), dataset.spec(plan.dataset), plan),
            run_dir=run_dir,
        )
        return coordinator.run(resume=resume)


def test_same_seed_gives_identical_global_model():
    plan = small_plan()
    first = simulate(plan)
    second = simulate(plan)
    np.testing.assert_array_equal(first.parameters.flatten(), second.parameters.flatten())


def test_different_seed_gives_different_global_model():
    first = simulate(small_plan(seed=1))
    second = simulate(small_plan(seed=2))
    assert not np.array_equal(first.parameters.flatten(), second.parameters.flatten())


def test_failing_node_is_reported_by_name_and_round_completes_with_the_rest():
    plan = small_plan()
    result = run_federation(plan, {"site-2": FailingTask({2}, [])})
    assert result.rounds_completed == plan.rounds
    failures = [f for f in result.failures if f["node_id"] == "site-2"]
    assert len(failures) == 1
    assert failures[0]["round"] == 2
    assert "RuntimeError" in failures[0]["error"] and "scanner export corrupted" in failures[0]["error"]


def test_run_stops_when_fewer_than_min_nodes_remain_and_keeps_last_checkpoint(tmp_path):
    plan = small_plan(min_nodes=2)
    failing = {site: FailingTask({3}, []) for site in ("site-0", "site-1", "site-3")}
    run_dir = RunDirectory(tmp_path / "run")
    with pytest.raises(FederationError) as info:
        run_federation(plan, failing, run_dir)
    assert info.value.round == 3
    assert "min_nodes=2" in str(info.value)
    assert "site-0" in str(info.value)
    checkpoint = run_dir.load_checkpoint()
    assert checkpoint is not None
    assert checkpoint[0] == 2
    events = [e["event"] for e in run_dir.events()]
    assert "round_failed" in events
    assert not run_dir.model_path.exists()


def test_resume_after_failed_round_matches_uninterrupted_run(tmp_path):
    plan = small_plan(min_nodes=4)
    uninterrupted = run_federation(plan, {})
    run_dir = RunDirectory(tmp_path / "run")
    with pytest.raises(FederationError):
        run_federation(plan, {"site-1": FailingTask({3}, [])}, run_dir)
    resumed = run_federation(plan, {}, run_dir, resume=True)
    assert resumed.rounds_completed == plan.rounds
    np.testing.assert_allclose(resumed.parameters.flatten(), uninterrupted.parameters.flatten(), atol=1e-7)


def test_straggler_past_round_deadline_is_left_out_and_reported():
    plan = small_plan(rounds=1, round_timeout_s=1.0, evaluation={"every_rounds": 1})
    result = run_federation(plan, {"site-3": SlowTask(delay_s=2.0)})
    late = [f for f in result.failures if f["node_id"] == "site-3"]
    assert late and "deadline" in late[0]["error"]
    assert result.rounds_completed == 1


def test_node_producing_nan_weights_is_refused():
    class NanTask(LogisticTask):
        def train(self, model: Any, data: Split, plan: Plan, *, seed: int, hooks: Any = ()) -> TrainResult:
            out = super().train(model, data, plan, seed=seed, hooks=hooks)
            with __import__("torch").no_grad():
                model.linear.weight.fill_(float("nan"))
            return out

    result = run_federation(small_plan(rounds=1), {"site-0": NanTask()})
    errors = [f["error"] for f in result.failures if f["node_id"] == "site-0"]
    assert errors and "non-finite" in errors[0]


def test_run_directory_holds_plan_events_checkpoint_model_and_card(tmp_path):
    plan = small_plan()
    result = simulate(plan, out_dir=tmp_path / "run")
    run_dir = RunDirectory(tmp_path / "run")
    assert (tmp_path / "run" / "plan.yaml").exists()
    kinds = [e["event"] for e in run_dir.events()]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert kinds.count("round_end") == plan.rounds
    assert kinds.count("evaluation") == 2
    assert run_dir.load_checkpoint()[0] == plan.rounds
    import json

    card = json.loads(run_dir.model_card_path.read_text())
    assert card["sites"] == ["site-0", "site-1", "site-2", "site-3"]
    assert sum(card["train_examples"].values()) + sum(card["test_examples"].values()) == 569
    assert card["metrics"]["mean"]["accuracy"] == pytest.approx(result.final_evaluation.mean["accuracy"])
    assert card["privacy"]["differential_privacy"] is None
    from fedcare.params import Parameters

    saved = Parameters.from_bytes(run_dir.model_path.read_bytes())
    np.testing.assert_array_equal(saved.flatten(), result.parameters.flatten())


def test_federated_normalization_matches_pooled_training_statistics():
    plan = small_plan(rounds=1)
    events: list[dict[str, Any]] = []
    simulate(plan, on_event=events.append)
    normalization = [e for e in events if e["event"] == "normalization"][0]
    sites = DatasetCatalog.bundled().get("breast-cancer").load_sites(plan.dataset)
    assert normalization["num_examples"] == sum(len(s.train) for s in sites.values())
    assert normalization["nodes"] == 4


def test_evaluation_reports_each_site_mean_and_pooled():
    result = simulate(small_plan())
    final = result.final_evaluation
    assert set(final.sites) == {"site-0", "site-1", "site-2", "site-3"}
    accuracies = [m["accuracy"] for m in final.sites.values()]
    assert final.mean["accuracy"] == pytest.approx(np.mean(accuracies))
    weights = [final.examples[s] for s in final.sites]
    assert final.pooled["accuracy"] == pytest.approx(np.average(accuracies, weights=weights))
    for metrics in final.sites.values():
        assert {"accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "log_loss"} <= set(metrics)
    assert final.mean["accuracy"] > 0.9  # breast cancer is easy: a broken pipeline would not get here


def test_nodes_per_round_selects_a_seeded_subset_each_round():
    events: list[dict[str, Any]] = []
    simulate(small_plan(nodes_per_round=2, rounds=3), on_event=events.append)
    chosen = [tuple(e["nodes"]) for e in events if e["event"] == "round_start"]
    assert all(len(c) == 2 for c in chosen)
    events_again: list[dict[str, Any]] = []
    simulate(small_plan(nodes_per_round=2, rounds=3), on_event=events_again.append)
    assert chosen == [tuple(e["nodes"]) for e in events_again if e["event"] == "round_start"]


def test_registry_from_entry_points_has_builtin_tasks():
    registry = TaskRegistry.from_entry_points()
    assert {"tabular-logistic", "tabular-mlp"} <= set(registry.names())
