"""Feature standardization: per site, or with global statistics built from aggregates.

For federated normalization each site returns only its row count, per-feature
sums and per-feature sums of squares; the coordinator turns those into a
global mean and standard deviation. No row ever leaves the site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcare.errors import ProtocolError
from fedcare.tasks.base import SiteData, Split

__all__ = ["FeatureStats", "Standardization", "combine_feature_stats", "feature_stats"]


@dataclass(frozen=True)
class FeatureStats:
    """Aggregates of one site's training features."""

    count: int
    sum: np.ndarray
    sum_of_squares: np.ndarray


@dataclass(frozen=True)
class Standardization:
    """``(x - mean) / scale`` per feature."""

    mean: np.ndarray
    scale: np.ndarray

    def apply(self, split: Split) -> Split:
        """Return a standardized copy of ``split`` (the input is not changed)."""
        x = (split.x - self.mean) / self.scale
        return Split(x=x.astype(np.float32, copy=False), y=split.y)

    def apply_site(self, data: SiteData) -> SiteData:
        """Standardize both splits of a site."""
        return SiteData(
            site=data.site, spec=data.spec, train=self.apply(data.train), test=self.apply(data.test)
        )

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardization:
        """Standardization from one array's own statistics (constant features keep scale 1)."""
        return _from_moments(len(x), x.sum(axis=0, dtype=np.float64), np.square(x, dtype=np.float64).sum(axis=0))

    def to_config(self) -> dict[str, list[float]]:
        """JSON-able form sent to the nodes in each job's config."""
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_config(cls, value: dict[str, list[float]], *, num_features: int) -> Standardization:
        """Inverse of :meth:`to_config`, checking the width.

        Raises
        ------
        ProtocolError
            If the vectors do not have ``num_features`` finite entries or a scale is not positive.
        """
        mean = np.asarray(value.get("mean", ()), dtype=np.float64)
        scale = np.asarray(value.get("scale", ()), dtype=np.float64)
        if mean.shape != (num_features,) or scale.shape != (num_features,):
            raise ProtocolError(
                f"normalization has {mean.size} means and {scale.size} scales, "
                f"the data has {num_features} features"
            )
        if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise ProtocolError("normalization statistics must be finite with positive scales")
        return cls(mean=mean, scale=scale)


def feature_stats(x: np.ndarray) -> FeatureStats:
    """Row count, per-feature sums and sums of squares (float64)."""
    return FeatureStats(
        count=int(x.shape[0]),
        sum=x.sum(axis=0, dtype=np.float64),
        sum_of_squares=np.square(x, dtype=np.float64).sum(axis=0),
    )


def combine_feature_stats(stats: Sequence[FeatureStats]) -> Standardization:
    """Global mean and population standard deviation from sites' aggregates.

    Examples
    --------
    >>> a, b = np.array([[1.0], [3.0]]), np.array([[5.0], [7.0]])
    >>> s = combine_feature_stats([feature_stats(a), feature_stats(b)])
    >>> float(s.mean[0]), round(float(s.scale[0]), 4)
    (4.0, 2.2361)
    """
    if not stats:
        raise ProtocolError("no site returned feature statistics")
    count = sum(s.count for s in stats)
    total = np.sum([s.sum for s in stats], axis=0)
    squares = np.sum([s.sum_of_squares for s in stats], axis=0)
    return _from_moments(count, total, squares)


def _from_moments(count: int, total: np.ndarray, squares: np.ndarray) -> Standardization:
    if count <= 0:
        raise ProtocolError("feature statistics cover no rows")
    mean = total / count
    variance = np.maximum(squares / count - mean**2, 0.0)
    scale = np.sqrt(variance)
    scale[scale < 1e-12] = 1.0
    return Standardization(mean=mean, scale=scale)
