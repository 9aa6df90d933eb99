"""Which sites take part: the coordinator's view of each site's answer to the plan.

A deployed site runs a plan only once its own approval is given; it reports
``pending``, ``approved``, ``rejected`` or ``refused`` (with the reason) to
the coordinator with its heartbeats. :class:`ApprovalGate` waits for the
answers before round 1 as ``plan.approval`` says, leaves out of each round
the sites that have not approved, and records every change as an event and
in the coordinator's audit log. Transports whose nodes approve nothing
themselves (in-process simulations) report no status: every node takes part.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fedcare.errors import FederationError
from fedcare.plan import Plan

if TYPE_CHECKING:
    from fedcare.federation.audit_log import AuditLog
    from fedcare.transport.base import Transport

__all__ = ["ApprovalGate"]

#: Statuses that let a node take part: approved, or none reported.
_TAKES_PART = frozenset({"", "approved"})
#: Final answers: the coordinator stops waiting for these nodes.
_FINAL = frozenset({"approved", "rejected", "refused"})
#: How long to wait, whatever ``plan.approval.wait_s``, for a node that joined to give any answer
#: (it does so right after joining).
_FIRST_ANSWER_S = 10.0


class ApprovalGate:
    """Follows the sites' answers to the plan.

    Parameters
    ----------
    plan : Plan
    transport : Transport
        Reports each node's status (:meth:`Transport.statuses`).
    emit : callable
        Logs an event (the coordinator's event log).
    audit : AuditLog, optional
        The coordinator's audit log: approvals, rejections and refusals land there.
    poll_s : float
        How often to look at the statuses while waiting.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> from fedcare.transport.inproc import InProcTransport
    >>> plan = parse_plan({"task": "t", "dataset": {"name": "d"}, "rounds": 1})
    >>> with InProcTransport() as transport:
    ...     ApprovalGate(plan, transport=transport, emit=print).taking_part(["a", "b"])
    ['a', 'b']
    """

    def __init__(
        self,
        plan: Plan,
        *,
        transport: Transport,
        emit: Callable[[dict[str, Any]], None],
        audit: AuditLog | None = None,
        poll_s: float = 0.2,
    ) -> None:
        self.plan = plan
        self.transport = transport
        self._emit = emit
        self.audit = audit
        self.poll_s = poll_s
        self._seen: dict[str, tuple[str, str]] = {}

    def wait(self, nodes: Sequence[str]) -> list[str]:
        """Wait up to ``plan.approval.wait_s`` for every node's answer; return those taking part.

        Raises
        ------
        FederationError
            Under ``proceed: when-all-approved`` if a node has not approved by
            then, or if fewer than ``plan.min_nodes`` approved.
        """
        approval = self.plan.approval
        started = time.monotonic()
        while True:
            statuses = self._update(nodes)
            silent = [n for n in nodes if statuses.get(n, ("", ""))[0] == "unknown"]
            undecided = [n for n in nodes if n in statuses and statuses[n][0] not in _FINAL]
            waited = time.monotonic() - started
            if not undecided or (waited >= approval.wait_s and (not silent or waited >= _FIRST_ANSWER_S)):
                break
            time.sleep(self.poll_s)
        statuses = self._update(nodes)
        taking_part = [n for n in nodes if statuses.get(n, ("", ""))[0] in _TAKES_PART]
        if approval.proceed == "when-all-approved" and len(taking_part) < len(nodes):
            raise FederationError(
                f"the plan needs every site's approval, and {self._not_approved(nodes, statuses)}", round=0
            )
        if len(taking_part) < self.plan.min_nodes:
            raise FederationError(
                f"only {len(taking_part)} sites approved the plan, fewer than min_nodes={self.plan.min_nodes}; "
                f"{self._not_approved(nodes, statuses)}",
                round=0,
            )
        return taking_part

    def taking_part(self, nodes: Sequence[str]) -> list[str]:
        """The nodes that have approved the plan (or report no status), recording any change."""
        statuses = self._update(nodes)
        return [n for n in nodes if statuses.get(n, ("", ""))[0] in _TAKES_PART]

    def _update(self, nodes: Sequence[str]) -> dict[str, tuple[str, str]]:
        statuses = {n: s for n, s in self.transport.statuses().items() if n in nodes}
        changed = {n: s for n, s in statuses.items() if self._seen.get(n) != s}
        if changed:
            self._seen.update(changed)
            self._emit(
                {
                    "event": "approval",
                    "approved": sorted(n for n, (s, _) in self._seen.items() if s == "approved"),
                    "pending": sorted(n for n, (s, _) in self._seen.items() if s == "pending"),
                    "rejected": {n: r for n, (s, r) in sorted(self._seen.items()) if s == "rejected"},
                    "refused": {n: r for n, (s, r) in sorted(self._seen.items()) if s == "refused"},
                }
            )
            if self.audit is not None:
                for node, (status, reason) in sorted(changed.items()):
                    if status == "approved":
                        self.audit.append("plan_approved", peer=node)
                    elif status == "pending":
                        self.audit.append("plan_pending", peer=node)
                    elif status == "rejected":
                        self.audit.append("plan_rejected", peer=node, reason=reason)
                    elif status == "refused":
                        self.audit.refusal(reason=reason, peer=node)
        return statuses

    @staticmethod
    def _not_approved(nodes: Sequence[str], statuses: dict[str, tuple[str, str]]) -> str:
        parts = []
        for node in nodes:
            status, reason = statuses.get(node, ("", ""))
            if status in _TAKES_PART:
                continue
            parts.append(f"{node} {status or 'did not answer'}" + (f" ({reason})" if reason else ""))
        return "; ".join(parts) or "every site approved"
