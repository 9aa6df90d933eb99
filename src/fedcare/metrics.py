"""Clinical classification and survival metrics, and their aggregation across sites.

The metric functions are small numpy kernels, checked against scikit-learn in
the test suite. They are written here rather than imported so that a site's
evaluation does not pay scikit-learn's import time (about a second) on every
process start; that matters for short simulation runs and small node devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "ROC_FPR_GRID",
    "ROC_PREFIX",
    "aggregate_site_metrics",
    "binary_metrics",
    "calibration_error",
    "concordance_index",
    "multiclass_metrics",
    "roc_auc",
    "roc_points",
    "split_curves",
]

_EPS = 1e-7

#: False-positive rates at which a site reports its ROC curve's true-positive rate
#: (denser where screening decisions are made). A site sends these 16 rates, not scores.
ROC_FPR_GRID: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

#: Metric names that carry one point of a ROC curve: ``roc_tpr@0.05`` is the TPR at FPR 0.05.
ROC_PREFIX = "roc_tpr@"


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, with ties counted half (Mann-Whitney U).

    Parameters
    ----------
    y_true : numpy.ndarray
        Binary labels, 1 for the positive class.
    scores : numpy.ndarray
        Higher means more likely positive.

    Returns
    -------
    float
        The AUC in [0, 1], or NaN when only one class is present.

    Examples
    --------
    >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks over runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s.size]))
    average = (starts + ends + 1) / 2.0  # 1-based mean rank of each run
    ranks[order] = np.repeat(average, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_points(y_true: np.ndarray, scores: np.ndarray, grid: Sequence[float] = ROC_FPR_GRID) -> list[float]:
    """The ROC curve's true-positive rate at each false-positive rate of ``grid``.

    The TPR at ``f`` is the highest one reached by a threshold whose FPR is
    at most ``f`` (the empirical curve read as a step function), so it never
    overstates the curve.

    Parameters
    ----------
    y_true : numpy.ndarray
        Binary labels, 1 for the positive class.
    scores : numpy.ndarray
        Higher means more likely positive.
    grid : sequence of float
        False-positive rates in [0, 1].

    Returns
    -------
    list of float
        One TPR per grid point; NaN everywhere when only one class is present.

    Examples
    --------
    >>> roc_points(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]), grid=(0.0, 0.5, 1.0))
    [0.5, 1.0, 1.0]
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return [math.nan] * len(grid)
    order = np.argsort(-s, kind="mergesort")
    sorted_scores, sorted_y = s[order], y[order]
    # one curve point per distinct threshold: everything scoring at least it is called positive
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), s.size - 1]
    tpr = np.r_[0.0, np.cumsum(sorted_y)[last] / n_pos]
    fpr = np.r_[0.0, np.cumsum(~sorted_y)[last] / n_neg]
    return [float(tpr[fpr <= f + 1e-12].max()) for f in grid]


def calibration_error(y_true: np.ndarray, probability: np.ndarray, *, bins: int = 10) -> float:
    """Expected calibration error: the gap between predicted probability and observed frequency.

    The predictions are put in ``bins`` equal-width bins of probability; the
    error is the mean over cases of ``|observed rate - mean prediction|`` of
    their bin. For two classes ``probability`` is that of the positive class;
    for more, an ``(n, k)`` array, the confidence of the predicted class
    against its accuracy.

    Returns
    -------
    float
        In [0, 1]; 0 is perfectly calibrated. NaN without cases.

    Examples
    --------
    >>> calibration_error(np.array([0, 1, 1, 0]), np.array([0.0, 1.0, 1.0, 0.0]))
    0.0
    >>> round(calibration_error(np.array([0, 0, 1, 1]), np.array([0.75, 0.75, 0.75, 0.75])), 3)
    0.25
    """
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probability, dtype=np.float64)
    if y.size == 0:
        return math.nan
    if p.ndim == 2:
        confidence = p.max(axis=1)
        hit = (p.argmax(axis=1) == y).astype(np.float64)
    else:
        confidence = p.reshape(-1)
        hit = y.astype(np.float64)
    which = np.minimum((np.clip(confidence, 0.0, 1.0) * bins).astype(np.int64), bins - 1)
    counts = np.bincount(which, minlength=bins)
    gaps = np.abs(np.bincount(which, weights=hit, minlength=bins) - np.bincount(which, weights=confidence, minlength=bins))
    return float(gaps[counts > 0].sum() / y.size)


