"""Pooled and local baselines: what federation is judged against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from fedcare.baselines import normalize_sites, run_baseline
from fedcare.federation.coordinator import round_seed
from fedcare.data.catalog import DatasetCatalog
from fedcare.errors import ConfigError
from fedcare.plan import Plan, parse_plan
from fedcare.simulation import initial_parameters, simulate
from fedcare.tasks.base import Split, TrainHook, TrainResult
from fedcare.tasks.registry import TaskRegistry
from fedcare.tasks.tabular import LogisticTask

HEART_SITES = ["cleveland", "hungary", "switzerland", "va-long-beach"]
HEART_TEST_SIZES = {"cleveland": 104, "hungary": 89, "switzerland": 16, "va-long-beach": 45}


def heart_plan(**overrides: Any) -> Plan:
    data: dict[str, Any] = {
        "task": "tabular-logistic",
        "dataset": {"name": "heart-disease", "normalization": "federated"},
        "rounds": 3,
        "local": {"epochs": 1, "batch_size": 16, "learning_rate": 0.05},
        "seed": 7,
    }
    data.update(overrides)
    return parse_plan(data)


def flat(parameters: Any) -> np.ndarray:
    return np.asarray(parameters.flatten(), dtype=np.float64)


def test_pooled_baseline_evaluates_every_site_on_its_own_test_split() -> None:
    result = run_baseline(heart_plan(), mode="pooled")

    assert result.mode == "pooled"
    assert list(result.sites) == HEART_SITES
    assert result.examples == HEART_TEST_SIZES
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in result.sites.values())


def test_pooled_baseline_scores_one_shared_model_at_every_site() -> None:
    result = run_baseline(heart_plan(), mode="pooled")

    reference = flat(result.parameters["cleveland"])
    for site in HEART_SITES:
        np.testing.assert_array_equal(flat(result.parameters[site]), reference)


def test_local_baseline_trains_a_separate_model_for_each_site() -> None:
    result = run_baseline(heart_plan(), mode="local")

    models = {site: flat(p) for site, p in result.parameters.items()}
    assert list(models) == HEART_SITES
    for site in ("cleveland", "hungary", "va-long-beach"):
        assert not np.allclose(models["switzerland"], models[site])


def test_local_baseline_reports_each_site_with_its_own_model() -> None:
    plan = heart_plan()
    result = run_baseline(plan, mode="local")
    task = LogisticTask()
    sites = normalize_sites(DatasetCatalog.bundled().get("heart-disease").load_sites(plan.dataset), mode="federated")

    model = task.build_model(sites["switzerland"].spec, plan)
    task.set_parameters(model, result.parameters["switzerland"])
    assert task.evaluate(model, sites["switzerland"].test) == pytest.approx(result.sites["switzerland"], nan_ok=True)


def test_local_model_is_the_site_trained_alone_with_coordinator_seeds() -> None:
    plan = heart_plan()
    result = run_baseline(plan, mode="local")
    task = LogisticTask()
    dataset = DatasetCatalog.bundled().get("heart-disease")
    sites = normalize_sites(dataset.load_sites(plan.dataset), mode="federated")

    model = task.build_model(dataset.spec(plan.dataset), plan)
    task.set_parameters(model, initial_parameters(task, dataset.spec(plan.dataset), plan))
    index = HEART_SITES.index("hungary")
    for round_number in range(1, plan.rounds + 1):
        task.train(model, sites["hungary"].train, plan, seed=round_seed(plan.seed, round_number, index))

    np.testing.assert_array_equal(flat(task.get_parameters(model)), flat(result.parameters["hungary"]))


def test_local_baseline_of_one_site_equals_a_one_node_federation() -> None:
    plan = heart_plan(nodes=["switzerland"], evaluation={"every_rounds": 3})
    baseline = run_baseline(plan, mode="local")
    federated = simulate(plan)

    np.testing.assert_allclose(flat(baseline.parameters["switzerland"]), flat(federated.parameters), atol=1e-6)
    assert federated.final_evaluation is not None
    assert baseline.sites["switzerland"]["accuracy"] == federated.final_evaluation.sites["switzerland"]["accuracy"]


def test_pooled_and_local_baselines_differ_when_several_sites_train() -> None:
    pooled = run_baseline(heart_plan(), mode="pooled")
    local = run_baseline(heart_plan(), mode="local")

    assert not np.allclose(flat(pooled.parameters["cleveland"]), flat(local.parameters["cleveland"]))


@pytest.mark.parametrize("mode", ["pooled", "local"])
def test_baseline_is_reproducible_for_a_fixed_seed_and_moves_with_the_seed(mode: str) -> None:
    first = run_baseline(heart_plan(seed=1), mode=mode)  # type: ignore[arg-type]
    again = run_baseline(heart_plan(seed=1), mode=mode)  # type: ignore[arg-type]
    other = run_baseline(heart_plan(seed=2), mode=mode)  # type: ignore[arg-type]

    np.testing.assert_array_equal(flat(first.parameters["hungary"]), flat(again.parameters["hungary"]))
    assert first.sites == again.sites
    assert not np.allclose(flat(first.parameters["hungary"]), flat(other.parameters["hungary"]))


def test_normalization_mode_changes_the_pooled_model_and_its_scores() -> None:
    results = {
        mode: run_baseline(heart_plan(dataset={"name": "heart-disease", "normalization": mode}), mode="pooled")
        for mode in ("federated", "per-site", "none")
    }

    models = {mode: flat(r.parameters["cleveland"]) for mode, r in results.items()}
    assert not np.allclose(models["federated"], models["per-site"])
    assert not np.allclose(models["federated"], models["none"])
    assert len({round(r.mean["log_loss"], 6) for r in results.values()}) == 3


def test_federated_normalization_standardizes_the_union_of_training_sets() -> None:
    sites = DatasetCatalog.bundled().get("heart-disease").load_sites(heart_plan().dataset)
    prepared = normalize_sites(sites, mode="federated")

    union = np.concatenate([data.train.x for data in prepared.values()]).astype(np.float64)
    np.testing.assert_allclose(union.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(union.std(axis=0), 1.0, atol=1e-4)
    assert abs(prepared["switzerland"].train.x.mean(axis=0)).max() > 0.1  # a site keeps its own offset


def test_per_site_normalization_centres_each_site_on_its_own_training_data() -> None:
    sites = DatasetCatalog.bundled().get("heart-disease").load_sites(heart_plan().dataset)
    prepared = normalize_sites(sites, mode="per-site")

    for data in prepared.values():
        np.testing.assert_allclose(data.train.x.astype(np.float64).mean(axis=0), 0.0, atol=1e-5)
    assert not np.array_equal(prepared["cleveland"].test.x, sites["cleveland"].test.x)


def test_no_normalization_leaves_features_unchanged() -> None:
    sites = DatasetCatalog.bundled().get("heart-disease").load_sites(heart_plan().dataset)
    prepared = normalize_sites(sites, mode="none")

    np.testing.assert_array_equal(prepared["va-long-beach"].train.x, sites["va-long-beach"].train.x)


def test_baseline_with_validation_fraction_scores_the_validation_split() -> None:
    plan = heart_plan(dataset={"name": "heart-disease", "validation_fraction": 0.2})
    result = run_baseline(plan, mode="pooled")

    full_train = {"cleveland": 199, "hungary": 172, "switzerland": 30, "va-long-beach": 85}
    for site in HEART_SITES:
        assert result.examples[site] + result.train_examples[site] == full_train[site]
        assert result.examples[site] < HEART_TEST_SIZES[site]


def test_baseline_summaries_are_the_mean_and_example_weighted_mean_of_sites() -> None:
    result = run_baseline(heart_plan(), mode="local")

    accuracies = [result.sites[s]["accuracy"] for s in HEART_SITES]
    weights = [result.examples[s] for s in HEART_SITES]
    assert result.mean["accuracy"] == pytest.approx(np.mean(accuracies))
    assert result.pooled["accuracy"] == pytest.approx(np.average(accuracies, weights=weights))


def test_baseline_admits_only_the_plan_nodes() -> None:
    result = run_baseline(heart_plan(nodes=["va-long-beach", "hungary"]), mode="pooled")

    assert list(result.sites) == ["hungary", "va-long-beach"]
    assert result.train_examples == {"hungary": 172, "va-long-beach": 85}


def test_baseline_refuses_a_node_the_dataset_lacks() -> None:
    with pytest.raises(ConfigError) as raised:
        run_baseline(heart_plan(nodes=["cleveland", "mars"]), mode="local")
    assert raised.value.field == "plan.nodes"
    assert "mars" in raised.value.message


def test_baseline_refuses_an_unknown_mode_naming_the_field() -> None:
    with pytest.raises(ConfigError) as raised:
        run_baseline(heart_plan(), mode="centralised")  # type: ignore[arg-type]
    assert raised.value.field == "mode"
    assert "'centralised'" in raised.value.message


class DivergingTask(LogisticTask):
    """Writes NaN into the weights, as a too-large learning rate would."""

    def train(
        self, model: Any, data: Split, plan: Plan, *, seed: int, hooks: Sequence[TrainHook] = ()
    ) -> TrainResult:
        result = super().train(model, data, plan, seed=seed, hooks=hooks)
        model.linear.weight.data.fill_(float("nan"))
        return result


def test_diverging_training_is_reported_as_a_learning_rate_problem() -> None:
    registry = TaskRegistry([("tabular-logistic", DivergingTask)])

    with pytest.raises(ConfigError) as raised:
        run_baseline(heart_plan(), mode="local", registry=registry)
    assert raised.value.field == "plan.local.learning_rate"
    assert raised.value.node_id == "cleveland"
    assert raised.value.round == 1
