"""The in-process transport: every node in its own thread, jobs passed by reference."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Collection, Iterator

from fedcare.errors import TransportError
from fedcare.messages import Job, JobResult
from fedcare.transport.base import NodeChannel, NodeRunner, Transport

__all__ = ["InProcTransport"]

logger = logging.getLogger(__name__)

_PUT_POLL_S = 0.05  # how often a node waiting to hand back a result checks for close()


class _InProcChannel(NodeChannel):
    def __init__(self, transport: InProcTransport, node_id: str) -> None:
        self._transport = transport
        self.node_id = node_id
        self.inbox: queue.Queue[Job | None] = queue.Queue()  # None: woken by close()

    def pull_job(self, *, timeout_s: float) -> Job | None:
        try:
            job = self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if job is None:
            return None
        # A node computes only while it holds a compute slot: simulated sites
        # share this machine's cores, and memory stays O(model x slots).
        self._transport._slots.acquire()
        return job

    def push_result(self, result: JobResult) -> None:
        results = self._transport._results
        try:
            # At most ``max_concurrency`` results wait for the coordinator; a node that
            # finds no room keeps its slot until there is, so the model-sized updates
            # held in memory stay O(model x slots) however many nodes there are.
            while not self.closed:
                try:
                    results.put(result, timeout=_PUT_POLL_S)
                    return
                except queue.Full:
                    continue
            try:
                results.put_nowait(result)
            except queue.Full:
                pass  # closed: nobody will collect it
        finally:
            self._transport._slots.release()

    @property
    def closed(self) -> bool:
        return self._transport._closed.is_set()


class InProcTransport(Transport):
    """Runs each node in a thread of this process; a real transport, not a mock.

    Jobs and results are passed by reference (the global parameters are
    frozen read-only), so nothing is serialized. At most ``max_concurrency``
    nodes compute at once, and at most as many results wait to be collected.

    Parameters
    ----------
    max_concurrency : int, optional
        Nodes allowed to compute at the same time; defaults to the number of
        CPU cores.

    Examples
    --------
    >>> from fedcare.messages import Job, JobKind, JobResult
    >>> def echo(channel):
    ...     while not channel.closed:
    ...         job = channel.pull_job(timeout_s=0.05)
    ...         if job is not None:
    ...             channel.push_result(JobResult(job.run_id, job.round, job.job_id,
    ...                                           job.kind, node_id="a", num_examples=1))
    >>> with InProcTransport() as transport:
    ...     transport.add_node("a", echo)
    ...     transport.submit("a", Job("run", 1, "j1", JobKind.EVALUATE, plan_hash=""))
    ...     [r.job_id for r in transport.results(["j1"], timeout_s=5)]
    ['j1']
    """

    def __init__(self, *, max_concurrency: int | None = None) -> None:
        slots = max_concurrency or os.cpu_count() or 1
        self._slots = threading.BoundedSemaphore(slots)
        self._results: queue.Queue[JobResult] = queue.Queue(maxsize=slots)
        self._channels: dict[str, _InProcChannel] = {}
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()

    def add_node(self, node_id: str, runner: NodeRunner) -> None:
        """Start ``runner`` (e.g. ``Node.serve``) in a thread with its own channel.

        Raises
        ------
        TransportError
            If a node with that identifier is already attached.
        """
        if node_id in self._channels:
            raise TransportError(f"node {node_id!r} is already attached")
        channel = _InProcChannel(self, node_id)
        self._channels[node_id] = channel
        thread = threading.Thread(target=runner, args=(channel,), name=f"fedcare-node-{node_id}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def nodes(self) -> list[str]:
        return sorted(self._channels)

    def submit(self, node_id: str, job: Job) -> None:
        if self._closed.is_set():
            raise TransportError("transport is closed")
        try:
            channel = self._channels[node_id]
        except KeyError:
            raise TransportError(f"no node {node_id!r} is attached", node_id=node_id) from None
        channel.inbox.put(job)

    def results(self, job_ids: Collection[str], *, timeout_s: float | None) -> Iterator[JobResult]:
        waiting = set(job_ids)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while waiting:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            try:
                result = self._results.get(timeout=remaining)
            except queue.Empty:
                return
            if result.job_id not in waiting:
                logger.info("dropped a stale result", extra={"node_id": result.node_id, "round": result.round})
                continue
            waiting.discard(result.job_id)
            yield result

    def close(self) -> None:
        self._closed.set()
        for channel in self._channels.values():
            channel.inbox.put(None)  # wake nodes waiting for a job, so they see the close now
        for thread in self._threads:
            thread.join(timeout=5)
