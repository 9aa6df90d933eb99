"""Secure aggregation over the federation's jobs: the coordinator and node sides.

A secure round runs the SecAgg+ protocol of :mod:`fedcare.privacy.secagg` as
five exchanges of ordinary jobs, so it works over every transport:

==================  =======================================  ===============================
job                 the node does                            and returns
==================  =======================================  ===============================
``TRAIN``           trains, keeps its update, makes keys     its public keys (``data``)
``SECAGG`` shares   Shamir-shares its two secrets            one ciphertext per neighbour
``SECAGG`` masked   weights, clips, quantizes and masks      the masked vector (32 or 16 bits)
``SECAGG`` check    signs the set of surviving nodes         its signature
``SECAGG`` unmask   checks the signatures                    one share per neighbour
==================  =======================================  ===============================

The node sends ``[w * clip(update), w]`` with ``w = min(n, max_examples) /
max_examples``, ``n`` its training examples: the coordinator learns
``sum(w_i * update_i)`` and ``sum(w_i)``, hence the example-weighted mean,
and neither any update nor any site's example count. Whatever arrives at the
coordinator from one node is a uniformly distributed vector.

With distributed site-level differential privacy (``privacy.site_level.mode:
distributed``) the training job's ``secagg`` section also carries
``dp_clip_norm`` (``C``) and ``dp_noise_multiplier`` (``z``), and each of the
round's ``n`` nodes sends ``[clip_C(update) + N(0, (z C / sqrt(n))^2 I),
min(1, clip)]`` instead: its update L2-clipped to ``C``, plus its share of the
noise, with weight 1 whatever its example count. The shares of ``n`` nodes
add up to noise of standard deviation ``z C`` on the sum, so the revealed sum
is the central DP-FedAvg sum while no party, the coordinator included, sees a
site's update with less than its share of noise. If only ``k`` of the ``n``
nodes reach the sum, its noise is ``z C sqrt(k / n)``, an effective noise
multiplier of ``z sqrt(k / n)``: to keep ``z`` through up to ``d`` dropouts,
plan ``z sqrt(n / (n - d))``. The per-coordinate clip of the ring still
applies (and is counted); the guarantee assumes it clips nothing, so set
``secure_aggregation.clip`` well above ``C`` plus a few noise shares.

With ``compression.method`` ``int8``, ``float16`` or ``bfloat16`` the sum is
taken in the 16-bit ring (:func:`secure_ring_bits`): each node sends only the
low 16 bits of its masked words, two to a transported word, so its upload
halves; the coordinator unpacks them into the same ``uint32`` running sum and
reads the total modulo ``2**16``. The ring then holds ``floor((2**15 - 1) /
n) - 2`` quantization steps per ``clip`` for ``n`` sites, and a round is
refused when that is fewer than the method keeps (:data:`NARROW_RING_STEPS`):
int8 fits up to 254 sites, bfloat16 127, float16 15. ``topk`` is refused
under secure aggregation. Noise (distributed DP) is added before
quantization, as without compression. The weight travels in the narrow ring
too: the sum of ``k`` weights is off by less than ``k / scale``, so the mean's
relative error from it is below ``k / (scale * sum(w))``; keep
``max_examples`` close to the largest site so that the weights are near 1
(for 4 sites, ``clip: 1`` and weights of about 0.5, under 0.1 %).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcare.errors import FedcareError, ProtocolError
from fedcare.federation.secure_ring import (
    MASKED_TENSOR,
    NARROW_RING_STEPS,
    masked_parameters,
    masked_words,
    round_settings,
    secure_ring_bits,
)
from fedcare.params import Parameters
from fedcare.plan import CompressionConfig, SecureAggregationConfig, SiteLevelPrivacy
from fedcare.privacy.secagg import (
    RoundContext,
    SecAggClient,
    SecAggServer,
    check_headroom,
    dequantize_sum,
    resolve_params,  # noqa: F401 - used by the doctests
    validate_params,
)
from fedcare.privacy.secagg.config import SecAggParams
from fedcare.privacy.secagg.quantize import clip_values
from fedcare.strategies.kernels import add_gaussian_noise, clip_fold

__all__ = [
    "MASKED_TENSOR",
    "NARROW_RING_STEPS",
    "NodeSecureAggregation",
    "SecureRound",
    "masked_parameters",
    "masked_words",
    "round_settings",
    "secure_ring_bits",
]

_PHASES = ("share_keys", "masked_input", "consistency_check", "unmask")

def _session(run_id: str, round_number: int) -> bytes:
    return hashlib.sha256(f"fedcare-secagg\x00{run_id}\x00{round_number}".encode()).digest()


# -- coordinator side ---------------------------------------------------------------


@dataclass
class SecureRound:
    """The coordinator's side of one secure round; it learns only the weighted sum.

    Parameters
    ----------
    config : SecureAggregationConfig
        The plan's settings.
    run_id : str
    round_number : int
    nodes : sequence of str
        The nodes selected for the round, in order; node ``nodes[i]`` is protocol index ``i + 1``.
    model_size : int
        Number of model parameters (the vector summed is one longer: the weight).
    site_level : SiteLevelPrivacy, optional
        The plan's site-level DP; in distributed mode its clip norm and noise
        multiplier go to the nodes with the round's settings.
    compression : CompressionConfig, optional
        The plan's compression, which sets the ring (:func:`secure_ring_bits`);
        leave it out for a sum that is not a model update (federated
        normalization statistics), which always uses the 32-bit ring.
    """

    config: SecureAggregationConfig
    run_id: str
    round_number: int
    nodes: Sequence[str]
    model_size: int
    num_clipped: int = 0
    site_level: SiteLevelPrivacy = field(default_factory=SiteLevelPrivacy)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    server: SecAggServer = field(init=False)
    context: RoundContext = field(init=False)

    def __post_init__(self) -> None:
        params, scale = round_settings(
            self.config, num_nodes=len(self.nodes), vector_length=self.model_size + 1, compression=self.compression
        )
        self.context = RoundContext(
            session=_session(self.run_id, self.round_number),
            params=params,
            clip=self.config.clip,
            scale=scale,
            ring_bits=secure_ring_bits(self.compression),
        )
        self.server = SecAggServer(self.context)
        self._index = {node: i + 1 for i, node in enumerate(self.nodes)}
        self._node = {i: node for node, i in self._index.items()}

    def index(self, node: str) -> int:
        """The protocol index of ``node``."""
        return self._index[node]

    def node(self, index: int) -> str:
        """The node with protocol index ``index``."""
        return self._node[index]

    def masked_words(self, parameters: Parameters) -> np.ndarray:
        """The ``uint32`` words of a node's masked input, unpacked from the round's ring.

        Raises
        ------
        ProtocolError
            As :func:`masked_words`.
        """
        return masked_words(parameters, length=self.context.params.vector_length, ring_bits=self.context.ring_bits)

    def train_config(self, node: str) -> dict[str, Any]:
        """The ``secagg`` section of ``node``'s training job."""
        params = self.context.params
        return {
            "session": self.context.session.hex(),
            "index": self._index[node],
            "num_nodes": params.num_nodes,
            "neighbours": params.neighbours,
            "threshold": params.threshold,
            "vector_length": params.vector_length,
            "clip": self.context.clip,
            "scale": self.context.scale,
            "ring_bits": self.context.ring_bits,
            "max_examples": self.config.max_examples,
            **(
                {"dp_clip_norm": self.site_level.clip_norm, "dp_noise_multiplier": self.site_level.noise_multiplier}
                if self.site_level.enabled and self.site_level.mode == "distributed"
                else {}
            ),
        }

    def weighted_mean(self, total: np.ndarray) -> tuple[np.ndarray, float]:
        """Dequantize the unmasked sum into (example-weighted mean update, total weight).

        With distributed DP every node's weight is the same constant, so the
        "mean" is the noisy sum over (constant * nodes summed) and ``mean *
        weight`` is the noisy sum of the clipped updates itself.

        Raises
        ------
        ProtocolError
            If the total weight is not positive.
        """
        summed = dequantize_sum(total, scale=self.context.scale, ring_bits=self.context.ring_bits)
        weight = float(summed[-1])
        if not weight > 0:
            raise ProtocolError(f"the secure sum carries a total weight of {weight}; no site contributed")
        mean = summed[:-1]
        mean /= weight
        return mean, weight


