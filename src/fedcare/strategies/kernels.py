"""Pure numpy kernels for aggregation. They write only to the ``out`` they are given."""

from __future__ import annotations

import numpy as np

__all__ = [
    "add_gaussian_noise",
    "adaptive_server_step",
    "clip_fold",
    "coordinate_median",
    "krum_scores",
    "l2_norm",
    "trimmed_mean",
    "weighted_fold",
    "weiszfeld",
]

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


def _check_stack(updates: np.ndarray, out: np.ndarray | None = None) -> None:
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be a non-empty (nodes, elements) array, got shape {updates.shape}")
    if out is not None and out.shape != updates.shape[1:]:
        raise ValueError(f"out has shape {out.shape}, updates have {updates.shape[1]} elements")


def coordinate_median(updates: np.ndarray, out: np.ndarray) -> None:
    """``out[j] = median_i updates[i, j]``, coordinate by coordinate (Yin et al. 2018).

    With an even number of rows the median is the mean of the two middle values.

    Parameters
    ----------
    updates : numpy.ndarray
        ``(nodes, elements)`` array, one update per row; read only.
    out : numpy.ndarray
        ``(elements,)`` float64 array, overwritten.

    Raises
    ------
    ValueError
        If the shapes do not fit or there is no update.

    Examples
    --------
    >>> out = np.empty(2)
    >>> coordinate_median(np.array([[1.0, 10.0], [2.0, -5.0], [100.0, 0.0]]), out)
    >>> out.tolist()
    [2.0, 0.0]
    """
    _check_stack(updates, out)
    for start in range(0, out.size, _CHUNK):
        stop = min(start + _CHUNK, out.size)
        # a float64 copy of the chunk, so the mean of two middle values is exact and the input is never reordered
        chunk = updates[:, start:stop].astype(np.float64)
        np.median(chunk, axis=0, overwrite_input=True, out=out[start:stop])


def trimmed_mean(updates: np.ndarray, trim: int, out: np.ndarray) -> None:
    """Coordinate-wise mean after dropping the ``trim`` largest and ``trim`` smallest values.

    Parameters
    ----------
    updates : numpy.ndarray
        ``(nodes, elements)`` array, one update per row; read only.
    trim : int
        Values dropped at each end of every coordinate (``0 <= 2 * trim < nodes``).
    out : numpy.ndarray
        ``(elements,)`` float64 array, overwritten.

    Raises
    ------
    ValueError
        If ``trim`` is negative or ``2 * trim >= nodes``, or the shapes do not fit.

    Examples
    --------
    >>> out = np.empty(2)
    >>> trimmed_mean(np.array([[1.0, 4.0], [2.0, -50.0], [3.0, 5.0], [100.0, 6.0]]), 1, out)
    >>> out.tolist()
    [2.5, 4.5]
    """
    _check_stack(updates, out)
    count = updates.shape[0]
    if trim < 0 or 2 * trim >= count:
        raise ValueError(f"trim must satisfy 0 <= 2 * trim < {count} updates, got trim={trim}")
    for start in range(0, out.size, _CHUNK):
        stop = min(start + _CHUNK, out.size)
        ordered = np.sort(updates[:, start:stop], axis=0)  # a sorted copy; the input stays as it is
        np.mean(ordered[trim : count - trim], axis=0, dtype=np.float64, out=out[start:stop])


