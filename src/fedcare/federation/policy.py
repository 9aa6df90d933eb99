"""A site's policy: what it requires of every round it takes part in.

The policy lives at the site (``node.yaml``), not in the plan: the plan says
what the researcher asks for, the policy what the hospital allows. A job that
breaks the policy is refused with :class:`~fedcare.errors.PolicyViolation`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedcare.errors import PolicyViolation

__all__ = ["NodePolicy", "PrivacyBudget"]


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
        when the round is announced, before the masked update is sent (against
        the sites whose key shares arrived) and before helping to unmask
        (against the sites whose masked updates the coordinator holds).

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
