"""A site's plan approvals: every plan it received, and whether its data protection officer approved it.

The node records each plan it receives as ``pending`` (or ``approved`` at
once, under the policy's ``auto_approve``); ``fedcare node approve HASH`` and
``fedcare node reject HASH`` decide. One JSON file per plan, written
atomically, in the site's approvals directory, next to the plan itself, so
the officer can read exactly what was asked.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fedcare.errors import ConfigError, DataError
from fedcare.federation.rundir import atomic_write
from fedcare.plan import Plan, plan_hash

__all__ = ["PlanApprovals", "PlanRecord", "PlanStatus", "plan_summary"]

PlanStatus = Literal["pending", "approved", "rejected"]
_HASH = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PlanRecord:
    """One plan a site received, and the decision on it.

    Attributes
    ----------
    plan_hash : str
        The plan's SHA-256 (what ``fedcare node approve`` takes).
    status : {"pending", "approved", "rejected"}
    summary : dict
        What the plan asks for, readably: task, dataset, rounds, strategy, privacy.
    received_at, decided_at : str
        UTC ISO 8601 times (``decided_at`` empty while pending).
    decided_by : str
        ``operator`` or ``auto-approve`` (empty while pending).
    reason : str
        The reason given with a rejection.
    """

    plan_hash: str
    status: PlanStatus
    summary: dict[str, Any]
    received_at: str
    decided_at: str = ""
    decided_by: str = ""
    reason: str = ""


def plan_summary(plan: Plan) -> dict[str, Any]:
    """What a plan asks of a site, in words and numbers a data protection officer can check.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "image-cnn", "dataset": {"name": "chest-xray", "labels": ["a", "b"],
    ...                    "input_shape": [1, 28, 28]}, "rounds": 10})
    >>> s = plan_summary(plan)
    >>> s["task"], s["rounds"], s["privacy"]
    ('image-cnn', 10, 'no record-level DP; no secure aggregation')
    """
    record_level = plan.privacy.record_level
    privacy = []
    if record_level.enabled:
        budget = (
            f"noise multiplier {record_level.noise_multiplier:g}"
            if record_level.noise_multiplier is not None
            else f"epsilon {record_level.epsilon:g}"
        )
        privacy.append(f"record-level DP ({budget}, delta {record_level.delta:g})")
    else:
        privacy.append("no record-level DP")
    privacy.append("secure aggregation" if plan.secure_aggregation.enabled else "no secure aggregation")
    if plan.privacy.site_level.enabled:
        privacy.append(f"site-level DP ({plan.privacy.site_level.mode}, z {plan.privacy.site_level.noise_multiplier:g})")
    leaving = ["model updates", "evaluation metrics"]
    if plan.dataset.normalization == "federated":
        leaving.append("feature sums and sums of squares")
    return {
        "name": plan.name,
        "task": plan.task,
        "dataset": plan.dataset.name,
        "rounds": plan.rounds,
        "strategy": plan.strategy.name,
        "nodes": list(plan.nodes or ()),
        "privacy": "; ".join(privacy),
        "leaves_the_site": ", ".join(leaving),
    }


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class PlanApprovals:
    """The approvals directory of one site.

    Parameters
    ----------
    directory : Path
        Where ``HASH.json`` (the record) and ``HASH.plan.json`` (the plan) live.

    Examples
    --------
    >>> import tempfile
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "tabular-logistic", "dataset": {"name": "heart-disease"}, "rounds": 3})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     approvals = PlanApprovals(Path(tmp))
    ...     first = approvals.receive(plan)
    ...     decided = approvals.approve(first.plan_hash[:12])
    ...     print(first.status, decided.status, approvals.get(first.plan_hash).decided_by)
    pending approved operator
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def receive(self, plan: Plan, *, auto_approve: bool = False) -> PlanRecord:
        """Record a plan as received (pending, or approved under ``auto_approve``); a known plan keeps its decision."""
        digest = plan_hash(plan)
        known = self.get(digest)
        if known is not None:
            return known
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.directory / f"{digest}.plan.json", json.dumps(plan.model_dump(mode="json"), indent=2, sort_keys=True).encode())
        record = PlanRecord(plan_hash=digest, status="pending", summary=plan_summary(plan), received_at=_now())
        if auto_approve:
            record = PlanRecord(**{**asdict(record), "status": "approved", "decided_at": _now(), "decided_by": "auto-approve"})
        self._write(record)
        return record

    def get(self, plan_hash_or_prefix: str) -> PlanRecord | None:
        """The record of a plan, by its hash or a unique prefix of it; ``None`` if unknown."""
        try:
            digest = self.resolve(plan_hash_or_prefix)
        except ConfigError:
            return None
        path = self.directory / f"{digest}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise DataError(f"plan approval record {digest[:12]} cannot be read: {exc}") from None
        return PlanRecord(**data)

    def approve(self, plan_hash_or_prefix: str, *, by: str = "operator") -> PlanRecord:
        """Approve a received plan.

        Raises
        ------
        ConfigError
            If no received plan has that hash (or the prefix is ambiguous).
        """
        return self._decide(plan_hash_or_prefix, status="approved", by=by, reason="")

    def reject(self, plan_hash_or_prefix: str, *, reason: str = "", by: str = "operator") -> PlanRecord:
        """Reject a received plan, with a reason the coordinator will be told.

        Raises
        ------
        ConfigError
            If no received plan has that hash (or the prefix is ambiguous).
        """
        return self._decide(plan_hash_or_prefix, status="rejected", by=by, reason=reason)

    def records(self) -> list[PlanRecord]:
        """Every plan received, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob("*.json"):
            if path.name.endswith(".plan.json") or not _HASH.match(path.stem):
                continue
            record = self.get(path.stem)
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda r: (r.received_at, r.plan_hash))

    def plan_text(self, plan_hash_or_prefix: str) -> str:
        """The received plan itself, as JSON."""
        digest = self.resolve(plan_hash_or_prefix)
        return (self.directory / f"{digest}.plan.json").read_text(encoding="utf-8")

    def resolve(self, plan_hash_or_prefix: str) -> str:
        """The full hash of a received plan from its hash or a unique prefix (8 hex digits or more).

        Raises
        ------
        ConfigError
            If the prefix is too short, matches no received plan or several.
        """
        prefix = plan_hash_or_prefix.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", prefix):
            raise ConfigError(f"a plan hash is 8 to 64 hex digits, got {plan_hash_or_prefix!r}", field="plan_hash")
        if not self.directory.is_dir():
            raise ConfigError("this site has received no plan yet", field="plan_hash")
        matches = sorted(
            path.stem
            for path in self.directory.glob(f"{prefix}*.json")
            if not path.name.endswith(".plan.json") and _HASH.match(path.stem)
        )
        if not matches:
            raise ConfigError(f"no received plan has a hash starting {prefix}", field="plan_hash")
        if len(matches) > 1:
            raise ConfigError(f"{len(matches)} received plans have hashes starting {prefix}; give more digits", field="plan_hash")
        return matches[0]

    def _decide(self, plan_hash_or_prefix: str, *, status: PlanStatus, by: str, reason: str) -> PlanRecord:
        record = self.get(plan_hash_or_prefix)
        if record is None:
            self.resolve(plan_hash_or_prefix)  # raises, saying why
            raise ConfigError(f"no received plan has hash {plan_hash_or_prefix}", field="plan_hash")
        decided = PlanRecord(**{**asdict(record), "status": status, "decided_at": _now(), "decided_by": by, "reason": reason})
        self._write(decided)
        return decided

    def _write(self, record: PlanRecord) -> None:
        atomic_write(self.directory / f"{record.plan_hash}.json", json.dumps(asdict(record), indent=2, sort_keys=True).encode())
