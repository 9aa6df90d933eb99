"""Light nodes for the load tests and ``benchmarks/load.py``: many real node links in one process.

Each simulated node is a thread holding its own :class:`GrpcNodeChannel`
(its own TLS connection, with its own node certificate). It joins, approves
the plan, and answers every TRAIN job with a known constant update and
every EVALUATE job with a fixed metric, without training anything; so the
coordinator's aggregate is known in advance (:func:`expected_fedavg`).

Run as a program (one process per group of nodes)::

    python tests/load/light_nodes.py --coordinator 127.0.0.1:PORT --certs DIR --names site-0,site-1

It prints one JSON line when every node has finished: ``{"joined": n,
"jobs": n, "errors": [...], "join_s": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["expected_fedavg", "known_update", "node_names", "run_light_nodes"]

#: Seconds a node keeps retrying an unreachable coordinator before it gives up.
GIVE_UP_AFTER_S = 60.0


def node_names(count: int) -> list[str]:
    """The names (certificate common names) of ``count`` light nodes.

    Examples
    --------
    >>> node_names(3)
    ['load-000', 'load-001', 'load-002']
    """
    return [f"load-{index:03d}" for index in range(count)]


def known_update(name: str) -> tuple[float, int]:
    """The constant every value of ``name``'s update holds, and its number of examples.

    The values are multiples of 1/4 and the weights small integers, so any
    order of float64 folding gives the same sum exactly.

    Examples
    --------
    >>> known_update("load-005")
    (1.25, 3)
    """
    index = int(name.rsplit("-", 1)[1])
    return (index % 8) / 4, 1 + index % 3


def expected_fedavg(initial: np.ndarray, names: Sequence[str], *, rounds: int) -> np.ndarray:
    """The global model after ``rounds`` rounds of FedAvg (server learning rate 1) over ``names``.

    Follows :class:`fedcare.strategies.FedAvg`'s arithmetic: the float64
    weighted mean of the updates, added to the float32 global model, cast
    back to float32.

    Examples
    --------
    >>> expected_fedavg(np.zeros(2, dtype=np.float32), ["load-002", "load-005"], rounds=2).tolist()
    [1.75, 1.75]
    """
    answers = [known_update(name) for name in names]
    total = float(sum(weight for _, weight in answers))
    mean = sum(value * weight for value, weight in answers) / total
    model = np.asarray(initial, dtype=np.float32)
    for _ in range(rounds):
        step = np.full(model.shape, mean, dtype=np.float64)
        step += model
        model = step.astype(np.float32)
    return model


class _Updates:
    """One frozen update per (model layout, value), shared by the threads of a process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[Any, float], Any] = {}

    def get(self, spec: Any, value: float) -> Any:
        from fedcare.params import Parameters, spec_size

        key = (spec, value)
        with self._lock:
            update = self._cache.get(key)
            if update is None:
                flat = np.full(spec_size(spec), value, dtype=np.float32)
                update = Parameters.from_flat(flat, spec).freeze()
                self._cache[key] = update
            return update


def _serve_one(
    name: str,
    *,
    coordinator: str,
    certs_dir: Path,
    updates: _Updates,
    report: dict[str, Any],
    lock: threading.Lock,
    chunk_bytes: int,
) -> None:
    from fedcare.messages import JobKind, JobResult
    from fedcare.transport.grpc_client import GrpcNodeChannel

    value, weight = known_update(name)
    started = time.monotonic()
    channel = GrpcNodeChannel(
        coordinator, certs_dir=certs_dir, name=name, chunk_bytes=chunk_bytes, give_up_after_s=GIVE_UP_AFTER_S
    )
    try:
        channel.join()
        channel.report_status("approved")
        with lock:
            report["joined"] += 1
            report["join_s"].append(time.monotonic() - started)
        jobs = 0
        while not channel.closed:
            job = channel.pull_job(timeout_s=10.0)
            if job is None:
                continue
            if job.kind is JobKind.TRAIN and job.parameters is not None:
                update = updates.get(job.parameters.spec, value)
                answer = JobResult(job.run_id, job.round, job.job_id, job.kind, node_id=name,
                                   update=update, num_examples=weight, metrics={"train_loss": value})
            elif job.kind is JobKind.EVALUATE:
                answer = JobResult(job.run_id, job.round, job.job_id, job.kind, node_id=name,
                                   num_examples=weight, metrics={"loss": value})
            else:
                answer = JobResult(job.run_id, job.round, job.job_id, job.kind, node_id=name,
                                   error=f"light nodes do not do {job.kind.value} jobs")
            del job  # the downloaded model is not kept while uploading
            channel.push_result(answer)
            jobs += 1
        with lock:
            report["jobs"] += jobs
    except Exception as exc:  # noqa: BLE001 - reported to the parent on stdout
        if not channel.closed:
            with lock:
                report["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
    finally:
        channel.close()


def run_light_nodes(
    *, coordinator: str, certs_dir: Path, names: Sequence[str], chunk_bytes: int = 1 << 20
) -> dict[str, Any]:
    """Serve as every node of ``names`` (one thread each) until the coordinator ends the run.

    Returns
    -------
    dict
        ``joined`` (nodes that joined), ``jobs`` (jobs answered), ``errors``
        (one line per node that failed) and ``join_s`` (seconds from start
        to joined, per node).
    """
    report: dict[str, Any] = {"joined": 0, "jobs": 0, "errors": [], "join_s": []}
    lock = threading.Lock()
    updates = _Updates()
    threads = [
        threading.Thread(
            target=_serve_one,
            args=(name,),
            kwargs={"coordinator": coordinator, "certs_dir": certs_dir, "updates": updates, "report": report,
                    "lock": lock, "chunk_bytes": chunk_bytes},
            name=f"light-{name}",
            daemon=True,
        )
        for name in names
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one light-node process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--certs", type=Path, required=True)
    parser.add_argument("--names", required=True, help="comma-separated node names")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20, help="upload chunk size")
    args = parser.parse_args(argv)
    report = run_light_nodes(
        coordinator=args.coordinator, certs_dir=args.certs, names=args.names.split(","), chunk_bytes=args.chunk_bytes
    )
    print(json.dumps(report), flush=True)
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
