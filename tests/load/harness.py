"""One load run: a real coordinator in this process, light nodes in a few child processes.

The coordinator is a :class:`GrpcTransport` with mutual TLS on 127.0.0.1 and
a :class:`Coordinator` running FedAvg over a plan that lists every node. The
nodes are :mod:`light_nodes` processes, each holding a group of real
:class:`GrpcNodeChannel` links with their own certificates. A sampler thread
records this process's resident set size and thread count, and the node
processes' resident set sizes, while the run goes on.

Used by ``tests/load/test_many_nodes.py`` and ``benchmarks/load.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # imported by path from the benchmark
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from light_nodes import node_names  # noqa: E402

__all__ = ["LoadRun", "issue_certificates", "run_load"]

_LIGHT_NODES = Path(__file__).resolve().parent / "light_nodes.py"


def issue_certificates(directory: Path, count: int) -> float:
    """A CA, the coordinator's certificate for 127.0.0.1 and ``count`` node certificates; returns the seconds taken."""
    from fedcare.transport import pki

    started = time.perf_counter()
    pki.init_ca(directory, federation="load")
    pki.issue_certificate(directory, role="server", name="coordinator", hosts=("127.0.0.1",))
    for name in node_names(count):
        pki.issue_certificate(directory, role="node", name=name)
    return time.perf_counter() - started


@dataclass
class LoadRun:
    """What one load run measured (bytes, seconds)."""

    num_nodes: int
    num_values: int
    rounds: int
    processes: int
    max_concurrent_uploads: int
    join_s: float
    round_s: list[float]
    run_s: float
    initial: np.ndarray
    final: np.ndarray
    participation: dict[int, list[str]]
    failures: list[dict[str, Any]]
    #: The coordinator process's RSS before the transport starts, once every node joined, and its peak during the rounds.
    start_rss_bytes: int
    joined_rss_bytes: int
    peak_rss_bytes: int
    #: Largest sum of the coordinator's and the node processes' RSS.
    peak_total_rss_bytes: int
    #: Largest number of threads in the coordinator process (all of them, the gRPC pool's included).
    peak_threads: int
    threads_before: int
    node_reports: list[dict[str, Any]] = field(default_factory=list)
    node_exit_codes: list[int] = field(default_factory=list)

    @property
    def model_bytes(self) -> int:
        """Bytes of one model (float32)."""
        return 4 * self.num_values

    @property
    def rss_growth_bytes(self) -> int:
        """How far the coordinator's RSS rose during the rounds, above its level once every node joined."""
        return self.peak_rss_bytes - self.joined_rss_bytes


class _Sampler:
    """Polls RSS and thread counts every ``poll_s`` seconds in a daemon thread."""

    def __init__(self, children: Sequence[subprocess.Popen[bytes]], *, poll_s: float = 0.05) -> None:
        import psutil

        self._own = psutil.Process()
        self._children = children
        self._poll_s = poll_s
        self._stop = threading.Event()
        self.peak_rss_bytes = 0
        self.peak_total_rss_bytes = 0
        self.peak_threads = 0
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def sample(self) -> int:
        import psutil

        own = int(self._own.memory_info().rss)
        total = own
        for child in self._children:
            try:
                total += psutil.Process(child.pid).memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss_bytes = max(self.peak_rss_bytes, own)
        self.peak_total_rss_bytes = max(self.peak_total_rss_bytes, total)
        self.peak_threads = max(self.peak_threads, self._own.num_threads())
        return own

    def reset_own_peak(self) -> None:
        self.peak_rss_bytes = 0

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.sample()

    @contextmanager
    def running(self) -> Iterator[_Sampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=5)