def split_curves(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Separate a site's scalar metrics from the curve points it reported.

    Returns
    -------
    (dict, dict)
        The scalar metrics, and ``{"roc": [tpr at each ROC_FPR_GRID point]}``
        when the metrics carry a ROC curve (else ``{}``).

    Examples
    --------
    >>> scalars, curves = split_curves({"accuracy": 0.9, "roc_tpr@0": 0.2, "roc_tpr@1": 1.0})
    >>> scalars, curves["roc"][:1], len(curves["roc"])
    ({'accuracy': 0.9}, [0.2], 16)
    """
    scalars = {k: v for k, v in metrics.items() if not k.startswith(ROC_PREFIX)}
    if len(scalars) == len(metrics):
        return scalars, {}
    return scalars, {"roc": [float(metrics.get(f"{ROC_PREFIX}{f:g}", math.nan)) for f in ROC_FPR_GRID]}


def binary_metrics(
    y_true: np.ndarray, probability: np.ndarray, *, threshold: float = 0.5
) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC, sensitivity, specificity, log loss, calibration error, ROC curve.

    The ROC curve comes as one metric per point of :data:`ROC_FPR_GRID`
    (``roc_tpr@0.05``: the TPR at FPR 0.05); :func:`split_curves` gathers them.

    Parameters
    ----------
    y_true : numpy.ndarray
        Labels in {0, 1}; 1 is the positive (disease) class.
    probability : numpy.ndarray
        Predicted probability of the positive class.
    threshold : float
        Probability at or above which a case is called positive.

    Returns
    -------
    dict of str to float
        Metrics undefined on this data (sensitivity without positives, AUC
        with one class) are NaN.

    Examples
    --------
    >>> m = binary_metrics(np.array([0, 1, 1, 0]), np.array([0.2, 0.9, 0.4, 0.1]))
    >>> m["accuracy"], m["sensitivity"], m["specificity"]
    (0.75, 0.5, 1.0)
    """
    y = np.asarray(y_true).astype(np.int64)
    raw = np.asarray(probability, dtype=np.float64)
    p = np.clip(raw, _EPS, 1 - _EPS)  # for the log loss only
    predicted = raw >= threshold
    positives = y == 1
    tp = int(np.sum(predicted & positives))
    tn = int(np.sum(~predicted & ~positives))
    n_pos = int(positives.sum())
    n_neg = int(y.size - n_pos)
    sensitivity = tp / n_pos if n_pos else math.nan
    specificity = tn / n_neg if n_neg else math.nan
    defined = [v for v in (sensitivity, specificity) if not math.isnan(v)]
    log_loss = -float(np.mean(np.where(positives, np.log(p), np.log(1 - p)))) if y.size else math.nan
    return {
        "accuracy": (tp + tn) / y.size if y.size else math.nan,
        "balanced_accuracy": sum(defined) / len(defined) if defined else math.nan,
        "roc_auc": roc_auc(y, raw),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "log_loss": log_loss,
        "calibration_error": calibration_error(y, raw),
        **{f"{ROC_PREFIX}{f:g}": t for f, t in zip(ROC_FPR_GRID, roc_points(y, raw), strict=True)},
    }


def multiclass_metrics(y_true: np.ndarray, probability: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, log loss and calibration error for more than two classes.

    Parameters
    ----------
    y_true : numpy.ndarray
        Labels in ``0 .. k-1``.
    probability : numpy.ndarray
        ``(n, k)`` class probabilities.

    Returns
    -------
    dict of str to float

    Examples
    --------
    >>> p = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.5, 0.2, 0.3]])
    >>> round(multiclass_metrics(np.array([0, 1, 2]), p)["accuracy"], 3)
    0.667
    """
    y = np.asarray(y_true).astype(np.int64)
    p = np.clip(np.asarray(probability, dtype=np.float64), _EPS, 1.0)
    predicted = p.argmax(axis=1)
    recalls = [float(np.mean(predicted[y == c] == c)) for c in np.unique(y)]
    return {
        "accuracy": float(np.mean(predicted == y)) if y.size else math.nan,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else math.nan,
        "log_loss": -float(np.mean(np.log(p[np.arange(y.size), y]))) if y.size else math.nan,
        "calibration_error": calibration_error(y, np.asarray(probability, dtype=np.float64)),
    }


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index of risk scores against censored survival times.

    A pair of patients ``(i, j)`` is comparable when ``i`` had the event and
    ``j`` was still at risk after it: ``time[i] < time[j]``, or equal times
    with ``j`` censored (a patient censored at ``t`` outlived an event at
    ``t``; two events at the same time are not comparable). The index is the
    share of comparable pairs with ``risk[i] > risk[j]``, a tie in risk
    counting one half. This is the convention of ``lifelines.utils.concordance_index``
    (called with ``-risk``), which FLamby reports. Cost: O(events x n) time,
    O(n) memory.

    Parameters
    ----------
    time : numpy.ndarray
        ``(n,)`` follow-up times (any unit), to the event or to censoring.
    event : numpy.ndarray
        ``(n,)`` 1 where the event was observed, 0 where censored.
    risk : numpy.ndarray
        ``(n,)`` predicted risk; higher means an earlier event is expected.

    Returns
    -------
    float
        In [0, 1] (0.5 for random scores), or NaN when no pair is comparable.

    Raises
    ------
    ValueError
        If the three arrays do not have the same length.

    Examples
    --------
    >>> time = np.array([1.0, 2.0, 3.0, 4.0])
    >>> event = np.array([1, 1, 0, 1])
    >>> concordance_index(time, event, np.array([4.0, 3.0, 2.0, 1.0]))
    1.0
    >>> concordance_index(time, event, np.array([4.0, 1.0, 2.0, 1.0]))
    0.7
    """
    t = np.asarray(time, dtype=np.float64).reshape(-1)
    e = np.asarray(event).reshape(-1).astype(bool)
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    if not t.shape == e.shape == r.shape:
        raise ValueError(
            f"time, event and risk must have the same length, got {t.size}, {e.size} and {r.size}"
        )
    concordant = 0.0
    pairs = 0
    for i in np.flatnonzero(e):
        at_risk = (t > t[i]) | ((t == t[i]) & ~e)
        others = r[at_risk]
        pairs += others.size
        concordant += float(np.count_nonzero(r[i] > others)) + 0.5 * float(np.count_nonzero(r[i] == others))
    return concordant / pairs if pairs else math.nan