def krum_scores(updates: np.ndarray, num_byzantine: int) -> np.ndarray:
    """Krum score of every update: sum of squared L2 distances to its ``n - f - 2`` nearest others.

    Blanchard et al. (2017). Distances are computed row against row in
    float64 (no Gram-matrix cancellation), so memory is O(elements) beyond the input.

    Parameters
    ----------
    updates : numpy.ndarray
        ``(n, elements)`` array, one update per row; read only.
    num_byzantine : int
        ``f``, the number of updates that may be adversarial; needs ``n > 2 * f + 2``.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` float64 scores (squared units of ``updates``); lower is more central.

    Raises
    ------
    ValueError
        If ``num_byzantine`` is negative or ``n <= 2 * f + 2``.

    Examples
    --------
    >>> scores = krum_scores(np.array([[0.0], [1.0], [2.0], [3.0], [50.0]]), 1)
    >>> scores.tolist()
    [5.0, 2.0, 2.0, 5.0, 4513.0]
    """
    _check_stack(updates)
    count = updates.shape[0]
    if num_byzantine < 0 or count <= 2 * num_byzantine + 2:
        raise ValueError(f"Krum needs more than 2 * f + 2 updates, got {count} with f={num_byzantine}")
    distances = np.zeros((count, count), dtype=np.float64)
    row = np.empty(updates.shape[1], dtype=np.float64)
    for i in range(count):
        for j in range(i + 1, count):
            np.subtract(updates[i], updates[j], out=row, dtype=np.float64)
            distances[i, j] = distances[j, i] = float(np.dot(row, row))
    neighbours = count - num_byzantine - 2
    scores = np.empty(count, dtype=np.float64)
    for i in range(count):
        others = np.delete(distances[i], i)
        scores[i] = float(np.sum(np.partition(others, neighbours - 1)[:neighbours])) if neighbours > 0 else 0.0
    return scores


def weiszfeld(
    updates: np.ndarray,
    out: np.ndarray,
    *,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
    smoothing: float = 1e-6,
) -> int:
    """Smoothed Weiszfeld iterations towards the geometric median of the rows (Pillutla et al. 2022, RFA).

    Starting from the mean, each step is ``v <- sum(b_i x_i) / sum(b_i)`` with
    ``b_i = 1 / max(smoothing, ||v - x_i||)``; it stops when the objective
    ``sum_i ||v - x_i||`` improves by less than ``tolerance`` times itself, or
    after ``max_iterations`` steps. Rows are equally weighted.

    Parameters
    ----------
    updates : numpy.ndarray
        ``(nodes, elements)`` array, one update per row; read only.
    out : numpy.ndarray
        ``(elements,)`` float64 array, overwritten with the estimate.
    max_iterations : int
        At most this many Weiszfeld steps (>= 1).
    tolerance : float
        Relative improvement of the objective below which it stops (> 0).
    smoothing : float
        ``nu``: distances below it count as ``nu`` (> 0), so a step never divides by zero.

    Returns
    -------
    int
        The number of steps taken.

    Raises
    ------
    ValueError
        If the shapes do not fit or a setting is out of range.

    Examples
    --------
    >>> out = np.empty(2)
    >>> points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1000.0, 1000.0]])
    >>> steps = weiszfeld(points, out, max_iterations=500, tolerance=1e-12)
    >>> bool(np.all(np.abs(out - 0.5) < 0.5)), steps > 1
    (True, True)
    """
    _check_stack(updates, out)
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    if not (np.isfinite(tolerance) and tolerance > 0) or not (np.isfinite(smoothing) and smoothing > 0):
        raise ValueError(f"tolerance and smoothing must be positive and finite, got {tolerance} and {smoothing}")
    count = updates.shape[0]
    np.mean(updates, axis=0, dtype=np.float64, out=out)
    row = np.empty(out.size, dtype=np.float64)

    def distances() -> np.ndarray:
        result = np.empty(count, dtype=np.float64)
        for i in range(count):
            np.subtract(out, updates[i], out=row, dtype=np.float64)
            result[i] = float(np.sqrt(np.dot(row, row)))
        return result

    current = distances()
    objective = float(current.sum())
    steps = 0
    while steps < max_iterations:
        steps += 1
        betas = 1.0 / np.maximum(current, smoothing)
        out.fill(0.0)
        for i in range(count):
            weighted_fold(out, updates[i], float(betas[i]))
        out /= float(betas.sum())
        current = distances()
        previous, objective = objective, float(current.sum())
        if abs(previous - objective) <= tolerance * objective:
            break
    return steps


