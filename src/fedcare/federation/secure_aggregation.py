"""Secure aggregation over the federation's jobs: the coordinator and node sides.

A secure round runs the SecAgg+ protocol of :mod:`fedcare.privacy.secagg` as
five exchanges of ordinary jobs, so it works over every transport:

==================  =======================================  ===============================
job                 the node does                            and returns
==================  =======================================  ===============================
``TRAIN``           trains, keeps its update, makes keys     its public keys (``data``)
``SECAGG`` shares   Shamir-shares its two secrets            one ciphertext per neighbour
``SECAGG`` masked   weights, clips, quantizes and masks      the masked ``uint32`` vector
``SECAGG`` check    signs the set of surviving nodes         its signature
``SECAGG`` unmask   checks the signatures                    one share per neighbour
==================  =======================================  ===============================

The node sends ``[w * clip(update), w]`` with ``w = min(n, max_examples) /
max_examples``, ``n`` its training examples: the coordinator learns
``sum(w_i * update_i)`` and ``sum(w_i)``, hence the example-weighted mean,
and neither any update nor any site's example count. Whatever arrives at the
coordinator from one node is a uniformly distributed vector.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcare.errors import FedcareError, ProtocolError
from fedcare.params import Parameters
from fedcare.plan import SecureAggregationConfig
from fedcare.privacy.secagg import (
    RoundContext,
    SecAggClient,
    SecAggServer,
    check_headroom,
    dequantize_sum,
    max_scale,
    resolve_params,
    validate_params,
)
from fedcare.privacy.secagg.config import SecAggParams
from fedcare.privacy.secagg.quantize import clip_values

__all__ = [
    "MASKED_TENSOR",
    "NodeSecureAggregation",
    "SecureRound",
    "masked_parameters",
    "masked_words",
    "round_settings",
]

#: The one tensor of a masked-input result: the ``uint32`` words, carried bit for bit as float32.
MASKED_TENSOR = "secagg.masked"

_PHASES = ("share_keys", "masked_input", "consistency_check", "unmask")


def masked_parameters(values: np.ndarray) -> Parameters:
    """Wrap a masked ``uint32`` vector for transport (the bits travel unchanged).

    Examples
    --------
    >>> words = np.array([0, 1, 2**32 - 1], dtype=np.uint32)
    >>> bool((masked_words(masked_parameters(words), length=3) == words).all())
    True
    """
    return Parameters.from_flat(values.view(np.float32), ((MASKED_TENSOR, (values.size,)),))


def masked_words(parameters: Parameters, *, length: int) -> np.ndarray:
    """The ``uint32`` vector inside a masked-input result.

    Raises
    ------
    ProtocolError
        If the result is not one tensor of ``length`` words.
    """
    if parameters.spec != ((MASKED_TENSOR, (length,)),):
        raise ProtocolError(f"a masked input must be one tensor {MASKED_TENSOR}[{length}], got {parameters.spec}")
    return parameters.flatten().view(np.uint32)


def round_settings(
    config: SecureAggregationConfig, *, num_nodes: int, vector_length: int
) -> tuple[SecAggParams, float]:
    """The protocol parameters and quantization scale of a round of ``num_nodes`` nodes.

    The scale is the plan's, or the largest at which the sum of ``num_nodes``
    weighted, clipped vectors cannot wrap the 32-bit ring.

    Raises
    ------
    ConfigError
        If the threshold or neighbour count is unsafe for ``num_nodes`` or the
        plan's scale could wrap the ring.

    Examples
    --------
    >>> params, scale = round_settings(SecureAggregationConfig(enabled=True), num_nodes=4, vector_length=10)
    >>> params.threshold, scale > 1e8
    (3, True)
    """
    params = resolve_params(
        num_nodes=num_nodes, vector_length=vector_length, neighbours=config.neighbours, threshold=config.threshold
    )
    if config.scale is not None:
        scale = config.scale
    else:
        scale = float(math.floor(max_scale(clip=config.clip, max_nodes=num_nodes)))
    check_headroom(clip=config.clip, scale=scale, max_nodes=num_nodes)
    return params, scale


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
    """

    config: SecureAggregationConfig
    run_id: str
    round_number: int
    nodes: Sequence[str]
    model_size: int
    num_clipped: int = 0
    server: SecAggServer = field(init=False)
    context: RoundContext = field(init=False)

    def __post_init__(self) -> None:
        params, scale = round_settings(self.config, num_nodes=len(self.nodes), vector_length=self.model_size + 1)
        self.context = RoundContext(session=_session(self.run_id, self.round_number), params=params, clip=self.config.clip, scale=scale)
        self.server = SecAggServer(self.context)
        self._index = {node: i + 1 for i, node in enumerate(self.nodes)}
        self._node = {i: node for node, i in self._index.items()}

    def index(self, node: str) -> int:
        """The protocol index of ``node``."""
        return self._index[node]

    def node(self, index: int) -> str:
        """The node with protocol index ``index``."""
        return self._node[index]

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
            "max_examples": self.config.max_examples,
        }

    def weighted_mean(self, total: np.ndarray) -> tuple[np.ndarray, float]:
        """Dequantize the unmasked sum into (example-weighted mean update, total weight).

        Raises
        ------
        ProtocolError
            If the total weight is not positive.
        """
        summed = dequantize_sum(total, scale=self.context.scale)
        weight = float(summed[-1])
        if not weight > 0:
            raise ProtocolError(f"the secure sum carries a total weight of {weight}; no site contributed")
        mean = summed[:-1]
        mean /= weight
        return mean, weight


