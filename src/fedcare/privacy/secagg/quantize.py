"""Clipping and stochastic quantization of float vectors into the ring Z_2^32 (or Z_2^16).

SecAgg adds vectors of 32-bit unsigned integers modulo ``2**32``. A float
vector gets there in three pure steps:

1. clip every coordinate to ``[-clip, clip]`` (:func:`clip_values` counts how
   many coordinates it changed);
2. multiply by ``scale`` and round stochastically (up with probability equal to
   the fractional part, so the rounding is unbiased), giving integers in
   ``[-(clip * scale + 1), clip * scale + 1]`` stored as two's complement
   ``uint32`` (:func:`quantize`);
3. after the modular sum, read the total as ``int32`` and divide by ``scale``
   (:func:`dequantize_sum`).

The sum cannot wrap if ``max_nodes * (clip * scale + 1) <= 2**31 - 1``:
:func:`max_scale` gives the largest such scale and :func:`check_headroom`
refuses a configuration that breaks it. The dequantized sum of ``n`` vectors is
within ``n / scale`` of the sum of the clipped vectors, per coordinate
(:func:`quantization_error_bound`).

A narrower ring, Z_2^16 (``ring_bits=16``, for compressed uploads), works the
same way with ``2**15 - 1`` in place of ``2**31 - 1``: the values are still
``uint32`` words, of which only the low 16 bits count (the low 16 bits of a
sum modulo ``2**32`` are the sum modulo ``2**16``), and :func:`dequantize_sum`
reads the low 16 bits of the total as ``int16``. The scale is then about
65,536 times smaller, and so the error bound about 65,536 times larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedcare.errors import ConfigError, ProtocolError

__all__ = [
    "RING_BITS",
    "Quantized",
    "check_headroom",
    "clip_values",
    "dequantize_sum",
    "max_scale",
    "quantization_error_bound",
    "quantize",
]

#: The ring widths a secure sum can use: Z_2^32 (the default) and Z_2^16 (compressed uploads).
RING_BITS = (16, 32)
_INT32_MAX = 2**31 - 1
_CHUNK = 1 << 18  # elements per step: float64 temporaries stay at 2 MB


def _largest_sum(ring_bits: int) -> int:
    """``2**(ring_bits - 1) - 1``: the largest sum whose sign the ring still shows."""
    if ring_bits not in RING_BITS:
        raise ConfigError(f"must be one of {RING_BITS}, got {ring_bits!r}", field="secagg.ring_bits")
    return (1 << (ring_bits - 1)) - 1


def max_scale(*, clip: float, max_nodes: int, ring_bits: int = 32) -> float:
    """The largest scale at which the sum of ``max_nodes`` quantized vectors cannot wrap.

    Parameters
    ----------
    clip : float
        Coordinates are clipped to ``[-clip, clip]`` (> 0, in the units of the update).
    max_nodes : int
        The most vectors that will ever be summed (>= 1).
    ring_bits : {32, 16}
        The width of the ring the sum is taken in.

    Returns
    -------
    float
        ``(floor((2**(ring_bits - 1) - 1) / max_nodes) - 2) / clip``, quantization steps per unit.

    Raises
    ------
    ConfigError
        If ``clip`` is not a positive finite number, ``ring_bits`` is not 16 or
        32, or ``max_nodes`` is so large that no scale of at least 1 step per
        ``clip`` fits (field ``secagg.max_nodes``).

    Examples
    --------
    >>> round(max_scale(clip=1.0, max_nodes=100))
    21474834
    >>> round(max_scale(clip=1.0, max_nodes=100, ring_bits=16))
    325
    >>> check_headroom(clip=1e-4, scale=max_scale(clip=1e-4, max_nodes=4), max_nodes=4)
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"must be a positive finite number, got {clip}", field="secagg.clip")
    if max_nodes < 1:
        raise ConfigError(f"must be >= 1, got {max_nodes}", field="secagg.max_nodes")
    largest = _largest_sum(ring_bits)
    # ceil(clip * scale) + 1 per node must fit max_nodes times: keep a step of margin for float rounding.
    scale = (largest // max_nodes - 2) / clip
    if scale * clip < 1.0:
        raise ConfigError(
            f"{max_nodes} nodes leave no room in the {ring_bits}-bit ring for even one quantization step per clip; "
            "use fewer nodes per aggregation",
            field="secagg.max_nodes",
        )
    return scale


def check_headroom(*, clip: float, scale: float, max_nodes: int, ring_bits: int = 32) -> None:
    """Refuse a (clip, scale, max_nodes) with which the modular sum could wrap.

    Parameters
    ----------
    clip : float
        Clipping bound per coordinate (> 0).
    scale : float
        Quantization steps per unit (> 0).
    max_nodes : int
        The most vectors summed (>= 1).
    ring_bits : {32, 16}
        The width of the ring the sum is taken in.

    Raises
    ------
    ConfigError
        Naming ``secagg.scale`` when ``max_nodes * (clip * scale + 1)`` exceeds
        ``2**(ring_bits - 1) - 1``, the largest sum whose sign can still be read back.

    Examples
    --------
    >>> check_headroom(clip=1.0, scale=1000.0, max_nodes=100)
    >>> check_headroom(clip=1.0, scale=1e8, max_nodes=100)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: secagg.scale: the sum of 100 nodes could reach 10000000100 ...
    >>> check_headroom(clip=1.0, scale=1000.0, max_nodes=100, ring_bits=16)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: secagg.scale: the sum of 100 nodes could reach 100100 > 2**15 - 1 and wrap the 16-bit ring; ...
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"must be a positive finite number, got {clip}", field="secagg.clip")
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"must be a positive finite number, got {scale}", field="secagg.scale")
    if max_nodes < 1:
        raise ConfigError(f"must be >= 1, got {max_nodes}", field="secagg.max_nodes")
    largest = _largest_sum(ring_bits)
    worst = max_nodes * (math.ceil(clip * scale) + 1)
    if worst > largest:
        raise ConfigError(
            f"the sum of {max_nodes} nodes could reach {worst} > 2**{ring_bits - 1} - 1 and wrap the "
            f"{ring_bits}-bit ring; use a scale of at most "
            f"{max_scale(clip=clip, max_nodes=max_nodes, ring_bits=ring_bits):.6g}",
            field="secagg.scale",
        )


def clip_values(values: np.ndarray, *, clip: float, out: np.ndarray) -> int:
    """Write ``values`` clipped to ``[-clip, clip]`` into ``out``; return how many changed.

    Parameters
    ----------
    values : numpy.ndarray
        1-D float array; read only.
    clip : float
        The bound (> 0).
    out : numpy.ndarray
        1-D float array of the same length, written to (may be ``values`` itself
        only if the caller owns it).

    Returns
    -------
    int
        The number of coordinates outside ``[-clip, clip]``.

    Raises
    ------
    ProtocolError
        If a value is NaN or infinite: such an update cannot be aggregated.

    Examples
    --------
    >>> out = np.empty(4)
    >>> clip_values(np.array([-3.0, 0.5, 2.0, 1.0]), clip=1.0, out=out)
    2
    >>> out.tolist()
    [-1.0, 0.5, 1.0, 1.0]
    """
    if not np.isfinite(values).all():
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise ProtocolError(f"{bad} coordinates are NaN or infinite; fix the update before aggregation", field="update")
    clipped = int(np.count_nonzero(np.abs(values) > clip))
    np.clip(values, -clip, clip, out=out)
    return clipped


@dataclass(frozen=True)
class Quantized:
    """A vector quantized into Z_2^32 and how many of its coordinates were clipped.

    Attributes
    ----------
    values : numpy.ndarray
        1-D ``uint32``: the rounded ``clip(x) * scale`` in two's complement.
    num_clipped : int
        Coordinates that were outside ``[-clip, clip]`` before rounding.
    """

    values: np.ndarray
    num_clipped: int


def quantize(values: np.ndarray, *, clip: float, scale: float, rng: np.random.Generator) -> Quantized:
    """Clip, scale and stochastically round a float vector into ``uint32``.

    Works in chunks of 262,144 coordinates, so the temporaries stay at a few MB
    whatever the length.

    Parameters
    ----------
    values : numpy.ndarray
        1-D float array (float32 or float64); read only.
    clip : float
        Clipping bound per coordinate (> 0).
    scale : float
        Quantization steps per unit; check it with :func:`check_headroom`.
    rng : numpy.random.Generator
        Source of the rounding dither.

    Returns
    -------
    Quantized

    Raises
    ------
    ProtocolError
        If ``values`` is not 1-D or holds NaN or infinity.
    ConfigError
        If ``clip`` or ``scale`` is not positive or ``clip * scale + 1`` does not fit in int32.

    Examples
    --------
    >>> q = quantize(np.array([0.25, -2.0]), clip=1.0, scale=4.0, rng=np.random.default_rng(0))
    >>> q.values.view(np.int32).tolist(), q.num_clipped
    ([1, -4], 1)
    """
    check_headroom(clip=clip, scale=scale, max_nodes=1)
    if values.ndim != 1:
        raise ProtocolError(f"must be 1-D, got shape {values.shape}", field="update")
    out = np.empty(values.size, dtype=np.uint32)
    scratch = np.empty(min(_CHUNK, values.size), dtype=np.float64)
    num_clipped = 0
    for start in range(0, values.size, _CHUNK):
        stop = min(start + _CHUNK, values.size)
        part = scratch[: stop - start]
        num_clipped += clip_values(values[start:stop], clip=clip, out=part)
        part *= scale
        part += rng.random(stop - start)
        np.floor(part, out=part)
        out[start:stop] = part.astype(np.int32).view(np.uint32)
    return Quantized(values=out, num_clipped=num_clipped)


def dequantize_sum(total: np.ndarray, *, scale: float, ring_bits: int = 32) -> np.ndarray:
    """Turn a modular sum of quantized vectors back into floats.

    Parameters
    ----------
    total : numpy.ndarray
        1-D ``uint32``, the sum modulo ``2**32`` (for ``ring_bits=16``, only its
        low 16 bits are read); read only.
    scale : float
        The scale the vectors were quantized with.
    ring_bits : {32, 16}
        The width of the ring the sum was taken in.

    Returns
    -------
    numpy.ndarray
        float64, ``int32(total) / scale`` (``int16(total mod 2**16) / scale`` for 16 bits).

    Examples
    --------
    >>> a = quantize(np.array([0.5, -0.75]), clip=1.0, scale=4.0, rng=np.random.default_rng(0)).values
    >>> b = quantize(np.array([-1.0, 0.25]), clip=1.0, scale=4.0, rng=np.random.default_rng(1)).values
    >>> dequantize_sum(a + b, scale=4.0).tolist()
    [-0.5, -0.5]
    >>> dequantize_sum(np.array([2**16 - 2, 2**20 + 3], dtype=np.uint32), scale=4.0, ring_bits=16).tolist()
    [-0.5, 0.75]
    """
    if total.dtype != np.uint32:
        raise ProtocolError(f"must be uint32, got {total.dtype}", field="total")
    _largest_sum(ring_bits)
    if ring_bits == 16:
        # astype keeps the low 16 bits (the sum modulo 2**16); the int16 view reads their sign.
        return total.astype(np.uint16).view(np.int16).astype(np.float64) / scale
    return total.view(np.int32).astype(np.float64) / scale


def quantization_error_bound(*, scale: float, num_summed: int) -> float:
    """Worst-case per-coordinate error of a dequantized sum against the sum of clipped floats.

    Each stochastic rounding moves a value by less than one step, ``1 / scale``,
    so the sum of ``num_summed`` vectors is off by less than ``num_summed / scale``
    (the typical error is about ``sqrt(num_summed) / (2 * scale)``). The ring
    enters through the scale: the default one is :func:`max_scale` of the
    ring, so in the 16-bit ring the bound is about 65,536 times that of the
    32-bit ring (for 4 sites and ``clip=1``: 4.9e-4 instead of 7.5e-9).

    Examples
    --------
    >>> quantization_error_bound(scale=1000.0, num_summed=10)
    0.01
    >>> f"{quantization_error_bound(scale=max_scale(clip=1.0, max_nodes=4, ring_bits=16), num_summed=4):.2g}"
    '0.00049'
    """
    return num_summed / scale
