"""Feature standardization: per site, or with global statistics built from aggregates.

For federated normalization each site returns only its row count, per-feature
sums and per-feature sums of squares; the coordinator turns those into a
global mean and standard deviation. No row ever leaves the site. Images and
volumes are normalized per channel: each example contributes the mean of its
pixels and the mean of their squares, channel by channel, so the global
statistics are those of every pixel of every image (all images of a
federation have the plan's ``input_shape``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcare.errors import DataError, ProtocolError
from fedcare.tasks.base import SiteData, Split

__all__ = [
    "FeatureStats",
    "Standardization",
    "channel_moments",
    "checked_bounds",
    "combine_feature_stats",
    "feature_stats",
    "from_unit_moments",
    "private_feature_stats",
    "stats_sensitivity",
    "unit_moments",
]


@dataclass(frozen=True)
class FeatureStats:
    """Aggregates of one site's training features."""

    count: float
    sum: np.ndarray
    sum_of_squares: np.ndarray
    #: The public ``(low, high)`` bounds of each feature, ``(d, 2)``, sent with noisy statistics
    #: (differential privacy): the coordinator keeps the mean within them and the standard
    #: deviation between a sixteenth and a half of the range, however large the noise.
    bounds: np.ndarray | None = None


@dataclass(frozen=True)
class Standardization:
    """``(x - mean) / scale`` per feature."""

    mean: np.ndarray
    scale: np.ndarray

    def apply(self, split: Split) -> Split:
        """Return a standardized copy of ``split`` (the input is not changed; ``time`` is kept).

        For images and volumes ``(n, C, ...)`` the mean and scale are per channel.

        Examples
        --------
        >>> s = Standardization(mean=np.array([0.5]), scale=np.array([0.25]))
        >>> images = Split(x=np.full((2, 1, 2, 2), 0.75, np.float32), y=np.array([0, 1]))
        >>> s.apply(images).x[0, 0].tolist()
        [[1.0, 1.0], [1.0, 1.0]]
        """
        shape = (-1,) + (1,) * (split.x.ndim - 2)  # (C, 1, 1) for images: per channel
        x = (split.x - self.mean.reshape(shape)) / self.scale.reshape(shape)
        return Split(x=x.astype(np.float32, copy=False), y=split.y, time=split.time)

    def apply_site(self, data: SiteData) -> SiteData:
        """Standardize both splits of a site."""
        return SiteData(
            site=data.site, spec=data.spec, train=self.apply(data.train), test=self.apply(data.test)
        )

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardization:
        """Standardization from one array's own statistics (constant features keep scale 1)."""
        stats = feature_stats(x)
        return _from_moments(stats.count, stats.sum, stats.sum_of_squares)

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


