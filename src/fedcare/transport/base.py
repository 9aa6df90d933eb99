"""The transport interface: how jobs reach nodes and results come back.

The coordinator side (:class:`Transport`) submits jobs and iterates results
as they complete. The node side (:class:`NodeChannel`) pulls jobs and pushes
results: nodes only ever open outbound connections. Every implementation
passes the same conformance tests (``tests/transport/test_conformance.py``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Iterator
from typing import Self

from fedcare.messages import Job, JobResult

__all__ = ["NodeChannel", "NodeRunner", "Transport"]


class NodeChannel(abc.ABC):
    """A node's end of the link."""

    @abc.abstractmethod
    def pull_job(self, *, timeout_s: float) -> Job | None:
        """Wait up to ``timeout_s`` seconds for the next job; None if none came."""

    @abc.abstractmethod
    def push_result(self, result: JobResult) -> None:
        """Send a result back to the coordinator."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once the coordinator has shut the federation down."""


#: What runs a node: takes its channel and serves jobs until the channel closes.
NodeRunner = Callable[[NodeChannel], None]


class Transport(abc.ABC):
    """The coordinator's end of the links to all nodes."""

    @abc.abstractmethod
    def nodes(self) -> list[str]:
        """Identifiers of the nodes currently reachable, sorted."""

    @abc.abstractmethod
    def submit(self, node_id: str, job: Job) -> None:
        """Queue ``job`` for ``node_id``.

        Raises
        ------
        TransportError
            If the node is unknown or the transport is closed.
        """

    @abc.abstractmethod
    def results(self, job_ids: Collection[str], *, timeout_s: float | None) -> Iterator[JobResult]:
        """Yield results of ``job_ids`` as they complete.

        Stops when every job has answered or ``timeout_s`` seconds have
        passed; results of other (stale) jobs are dropped. A caller may stop
        iterating early: the jobs it has not had an answer to stay
        outstanding, and a later call naming them (with jobs submitted since)
        yields their results. Buffered aggregation
        (:mod:`fedcare.federation.buffered`) takes one answer at a time so.
        """

    def statuses(self) -> dict[str, tuple[str, str]]:
        """Each node's answer to the plan (``pending``, ``approved``, ``rejected``, ``refused``) and its reason.

        Transports whose nodes approve nothing themselves (in-process
        simulations) report none: every node counts as approved.
        """
        return {}

    def close(self) -> None:
        """Release the links; nodes see their channel close."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