def _model(num_values: int, *, tensors: int = 4) -> Any:
    from fedcare.params import Parameters

    flat = (np.arange(num_values, dtype=np.float32) % 7) / np.float32(8)
    sizes = [num_values // tensors] * (tensors - 1)
    sizes.append(num_values - sum(sizes))
    spec = tuple((f"layer{i}.weight", (size,)) for i, size in enumerate(sizes))
    return Parameters.from_flat(flat, spec).freeze()


def run_load(
    certs_dir: Path,
    *,
    num_nodes: int,
    num_values: int,
    rounds: int = 3,
    processes: int = 4,
    max_concurrent_uploads: int = 4,
    heartbeat_interval_s: float = 1.0,
    chunk_bytes: int = 1 << 20,
    join_timeout_s: float = 120.0,
    log_dir: Path | None = None,
) -> LoadRun:
    """Serve ``rounds`` rounds of FedAvg to ``num_nodes`` light nodes spread over ``processes`` processes.

    ``certs_dir`` must hold certificates for at least ``num_nodes`` nodes
    (:func:`issue_certificates`). Raises ``RuntimeError`` if fewer nodes join
    within ``join_timeout_s``.
    """
    import psutil

    from fedcare.federation.coordinator import Coordinator
    from fedcare.plan import parse_plan
    from fedcare.strategies import FedAvg
    from fedcare.transport.grpc_server import GrpcTransport

    names = node_names(num_nodes)
    plan = parse_plan(
        {
            "name": "load",
            "task": "light-nodes",
            "dataset": {"name": "none", "normalization": "none"},
            "nodes": names,
            "rounds": rounds,
            "min_nodes": num_nodes,
            "evaluation": {"every_rounds": rounds},
            "round_timeout_s": 300,
            "seed": 0,
        }
    )
    initial = _model(num_values)
    run_id = uuid.uuid4().hex
    own = psutil.Process()
    start_rss = own.memory_info().rss
    threads_before = own.num_threads()
    children: list[subprocess.Popen[bytes]] = []
    logs = []
    transport = GrpcTransport(
        plan, listen="127.0.0.1:0", certs_dir=certs_dir, heartbeat_interval_s=heartbeat_interval_s,
        max_concurrent_uploads=max_concurrent_uploads, chunk_bytes=chunk_bytes,
    )
    transport.set_run(run_id)
    round_s: list[float] = []

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "round_end":
            round_s.append(float(event["duration_s"]))

    sampler = _Sampler(children)
    closed = False
    try:
        started = time.perf_counter()
        groups = [names[i::processes] for i in range(processes)]
        for index, group in enumerate(groups):
            log = open(log_dir / f"nodes-{index}.log", "wb") if log_dir else subprocess.DEVNULL  # noqa: SIM115
            logs.append(log)
            command = [sys.executable, str(_LIGHT_NODES), "--coordinator", f"127.0.0.1:{transport.port}",
                       "--certs", str(certs_dir), "--names", ",".join(group), "--chunk-bytes", str(chunk_bytes)]
            children.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log))
        with sampler.running():
            joined = transport.wait_for_nodes(num_nodes, timeout_s=join_timeout_s)
            join_s = time.perf_counter() - started
            if len(joined) < num_nodes:
                raise RuntimeError(f"only {len(joined)} of {num_nodes} nodes joined within {join_timeout_s:.0f} s")
            joined_rss = sampler.sample()
            sampler.reset_own_peak()
            coordinator = Coordinator(
                plan, strategy=FedAvg(), transport=transport, initial_parameters=initial, run_id=run_id,
                on_event=on_event,
            )
            run_started = time.perf_counter()
            result = coordinator.run()
            run_s = time.perf_counter() - run_started
            sampler.sample()
            transport.close()
            closed = True
            reports, codes = [], []
            for child in children:
                out, _ = child.communicate(timeout=60)
                codes.append(child.returncode)
                lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("{")]
                reports.append(json.loads(lines[-1]) if lines else {"errors": ["no report"]})
    finally:
        if not closed:
            transport.close()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        for log in logs:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
    return LoadRun(
        num_nodes=num_nodes,
        num_values=num_values,
        rounds=rounds,
        processes=processes,
        max_concurrent_uploads=max_concurrent_uploads,
        join_s=join_s,
        round_s=round_s,
        run_s=run_s,
        initial=initial.flatten(),
        final=result.parameters.flatten(),
        participation=result.participation,
        failures=result.failures,
        start_rss_bytes=start_rss,
        joined_rss_bytes=joined_rss,
        peak_rss_bytes=sampler.peak_rss_bytes,
        peak_total_rss_bytes=sampler.peak_total_rss_bytes,
        peak_threads=sampler.peak_threads,
        threads_before=threads_before,
        node_reports=reports,
        node_exit_codes=codes,
    )
