"""The canonical heart-disease plan reaches its benchmarked accuracy on FLamby's split."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcare.data.catalog import DatasetCatalog
from fedcare.federation.coordinator import RunResult
from fedcare.plan import Plan, load_plan
from fedcare.simulation import simulate

CANONICAL_PLAN = Path(__file__).resolve().parents[1] / "examples" / "heart_disease.yaml"

#: Seed 0 of the canonical plan measured 0.810 mean per-site test accuracy
#: (benchmarks/flamby_heart.py; seeds 0-4 average 0.809); the floor leaves 0.02
#: for platform drift, well above FLamby's published FedAvg (0.685) and pooled
#: (0.735) figures.
MIN_MEAN_ACCURACY_SEED_0 = 0.79

FLAMBY_TRAIN = {"cleveland": 199, "hungary": 172, "switzerland": 30, "va-long-beach": 85}
FLAMBY_TEST = {"cleveland": 104, "hungary": 89, "switzerland": 16, "va-long-beach": 45}


@pytest.fixture(scope="module")
def plan() -> Plan:
    return load_plan(CANONICAL_PLAN)


@pytest.fixture(scope="module")
def run(plan: Plan) -> RunResult:
    assert plan.seed == 0
    return simulate(plan)


def test_canonical_plan_is_fedavg_with_federated_normalization_scored_on_test(plan: Plan) -> None:
    assert plan.dataset.name == "heart-disease"
    assert plan.dataset.normalization == "federated"
    assert plan.dataset.validation_fraction == 0.0
    assert plan.strategy.name == "fedavg"


def test_canonical_plan_reaches_its_benchmarked_mean_site_accuracy_with_seed_0(run: RunResult) -> None:
    final = run.final_evaluation
    assert final is not None
    assert final.mean["accuracy"] >= MIN_MEAN_ACCURACY_SEED_0


def test_canonical_sites_hold_flamby_split_sizes(plan: Plan) -> None:
    sites = DatasetCatalog.bundled().get(plan.dataset.name).load_sites(plan.dataset)

    assert {name: len(site.train) for name, site in sites.items()} == FLAMBY_TRAIN
    assert {name: len(site.test) for name, site in sites.items()} == FLAMBY_TEST


def test_canonical_run_tests_on_flamby_split_sizes(run: RunResult) -> None:
    final = run.final_evaluation
    assert final is not None
    assert final.examples == FLAMBY_TEST


def test_canonical_run_with_secure_aggregation_never_learns_training_counts(plan: Plan, run: RunResult) -> None:
    # The example weights travel inside the masked vectors: the coordinator sees only their sum.
    assert plan.secure_aggregation.enabled
    assert run.train_examples == {}


def test_canonical_run_has_13_input_features(run: RunResult) -> None:
    first_layer = next(iter(run.parameters.values()))
    assert first_layer.shape[-1] == 13


DP_PLAN = Path(__file__).resolve().parents[1] / "examples" / "heart_disease_dp.yaml"

#: Seed 0 of the DP plan (epsilon 1, delta 1e-3 at every hospital, noisy statistics included)
#: measured 0.808 mean per-site test accuracy (benchmarks/dp_heart.py: seeds 0-4 average 0.770); the floor
#: leaves a margin and stays above FLamby's DP example (0.702 at the same epsilon and delta).
MIN_DP_MEAN_ACCURACY_SEED_0 = 0.75


def test_dp_plan_reaches_its_benchmarked_accuracy_at_epsilon_1_with_seed_0() -> None:
    plan = load_plan(DP_PLAN)
    assert plan.seed == 0
    assert (plan.privacy.record_level.epsilon, plan.privacy.record_level.delta) == (1.0, 1e-3)
    result = simulate(plan)
    final = result.final_evaluation
    assert final is not None
    assert final.mean["accuracy"] >= MIN_DP_MEAN_ACCURACY_SEED_0
    assert max(result.epsilon_spent.values()) <= 1.0 + 1e-9
