"""Survival analysis: the bundled TCGA-BRCA data, the C-index and the tabular-cox task."""

from __future__ import annotations

import math
from itertools import permutations

import numpy as np
import pytest

from fedcare.baselines import run_baseline
from fedcare.data.catalog import DatasetCatalog, TcgaBrca
from fedcare.data.normalization import Standardization
from fedcare.errors import ConfigError, DataError
from fedcare.metrics import concordance_index
from fedcare.plan import DatasetConfig, Plan, parse_plan
from fedcare.simulation import simulate
from fedcare.tasks.base import DataSpec, SiteData, Split, TrainHook
from fedcare.tasks.survival import CoxTask, cox_partial_likelihood_loss

CONFIG = DatasetConfig(name="tcga-brca")
#: FLamby's Fed-TCGA-BRCA split (train, test) of centers 0..5.
FLAMBY_SIZES = {
    "northeast": (248, 63),
    "south": (156, 40),
    "west": (164, 42),
    "midwest": (129, 33),
    "europe": (129, 33),
    "canada": (40, 11),
}


@pytest.fixture(scope="module")
def sites() -> dict[str, SiteData]:
    return TcgaBrca().load_sites(CONFIG)


def cox_plan(**overrides: object) -> Plan:
    # learning_rate 0.5: best of 0.05-1.0 by mean per-site C-index on validation splits
    # (validation_fraction 0.2, seeds 0-4), not on the test split.
    raw: dict[str, object] = {
        "name": "tcga-brca-cox",
        "task": "tabular-cox",
        "dataset": {"name": "tcga-brca", "normalization": "federated"},
        "rounds": 15,
        "local": {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "learning_rate": 0.5},
        "strategy": {"name": "fedavg"},
        "evaluation": {"every_rounds": 15},
        "seed": 0,
    }
    raw.update(overrides)
    return parse_plan(raw)


def brute_force_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    concordant, pairs = 0.0, 0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
                pairs += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / pairs if pairs else math.nan


def brute_force_breslow_loss(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    total = 0.0
    for i in range(len(time)):
        if event[i]:
            total -= risk[i] - math.log(sum(math.exp(risk[j]) for j in range(len(time)) if time[j] >= time[i]))
    return total / len(time)


# --- the dataset ------------------------------------------------------------------


def test_catalog_offers_tcga_brca() -> None:
    assert isinstance(DatasetCatalog.bundled().get("tcga-brca"), TcgaBrca)


def test_tcga_brca_sites_hold_flambys_train_and_test_split(sites: dict[str, SiteData]) -> None:
    assert {name: (len(d.train), len(d.test)) for name, d in sites.items()} == FLAMBY_SIZES


def test_tcga_brca_has_39_float32_features_events_and_times_in_days(sites: dict[str, SiteData]) -> None:
    for data in sites.values():
        for split in (data.train, data.test):
            assert split.x.dtype == np.float32 and split.x.shape[1] == 39
            assert split.y.dtype == np.int64 and set(np.unique(split.y)) <= {0, 1}
            assert split.time is not None and split.time.shape == split.y.shape and (split.time >= 0).all()
    assert sum(int(d.train.y.sum() + d.test.y.sum()) for d in sites.values()) == 151  # FLamby: 151 deaths


def test_tcga_brca_spec_names_the_quoted_comma_columns() -> None:
    spec = TcgaBrca().spec(CONFIG)
    assert spec.num_features == len(spec.feature_names) == len(spec.feature_bounds) == 39
    assert "primary_diagnosis_Infiltrating duct carcinoma, NOS" in spec.feature_names
    assert spec.class_names == ("censored", "death")


def test_tcga_brca_records_lie_within_the_public_feature_bounds(sites: dict[str, SiteData]) -> None:
    bounds = np.asarray(TcgaBrca.BOUNDS)
    x = np.concatenate([split.x for d in sites.values() for split in (d.train, d.test)])
    assert (x >= bounds[:, 0]).all() and (x <= bounds[:, 1]).all()


def test_tcga_brca_refuses_a_file_whose_checksum_does_not_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TcgaBrca._FILES, "train_test_split.csv", "0" * 64)
    with pytest.raises(DataError, match="train_test_split.csv does not match its recorded SHA-256"):
        TcgaBrca().load_sites(CONFIG)


