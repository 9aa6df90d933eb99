"""Cyclic training: one site per round, in turn, and the global model becomes that site's result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare.data import DatasetCatalog
from fedcare.errors import ConfigError
from fedcare.federation.coordinator import round_seed
from fedcare.federation.node import Node
from fedcare.messages import Job, JobKind
from fedcare.params import Parameters
from fedcare.plan import Plan, StrategyConfig, parse_plan, plan_hash
from fedcare.simulation import initial_parameters, simulate
from fedcare.strategies import Cyclic, FedAvg, make_strategy
from fedcare.tasks.tabular import LogisticTask

SITES = ["cleveland", "hungary", "switzerland", "va-long-beach"]


def _cyclic_plan(*, rounds: int, **extra: Any) -> Plan:
    return parse_plan({"task": "tabular-logistic", "rounds": rounds, "local": {"epochs": 1, "learning_rate": 0.05},
                       "dataset": {"name": "heart-disease", "normalization": "per-site"},
                       "strategy": {"name": "cyclic"}, **extra})  # fmt: skip


def test_make_strategy_builds_cyclic_which_aggregates_like_fedavg() -> None:
    strategy = make_strategy(StrategyConfig(name="cyclic"))
    assert type(strategy) is Cyclic and isinstance(strategy, FedAvg)


def test_cyclic_visits_the_sites_in_order_across_rounds() -> None:
    events: list[dict[str, Any]] = []
    simulate(_cyclic_plan(rounds=6), on_event=events.append, max_concurrency=2)
    visited = [e["nodes"] for e in events if e["event"] == "round_start"]
    assert visited == [[SITES[0]], [SITES[1]], [SITES[2]], [SITES[3]], [SITES[0]], [SITES[1]]]


def _train_at(site: str, plan: Plan, start: Parameters, round_number: int) -> Parameters:
    data = DatasetCatalog.bundled().get("heart-disease").load_site(plan.dataset, site)
    node = Node(site, task=LogisticTask(), data=data, plan=plan)
    config = {"seed": round_seed(plan.seed, round_number, SITES.index(site))}
    job = Job("run", round_number, "j", JobKind.TRAIN, plan_hash=plan_hash(plan), parameters=start, config=config)
    answer = node.handle(job)
    assert answer.ok and answer.update is not None, answer.error
    return Parameters.from_flat(start.flatten() + answer.update.flatten(), start.spec)


def test_model_after_each_round_is_that_sites_training_of_the_previous_global_model() -> None:
    plan = _cyclic_plan(rounds=2)
    spec = DatasetCatalog.bundled().get("heart-disease").spec(plan.dataset)
    model = initial_parameters(LogisticTask(), spec, plan).freeze()
    for round_number, site in ((1, SITES[0]), (2, SITES[1])):
        model = _train_at(site, plan, model, round_number).freeze()
    result = simulate(plan, max_concurrency=2)
    np.testing.assert_allclose(result.parameters.flatten(), model.flatten(), atol=1e-6)


def test_plan_refuses_cyclic_with_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="cyclic trains one site per round") as caught:
        _cyclic_plan(rounds=1, secure_aggregation={"enabled": True})
    assert caught.value.field == "plan.strategy.name"


def test_plan_refuses_cyclic_with_min_nodes_above_one() -> None:
    with pytest.raises(ConfigError, match="min_nodes must be 1 with cyclic.*got 2") as caught:
        _cyclic_plan(rounds=1, min_nodes=2)
    assert caught.value.field == "plan.min_nodes"


def test_resumed_cyclic_run_continues_the_order_and_matches_the_uninterrupted_one(tmp_path: Path) -> None:
    uninterrupted = simulate(_cyclic_plan(rounds=5), max_concurrency=2)
    simulate(_cyclic_plan(rounds=2), out_dir=tmp_path, max_concurrency=2)
    events: list[dict[str, Any]] = []
    resumed = simulate(_cyclic_plan(rounds=5), out_dir=tmp_path, max_concurrency=2, resume=True,
                       on_event=events.append)  # fmt: skip
    assert resumed.rounds_completed == 5 and not resumed.failures
    assert [e["nodes"] for e in events if e["event"] == "round_start"] == [[SITES[2]], [SITES[3]], [SITES[0]]]
    np.testing.assert_allclose(resumed.parameters.flatten(), uninterrupted.parameters.flatten(), atol=1e-6)
