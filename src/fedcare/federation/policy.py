"""A site's policy: what it requires of every round it takes part in.

The policy lives at the site (``node.yaml``), not in the plan: the plan says
what the researcher asks for, the policy what the hospital allows. A job that
breaks the policy is refused with :class:`~fedcare.errors.PolicyViolation`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from fedcare.errors import PolicyViolation

if TYPE_CHECKING:
    from fedcare.plan import Plan
    from fedcare.tasks.registry import TaskInfo

__all__ = ["AllowedTask", "NodePolicy", "PrivacyBudget", "Statistic"]

#: Aggregate statistics a site may let leave, besides its (masked or clipped) model updates:
#: ``feature_statistics`` (counts, sums and sums of squares for federated normalization),
#: ``evaluation_metrics`` (accuracy, AUC, ... of the global model on the site's test split) and
#: ``training_metrics`` (the mean training loss of each round).
Statistic = Literal["feature_statistics", "evaluation_metrics", "training_metrics"]
_STATISTICS: tuple[Statistic, ...] = ("feature_statistics", "evaluation_metrics", "training_metrics")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _fingerprint(value: str) -> str:
    """``AB:CD:...`` or ``abcd...``: the lower-case hex of a SHA-256."""
    text = value.replace(":", "").strip().lower()
    if not _SHA256.match(text):
        raise ValueError(f"must be a SHA-256 in hex (64 digits, colons allowed), got {value!r}")
    return text


class AllowedTask(BaseModel):
    """A task the site lets run, pinned by version and code hash (``fedcare node tasks`` prints both).

    Attributes
    ----------
    name : str
        The registered task name (``image-cnn``).
    version : str, optional
        The installed distribution's version; any version when omitted.
    sha256 : str, optional
        The SHA-256 of the installed task's code; any code when omitted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    version: str | None = Field(default=None, min_length=1)
    sha256: str | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        return None if value is None else _fingerprint(value)


