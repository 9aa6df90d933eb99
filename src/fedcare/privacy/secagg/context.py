"""The round context every party agrees on, the masked input a node sends, and shared checks."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedcare.errors import ConfigError, ProtocolError
from fedcare.privacy.secagg.config import SecAggParams, resolve_params, validate_params
from fedcare.privacy.secagg.graph import neighbour_graph
from fedcare.privacy.secagg.quantize import RING_BITS, check_headroom

__all__ = ["MaskedInput", "RoundContext"]


class Step(enum.IntEnum):
    """How far a party has got in the round (internal)."""

    START = 0
    KEYS = 1
    SHARES = 2
    INPUTS = 3
    SIGNATURES = 4
    DONE = 5




@dataclass(frozen=True)
class RoundContext:
    """What every party of one round agrees on beforehand.

    Attributes
    ----------
    session : bytes
        16 to 256 bytes unique to the run and round (e.g. SHA-256 of the run id and
        round number). Bound into every derived key, box and signature, and the
        seed of the neighbour graph.
    params : SecAggParams
        Checked with :func:`~fedcare.privacy.secagg.config.validate_params`.
    clip : float
        Coordinates are clipped to ``[-clip, clip]`` before quantizing.
    scale : float
        Quantization steps per unit; checked so that the sum of ``num_nodes``
        inputs cannot wrap the ring.
    ring_bits : {32, 16}
        The ring of the sum: Z_2^32, or Z_2^16, where only the low 16 bits of
        each masked word count (and travel). Masks are the same ``uint32``
        keystreams either way, reduced modulo ``2**16``: their low 16 bits are
        uniform too, and they cancel, and are removed after dropouts, modulo
        ``2**16`` because they do modulo ``2**32``.

    Raises
    ------
    ConfigError
        Naming the field, if the session is too short or long, the parameters
        are invalid, the ring is neither 16 nor 32 bits, or ``clip * scale``
        leaves no headroom in it.

    Examples
    --------
    >>> context = RoundContext(session=bytes(32), params=resolve_params(num_nodes=50, vector_length=10),
    ...                        clip=1.0, scale=1e3)
    >>> len(context.neighbours(1)), 1 in context.neighbours(1)
    (34, False)
    """

    session: bytes
    params: SecAggParams
    clip: float
    scale: float
    ring_bits: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.session, bytes) or not 16 <= len(self.session) <= 256:
            raise ConfigError("must be 16 to 256 bytes unique to the run and round", field="secagg.session")
        validate_params(self.params)
        if isinstance(self.ring_bits, bool) or self.ring_bits not in RING_BITS:
            raise ConfigError(f"must be one of {RING_BITS}, got {self.ring_bits!r}", field="secagg.ring_bits")
        check_headroom(clip=self.clip, scale=self.scale, max_nodes=self.params.num_nodes, ring_bits=self.ring_bits)

    @property
    def ring_mask(self) -> int:
        """``2**ring_bits - 1``: the bits of a word that count in this ring."""
        return (1 << self.ring_bits) - 1

    @cached_property
    def _graph(self) -> dict[int, frozenset[int]]:
        nodes = range(1, self.params.num_nodes + 1)
        return neighbour_graph(nodes, neighbours=self.params.neighbours, seed=self.session)

    def neighbours(self, index: int) -> frozenset[int]:
        """Node ``index``'s neighbours (not itself) in the round's graph.

        Raises
        ------
        ConfigError
            If ``index`` is not in ``1 .. num_nodes``.
        """
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= self.params.num_nodes:
            raise ConfigError(f"must be a node index in 1 .. {self.params.num_nodes}, got {index!r}", field="index")
        return self._graph[index]


@dataclass(frozen=True)
class MaskedInput:
    """What a node sends in the ``masked_input`` phase.

    Attributes
    ----------
    values : numpy.ndarray
        ``uint32``, length ``vector_length``: the quantized vector plus masks,
        modulo ``2**ring_bits`` of the round (in a 16-bit ring every word is below ``2**16``).
    num_clipped : int
        Coordinates that were outside ``[-clip, clip]``; a count, safe to report.
    """

    values: np.ndarray
    num_clipped: int


def check_index(value: object, *, context: RoundContext, field: str) -> int:
    """``value`` if it is a node index of the round, else a :class:`ProtocolError` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= context.params.num_nodes:
        raise ProtocolError(f"must be a node index in 1 .. {context.params.num_nodes}, got {value!r}", field=field)
    return value


def index_set(values: Sequence[int], *, context: RoundContext, field: str) -> frozenset[int]:
    """The distinct node indices in ``values``; a :class:`ProtocolError` if one is invalid or repeats."""
    members = [check_index(v, context=context, field=field) for v in values]
    if len(set(members)) != len(members):
        raise ProtocolError("lists a node twice", field=field)
    return frozenset(members)