def channel_moments(x: np.ndarray, *, bounds: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each example's values and squares, ``(n, d)`` each; per channel means for images.

    A table ``(n, d)`` gives ``x`` and ``x**2``; an image batch ``(n, C, ...)``
    gives, per example and channel, the mean of its pixels and the mean of
    their squares. With ``bounds = (low, high)`` (one pair per feature or
    channel), values are first clipped to the bounds and mapped to ``u = (x -
    mid) / (high - low)`` in ``[-1/2, 1/2]``.

    Examples
    --------
    >>> m, q = channel_moments(np.array([[[[0.0, 1.0]]]]))   # one 1x1x2 image
    >>> m.tolist(), q.tolist()
    ([[0.5]], [[0.5]])
    """
    values = np.asarray(x, dtype=np.float64)
    if bounds is not None:
        low, high = bounds
        shape = (1, -1) + (1,) * (values.ndim - 2)
        width, middle = (high - low).reshape(shape), ((high + low) / 2).reshape(shape)
        values = (np.clip(values, low.reshape(shape), high.reshape(shape)) - middle) / width
    if values.ndim <= 2:
        return values, np.square(values)
    axes = tuple(range(2, values.ndim))
    return values.mean(axis=axes), np.square(values).mean(axis=axes)


def feature_stats(x: np.ndarray) -> FeatureStats:
    """Row count, per-feature sums and sums of squares (float64); per channel for images.

    Examples
    --------
    >>> stats = feature_stats(np.ones((3, 2, 4, 4), np.float32))
    >>> stats.count, stats.sum.tolist(), stats.sum_of_squares.tolist()
    (3, [3.0, 3.0], [3.0, 3.0])
    """
    if x.ndim <= 2:
        return FeatureStats(
            count=int(x.shape[0]),
            sum=x.sum(axis=0, dtype=np.float64),
            sum_of_squares=np.square(x, dtype=np.float64).sum(axis=0),
        )
    values, squares = channel_moments(x)
    return FeatureStats(count=int(x.shape[0]), sum=values.sum(axis=0), sum_of_squares=squares.sum(axis=0))


#: With noisy statistics the standard deviation is kept above this share of a feature's public range.
_SCALE_FLOOR = 1 / 16


def stats_sensitivity(num_features: int) -> float:
    """L2 sensitivity of one record's ``(1, u, u**2)`` with ``u`` in ``[-1/2, 1/2]`` per feature.

    Examples
    --------
    >>> round(stats_sensitivity(13), 4)
    2.25
    """
    return float(np.sqrt(1.0 + num_features / 4 + num_features / 16))


def private_feature_stats(
    x: np.ndarray,
    *,
    bounds: Sequence[tuple[float, float]],
    noise_multiplier: float,
    rng: np.random.Generator,
) -> FeatureStats:
    """Row count, sums and sums of squares released with the Gaussian mechanism.

    Each feature is clipped to its public bounds ``[lo, hi]`` and mapped to
    ``u = (x - mid) / (hi - lo)`` in ``[-1/2, 1/2]``. Adding or removing one
    record changes ``(count, sum u, sum u**2)`` by at most
    :func:`stats_sensitivity` in L2 norm; Gaussian noise of
    ``noise_multiplier`` times that is added to each, and the noisy moments
    are mapped back to the original units (post-processing, free of privacy
    cost). The release is one Gaussian mechanism with sampling rate 1.

    Parameters
    ----------
    x : numpy.ndarray
        ``(n, d)`` training features, or ``(n, d, ...)`` images with ``d``
        channels (each image contributes its per-channel pixel means); read only.
    bounds : sequence of (float, float)
        ``d`` public bounds, each with ``lo < hi``.
    noise_multiplier : float
        Noise standard deviation over the sensitivity.
    rng : numpy.random.Generator
        The noise source (seeded from the OS in deployments).

    Returns
    -------
    FeatureStats
        With a real-valued (noisy) ``count``.

    Raises
    ------
    DataError
        If ``bounds`` does not give one ``lo < hi`` pair per feature.

    Examples
    --------
    >>> x = np.array([[0.0], [1.0]] * 50)
    >>> stats = private_feature_stats(x, bounds=[(0.0, 1.0)], noise_multiplier=1e-9,
    ...                               rng=np.random.default_rng(0))
    >>> round(float(stats.count), 3), round(float(stats.sum[0]), 3), round(float(stats.sum_of_squares[0]), 3)
    (100.0, 50.0, 50.0)
    """
    low, high = checked_bounds(bounds, width=x.shape[1])
    count, sum_u, squares_u = unit_moments(x, low=low, high=high)
    scale = noise_multiplier * stats_sensitivity(x.shape[1])
    count += rng.normal(0.0, scale)
    sum_u += rng.normal(0.0, scale, size=x.shape[1])
    squares_u += rng.normal(0.0, scale, size=x.shape[1])
    return from_unit_moments(count, sum_u, squares_u, low=low, high=high)


def checked_bounds(bounds: Sequence[tuple[float, float]], *, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` arrays of ``width`` public bounds.

    Raises
    ------
    DataError
        If ``bounds`` does not give one ``lo < hi`` pair per feature.
    """
    low = np.array([b[0] for b in bounds], dtype=np.float64)
    high = np.array([b[1] for b in bounds], dtype=np.float64)
    if low.shape != (width,) or not (high > low).all():
        raise DataError(
            f"feature statistics with differential privacy or secure aggregation need one public (low, high) "
            f"bound per feature, low < high; got {len(bounds)} bounds for {width} features"
        )
    return low, high


def unit_moments(x: np.ndarray, *, low: np.ndarray, high: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """``(count, sum u, sum u**2)`` of the values mapped into ``[-1/2, 1/2]`` by their bounds."""
    u, squares = channel_moments(x, bounds=(low, high))
    return float(x.shape[0]), u.sum(axis=0), squares.sum(axis=0)


def from_unit_moments(
    count: float, sum_u: np.ndarray, squares_u: np.ndarray, *, low: np.ndarray, high: np.ndarray
) -> FeatureStats:
    """Map moments of ``u = (x - mid) / (high - low)`` back to the original units (post-processing)."""
    width, middle = high - low, (high + low) / 2
    return FeatureStats(
        count=count,
        sum=middle * count + width * sum_u,
        sum_of_squares=middle**2 * count + 2 * middle * width * sum_u + width**2 * squares_u,
        bounds=np.stack([low, high], axis=1),
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
    bounds = next((s.bounds for s in stats if s.bounds is not None), None)
    if bounds is not None:
        # Noisy statistics: the noise may even make the count negative; the public bounds keep
        # the standardization sane however large it is.
        count = max(count, 1.0)
    return _from_moments(count, total, squares, bounds=bounds)


def _from_moments(
    count: float, total: np.ndarray, squares: np.ndarray, *, bounds: np.ndarray | None = None
) -> Standardization:
    if count <= 0:
        raise ProtocolError("feature statistics cover no rows")
    mean = total / count
    variance = np.maximum(squares / count - mean**2, 0.0)
    scale = np.sqrt(variance)
    if bounds is not None:
        low, high = bounds[:, 0], bounds[:, 1]
        np.clip(mean, low, high, out=mean)
        np.clip(scale, (high - low) * _SCALE_FLOOR, (high - low) / 2, out=scale)
    scale[scale < 1e-12] = 1.0
    return Standardization(mean=mean, scale=scale)
