"""The messages that travel between the coordinator and the nodes.

A :class:`Job` goes from the coordinator to one node; a :class:`JobResult`
comes back. Both hold only a declarative configuration, parameters and
numbers: never code, never data rows.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedcare.params import Parameters

__all__ = ["Job", "JobKind", "JobResult"]


class JobKind(enum.Enum):
    """What a node is asked to do."""

    #: Train the global model locally and return the update (new - global).
    TRAIN = "train"
    #: Evaluate the global model on the local test split and return metrics.
    EVALUATE = "evaluate"
    #: Return per-feature counts, sums and sums of squares of the training split,
    #: for federated feature normalization. Only these aggregates leave the site.
    FEATURE_STATS = "feature-stats"
    #: One later phase of a secure aggregation round (the phase is in the config);
    #: see :mod:`fedcare.federation.secure_aggregation`.
    SECAGG = "secagg"


@dataclass(frozen=True)
class Job:
    """One unit of work sent to one node.

    Attributes
    ----------
    run_id : str
        The run this job belongs to; a node refuses jobs of another run.
    round : int
        Federation round (1-based; 0 for set-up jobs).
    job_id : str
        Unique within the run; the result must echo it.
    kind : JobKind
        What to do.
    plan_hash : str
        SHA-256 of the plan the node approved; a mismatch is refused.
    parameters : Parameters, optional
        Global model weights (read-only), for TRAIN and EVALUATE.
    config : Mapping[str, Any]
        Per-round, JSON-able settings: the training seed, normalization
        statistics, strategy options.
    """

    run_id: str
    round: int
    job_id: str
    kind: JobKind
    plan_hash: str
    parameters: Parameters | None = None
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        """Bytes this job carries: the parameters' tensors plus its JSON config.

        Transport framing (gRPC, TLS) is not counted, so the figure is the same
        over every transport.

        Examples
        --------
        >>> import numpy as np
        >>> Job("run", 1, "j", JobKind.TRAIN, plan_hash="", parameters=Parameters({"w": np.zeros(4, np.float32)})).payload_bytes
        16
        """
        tensors = self.parameters.nbytes if self.parameters is not None else 0
        return tensors + _json_bytes(self.config)


@dataclass(frozen=True)
class JobResult:
    """A node's answer to one :class:`Job`.

    Attributes
    ----------
    run_id, round, job_id, kind
        Echoed from the job.
    node_id : str
        The answering node.
    update : Parameters, optional
        For TRAIN: new weights minus global weights.
    num_examples : int
        Examples trained on (TRAIN) or evaluated (EVALUATE, FEATURE_STATS).
    metrics : Mapping[str, float]
        Training or evaluation metrics; numbers only.
    statistics : Mapping[str, tuple[float, ...]]
        For FEATURE_STATS: ``sum`` and ``sum_of_squares`` per feature.
    data : Mapping[str, Any]
        JSON-able protocol messages (secure aggregation keys, encrypted shares,
        signatures); never patient data.
    error : str, optional
        Set when the node could not do the job; says why (no patient data).
    duration_s : float
        Wall time the node spent on the job, in seconds.
    """

    run_id: str
    round: int
    job_id: str
    kind: JobKind
    node_id: str
    update: Parameters | None = None
    num_examples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    statistics: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the node did the job."""
        return self.error is None

    @property
    def payload_bytes(self) -> int:
        """Bytes this result carries: the update's tensors plus its metrics, statistics and data as JSON."""
        tensors = self.update.nbytes if self.update is not None else 0
        numbers = _json_bytes(self.metrics) + _json_bytes(self.statistics)
        return tensors + numbers + _json_bytes(self.data) + len((self.error or "").encode())


def _json_bytes(value: Mapping[str, Any]) -> int:
    """Size of ``value`` as compact JSON; 0 when empty."""
    if not value:
        return 0
    return len(json.dumps(value, separators=(",", ":"), default=str).encode())