def test_standardization_keeps_survival_times(sites: dict[str, SiteData]) -> None:
    train = sites["west"].train
    standardized = Standardization.fit(train.x).apply(train)
    assert standardized.time is train.time


def test_validation_carve_keeps_each_patients_survival_time() -> None:
    full = TcgaBrca().load_sites(CONFIG)["south"].train
    carved = TcgaBrca().load_sites(DatasetConfig(name="tcga-brca", validation_fraction=0.2))["south"]
    assert len(carved.train) + len(carved.test) == len(full)
    for split in (carved.train, carved.test):
        assert split.time is not None
        rows = [int(np.flatnonzero((full.x == row).all(axis=1) & (full.time == t))[0]) for row, t in zip(split.x, split.time)]
        np.testing.assert_array_equal(full.y[rows], split.y)


# --- the C-index ------------------------------------------------------------------


def test_c_index_of_a_hand_computed_example() -> None:
    # Comparable pairs: (0,1) (0,2) (0,3) (1,2) (1,3); concordant 3, tied 1 (1,3), discordant (1,2).
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 0, 1])
    assert concordance_index(time, event, np.array([4.0, 1.0, 2.0, 1.0])) == pytest.approx(3.5 / 5)


def test_c_index_counts_censoring_at_an_event_time_as_surviving_it() -> None:
    # (0,1) and (2,1) are comparable (1 is censored at their event time), both concordant;
    # (0,2), two events at one time, is not comparable (else one of its orders would be discordant).
    time = np.array([5.0, 5.0, 5.0])
    event = np.array([1, 0, 1])
    assert concordance_index(time, event, np.array([2.0, 1.0, 3.0])) == 1.0


def test_c_index_is_one_for_perfect_zero_for_reversed_and_half_for_constant_risk() -> None:
    time = np.arange(1.0, 11.0)
    event = np.ones(10, dtype=np.int64)
    assert concordance_index(time, event, -time) == 1.0
    assert concordance_index(time, event, time) == 0.0
    assert concordance_index(time, event, np.zeros(10)) == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_c_index_agrees_with_brute_force_on_random_data_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 60
    time = rng.integers(0, 20, n).astype(np.float64)  # many tied times
    event = rng.integers(0, 2, n)
    risk = np.round(rng.normal(size=n), 1)  # many tied risks
    assert concordance_index(time, event, risk) == pytest.approx(brute_force_c_index(time, event, risk))


def test_c_index_agrees_with_lifelines() -> None:
    lifelines_utils = pytest.importorskip("lifelines.utils")
    rng = np.random.default_rng(7)
    time = rng.integers(0, 30, 200).astype(np.float64)
    event = rng.integers(0, 2, 200)
    risk = np.round(rng.normal(size=200), 1)
    expected = lifelines_utils.concordance_index(time, -risk, event)
    assert concordance_index(time, event, risk) == pytest.approx(expected)


def test_c_index_is_nan_without_comparable_pairs() -> None:
    assert math.isnan(concordance_index(np.array([1.0, 2.0]), np.array([0, 0]), np.array([0.3, 0.1])))


def test_c_index_refuses_arrays_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="same length, got 3, 2 and 3"):
        concordance_index(np.zeros(3), np.zeros(2), np.zeros(3))


# --- the Cox task -----------------------------------------------------------------


def test_cox_loss_is_breslows_partial_likelihood_with_tied_times() -> None:
    import torch

    rng = np.random.default_rng(3)
    time = rng.integers(0, 6, 25).astype(np.float64)
    event = rng.integers(0, 2, 25)
    risk = rng.normal(size=25)
    loss = cox_partial_likelihood_loss(torch.from_numpy(risk), time, event)
    assert float(loss) == pytest.approx(brute_force_breslow_loss(risk, time, event))


def test_cox_loss_does_not_depend_on_the_order_of_patients() -> None:
    import torch

    time = np.array([3.0, 1.0, 3.0, 2.0])
    event = np.array([1, 1, 0, 1])
    risk = np.array([0.2, -0.5, 1.0, 0.1])
    losses = {
        round(float(cox_partial_likelihood_loss(torch.from_numpy(risk[list(p)]), time[list(p)], event[list(p)])), 12)
        for p in permutations(range(4))
    }
    assert len(losses) == 1


