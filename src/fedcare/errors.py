"""Exceptions raised by fedcare.

Every error fedcare raises on purpose derives from :class:`FedcareError` and
from the matching builtin, so callers can catch either::

    FedcareError(Exception)
    +-- ConfigError(FedcareError, ValueError)        bad plan, node config or argument
    +-- DataError(FedcareError, ValueError)          local data missing or malformed
    +-- ProtocolError(FedcareError, ValueError)      a message breaks the protocol
    |                                                (wrong shape, NaN, stale round, ...)
    +-- TransportError(FedcareError, ConnectionError) a link failed or timed out
    +-- PolicyViolation(FedcareError, PermissionError) a site refuses the work
    |   +-- BudgetExceeded(PolicyViolation)           ... because it would overspend privacy
    +-- FederationError(FedcareError, RuntimeError)  the federation cannot go on
        |                                            (too few nodes left in a round)
        +-- SecAggAborted(FederationError)           a secure aggregation round could not
                                                     complete; no partial sum was released

Errors carry the context they happened in (``node_id``, ``round``, ``field``)
as attributes; messages say what went wrong, what was received and what to do.
Messages never contain patient data or data paths.
"""

from __future__ import annotations

__all__ = [
    "BudgetExceeded",
    "ConfigError",
    "DataError",
    "FederationError",
    "FedcareError",
    "PolicyViolation",
    "ProtocolError",
    "SecAggAborted",
    "TransportError",
]


class FedcareError(Exception):
    """Root of every error fedcare raises on purpose.

    Parameters
    ----------
    message : str
        What went wrong, what was received and what to do.
    node_id : str, optional
        The site the error concerns.
    round : int, optional
        The federation round the error happened in (1-based).
    field : str, optional
        The dotted path of the configuration field at fault, e.g.
        ``"plan.local.learning_rate"``.

    Examples
    --------
    >>> err = ConfigError("must be > 0, got -0.1", field="plan.local.learning_rate")
    >>> str(err)
    'plan.local.learning_rate: must be > 0, got -0.1'
    >>> isinstance(err, ValueError)
    True
    """

    def __init__(
        self,
        message: str,
        *,
        node_id: str | None = None,
        round: int | None = None,  # noqa: A002 - the federation's own word
        field: str | None = None,
    ) -> None:
        self.message = message
        self.node_id = node_id
        self.round = round
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        prefix = []
        if self.node_id is not None:
            prefix.append(f"node {self.node_id!r}")
        if self.round is not None:
            prefix.append(f"round {self.round}")
        head = f"[{', '.join(prefix)}] " if prefix else ""
        body = f"{self.field}: {self.message}" if self.field else self.message
        return head + body


class ConfigError(FedcareError, ValueError):
    """A plan, node configuration or argument is invalid."""


class DataError(FedcareError, ValueError):
    """Local data is missing, malformed or inconsistent with the plan."""


class ProtocolError(FedcareError, ValueError):
    """A message breaks the protocol: wrong shape, non-finite values, stale round."""


class TransportError(FedcareError, ConnectionError):
    """A link to a node or to the coordinator failed or timed out."""


class PolicyViolation(FedcareError, PermissionError):
    """A site's policy refuses the requested work."""


class BudgetExceeded(PolicyViolation):
    """The work would spend more privacy budget than the site allows."""


class FederationError(FedcareError, RuntimeError):
    """The federation cannot go on, e.g. fewer nodes than the minimum answered."""


class SecAggAborted(FederationError):
    """A secure aggregation round could not complete; no partial sum was released.

    Raised when fewer nodes than the threshold are left at some phase, or too
    few shares came back to remove the masks. The server discards its running
    sum, so nothing about the inputs of the nodes that did answer leaks; start a
    new round (with a new session) to try again.

    Examples
    --------
    >>> err = SecAggAborted("only 2 of 5 nodes sent shares; the threshold is 3")
    >>> isinstance(err, FederationError), isinstance(err, RuntimeError)
    (True, True)
    """