class PrivacyBudget(BaseModel):
    """A site's lifetime record-level privacy budget for one dataset.

    Attributes
    ----------
    epsilon : float
        The most epsilon the site lets all runs on the dataset spend together.
    delta : float
        The delta at which epsilon is accounted.
    accountant : {"pld", "prv", "rdp"}
        The accountant of the site's ledger (default: dp-accounting PLD).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    accountant: Literal["pld", "prv", "rdp"] = "pld"


class NodePolicy(BaseModel):
    """What a site requires before its update leaves it.

    Attributes
    ----------
    require_secure_aggregation : bool
        Refuse to train in a round without secure aggregation: the coordinator
        must only ever see this site's update inside a sum.
    require_record_level_dp : bool
        Refuse to train in a run without record-level DP-SGD.
    privacy : dict of str to PrivacyBudget
        The lifetime budget per dataset name; a dataset not listed gets the
        plan's epsilon and delta as its budget.
    min_participants : int
        The fewest sites whose updates may be summed with this site's. Checked
        against the plan's sites per round, when the round is announced,
        before the masked update is sent (against the sites whose key shares
        arrived) and before helping to unmask (against the sites whose masked
        updates the coordinator holds).
    allowed_tasks : tuple of AllowedTask, optional
        The tasks that may run, pinned by version and code SHA-256; any
        installed task when omitted.
    allowed_strategies : tuple of str, optional
        The aggregation strategies the site takes part in; any when omitted.
    max_epsilon : float, optional
        Record-level DP is required, with the plan's epsilon at most this.
    max_rounds : int, optional
        The most rounds a plan may ask for.
    coordinator_fingerprint : str, optional
        The SHA-256 of the trusted coordinator's certificate (DER); the node
        refuses any other coordinator, even one with a certificate from the
        federation's CA.
    allowed_statistics : tuple of str
        Which aggregate statistics may leave the site besides model updates
        (default: all of ``feature_statistics``, ``evaluation_metrics``,
        ``training_metrics``).
    auto_approve : bool
        Approve every plan that passes the policy without waiting for
        ``fedcare node approve`` (requires ``allowed_tasks``).

    Examples
    --------
    >>> policy = NodePolicy(require_secure_aggregation=True, min_participants=3)
    >>> policy.check_participants(4, stage="announced")
    >>> policy.check_participants(2, stage="announced")
    Traceback (most recent call last):
    ...
    fedcare.errors.PolicyViolation: policy.min_participants: this site requires at least 3 sites per sum; 2 announced
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    require_secure_aggregation: bool = False
    min_participants: int = Field(default=1, ge=1)
    require_record_level_dp: bool = False
    privacy: dict[str, PrivacyBudget] = Field(default_factory=dict)
    allowed_tasks: tuple[AllowedTask, ...] | None = None
    allowed_strategies: tuple[str, ...] | None = None
    max_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_rounds: int | None = Field(default=None, ge=1)
    coordinator_fingerprint: str | None = None
    allowed_statistics: tuple[Statistic, ...] = _STATISTICS
    auto_approve: bool = False

    @field_validator("coordinator_fingerprint")
    @classmethod
    def _coordinator_hex(cls, value: str | None) -> str | None:
        return None if value is None else _fingerprint(value)

    @field_validator("allowed_strategies")
    @classmethod
    def _known_strategies(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        from typing import get_args

        from fedcare.plan import StrategyConfig

        known = get_args(StrategyConfig.model_fields["name"].annotation)
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown strategies {', '.join(unknown)}; known: {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _no_contradictions(self) -> NodePolicy:
        if self.max_epsilon is not None and "require_record_level_dp" in self.model_fields_set and not self.require_record_level_dp:
            raise PydanticCustomError(
                "policy_contradiction",
                "max_epsilon caps the epsilon of record-level DP, which require_record_level_dp: false does not "
                "require; remove one of them",
                {"loc": "max_epsilon"},
            )
        if self.auto_approve and self.allowed_tasks is None:
            raise PydanticCustomError(
                "policy_contradiction",
                "auto_approve runs plans unattended; list the allowed_tasks (name, version, sha256) it may run",
                {"loc": "auto_approve"},
            )
        names = [task.name for task in self.allowed_tasks or ()]
        if len(set(names)) != len(names):
            raise PydanticCustomError(
                "policy_contradiction", "allowed_tasks lists a task twice", {"loc": "allowed_tasks"}
            )
        if len(set(self.allowed_statistics)) != len(self.allowed_statistics):
            raise PydanticCustomError(
                "policy_contradiction", "allowed_statistics lists a statistic twice", {"loc": "allowed_statistics"}
            )
        return self

    def check_plan(self, plan: Plan, *, task: TaskInfo) -> None:
        """Refuse a plan that breaks the policy, naming the policy key; check before any data is read.

        Parameters
        ----------
        plan : Plan
            The plan the coordinator sent.
        task : TaskInfo
            The installed task the plan names (name, version, code hash).

        Raises
        ------
        PolicyViolation
            The first broken rule: a task not allowed (by name, version or
            code hash), a strategy not allowed, record-level DP missing or
            weaker than ``max_epsilon``, secure aggregation missing, fewer
            participants per round than ``min_participants``, more rounds than
            ``max_rounds``, or statistics the site does not release.

        Examples
        --------
        >>> from fedcare.plan import parse_plan
        >>> from fedcare.tasks.registry import TaskInfo
        >>> plan = parse_plan({"task": "image-cnn", "dataset": {"name": "heart-disease"}, "rounds": 50})
        >>> NodePolicy(max_rounds=20).check_plan(plan, task=TaskInfo("image-cnn", "0.1.0", "0" * 64))
        Traceback (most recent call last):
        ...
        fedcare.errors.PolicyViolation: policy.max_rounds: the plan asks for 50 rounds; this site allows at most 20
        """
        if self.allowed_tasks is not None:
            allowed = {entry.name: entry for entry in self.allowed_tasks}
            entry = allowed.get(plan.task)
            if entry is None:
                raise PolicyViolation(
                    f"task {plan.task!r} is not allowed at this site (allowed: {', '.join(allowed) or 'none'})",
                    field="policy.allowed_tasks",
                )
            if entry.version is not None and entry.version != task.version:
                raise PolicyViolation(
                    f"task {plan.task!r} is installed at version {task.version}; the policy allows {entry.version}",
                    field="policy.allowed_tasks",
                )
            if entry.sha256 is not None and entry.sha256 != task.sha256:
                raise PolicyViolation(
                    f"the installed code of task {plan.task!r} has SHA-256 {task.sha256[:16]}..., not the "
                    f"{entry.sha256[:16]}... the policy allows: the code changed since it was approved",
                    field="policy.allowed_tasks",
                )
        if self.allowed_strategies is not None and plan.strategy.name not in self.allowed_strategies:
            raise PolicyViolation(
                f"strategy {plan.strategy.name!r} is not allowed at this site (allowed: "
                f"{', '.join(self.allowed_strategies) or 'none'})",
                field="policy.allowed_strategies",
            )
        record_level = plan.privacy.record_level
        self.check_record_level_dp(enabled=record_level.enabled)
        if self.max_epsilon is not None:
            if not record_level.enabled:
                raise PolicyViolation(
                    f"this site requires record-level DP with epsilon at most {self.max_epsilon:g}; the plan has "
                    "none (set privacy.record_level.enabled: true)",
                    field="policy.max_epsilon",
                )
            if record_level.noise_multiplier is None and record_level.epsilon > self.max_epsilon:
                raise PolicyViolation(
                    f"the plan's record-level epsilon {record_level.epsilon:g} is weaker than this site's maximum "
                    f"{self.max_epsilon:g}",
                    field="policy.max_epsilon",
                )
        self.check_secure_aggregation(enabled=plan.secure_aggregation.enabled)
        per_round = plan.nodes_per_round or (len(plan.nodes) if plan.nodes is not None else None)
        if per_round is not None and per_round < self.min_participants:
            raise PolicyViolation(
                f"the plan has {per_round} sites per round; this site requires at least {self.min_participants}",
                field="policy.min_participants",
            )
        if self.max_rounds is not None and plan.rounds > self.max_rounds:
            raise PolicyViolation(
                f"the plan asks for {plan.rounds} rounds; this site allows at most {self.max_rounds}",
                field="policy.max_rounds",
            )
        if plan.dataset.normalization == "federated":
            self.check_statistic("feature_statistics")

    def check_statistic(self, statistic: Statistic) -> None:
        """Refuse to release ``statistic`` when the policy does not list it.

        Raises
        ------
        PolicyViolation
            If ``statistic`` is not in ``allowed_statistics``.
        """
        if statistic not in self.allowed_statistics:
            raise PolicyViolation(
                f"this site does not release {statistic.replace('_', ' ')} (allowed_statistics: "
                f"{', '.join(self.allowed_statistics) or 'none'})",
                field="policy.allowed_statistics",
            )

    def check_coordinator(self, fingerprint: str) -> None:
        """Refuse a coordinator whose certificate is not the pinned one.

        Raises
        ------
        PolicyViolation
            If ``coordinator_fingerprint`` is set and differs from ``fingerprint``.
        """
        if self.coordinator_fingerprint is not None and _fingerprint(fingerprint) != self.coordinator_fingerprint:
            raise PolicyViolation(
                f"the coordinator's certificate has SHA-256 {_fingerprint(fingerprint)[:16]}..., not the trusted "
                f"{self.coordinator_fingerprint[:16]}...",
                field="policy.coordinator_fingerprint",
            )

    def check_record_level_dp(self, *, enabled: bool) -> None:
        """Refuse training without record-level DP when the policy requires it.

        Raises
        ------
        PolicyViolation
            If ``require_record_level_dp`` is set and ``enabled`` is false.
        """
        if self.require_record_level_dp and not enabled:
            raise PolicyViolation(
                "this site requires record-level differential privacy and the plan does not enable it "
                "(set privacy.record_level.enabled: true in the plan)",
                field="policy.require_record_level_dp",
            )

    def check_secure_aggregation(self, *, enabled: bool) -> None:
        """Refuse a training round without secure aggregation when the policy requires it.

        Raises
        ------
        PolicyViolation
            If ``require_secure_aggregation`` is set and ``enabled`` is false.
        """
        if self.require_secure_aggregation and not enabled:
            raise PolicyViolation(
                "this site requires secure aggregation and the plan does not enable it "
                "(set secure_aggregation.enabled: true in the plan)",
                field="policy.require_secure_aggregation",
            )

    def check_participants(self, count: int, *, stage: str) -> None:
        """Refuse when fewer than ``min_participants`` sites would be summed.

        Parameters
        ----------
        count : int
            Sites in the sum as known at this stage.
        stage : str
            Which count it is, for the message (``announced``, ``sent key shares``, ...).

        Raises
        ------
        PolicyViolation
            If ``count < min_participants``.
        """
        if count < self.min_participants:
            raise PolicyViolation(
                f"this site requires at least {self.min_participants} sites per sum; {count} {stage}",
                field="policy.min_participants",
            )
