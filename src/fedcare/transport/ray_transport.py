"""The Ray transport: simulated sites packed into a few Ray worker actors.

Each worker actor holds several sites and answers ``run(node_id, header,
parameters)`` with ``(header, update)``. What crosses between processes is
plain data only: headers are dicts of strings and numbers (the job's config
and the result's protocol data as JSON text), parameters and updates are
safetensors bytes. No fedcare object is pickled on the way.

Ray itself pickles its containers, so this transport is for simulation inside
one trusted cluster; federations across organisations use the gRPC transport
with mutual TLS.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import time
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from fedcare.errors import ConfigError, ProtocolError, TransportError
from fedcare.messages import Job, JobKind, JobResult
from fedcare.params import Parameters
from fedcare.transport.base import Transport

__all__ = [
    "RayTransport",
    "WireJob",
    "WireResult",
    "job_from_wire",
    "job_to_wire",
    "require_ray",
    "result_from_wire",
    "result_to_wire",
]

logger = logging.getLogger(__name__)

#: A job as it crosses to a worker: a header of JSON-able values, and the parameters as safetensors bytes.
WireJob = tuple[dict[str, Any], bytes | None]
#: A result as it comes back: a header of JSON-able values, and the update as safetensors bytes.
WireResult = tuple[dict[str, Any], bytes | None]

#: Jobs a worker actor is given at once by default: one computing, one waiting, so it never idles.
DEFAULT_IN_FLIGHT_PER_WORKER = 2


def require_ray() -> Any:
    """Import Ray, or explain how to install it.

    Returns
    -------
    module
        The ``ray`` module.

    Raises
    ------
    ConfigError
        If Ray is not installed, naming the extra to install.

    Examples
    --------
    >>> require_ray().__name__
    'ray'
    """
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "the Ray backend needs Ray, which is not installed: pip install 'fedcare[ray]'", field="backend"
        ) from None
    return ray


def job_to_wire(job: Job) -> WireJob:
    """A job as plain data: its header (config as JSON text) and its parameters as safetensors bytes.

    Parameters
    ----------
    job : Job
        The job to send.

    Returns
    -------
    tuple of (dict, bytes or None)

    Raises
    ------
    ProtocolError
        If the job's config is not JSON-able.

    Examples
    --------
    >>> header, payload = job_to_wire(Job("run", 1, "j1", JobKind.EVALUATE, plan_hash="h", config={"seed": 3}))
    >>> header["kind"], header["config"], payload
    ('evaluate', '{"seed": 3}', None)
    >>> job_from_wire(header, payload).config["seed"]
    3
    """
    try:
        config = json.dumps(dict(job.config), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"job config must be JSON of numbers and strings: {exc}", round=job.round) from None
    header = {
        "run_id": job.run_id,
        "round": job.round,
        "job_id": job.job_id,
        "kind": job.kind.value,
        "plan_hash": job.plan_hash,
        "config": config,
    }
    return header, None if job.parameters is None else job.parameters.to_bytes()


def job_from_wire(header: Mapping[str, Any], parameters: bytes | None) -> Job:
    """The job :func:`job_to_wire` encoded.

    Parameters
    ----------
    header : Mapping[str, Any]
        The job's header.
    parameters : bytes, optional
        The global parameters as safetensors bytes.

    Returns
    -------
    Job

    Raises
    ------
    ProtocolError
        If the header misses a field, names an unknown kind or the parameters are not valid safetensors.
    """
    try:
        config = json.loads(header["config"])
        return Job(
            run_id=str(header["run_id"]),
            round=int(header["round"]),
            job_id=str(header["job_id"]),
            kind=JobKind(header["kind"]),
            plan_hash=str(header["plan_hash"]),
            parameters=None if parameters is None else Parameters.from_bytes(parameters),
            config=config,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed job header: {type(exc).__name__}: {exc}") from None


def result_to_wire(result: JobResult) -> WireResult:
    """A result as plain data: its header (protocol data as JSON text) and its update as safetensors bytes.

    Parameters
    ----------
    result : JobResult
        The node's answer.

    Returns
    -------
    tuple of (dict, bytes or None)

    Raises
    ------
    ProtocolError
        If the result's data is not JSON-able.

    Examples
    --------
    >>> r = JobResult("run", 1, "j1", JobKind.EVALUATE, node_id="a", num_examples=4, metrics={"auc": 0.5})
    >>> result_from_wire(*result_to_wire(r)) == r
    True
    """
    try:
        data = json.dumps(dict(result.data))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(
            f"result data must be JSON of numbers and strings: {exc}", node_id=result.node_id, round=result.round
        ) from None
    header = {
        "run_id": result.run_id,
        "round": result.round,
        "job_id": result.job_id,
        "kind": result.kind.value,
        "node_id": result.node_id,
        "num_examples": int(result.num_examples),
        "metrics": {str(k): float(v) for k, v in result.metrics.items()},
        "statistics": {str(k): [float(x) for x in v] for k, v in result.statistics.items()},
        "data": data,
        "error": result.error,
        "duration_s": float(result.duration_s),
    }
    return header, None if result.update is None else result.update.to_bytes()


def result_from_wire(header: Mapping[str, Any], update: bytes | None) -> JobResult:
    """The result :func:`result_to_wire` encoded.

    Parameters
    ----------
    header : Mapping[str, Any]
        The result's header.
    update : bytes, optional
        The update as safetensors bytes.

    Returns
    -------
    JobResult

    Raises
    ------
    ProtocolError
        If the header misses a field or the update is not valid safetensors.
    """
    try:
        error = header["error"]
        return JobResult(
            run_id=str(header["run_id"]),
            round=int(header["round"]),
            job_id=str(header["job_id"]),
            kind=JobKind(header["kind"]),
            node_id=str(header["node_id"]),
            update=None if update is None else Parameters.from_bytes(update),
            num_examples=int(header["num_examples"]),
            metrics={str(k): float(v) for k, v in header["metrics"].items()},
            statistics={str(k): tuple(float(x) for x in v) for k, v in header["statistics"].items()},
            data=json.loads(header["data"]),
            error=None if error is None else str(error),
            duration_s=float(header["duration_s"]),
        )
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"malformed result header: {type(exc).__name__}: {exc}") from None


class RayTransport(Transport):
    """Sends each node's jobs to the Ray worker actor that holds the node.

    A worker actor is any Ray actor with a method
    ``run(node_id, header, parameters) -> (header, update)`` speaking
    :func:`job_to_wire` / :func:`result_to_wire` (see
    :mod:`fedcare.scale` for the one that holds :class:`~fedcare.federation.Node`
    objects). The global parameters are put into Ray's object store once
    per round and shared by every job that carries them. At most
    ``max_in_flight_per_worker`` jobs are handed to a worker at a time; the
    rest wait here, so updates held in memory stay O(model x workers) however
    many sites there are. Results are yielded as they complete
    (``ray.wait``). The transport neither starts nor stops Ray or the actors.

    Parameters
    ----------
    placement : Mapping[str, Any]
        Node id -> the actor handle of the worker that holds it.
    max_in_flight_per_worker : int
        Jobs handed to one worker at once (default 2).

    Raises
    ------
    ConfigError
        If Ray is not installed or ``max_in_flight_per_worker`` is below 1.

    Examples
    --------
    >>> import ray  # doctest: +SKIP
    >>> transport = RayTransport({"site-0": worker, "site-1": worker})  # doctest: +SKIP
    >>> transport.submit("site-0", job)  # doctest: +SKIP
    >>> [r.node_id for r in transport.results([job.job_id], timeout_s=60)]  # doctest: +SKIP
    ['site-0']
    """

    def __init__(self, placement: Mapping[str, Any], *, max_in_flight_per_worker: int = DEFAULT_IN_FLIGHT_PER_WORKER) -> None:
        if max_in_flight_per_worker < 1:
            raise ConfigError(
                f"must be >= 1, got {max_in_flight_per_worker}", field="max_in_flight_per_worker"
            )
        self._ray = require_ray()
        self._placement = dict(placement)
        self._max_in_flight = max_in_flight_per_worker
        # Workers by identity: several nodes share one actor handle.
        self._workers: dict[int, Any] = {id(actor): actor for actor in self._placement.values()}
        self._queued: dict[int, collections.deque[tuple[str, Job]]] = {key: collections.deque() for key in self._workers}
        self._in_flight: dict[Any, tuple[int, str, Job]] = {}  # result ref -> (worker key, node id, job sans parameters)
        self._counts: dict[int, int] = {key: 0 for key in self._workers}
        self._shared: tuple[Parameters, Any] | None = None  # the last parameters put into the object store
        self._closed = False

    def nodes(self) -> list[str]:
        return sorted(self._placement)

    def submit(self, node_id: str, job: Job) -> None:
        if self._closed:
            raise TransportError("transport is closed", node_id=node_id)
        try:
            actor = self._placement[node_id]
        except KeyError:
            raise TransportError(f"no node {node_id!r} is attached", node_id=node_id) from None
        key = id(actor)
        self._queued[key].append((node_id, job))
        self._dispatch(key)

    def results(self, job_ids: Collection[str], *, timeout_s: float | None) -> Iterator[JobResult]:
        waiting = set(job_ids)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        expired = False  # a caller that stops iterating early keeps its other jobs outstanding (buffered rounds)
        try:
            while waiting and self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    expired = True
                    return
                ready, _ = self._ray.wait(list(self._in_flight), num_returns=1, timeout=remaining)
                if not ready:
                    expired = True
                    return
                for ref in ready:
                    key, node_id, job = self._in_flight.pop(ref)
                    self._counts[key] -= 1
                    self._dispatch(key)
                    result = self._collect(ref, node_id, job)
                    if result.job_id not in waiting:
                        logger.info("dropped a stale result", extra={"node_id": result.node_id, "round": result.round})
                        continue
                    waiting.discard(result.job_id)
                    yield result
        finally:
            if waiting and (expired or not self._in_flight):
                self._drop_queued(waiting)

    def close(self) -> None:
        self._closed = True
        for queue in self._queued.values():
            queue.clear()
        for ref in list(self._in_flight):
            with contextlib.suppress(Exception):  # a job already finished, or one Ray cannot cancel, is left to end
                self._ray.cancel(ref)
        self._in_flight.clear()
        self._shared = None

    # -- internals ---------------------------------------------------------------

    def _dispatch(self, key: int) -> None:
        """Hand queued jobs to worker ``key`` while it has fewer than the bound in flight."""
        queue = self._queued[key]
        actor = self._workers[key]
        while queue and self._counts[key] < self._max_in_flight:
            node_id, job = queue.popleft()
            bare = Job(job.run_id, job.round, job.job_id, job.kind, plan_hash=job.plan_hash, config=job.config)
            header, _ = job_to_wire(bare)
            parameters = None if job.parameters is None else self._put(job.parameters)
            ref = actor.run.remote(node_id, header, parameters)
            self._in_flight[ref] = (key, node_id, bare)
            self._counts[key] += 1

    def _put(self, parameters: Parameters) -> Any:
        """The object-store reference of ``parameters``' bytes, put once for every job that shares them."""
        if self._shared is None or self._shared[0] is not parameters:
            self._shared = (parameters, self._ray.put(parameters.to_bytes()))
        return self._shared[1]

    def _collect(self, ref: Any, node_id: str, job: Job) -> JobResult:
        """The result behind ``ref``; a failed result naming the node when the worker could not answer."""
        context = {"node_id": node_id, "round": job.round}
        try:
            header, update = self._ray.get(ref)
            return result_from_wire(header, update)
        except ProtocolError as exc:
            logger.warning("refused a malformed result", extra=context)
            message = exc.message
        except Exception as exc:  # noqa: BLE001 - the actor died or Ray lost the task: the node's failure
            logger.warning("worker failed a job", extra={**context, "error_type": type(exc).__name__})
            message = f"the Ray worker holding this node failed: {type(exc).__name__}"
        return JobResult(job.run_id, job.round, job.job_id, job.kind, node_id=node_id, error=message)

    def _drop_queued(self, job_ids: set[str]) -> None:
        """Forget jobs past their deadline that no worker has started."""
        for queue in self._queued.values():
            kept = [(node_id, job) for node_id, job in queue if job.job_id not in job_ids]
            queue.clear()
            queue.extend(kept)
