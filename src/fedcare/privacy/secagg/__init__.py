"""Secure aggregation (SecAgg+): the server learns the sum of the nodes' vectors and nothing else.

The protocol engine (:class:`SecAggClient`, :class:`SecAggServer`,
:func:`run_round`) does no I/O; its messages are plain dicts of ints and base64
strings, plus one ``uint32`` array per node. The building blocks (parameters,
neighbour graph, quantization, masks, Shamir sharing) are pure functions.
"""

from fedcare.privacy.secagg.config import (
    SecAggParams,
    default_neighbours,
    default_threshold,
    resolve_params,
    validate_params,
)
from fedcare.privacy.secagg.graph import neighbour_graph
from fedcare.privacy.secagg.masking import apply_masks, expand_mask
from fedcare.privacy.secagg.protocol import (
    PHASES,
    MaskedInput,
    RoundContext,
    SecAggClient,
    SecAggServer,
    run_round,
)
from fedcare.privacy.secagg.quantize import (
    RING_BITS,
    Quantized,
    check_headroom,
    dequantize_sum,
    max_scale,
    quantization_error_bound,
    quantize,
)
from fedcare.privacy.secagg.shamir import Share, reconstruct, split

__all__ = [
    "PHASES",
    "RING_BITS",
    "MaskedInput",
    "Quantized",
    "RoundContext",
    "SecAggClient",
    "SecAggParams",
    "SecAggServer",
    "Share",
    "apply_masks",
    "check_headroom",
    "default_neighbours",
    "default_threshold",
    "dequantize_sum",
    "expand_mask",
    "max_scale",
    "neighbour_graph",
    "quantization_error_bound",
    "quantize",
    "reconstruct",
    "resolve_params",
    "run_round",
    "split",
    "validate_params",
]
