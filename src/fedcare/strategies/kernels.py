"""Pure numpy kernels for aggregation. They write only to the ``out`` they are given."""

from __future__ import annotations

import numpy as np

__all__ = ["weighted_fold"]

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