# -- node side ----------------------------------------------------------------------------


def _os_generator() -> np.random.Generator:
    """A generator seeded from the operating system: a noise share nobody can predict."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))


@dataclass
class _Session:
    index: int
    client: SecAggClient
    values: np.ndarray
    num_clipped: int


class NodeSecureAggregation:
    """A node's side: one protocol client per secure round it takes part in.

    Parameters
    ----------
    min_participants : int
        The fewest sites the node lets its update be summed with.
    site_level : SiteLevelPrivacy, optional
        The approved plan's site-level DP. In distributed mode the node then
        refuses a round whose ``secagg`` section omits the DP settings or asks
        for less noise (or a larger clip norm) than the plan; without it the
        node applies whatever DP settings the job carries.
    noise_rng : numpy.random.Generator, optional
        Source of the distributed-DP noise share; ``None`` (deployments) seeds
        a fresh generator from ``os.urandom`` for every round.
    ring_bits : {32, 16}, optional
        The ring the approved plan sums model updates in
        (:func:`secure_ring_bits` of its compression). The node then refuses
        a training round announced in another ring, and a statistics round in
        any but the 32-bit ring; without it the node takes the announced ring.
    """

    def __init__(
        self,
        *,
        min_participants: int = 1,
        site_level: SiteLevelPrivacy | None = None,
        noise_rng: np.random.Generator | None = None,
        ring_bits: int | None = None,
    ) -> None:
        self.min_participants = min_participants
        self.site_level = site_level
        self.ring_bits = ring_bits
        self._noise_rng = noise_rng
        self._sessions: dict[tuple[str, int], _Session] = {}

    @staticmethod
    def dp_settings(config: Mapping[str, Any]) -> tuple[float, float] | None:
        """The distributed-DP ``(clip_norm, noise_multiplier)`` of a ``secagg`` section, or None.

        Raises
        ------
        ProtocolError
            If only one of ``dp_clip_norm`` and ``dp_noise_multiplier`` is
            present, or either is not a positive finite number (naming it).

        Examples
        --------
        >>> NodeSecureAggregation.dp_settings({"dp_clip_norm": 0.5, "dp_noise_multiplier": 1.0})
        (0.5, 1.0)
        >>> NodeSecureAggregation.dp_settings({}) is None
        True
        >>> NodeSecureAggregation.dp_settings({"dp_clip_norm": 0.5, "dp_noise_multiplier": -1})
        Traceback (most recent call last):
        ...
        fedcare.errors.ProtocolError: secagg.dp_noise_multiplier: must be a positive finite number, got -1
        """
        present = [key for key in ("dp_clip_norm", "dp_noise_multiplier") if key in config]
        if not present:
            return None
        if len(present) == 1:
            missing = "dp_noise_multiplier" if present == ["dp_clip_norm"] else "dp_clip_norm"
            raise ProtocolError(f"distributed DP settings are incomplete: {missing} is missing", field=f"secagg.{missing}")
        values: list[float] = []
        for key in ("dp_clip_norm", "dp_noise_multiplier"):
            raw = config[key]
            try:
                value = float(raw)
            except (TypeError, ValueError):
                value = math.nan
            if isinstance(raw, bool) or not (math.isfinite(value) and value > 0):
                raise ProtocolError(f"must be a positive finite number, got {raw!r}", field=f"secagg.{key}")
            values.append(value)
        return values[0], values[1]

    def _check_dp_against_plan(self, dp: tuple[float, float] | None) -> None:
        site_level = self.site_level
        if site_level is None or not (site_level.enabled and site_level.mode == "distributed"):
            return
        if dp is None:
            raise ProtocolError(
                "the approved plan asks for distributed DP but the round carries no DP settings", field="secagg.dp_clip_norm"
            )
        clip_norm, noise_multiplier = dp
        if noise_multiplier < site_level.noise_multiplier:
            raise ProtocolError(
                f"the round asks for noise multiplier {noise_multiplier:g}, below the approved plan's "
                f"{site_level.noise_multiplier:g}",
                field="secagg.dp_noise_multiplier",
            )
        if clip_norm > site_level.clip_norm:
            raise ProtocolError(
                f"the round asks for clip norm {clip_norm:g}, above the approved plan's {site_level.clip_norm:g}",
                field="secagg.dp_clip_norm",
            )

    def check_ring(self, context: RoundContext, *, statistics: bool = False) -> None:
        """Refuse a round whose ring is not the one the approved plan sums in.

        Raises
        ------
        ProtocolError
            Naming ``secagg.ring_bits``, if the plan is known and the round's
            ring differs from its ring (or, for statistics, from 32 bits).

        Examples
        --------
        >>> context = RoundContext(session=bytes(32), params=resolve_params(num_nodes=4, vector_length=3),
        ...                        clip=1.0, scale=4.0)
        >>> NodeSecureAggregation(ring_bits=16).check_ring(context)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fedcare.errors.ProtocolError: secagg.ring_bits: the round sums in the 32-bit ring, but the approved plan ...
        """
        if self.ring_bits is None:
            return
        expected = 32 if statistics else self.ring_bits
        if context.ring_bits != expected:
            what = "statistics" if statistics else "model updates"
            raise ProtocolError(
                f"the round sums in the {context.ring_bits}-bit ring, but the approved plan sums {what} in the "
                f"{expected}-bit ring (set by its compression.method)",
                field="secagg.ring_bits",
            )

    @staticmethod
    def context_from(config: Mapping[str, Any], *, run_id: str, round_number: int) -> tuple[RoundContext, int, int]:
        """Check a training job's ``secagg`` section; return (context, own index, max_examples).

        The node does not take the coordinator's word: it checks the session is
        this run's and round's, and that the threshold and scale are safe in
        the announced ring (``ring_bits``, 32 when absent).

        Raises
        ------
        ProtocolError
            If a field is missing or malformed or the session is not this round's.
        ConfigError
            If the threshold, neighbour count or scale is unsafe.
        """
        try:
            session = bytes.fromhex(str(config["session"]))
            params = SecAggParams(
                num_nodes=int(config["num_nodes"]),
                neighbours=int(config["neighbours"]),
                threshold=int(config["threshold"]),
                vector_length=int(config["vector_length"]),
            )
            index, clip, scale = int(config["index"]), float(config["clip"]), float(config["scale"])
            max_examples = int(config["max_examples"])
            ring_bits = config.get("ring_bits", 32)
            if isinstance(ring_bits, bool) or not isinstance(ring_bits, int):
                raise TypeError(f"ring_bits must be an integer, got {type(ring_bits).__name__}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"the job's secure aggregation settings are malformed ({exc})", field="secagg") from None
        if session != _session(run_id, round_number):
            raise ProtocolError("the secure aggregation session is not this run's and round's", field="secagg.session")
        if not 1 <= index <= params.num_nodes or max_examples < 1:
            raise ProtocolError("the secure aggregation index or max_examples is out of range", field="secagg")
        validate_params(params)
        check_headroom(clip=clip, scale=scale, max_nodes=params.num_nodes, ring_bits=ring_bits)
        NodeSecureAggregation.dp_settings(config)
        context = RoundContext(session=session, params=params, clip=clip, scale=scale, ring_bits=ring_bits)
        return context, index, max_examples

    def start(
        self,
        *,
        config: Mapping[str, Any],
        run_id: str,
        round_number: int,
        update: np.ndarray,
        num_examples: int,
        statistics: bool = False,
    ) -> dict[str, str]:
        """Keep the round's weighted, clipped update and return this node's public keys.

        With distributed DP settings in ``config`` the kept vector is the
        update L2-clipped to ``dp_clip_norm`` plus Gaussian noise of standard
        deviation ``dp_noise_multiplier * dp_clip_norm / sqrt(num_nodes)``
        (this node's share), with weight ``min(1, clip)`` whatever the example count.

        Raises
        ------
        ProtocolError, ConfigError
            As :meth:`context_from`, or if the update's length is not the
            announced one, the ring is not the approved plan's
            (:meth:`check_ring`), or the DP settings fall short of the approved plan's.
            With ``statistics=True`` (a normalization-statistics vector, not a
            model update) distributed-DP settings are neither required nor applied.
        PolicyViolation
            If fewer sites than the policy's minimum were announced.
        """
        from fedcare.federation.policy import NodePolicy

        context, index, max_examples = self.context_from(config, run_id=run_id, round_number=round_number)
        self.check_ring(context, statistics=statistics)
        NodePolicy(min_participants=self.min_participants).check_participants(
            context.params.num_nodes, stage="announced"
        )
        if update.size + 1 != context.params.vector_length:
            raise ProtocolError(
                f"the round sums vectors of {context.params.vector_length} values, the model has {update.size} + 1",
                field="secagg.vector_length",
            )
        # Site-level DP bounds a site's model update; a statistics vector (federated normalization,
        # the node's own choice by job kind) is summed as it is.
        dp = None if statistics else self.dp_settings(config)
        if not statistics:
            self._check_dp_against_plan(dp)
        values = np.empty(context.params.vector_length, dtype=np.float64)
        if dp is None:
            weight = min(num_examples, max_examples) / max_examples
            num_clipped = clip_values(update, clip=context.clip, out=values[:-1])
            values[:-1] *= weight
        else:
            clip_norm, noise_multiplier = dp
            shared = values[:-1]
            shared.fill(0.0)
            clip_fold(shared, update, clip_norm)
            share_stddev = noise_multiplier * clip_norm / math.sqrt(context.params.num_nodes)
            rng = self._noise_rng if self._noise_rng is not None else _os_generator()
            add_gaussian_noise(shared, stddev=share_stddev, rng=rng)
            num_clipped = clip_values(shared, clip=context.clip, out=shared)
            # The same constant for every node: the sum's last word counts the nodes (times it).
            weight = min(1.0, context.clip)
        values[-1] = weight
        client = SecAggClient(index, context)
        # Only the latest round is kept: a node takes part in one round at a time.
        self._sessions = {(run_id, round_number): _Session(index=index, client=client, values=values, num_clipped=num_clipped)}
        return client.advertise_keys()

    def step(
        self, *, config: Mapping[str, Any], run_id: str, round_number: int
    ) -> tuple[dict[str, Any], Parameters | None, int]:
        """Run one later phase; return (data for the result, masked input or None, coordinates clipped).

        The masked input comes packed for transport (:func:`masked_parameters`
        in the round's ring: half the bytes in the 16-bit ring).

        Raises
        ------
        ProtocolError
            If the phase is unknown, no session is open for the round, or the
            protocol refuses the messages.
        PolicyViolation
            If fewer sites than the policy's minimum remain.
        """
        from fedcare.federation.policy import NodePolicy

        policy = NodePolicy(min_participants=self.min_participants)
        phase = config.get("secagg_phase")
        if phase not in _PHASES:
            raise ProtocolError(f"unknown secure aggregation phase {phase!r}", field="secagg_phase")
        session = self._sessions.get((run_id, round_number))
        if session is None:
            raise ProtocolError("no secure aggregation session is open for this round", field="secagg")
        try:
            if phase == "share_keys":
                roster = {int(i): dict(advert) for i, advert in config["roster"].items()}
                shares = session.client.share_keys(roster)
                return {"shares": {str(i): c for i, c in shares.items()}}, None, 0
            if phase == "masked_input":
                ciphertexts = {int(i): str(c) for i, c in config["ciphertexts"].items()}
                # In a sparse graph the node sees its neighbourhood only; in a complete graph, everyone.
                senders = set(ciphertexts) | {session.index}
                policy.check_participants(len(senders), stage="shared keys with this site")
                masked = session.client.masked_input(session.values, ciphertexts)
                session.values = np.empty(0)
                packed = masked_parameters(masked.values, ring_bits=session.client.context.ring_bits)
                return {}, packed, session.num_clipped + masked.num_clipped
            survivors = [int(i) for i in config["survivors"]]
            policy.check_participants(len(survivors), stage="sent masked updates")
            if phase == "consistency_check":
                return {"signature": session.client.consistency_check(survivors)}, None, 0
            signatures = {int(i): str(s) for i, s in config["signatures"].items()}
            reveals = session.client.unmask(survivors, signatures)
            del self._sessions[(run_id, round_number)]
            return {"shares": {str(i): s for i, s in reveals.items()}}, None, 0
        except FedcareError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"malformed secure aggregation message ({type(exc).__name__}: {exc})", field="secagg") from None
