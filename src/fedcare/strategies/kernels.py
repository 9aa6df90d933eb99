"""Pure numpy kernels for aggregation. They write only to the ``out`` they are given."""

from __future__ import annotations

import numpy as np

__all__ = ["add_gaussian_noise", "clip_fold", "l2_norm", "weighted_fold"]

_CHUNK = 1 << 18  # 256 Ki elements: temporaries stay in cache, memory stays O(1)


def weighted_fold(out: np.ndarray, update: np.ndarray, weight: float) -> None:
    """``out += weight * update``, in float64 chunks so no model-sized temporary is made.

    Parameters
    ----------
    out : numpy.ndarray
        1-D float64 accumulator, changed in place.
    update : numpy.ndarray
        1-D array of the same length (float32).
    weight : float
        Scalar weight, e.g. the node's number of training examples.

    Examples
    --------
    >>> acc = np.zeros(3)
    >>> weighted_fold(acc, np.array([1, 2, 3], dtype=np.float32), 2.0)
    >>> acc.tolist()
    [2.0, 4.0, 6.0]
    """
    if out.shape != update.shape:
        raise ValueError(f"update has shape {update.shape}, accumulator {out.shape}")
    scratch = np.empty(min(_CHUNK, out.size), dtype=np.float64)
    for start in range(0, out.size, _CHUNK):
        stop = min(start + _CHUNK, out.size)
        part = scratch[: stop - start]
        np.multiply(update[start:stop], weight, out=part, dtype=np.float64)
        np.add(out[start:stop], part, out=out[start:stop])


def l2_norm(values: np.ndarray) -> float:
    """The L2 norm of a 1-D vector, summed in float64 chunks (no model-sized temporary).

    Parameters
    ----------
    values : numpy.ndarray
        1-D float array; read only.

    Returns
    -------
    float
        ``sqrt(sum(values ** 2))``, in the units of ``values``.

    Examples
    --------
    >>> l2_norm(np.array([3.0, 4.0], dtype=np.float32))
    5.0
    """
    scratch = np.empty(min(_CHUNK, values.size), dtype=np.float64)
    total = 0.0
    for start in range(0, values.size, _CHUNK):
        stop = min(start + _CHUNK, values.size)
        part = scratch[: stop - start]
        part[...] = values[start:stop]
        total += float(np.dot(part, part))
    return float(np.sqrt(total))


def clip_fold(out: np.ndarray, update: np.ndarray, clip_norm: float) -> float:
    """``out += min(1, clip_norm / ||update||) * update``; return ``||update||`` (L2, before clipping).

    An update no longer than ``clip_norm`` is folded in unchanged; a longer one
    is scaled onto the sphere of radius ``clip_norm``, so its contribution to
    ``out`` has norm exactly ``clip_norm``.

    Parameters
    ----------
    out : numpy.ndarray
        1-D float64 accumulator, changed in place.
    update : numpy.ndarray
        1-D array of the same length; read only.
    clip_norm : float
        The L2 bound (> 0), in the units of ``update``.

    Returns
    -------
    float
        The update's L2 norm before clipping.

    Raises
    ------
    ValueError
        If the shapes differ or ``clip_norm`` is not positive and finite.

    Examples
    --------
    >>> acc = np.zeros(2)
    >>> clip_fold(acc, np.array([3.0, 4.0], dtype=np.float32), 1.0)
    5.0
    >>> acc.round(6).tolist()
    [0.6, 0.8]
    >>> clip_fold(acc, np.array([0.1, 0.0], dtype=np.float32), 1.0) < 1.0
    True
    >>> acc.round(6).tolist()
    [0.7, 0.8]
    """
    if out.shape != update.shape:
        raise ValueError(f"update has shape {update.shape}, accumulator {out.shape}")
    if not (np.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm}")
    norm = l2_norm(update)
    weighted_fold(out, update, min(1.0, clip_norm / norm) if norm > 0 else 1.0)
    return norm


def add_gaussian_noise(out: np.ndarray, *, stddev: float, rng: np.random.Generator) -> None:
    """``out += N(0, stddev**2)`` independently per coordinate, drawn in chunks.

    Parameters
    ----------
    out : numpy.ndarray
        1-D float64 array, changed in place.
    stddev : float
        Standard deviation of the noise (>= 0), in the units of ``out``; 0 adds nothing.
    rng : numpy.random.Generator
        Source of the noise; for differential privacy, one seeded from the OS
        (``os.urandom``), never from a fixed or guessable seed.

    Raises
    ------
    ValueError
        If ``stddev`` is negative or not finite.

    Examples
    --------
    >>> acc = np.zeros(100_000)
    >>> add_gaussian_noise(acc, stddev=2.0, rng=np.random.default_rng(0))
    >>> round(float(acc.std()), 1)
    2.0
    """
    if not (np.isfinite(stddev) and stddev >= 0):
        raise ValueError(f"stddev must be a finite number >= 0, got {stddev}")
    if stddev == 0:
        return
    scratch = np.empty(min(_CHUNK, out.size), dtype=np.float64)
    for start in range(0, out.size, _CHUNK):
        stop = min(start + _CHUNK, out.size)
        part = scratch[: stop - start]
        rng.standard_normal(out=part)
        part *= stddev
        np.add(out[start:stop], part, out=out[start:stop])
