"""The ring and wire form of a secure sum: its width, its per-round settings, the packed masked input.

Without compression the sum is taken modulo ``2**32`` and each masked word
travels as it is. With ``compression.method`` ``int8``, ``float16`` or
``bfloat16`` it is taken modulo ``2**16`` (:func:`secure_ring_bits`): the
node sends the low 16 bits of each masked word, two to a transported word
(:func:`masked_parameters`), and the coordinator unpacks them into its
``uint32`` running sum (:func:`masked_words`). :func:`round_settings` picks
the scale for the ring and refuses a round whose ring would wrap, or (16
bits) would hold fewer quantization steps per ``clip`` than the method keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

from fedcare.errors import ConfigError, ProtocolError
from fedcare.params import Parameters
from fedcare.plan import CompressionConfig, SecureAggregationConfig
from fedcare.privacy.secagg import check_headroom, max_scale, resolve_params
from fedcare.privacy.secagg.config import SecAggParams

__all__ = [
    "MASKED_TENSOR",
    "NARROW_RING_STEPS",
    "masked_parameters",
    "masked_words",
    "round_settings",
    "secure_ring_bits",
]

#: The one tensor of a masked-input result: the ``uint32`` words, carried bit for bit as float32.
MASKED_TENSOR = "secagg.masked"

#: Quantization steps per ``clip`` that a compression method keeps, which the 16-bit ring must match:
#: int8 has 127 levels either side of zero; bfloat16 (8 significant bits) and float16 (11) are spaced
#: ``clip / 256`` and ``clip / 2048`` just below ``clip``. With ``floor((2**15 - 1) / n) - 2`` steps for
#: ``n`` sites, that allows at most 254, 127 and 15 sites.
NARROW_RING_STEPS: Mapping[str, int] = MappingProxyType({"int8": 127, "bfloat16": 256, "float16": 2048})

_LOW_HALF = np.uint32(0xFFFF)


def secure_ring_bits(compression: CompressionConfig) -> int:
    """The ring a secure sum uses under the plan's compression: 16 bits for int8, float16, bfloat16; else 32.

    Under secure aggregation the update is not cast or quantized on its own:
    the ring narrows instead, and each masked word travels in 16 bits.

    Raises
    ------
    ConfigError
        For ``topk`` (field ``compression.method``): masking makes every
        coordinate non-zero, so sparsification saves nothing, and the positions
        sent would tell which coordinates matter to a site.

    Examples
    --------
    >>> secure_ring_bits(CompressionConfig(method="int8")), secure_ring_bits(CompressionConfig())
    (16, 32)
    """
    if compression.method == "topk":
        raise ConfigError(
            "topk cannot be combined with secure aggregation: masking makes every coordinate non-zero, so "
            "sparsifying saves nothing, and the positions sent would show which coordinates matter at each site; "
            "use compression.method: int8 (a 16-bit secure sum, half the upload) or turn secure aggregation off",
            field="compression.method",
        )
    return 16 if compression.method in NARROW_RING_STEPS else 32


def _packed_length(length: int, ring_bits: int) -> int:
    return length if ring_bits == 32 else (length + 1) // 2


def masked_parameters(values: np.ndarray, *, ring_bits: int = 32) -> Parameters:
    """Wrap a masked ``uint32`` vector for transport (the bits travel unchanged).

    In the 16-bit ring only the low 16 bits of each word count: they travel
    two to a word (element ``2i`` in the low half of word ``i``, ``2i + 1`` in
    the high half; an odd length pads with zero), so the tensor is half as long.

    Examples
    --------
    >>> words = np.array([0, 1, 2**32 - 1], dtype=np.uint32)
    >>> bool((masked_words(masked_parameters(words), length=3) == words).all())
    True
    >>> narrow = np.array([0, 1, 2**16 - 1], dtype=np.uint32)
    >>> packed = masked_parameters(narrow, ring_bits=16)
    >>> packed.nbytes, masked_words(packed, length=3, ring_bits=16).tolist()
    (8, [0, 1, 65535])
    """
    if ring_bits == 32:
        return Parameters.from_flat(values.view(np.float32), ((MASKED_TENSOR, (values.size,)),))
    size = _packed_length(values.size, ring_bits)
    halves = np.zeros(2 * size, dtype=np.uint32)
    np.bitwise_and(values, _LOW_HALF, out=halves[: values.size])
    packed = halves[0::2] | (halves[1::2] << np.uint32(16))
    return Parameters.from_flat(packed.view(np.float32), ((MASKED_TENSOR, (size,)),))


def masked_words(parameters: Parameters, *, length: int, ring_bits: int = 32) -> np.ndarray:
    """The ``uint32`` vector inside a masked-input result (unpacked from 16 bits in the 16-bit ring).

    Raises
    ------
    ProtocolError
        If the result is not one tensor of ``length`` words (``ceil(length /
        2)`` in the 16-bit ring), or the padding half of an odd length is not zero.
    """
    size = _packed_length(length, ring_bits)
    if parameters.spec != ((MASKED_TENSOR, (size,)),):
        raise ProtocolError(
            f"a masked input of the {ring_bits}-bit ring must be one tensor {MASKED_TENSOR}[{size}], "
            f"got {parameters.spec}"
        )
    words = parameters.flatten().view(np.uint32)
    if ring_bits == 32:
        return words
    halves = np.empty(2 * size, dtype=np.uint32)
    np.bitwise_and(words, _LOW_HALF, out=halves[0::2])
    np.right_shift(words, np.uint32(16), out=halves[1::2])
    if length % 2 and halves[-1]:
        raise ProtocolError("the padding of a packed 16-bit masked input must be zero", field="values")
    return halves[:length]


def round_settings(
    config: SecureAggregationConfig,
    *,
    num_nodes: int,
    vector_length: int,
    compression: CompressionConfig | None = None,
) -> tuple[SecAggParams, float]:
    """The protocol parameters and quantization scale of a round of ``num_nodes`` nodes.

    The scale is the plan's, or the largest at which the sum of ``num_nodes``
    weighted, clipped vectors cannot wrap the ring: 32 bits, or 16 bits under a
    ``compression`` that narrows it (:func:`secure_ring_bits`). In the 16-bit
    ring the scale must also keep the method's resolution, at least
    :data:`NARROW_RING_STEPS` steps per ``clip``.

    Raises
    ------
    ConfigError
        If the threshold or neighbour count is unsafe for ``num_nodes``, the
        plan's scale could wrap the ring, the compression is ``topk``, or
        ``num_nodes`` sites leave the 16-bit ring too few steps per clip for the
        compression method (field ``compression.method``).

    Examples
    --------
    >>> params, scale = round_settings(SecureAggregationConfig(enabled=True), num_nodes=4, vector_length=10)
    >>> params.threshold, scale > 1e8
    (3, True)
    >>> round_settings(SecureAggregationConfig(enabled=True), num_nodes=4, vector_length=10,
    ...                compression=CompressionConfig(method="int8"))[1]
    8189.0
    >>> round_settings(SecureAggregationConfig(enabled=True), num_nodes=300, vector_length=10,
    ...                compression=CompressionConfig(method="int8"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: compression.method: int8 under secure aggregation sums in the 16-bit ring, ...
    """
    params = resolve_params(
        num_nodes=num_nodes, vector_length=vector_length, neighbours=config.neighbours, threshold=config.threshold
    )
    ring_bits = 32 if compression is None else secure_ring_bits(compression)
    if config.scale is not None:
        scale = config.scale
    else:
        scale = float(math.floor(max_scale(clip=config.clip, max_nodes=num_nodes, ring_bits=ring_bits)))
    check_headroom(clip=config.clip, scale=scale, max_nodes=num_nodes, ring_bits=ring_bits)
    if ring_bits == 16:
        assert compression is not None
        _check_resolution(config, compression=compression, scale=scale, num_nodes=num_nodes)
    return params, scale


def _check_resolution(
    config: SecureAggregationConfig, *, compression: CompressionConfig, scale: float, num_nodes: int
) -> None:
    method = compression.method
    needed = NARROW_RING_STEPS[method]
    steps = math.floor(scale * config.clip)
    if steps >= needed:
        return
    most = (2**15 - 1) // (needed + 2)
    remedy = (
        f"raise secure_aggregation.scale to at least {needed / config.clip:.6g} with at most {most} sites"
        if config.scale is not None
        else f"use at most {most} sites per round"
    )
    raise ConfigError(
        f"{method} under secure aggregation sums in the 16-bit ring, where {num_nodes} sites leave "
        f"{steps} quantization steps per clip, fewer than the {needed} that {method} keeps; {remedy}, or set "
        "compression.method: none to sum in the 32-bit ring",
        field="compression.method",
    )
