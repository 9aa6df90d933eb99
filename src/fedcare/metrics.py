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

__all__ = ["aggregate_site_metrics", "binary_metrics", "concordance_index", "multiclass_metrics", "roc_auc"]

_EPS = 1e-7


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


def binary_metrics(
    y_true: np.ndarray, probability: np.ndarray, *, threshold: float = 0.5
) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC, sensitivity, specificity, log loss.

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
    }


def multiclass_metrics(y_true: np.ndarray, probability: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and log loss for more than two classes.

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