def test_cox_loss_of_a_batch_without_events_is_zero_with_a_zero_gradient() -> None:
    import torch

    risk = torch.tensor([0.5, -1.0], requires_grad=True)
    loss = cox_partial_likelihood_loss(risk, np.array([1.0, 2.0]), np.array([0, 0]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and risk.grad is not None and not risk.grad.any()


def test_cox_training_lowers_the_partial_likelihood_loss(sites: dict[str, SiteData]) -> None:
    task, plan = CoxTask(), cox_plan(local={"epochs": 5, "batch_size": 64, "learning_rate": 0.5})
    data = Standardization.fit(sites["northeast"].train.x).apply_site(sites["northeast"])
    model = task.build_model(data.spec, plan, seed=0)
    before = task.evaluate(model, data.train)["loss"]
    result = task.train(model, data.train, plan, seed=1)
    after = task.evaluate(model, data.train)["loss"]
    assert result.num_examples == 248 and result.steps == 5 * 4
    assert after < before - 0.05, (before, after)


def test_cox_training_is_reproducible_from_its_seed(sites: dict[str, SiteData]) -> None:
    task, plan = CoxTask(), cox_plan()
    data = Standardization.fit(sites["west"].train.x).apply(sites["west"].train)
    weights = []
    for _ in range(2):
        model = task.build_model(sites["west"].spec, plan, seed=0)
        task.train(model, data, plan, seed=5)
        weights.append(task.get_parameters(model).flatten())
    np.testing.assert_array_equal(weights[0], weights[1])


def test_cox_task_refuses_record_level_dp_sgd() -> None:
    class NeedsLoader(TrainHook):
        needs_data_loader = True

    split = Split(x=np.zeros((4, 2), np.float32), y=np.array([1, 0, 1, 0]), time=np.arange(4.0))
    task, plan = CoxTask(), cox_plan()
    model = task.build_model(DataSpec(num_features=2, num_classes=2), plan, seed=0)
    with pytest.raises(ConfigError, match="does not support record-level differential privacy") as caught:
        task.train(model, split, plan, seed=0, hooks=[NeedsLoader()])
    assert caught.value.field == "plan.privacy.record_level.enabled"


def test_cox_task_refuses_data_without_survival_times() -> None:
    split = Split(x=np.zeros((4, 2), np.float32), y=np.array([1, 0, 1, 0]))
    task, plan = CoxTask(), cox_plan()
    model = task.build_model(DataSpec(num_features=2, num_classes=2), plan, seed=0)
    with pytest.raises(DataError, match="needs survival data"):
        task.evaluate(model, split)


# --- federated and pooled runs ----------------------------------------------------


def test_federated_cox_on_tcga_brca_ranks_patients_well_above_chance() -> None:
    # Measured: mean per-site test C-index 0.839 (seed 0); 0.816-0.839 over seeds 0-4.
    # FLamby reports 0.676 pooled and 0.815 for its best federated strategy on this split.
    result = simulate(cox_plan(), max_concurrency=2)
    final = result.final_evaluation
    assert final is not None and set(final.sites) == set(FLAMBY_SIZES)
    assert final.mean["c_index"] > 0.75, final.sites
    assert all(metrics["c_index"] > 0.6 for metrics in final.sites.values()), final.sites


def test_pooled_cox_baseline_trains_on_every_sites_survival_times() -> None:
    result = run_baseline(cox_plan(rounds=5), mode="pooled")
    assert result.mean["c_index"] > 0.7, result.sites


def test_cli_table_shows_the_c_index_for_survival_runs() -> None:
    from fedcare.cli import _site_table

    table = _site_table("t", {"a": {"c_index": 0.8, "loss": 1.0}}, {"a": 10}, {"mean of sites": {"c_index": 0.8}})
    assert [column.header for column in table.columns] == ["site", "n test", "C-index"]


def test_example_plan_is_the_benchmarked_cox_plan() -> None:
    from pathlib import Path

    from fedcare.plan import load_plan

    example = load_plan(Path(__file__).resolve().parents[1] / "examples" / "tcga_brca.yaml")
    assert example.model_copy(update={"min_nodes": 1}) == cox_plan()
