"""Clinical metrics agree with scikit-learn; site metrics aggregate as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, recall_score, roc_auc_score, roc_curve

from fedcare.metrics import (
    ROC_FPR_GRID,
    aggregate_site_metrics,
    binary_metrics,
    calibration_error,
    multiclass_metrics,
    roc_auc,
    roc_points,
    split_curves,
)

SIZES = [7, 40, 333, 2000]


def _binary_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with both classes and probabilities rounded to 0.05, so scores tie often."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    # Keep away from 0 and 1 so fedcare's clipping (1e-7) and scikit-learn's agree.
    probability = np.round(np.clip(rng.beta(2, 2, n) + 0.2 * y - 0.1, 0.05, 0.95) / 0.05) * 0.05
    return y, probability


def _multiclass_case(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)
    logits = np.round(rng.standard_normal((n, k)), 1)
    probability = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probability


# --- roc_auc --------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_roc_auc_with_ties_matches_scikit_learn(n: int) -> None:
    y, probability = _binary_case(n, seed=n)

    assert roc_auc(y, probability) == pytest.approx(roc_auc_score(y, probability), abs=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_roc_auc_of_integer_scores_with_heavy_ties_matches_scikit_learn(n: int) -> None:
    rng = np.random.default_rng(100 + n)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    scores = rng.integers(0, 3, n)

    assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_roc_auc_of_a_perfect_ranking_is_one() -> None:
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0


def test_roc_auc_of_all_tied_scores_is_one_half() -> None:
    assert roc_auc(np.array([0, 1, 0, 1, 1]), np.full(5, 0.3)) == 0.5


@pytest.mark.parametrize("label", [0, 1])
def test_roc_auc_of_a_single_class_is_nan(label: int) -> None:
    assert math.isnan(roc_auc(np.full(6, label), np.linspace(0, 1, 6)))


def test_roc_auc_does_not_depend_on_row_order() -> None:
    y, probability = _binary_case(333, seed=5)
    order = np.random.default_rng(6).permutation(333)

    assert roc_auc(y[order], probability[order]) == pytest.approx(roc_auc(y, probability), abs=1e-12)


# --- binary_metrics -------------------------------------------------------------------


def test_binary_metrics_report_the_documented_metrics_and_a_roc_curve() -> None:
    y, probability = _binary_case(40, seed=1)

    scalars, curves = split_curves(binary_metrics(y, probability))

    assert set(scalars) == {
        "accuracy",
        "balanced_accuracy",
        "roc_auc",
        "sensitivity",
        "specificity",
        "log_loss",
        "calibration_error",
    }
    assert len(curves["roc"]) == len(ROC_FPR_GRID)
    assert curves["roc"] == roc_points(y, probability)


@pytest.mark.parametrize("n", SIZES)
def test_roc_points_are_scikit_learns_curve_read_as_a_step_function(n: int) -> None:
    y, probability = _binary_case(n, seed=n)
    fpr, tpr, _ = roc_curve(y, probability, drop_intermediate=False)

    expected = [float(tpr[fpr <= f + 1e-12].max()) for f in ROC_FPR_GRID]

    assert roc_points(y, probability) == pytest.approx(expected, abs=1e-12)


def test_roc_points_rise_to_one_and_never_fall() -> None:
    y, probability = _binary_case(333, seed=3)

    points = roc_points(y, probability)

    assert points[-1] == 1.0
    assert all(b >= a for a, b in zip(points, points[1:]))


def test_roc_points_of_a_perfect_ranking_reach_one_at_zero_fpr() -> None:
    assert roc_points(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]))[0] == 1.0


def test_roc_points_are_nan_with_one_class() -> None:
    assert all(math.isnan(v) for v in roc_points(np.ones(5), np.linspace(0, 1, 5)))


def _reference_ece(y: np.ndarray, confidence: np.ndarray, hit: np.ndarray, bins: int = 10) -> float:
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = (confidence >= low) & ((confidence < high) | ((b == bins - 1) & (confidence <= high)))
        if inside.any():
            total += inside.sum() * abs(hit[inside].mean() - confidence[inside].mean())
    return total / y.size


@pytest.mark.parametrize("n", SIZES)
def test_binary_calibration_error_matches_a_loop_over_bins(n: int) -> None:
    y, probability = _binary_case(n, seed=n + 1)
    probability = np.clip(probability + 0.013, 0, 1)  # off the bin edges, where float rounding could differ

    assert calibration_error(y, probability) == pytest.approx(_reference_ece(y, probability, y.astype(float)), abs=1e-12)


def test_calibration_error_sees_overconfidence() -> None:
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.2, 0.8, 4000)
    y = (rng.uniform(size=truth.size) < truth).astype(int)
    overconfident = np.where(truth > 0.5, 0.99, 0.01)

    assert calibration_error(y, truth) < 0.03
    assert calibration_error(y, overconfident) > 0.2


def test_multiclass_calibration_error_uses_the_predicted_class_confidence() -> None:
    y, probability = _multiclass_case(333, 4, seed=5)
    confidence = probability.max(axis=1)
    hit = (probability.argmax(axis=1) == y).astype(float)

    assert multiclass_metrics(y, probability)["calibration_error"] == pytest.approx(
        _reference_ece(y, confidence, hit), abs=1e-9
    )


@pytest.mark.parametrize("n", SIZES)
def test_binary_accuracy_matches_scikit_learn(n: int) -> None:
    y, probability = _binary_case(n, seed=n)

    expected = accuracy_score(y, probability >= 0.5)

    assert binary_metrics(y, probability)["accuracy"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_binary_balanced_accuracy_matches_scikit_learn(n: int) -> None:
    y, probability = _binary_case(n, seed=n)

    expected = balanced_accuracy_score(y, probability >= 0.5)

    assert binary_metrics(y, probability)["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_binary_roc_auc_matches_scikit_learn(n: int) -> None:
    y, probability = _binary_case(n, seed=n)

    expected = roc_auc_score(y, probability)

    assert binary_metrics(y, probability)["roc_auc"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_binary_sensitivity_is_recall_of_the_positive_class(n: int) -> None:
    y, probability = _binary_case(n, seed=n)

    expected = recall_score(y, probability >= 0.5, pos_label=1)

    assert binary_metrics(y, probability)["sensitivity"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_binary_specificity_is_recall_of_the_negative_class(n: int) -> None:
    y, probability = _binary_case(n, seed=n)

    expected = recall_score(y, probability >= 0.5, pos_label=0)

    assert binary_metrics(y, probability)["specificity"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_binary_log_loss_matches_scikit_learn(n: int) -> None:
    y, probability = _binary_case(n, seed=n)

    expected = log_loss(y, probability, labels=[0, 1])

    assert binary_metrics(y, probability)["log_loss"] == pytest.approx(expected, rel=1e-12)


def test_binary_log_loss_stays_finite_for_confident_mistakes() -> None:
    metrics = binary_metrics(np.array([0, 1]), np.array([1.0, 0.0]))

    assert math.isfinite(metrics["log_loss"]) and metrics["log_loss"] > 10


def test_binary_threshold_decides_which_cases_are_called_positive() -> None:
    y = np.array([0, 0, 1, 1])
    probability = np.array([0.2, 0.45, 0.55, 0.7])

    assert binary_metrics(y, probability, threshold=0.6)["sensitivity"] == 0.5


def test_binary_case_at_the_threshold_is_called_positive() -> None:
    assert binary_metrics(np.array([0, 1]), np.array([0.1, 0.5]))["sensitivity"] == 1.0


def test_binary_roc_auc_ranks_confident_probabilities_like_scikit_learn() -> None:
    y = np.array([0, 1, 0, 1])
    probability = np.array([1e-9, 1e-8, 0.3, 0.6])

    assert binary_metrics(y, probability)["roc_auc"] == pytest.approx(roc_auc_score(y, probability))


def test_binary_metrics_on_one_class_give_nan_auc() -> None:
    metrics = binary_metrics(np.ones(5, dtype=int), np.linspace(0.1, 0.9, 5))

    assert math.isnan(metrics["roc_auc"])


def test_binary_metrics_without_negatives_give_nan_specificity() -> None:
    metrics = binary_metrics(np.ones(5, dtype=int), np.linspace(0.1, 0.9, 5))

    assert math.isnan(metrics["specificity"])


def test_binary_balanced_accuracy_without_negatives_is_the_sensitivity() -> None:
    metrics = binary_metrics(np.ones(5, dtype=int), np.linspace(0.1, 0.9, 5))

    assert metrics["balanced_accuracy"] == metrics["sensitivity"] == 0.6


def test_binary_metrics_do_not_change_their_inputs() -> None:
    y, probability = _binary_case(40, seed=2)
    probability[0] = 1.0
    y_before, probability_before = y.copy(), probability.copy()

    binary_metrics(y, probability)

    np.testing.assert_array_equal(probability, probability_before)
    np.testing.assert_array_equal(y, y_before)


# --- multiclass_metrics ---------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_multiclass_accuracy_matches_scikit_learn(n: int) -> None:
    y, probability = _multiclass_case(n, 4, seed=n)

    expected = accuracy_score(y, probability.argmax(axis=1))

    assert multiclass_metrics(y, probability)["accuracy"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_multiclass_balanced_accuracy_matches_scikit_learn(n: int) -> None:
    y, probability = _multiclass_case(n, 4, seed=n)

    expected = balanced_accuracy_score(y, probability.argmax(axis=1))

    assert multiclass_metrics(y, probability)["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_multiclass_balanced_accuracy_is_the_macro_recall(n: int) -> None:
    y, probability = _multiclass_case(n, 3, seed=n)

    expected = recall_score(y, probability.argmax(axis=1), average="macro")

    assert multiclass_metrics(y, probability)["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_multiclass_log_loss_matches_scikit_learn(n: int) -> None:
    y, probability = _multiclass_case(n, 4, seed=n)

    expected = log_loss(y, probability, labels=[0, 1, 2, 3])

    assert multiclass_metrics(y, probability)["log_loss"] == pytest.approx(expected, rel=1e-10)


def test_multiclass_balanced_accuracy_ignores_classes_absent_from_the_labels() -> None:
    y = np.array([0, 0, 1, 1])
    probability = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])

    assert multiclass_metrics(y, probability)["balanced_accuracy"] == 0.75


# --- aggregate_site_metrics -----------------------------------------------------------


def test_aggregate_mean_is_the_unweighted_mean_over_sites() -> None:
    per_site = {"a": {"accuracy": 0.9}, "b": {"accuracy": 0.6}, "c": {"accuracy": 0.3}}

    out = aggregate_site_metrics(per_site, {"a": 100, "b": 10, "c": 1})

    assert out["mean"]["accuracy"] == pytest.approx(0.6)


def test_aggregate_pooled_weights_each_site_by_its_test_examples() -> None:
    per_site = {"a": {"accuracy": 0.9}, "b": {"accuracy": 0.6}, "c": {"accuracy": 0.3}}

    out = aggregate_site_metrics(per_site, {"a": 100, "b": 10, "c": 1})

    assert out["pooled"]["accuracy"] == pytest.approx((90 + 6 + 0.3) / 111)


def test_aggregate_leaves_nan_sites_out_of_the_mean() -> None:
    per_site = {"a": {"roc_auc": 0.8}, "b": {"roc_auc": math.nan}, "c": {"roc_auc": 0.6}}

    out = aggregate_site_metrics(per_site, {"a": 10, "b": 50, "c": 30})

    assert out["mean"]["roc_auc"] == pytest.approx(0.7)


def test_aggregate_leaves_nan_sites_out_of_the_pooled_weights() -> None:
    per_site = {"a": {"roc_auc": 0.8}, "b": {"roc_auc": math.nan}, "c": {"roc_auc": 0.6}}

    out = aggregate_site_metrics(per_site, {"a": 10, "b": 50, "c": 30})

    assert out["pooled"]["roc_auc"] == pytest.approx((8 + 18) / 40)


def test_aggregate_of_a_metric_undefined_everywhere_is_nan() -> None:
    per_site = {"a": {"roc_auc": math.nan}, "b": {"roc_auc": math.nan}}

    out = aggregate_site_metrics(per_site, {"a": 10, "b": 5})

    assert math.isnan(out["mean"]["roc_auc"]) and math.isnan(out["pooled"]["roc_auc"])


def test_aggregate_keeps_metrics_reported_by_only_some_sites() -> None:
    per_site = {"a": {"accuracy": 0.5, "roc_auc": 0.9}, "b": {"accuracy": 1.0}}

    out = aggregate_site_metrics(per_site, {"a": 10, "b": 30})

    assert out["mean"]["roc_auc"] == 0.9 and out["pooled"]["accuracy"] == pytest.approx(0.875)


def test_aggregate_of_binary_metrics_pools_to_the_accuracy_of_all_rows() -> None:
    y, probability = _binary_case(333, seed=9)
    cuts = {"a": slice(0, 100), "b": slice(100, 133), "c": slice(133, 333)}
    per_site = {site: binary_metrics(y[rows], probability[rows]) for site, rows in cuts.items()}
    examples = {site: rows.stop - rows.start for site, rows in cuts.items()}

    pooled = aggregate_site_metrics(per_site, examples)["pooled"]["accuracy"]

    assert pooled == pytest.approx(binary_metrics(y, probability)["accuracy"], abs=1e-12)
