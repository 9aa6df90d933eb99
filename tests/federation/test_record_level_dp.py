"""Record-level DP-SGD at every site, in one process, on the heart-disease hospitals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare.data import DatasetCatalog
from fedcare.errors import ConfigError, FederationError
from fedcare.federation.differential_privacy import ledger_file
from fedcare.federation.policy import NodePolicy, PrivacyBudget
from fedcare.plan import Plan, load_plan, parse_plan
from fedcare.privacy.dp.accountant import epsilon_spent
from fedcare.privacy.dp.dpsgd import DPSGD, round_mechanism
from fedcare.simulation import simulate
from fedcare.tasks.registry import TaskRegistry

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart_disease.yaml"
SITES = ("cleveland", "hungary", "switzerland", "va-long-beach")


def dp_plan(*, rounds: int = 4, secure: bool = False, **record_level: Any) -> Plan:
    """The canonical heart-disease plan, shortened, with record-level DP settings replaced."""
    plan = load_plan(EXAMPLE)
    section = plan.privacy.record_level.model_copy(update={"enabled": True, **record_level})
    return plan.model_copy(
        update={
            "rounds": rounds,
            "evaluation": plan.evaluation.model_copy(update={"every_rounds": rounds}),
            "privacy": plan.privacy.model_copy(update={"record_level": section}),
            "secure_aggregation": plan.secure_aggregation.model_copy(update={"enabled": secure}),
        }
    )


def site_split(name: str = "cleveland") -> Any:
    plan = load_plan(EXAMPLE)
    return DatasetCatalog.bundled().get(plan.dataset.name).load_sites(plan.dataset)[name]


def test_dp_sgd_sample_rate_is_the_one_accounted() -> None:
    plan = dp_plan()
    data = site_split()
    task = TaskRegistry.from_entry_points().get(plan.task)
    hook = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=0)

    task.train(task.build_model(data.spec, plan, seed=0), data.train, plan, seed=0, hooks=[hook])

    mechanism = round_mechanism(len(data.train), plan.local, noise_multiplier=1.0)
    assert hook.sample_rate == pytest.approx(mechanism.sample_rate)


def test_dp_sgd_bounds_each_step_by_the_clipping_norm() -> None:
    # With almost no noise, one full-batch step moves the weights by at most lr * max_grad_norm.
    plan = parse_plan(
        {"task": "tabular-logistic", "dataset": {"name": "heart-disease"}, "rounds": 1,
         "local": {"steps": 1, "batch_size": 1000, "learning_rate": 1.0}}
    )  # fmt: skip
    data = site_split("switzerland")
    task = TaskRegistry.from_entry_points().get(plan.task)
    moved = {}
    for name, hooks in {"plain": [], "dp": [DPSGD(noise_multiplier=1e-9, max_grad_norm=1e-3, noise_seed=0)]}.items():
        model = task.build_model(data.spec, plan, seed=0)
        before = task.get_parameters(model).flatten().copy()
        task.train(model, data.train, plan, seed=0, hooks=hooks)
        moved[name] = float(np.linalg.norm(task.get_parameters(model).flatten() - before))

    assert moved["dp"] <= 1e-3 * (1 + 1e-4)
    assert moved["plain"] > 100 * moved["dp"]


def test_dp_sgd_leaves_no_opacus_hooks_on_the_task_model() -> None:
    plan = dp_plan()
    data = site_split()
    task = TaskRegistry.from_entry_points().get(plan.task)
    model = task.build_model(data.spec, plan, seed=0)

    task.train(model, data.train, plan, seed=0, hooks=[DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=0)])

    assert not any(module._forward_hooks or module._backward_hooks for module in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    # The model still trains without DP afterwards.
    task.train(model, data.train, plan, seed=1)


def test_simulated_run_spends_about_the_planned_epsilon_at_every_site(tmp_path: Path) -> None:
    plan = dp_plan(epsilon=1.0, delta=1e-3)
    result = simulate(plan, out_dir=tmp_path / "run")

    assert set(result.epsilon_spent) == set(SITES)
    for site, spent in result.epsilon_spent.items():
        assert 0.9 <= spent <= 1.0 + 1e-6, site
        ledger = json.loads(ledger_file(tmp_path / "run" / "ledgers" / site, "heart-disease").read_text())
        labels = [entry["label"] for entry in ledger["entries"]]
        assert labels == ["feature-stats"] + ["dp-sgd"] * plan.rounds


def test_epsilon_per_site_per_round_is_in_the_events_and_the_model_card(tmp_path: Path) -> None:
    plan = dp_plan(rounds=3, epsilon=2.0, delta=1e-3)
    result = simulate(plan, out_dir=tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_round = [e["dp_epsilon"] for e in events if e["event"] == "round_end"]

    assert [sorted(r) for r in per_round] == [sorted(SITES)] * 3
    for site in SITES:
        spent = [r[site] for r in per_round]
        assert spent == sorted(spent) and spent[0] < spent[-1]
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    record_level = card["privacy"]["differential_privacy"]["record_level"]
    assert record_level["epsilon_spent"] == pytest.approx(result.epsilon_spent)
    assert record_level["delta"] == 1e-3


def test_ledger_epsilon_is_the_accountant_composition_of_its_entries(tmp_path: Path) -> None:
    plan = dp_plan(rounds=2, epsilon=1.0, delta=1e-3)
    result = simulate(plan, out_dir=tmp_path / "run")
    ledger = json.loads(ledger_file(tmp_path / "run" / "ledgers" / "hungary", "heart-disease").read_text())
    from fedcare.privacy.dp.accountant import Mechanism

    mechanisms = [
        Mechanism(noise_multiplier=e["noise_multiplier"], sample_rate=e["sample_rate"], steps=e["steps"], label=e["label"])
        for e in ledger["entries"]
    ]
    assert epsilon_spent(mechanisms, delta=1e-3, accountant="pld") == pytest.approx(result.epsilon_spent["hungary"])


def test_site_with_a_smaller_budget_refuses_the_round_that_would_exceed_it(tmp_path: Path) -> None:
    # The plan targets epsilon 4 over 4 rounds; one hospital allows only 1 in its lifetime.
    plan = dp_plan(rounds=4, epsilon=4.0, delta=1e-3)
    policies = {"hungary": NodePolicy(privacy={"heart-disease": PrivacyBudget(epsilon=1.0, delta=1e-3)})}
    result = simulate(plan, out_dir=tmp_path / "run", policies=policies)

    refusals = [f for f in result.failures if f["node_id"] == "hungary"]
    assert refusals, "hungary never refused a round"
    assert "budget" in refusals[0]["error"] and "left" in refusals[0]["error"]
    assert result.epsilon_spent["hungary"] <= 1.0 + 1e-9
    assert result.rounds_completed == 4  # the others went on


def test_lifetime_budget_carries_over_between_runs_on_the_same_ledger(tmp_path: Path) -> None:
    plan = dp_plan(rounds=2, epsilon=1.0, delta=1e-3)
    simulate(plan, out_dir=tmp_path / "first", ledger_dir=tmp_path / "ledgers")

    # The first run spent each site's budget: every site refuses the second at its feature statistics.
    with pytest.raises(FederationError, match="budget") as refused:
        simulate(plan, out_dir=tmp_path / "second", ledger_dir=tmp_path / "ledgers")
    assert all(site in str(refused.value) for site in SITES)
    assert not (tmp_path / "second" / "model.safetensors").exists()


def test_feature_statistics_are_released_with_noise(tmp_path: Path) -> None:
    exact = simulate(dp_plan(rounds=1).model_copy(update={"privacy": load_plan(EXAMPLE).privacy}), out_dir=tmp_path / "a")
    noisy = simulate(dp_plan(rounds=1), out_dir=tmp_path / "b")
    normalization = {}
    for name, run in {"exact": tmp_path / "a", "noisy": tmp_path / "b"}.items():
        checkpoint = json.loads((run / "checkpoints" / "latest.json").read_text())
        normalization[name] = np.array(checkpoint["normalization"]["mean"])
    assert exact.rounds_completed == noisy.rounds_completed == 1
    assert not np.allclose(normalization["exact"], normalization["noisy"])
    # ... but close enough to be useful: age's mean within 3 years.
    assert abs(normalization["exact"][0] - normalization["noisy"][0]) < 3.0


def test_dataset_without_public_bounds_refuses_private_feature_statistics() -> None:
    plan = parse_plan(
        {"task": "tabular-logistic", "dataset": {"name": "breast-cancer", "num_nodes": 3}, "rounds": 1,
         "privacy": {"record_level": {"enabled": True, "epsilon": 1.0, "delta": 1e-4}}}
    )  # fmt: skip
    with pytest.raises(Exception, match="public bounds"):
        simulate(plan)


def test_site_requiring_record_level_dp_refuses_a_plain_run() -> None:
    plan = load_plan(EXAMPLE).model_copy(update={"rounds": 1, "min_nodes": 1})
    policies = {"cleveland": NodePolicy(require_record_level_dp=True)}
    result = simulate(plan, policies=policies)

    [refusal] = [f for f in result.failures if f["node_id"] == "cleveland"]
    assert "requires record-level differential privacy" in refusal["error"]


def test_node_without_a_ledger_directory_is_refused_under_dp() -> None:
    from fedcare.federation.node import Node

    plan = dp_plan()
    data = site_split()
    with pytest.raises(ConfigError, match="ledger"):
        Node("cleveland", task=TaskRegistry.from_entry_points().get(plan.task), data=data, plan=plan)