def adaptive_server_step(
    weights: np.ndarray,
    first_moment: np.ndarray,
    second_moment: np.ndarray,
    delta: np.ndarray,
    *,
    rule: str,
    learning_rate: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> None:
    """One FedOpt server step (Reddi et al. 2021, Algorithm 2), in place on the three buffers.

    ``m = b1 m + (1 - b1) d``; then ``v += d**2`` (``adagrad``),
    ``v -= (1 - b2) d**2 sign(v - d**2)`` (``yogi``) or
    ``v = b2 v + (1 - b2) d**2`` (``adam``); then
    ``x += learning_rate * m / (sqrt(v) + tau)``. No bias correction, as in the paper.
    Works in float64 chunks, so no model-sized temporary is made.

    Parameters
    ----------
    weights : numpy.ndarray
        1-D float64 global weights ``x``, changed in place.
    first_moment : numpy.ndarray
        1-D float64 ``m``, changed in place (start at 0).
    second_moment : numpy.ndarray
        1-D float64 ``v``, changed in place (start at ``tau**2``, as the paper's ``v_{-1} >= tau**2``).
    delta : numpy.ndarray
        1-D averaged update ``d`` (pseudo-gradient, new - global); read only.
    rule : {"adam", "yogi", "adagrad"}
        The second-moment rule.
    learning_rate : float
        Server step size ``eta`` (> 0), in weight units per unit of ``m / sqrt(v)``.
    beta1, beta2 : float
        Moment decay rates in [0, 1).
    tau : float
        Adaptivity (> 0): larger is closer to server SGD with momentum.

    Raises
    ------
    ValueError
        If the shapes differ or ``rule`` is unknown.

    Examples
    --------
    >>> x, m, v = np.zeros(2), np.zeros(2), np.full(2, 1e-6)
    >>> adaptive_server_step(x, m, v, np.array([1.0, -2.0]), rule="adagrad",
    ...                      learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    >>> m.round(6).tolist(), v.round(6).tolist()
    ([0.1, -0.2], [1.000001, 4.000001])
    >>> x.round(4).tolist()
    [0.01, -0.01]
    """
    if not weights.shape == first_moment.shape == second_moment.shape == delta.shape:
        raise ValueError(
            f"shapes differ: weights {weights.shape}, moments {first_moment.shape} and "
            f"{second_moment.shape}, delta {delta.shape}"
        )
    if rule not in ("adam", "yogi", "adagrad"):
        raise ValueError(f"rule must be adam, yogi or adagrad, got {rule!r}")
    size = min(_CHUNK, weights.size)
    squared = np.empty(size, dtype=np.float64)
    scratch = np.empty(size, dtype=np.float64)
    for start in range(0, weights.size, _CHUNK):
        stop = min(start + _CHUNK, weights.size)
        d2, tmp = squared[: stop - start], scratch[: stop - start]
        m, v, x = first_moment[start:stop], second_moment[start:stop], weights[start:stop]
        tmp[...] = delta[start:stop]
        np.multiply(tmp, tmp, out=d2)
        # m = b1 m + (1 - b1) d
        np.multiply(m, beta1, out=m)
        np.multiply(tmp, 1.0 - beta1, out=tmp)
        np.add(m, tmp, out=m)
        if rule == "adagrad":
            np.add(v, d2, out=v)
        elif rule == "yogi":
            np.subtract(v, d2, out=tmp)
            np.sign(tmp, out=tmp)
            np.multiply(tmp, d2, out=tmp)
            np.multiply(tmp, 1.0 - beta2, out=tmp)
            np.subtract(v, tmp, out=v)
        else:
            np.multiply(v, beta2, out=v)
            np.multiply(d2, 1.0 - beta2, out=d2)
            np.add(v, d2, out=v)
        np.sqrt(v, out=tmp)
        np.add(tmp, tau, out=tmp)
        np.divide(m, tmp, out=tmp)
        np.multiply(tmp, learning_rate, out=tmp)
        np.add(x, tmp, out=x)
