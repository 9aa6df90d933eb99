"""The federation: coordinator, nodes, the run directory, and a site's approvals and audit log."""

from fedcare.federation.approvals import PlanApprovals, PlanRecord
from fedcare.federation.audit_log import AuditLog, verify
from fedcare.federation.buffered import staleness_weight
from fedcare.federation.coordinator import Coordinator, EvaluationSummary, RunResult
from fedcare.federation.node import Node, RefusingNode
from fedcare.federation.participation import ApprovalGate
from fedcare.federation.rundir import RunDirectory

__all__ = [
    "ApprovalGate",
    "AuditLog",
    "Coordinator",
    "EvaluationSummary",
    "Node",
    "PlanApprovals",
    "PlanRecord",
    "RefusingNode",
    "RunDirectory",
    "RunResult",
    "staleness_weight",
    "verify",
]
