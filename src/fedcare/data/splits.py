"""Partitioners and splitters: pure functions of arrays and an explicit generator."""

from __future__ import annotations

import numpy as np

from fedcare.errors import ConfigError

__all__ = ["dirichlet_partition", "iid_partition", "stratified_split"]


def stratified_split(
    y: np.ndarray, *, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into train and test, keeping each class's share.

    Parameters
    ----------
    y : numpy.ndarray
        Labels.
    test_fraction : float
        Share of each class that goes to the test split, in (0, 1).
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    (train_index, test_index) : tuple of numpy.ndarray
        Sorted row indices.

    Examples
    --------
    >>> tr, te = stratified_split(np.array([0] * 8 + [1] * 4), test_fraction=0.25,
    ...                           rng=np.random.default_rng(0))
    >>> len(tr), len(te)
    (9, 3)
    """
    if not 0 < test_fraction < 1:
        raise ConfigError(f"must be in (0, 1), got {test_fraction}", field="test_fraction")
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(len(rows) * test_fraction))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def iid_partition(n: int, *, num_parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``n`` row indices and deal them into ``num_parts`` near-equal parts.

    Examples
    --------
    >>> [len(p) for p in iid_partition(10, num_parts=3, rng=np.random.default_rng(0))]
    [4, 3, 3]
    """
    if num_parts > n:
        raise ConfigError(f"cannot split {n} rows into {num_parts} sites", field="num_nodes")
    return [np.sort(part) for part in np.array_split(rng.permutation(n), num_parts)]


def dirichlet_partition(
    y: np.ndarray,
    *,
    num_parts: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed partition: each class is shared out by Dirichlet(alpha) proportions.

    Redraws until every part holds at least ``min_size`` rows.

    Raises
    ------
    ConfigError
        If no draw within ``max_tries`` gives every part ``min_size`` rows.

    Examples
    --------
    >>> y = np.array([0, 1] * 50)
    >>> parts = dirichlet_partition(y, num_parts=4, alpha=0.5, rng=np.random.default_rng(0))
    >>> sum(len(p) for p in parts)
    100
    """
    if num_parts * min_size > len(y):
        raise ConfigError(
            f"cannot give {num_parts} sites {min_size} rows each from {len(y)} rows",
            field="num_nodes",
        )
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for label in np.unique(y):
            rows = rng.permutation(np.flatnonzero(y == label))
            shares = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for part, chunk in zip(parts, np.split(rows, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) draw gave every one of {num_parts} sites "
        f"{min_size} rows; raise dirichlet_alpha or lower num_nodes",
        field="plan.dataset.dirichlet_alpha",
    )