def aggregate_site_metrics(
    per_site: Mapping[str, Mapping[str, float]], examples: Mapping[str, int]
) -> dict[str, dict[str, float]]:
    """Combine per-site evaluation metrics into the two federation summaries.

    Parameters
    ----------
    per_site : Mapping[str, Mapping[str, float]]
        Metrics of each site on its own test split.
    examples : Mapping[str, int]
        Test examples at each site.

    Returns
    -------
    dict
        ``{"mean": ..., "pooled": ...}``: ``mean`` is the unweighted mean over
        sites (FLamby's metric); ``pooled`` weights each site by its test
        examples. Sites where a metric is undefined (NaN) are left out of it.

    Examples
    --------
    >>> out = aggregate_site_metrics({"a": {"accuracy": 1.0}, "b": {"accuracy": 0.5}},
    ...                              {"a": 30, "b": 10})
    >>> out["mean"]["accuracy"], out["pooled"]["accuracy"]
    (0.75, 0.875)
    """
    names: list[str] = sorted({name for metrics in per_site.values() for name in metrics})
    mean: dict[str, float] = {}
    pooled: dict[str, float] = {}
    for name in names:
        values: Sequence[tuple[float, int]] = [
            (float(metrics[name]), int(examples.get(site, 0)))
            for site, metrics in per_site.items()
            if name in metrics and not math.isnan(float(metrics[name]))
        ]
        if not values:
            mean[name] = pooled[name] = math.nan
            continue
        mean[name] = sum(v for v, _ in values) / len(values)
        weight = sum(n for _, n in values)
        pooled[name] = sum(v * n for v, n in values) / weight if weight else math.nan
    return {"mean": mean, "pooled": pooled}