# -- node side ----------------------------------------------------------------------------


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
    policy_min_participants : int
        The fewest sites the node lets its update be summed with.
    """

    def __init__(self, *, min_participants: int = 1) -> None:
        self.min_participants = min_participants
        self._sessions: dict[tuple[str, int], _Session] = {}

    @staticmethod
    def context_from(config: Mapping[str, Any], *, run_id: str, round_number: int) -> tuple[RoundContext, int, int]:
        """Check a training job's ``secagg`` section; return (context, own index, max_examples).

        The node does not take the coordinator's word: it checks the session is
        this run's and round's, and that the threshold and scale are safe.

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
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"the job's secure aggregation settings are malformed ({exc})", field="secagg") from None
        if session != _session(run_id, round_number):
            raise ProtocolError("the secure aggregation session is not this run's and round's", field="secagg.session")
        if not 1 <= index <= params.num_nodes or max_examples < 1:
            raise ProtocolError("the secure aggregation index or max_examples is out of range", field="secagg")
        validate_params(params)
        check_headroom(clip=clip, scale=scale, max_nodes=params.num_nodes)
        return RoundContext(session=session, params=params, clip=clip, scale=scale), index, max_examples

    def start(
        self, *, config: Mapping[str, Any], run_id: str, round_number: int, update: np.ndarray, num_examples: int
    ) -> dict[str, str]:
        """Keep the round's weighted, clipped update and return this node's public keys.

        Raises
        ------
        ProtocolError, ConfigError
            As :meth:`context_from`, or if the update's length is not the announced one.
        PolicyViolation
            If fewer sites than the policy's minimum were announced.
        """
        from fedcare.federation.policy import NodePolicy

        context, index, max_examples = self.context_from(config, run_id=run_id, round_number=round_number)
        NodePolicy(min_participants=self.min_participants).check_participants(
            context.params.num_nodes, stage="announced"
        )
        if update.size + 1 != context.params.vector_length:
            raise ProtocolError(
                f"the round sums vectors of {context.params.vector_length} values, the model has {update.size} + 1",
                field="secagg.vector_length",
            )
        weight = min(num_examples, max_examples) / max_examples
        values = np.empty(context.params.vector_length, dtype=np.float64)
        num_clipped = clip_values(update, clip=context.clip, out=values[:-1])
        values[:-1] *= weight
        values[-1] = weight
        client = SecAggClient(index, context)
        # Only the latest round is kept: a node takes part in one round at a time.
        self._sessions = {(run_id, round_number): _Session(index=index, client=client, values=values, num_clipped=num_clipped)}
        return client.advertise_keys()

    def step(self, *, config: Mapping[str, Any], run_id: str, round_number: int) -> tuple[dict[str, Any], Any, int]:
        """Run one later phase; return (data for the result, masked vector or None, coordinates clipped).

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
                return {}, masked.values, session.num_clipped + masked.num_clipped
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
