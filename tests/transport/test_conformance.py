"""One conformance suite that every transport passes."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from fedcare.errors import TransportError
from fedcare.messages import Job, JobKind, JobResult
from fedcare.transport.base import NodeChannel, Transport
from fedcare.transport.inproc import InProcTransport

try:  # grpcio is not a core dependency; without it only the in-process transport is checked
    import grpc
except ImportError:  # pragma: no cover
    grpc = None


class EchoNode:
    """A node runner that answers every job after ``delay_s`` seconds; ``finished`` is set when it stops."""

    def __init__(self, node_id: str, delay_s: float = 0.0) -> None:
        self.node_id = node_id
        self.delay_s = delay_s
        self.finished = threading.Event()

    def __call__(self, channel: NodeChannel) -> None:
        try:
            while not channel.closed:
                job = channel.pull_job(timeout_s=0.05)
                if job is None:
                    continue
                time.sleep(self.delay_s)
                channel.push_result(
                    JobResult(job.run_id, job.round, job.job_id, job.kind, node_id=self.node_id, num_examples=job.round)
                )
        finally:
            self.finished.set()


def make_inproc(runners: Mapping[str, EchoNode]) -> Transport:
    transport = InProcTransport(max_concurrency=len(runners))
    for node_id, runner in runners.items():
        transport.add_node(node_id, runner)
    return transport


if grpc is not None:
    from fedcare.plan import parse_plan
    from fedcare.transport import pki
    from fedcare.transport.grpc_client import GrpcNodeChannel
    from fedcare.transport.grpc_server import GrpcTransport

    class _GrpcWithNodes(GrpcTransport):
        """A gRPC coordinator on 127.0.0.1 whose nodes run in threads over their own mTLS channels."""

        def __init__(self, runners: Mapping[str, EchoNode], workdir: Path) -> None:
            self._workdir = workdir
            certs = workdir / "certs"
            pki.init_ca(certs, federation="conformance")
            pki.issue_certificate(certs, role="server", name="coordinator", hosts=("127.0.0.1",))
            for node_id in runners:
                pki.issue_certificate(certs, role="node", name=node_id)
            plan = parse_plan({"task": "echo", "dataset": {"name": "none"}, "rounds": 1, "nodes": sorted(runners)})
            super().__init__(plan, listen="127.0.0.1:0", certs_dir=certs, heartbeat_interval_s=0.2)
            self._channels: list[GrpcNodeChannel] = []
            self._node_threads: list[threading.Thread] = []
            for node_id, runner in runners.items():
                channel = GrpcNodeChannel(
                    f"127.0.0.1:{self.port}", certs_dir=certs, name=node_id, give_up_after_s=10
                )
                channel.join()
                self._channels.append(channel)
                thread = threading.Thread(target=self._serve, args=(runner, channel), name=f"echo-{node_id}")
                self._node_threads.append(thread)
                thread.start()
            joined = self.wait_for_nodes(len(runners), timeout_s=10)
            assert joined == sorted(runners)

        def _serve(self, runner: EchoNode, channel: GrpcNodeChannel) -> None:
            try:
                runner(channel)
            except (TransportError, ValueError):
                # A node still sleeping when the coordinator stopped listening finds its
                # channel closed under it; anything else is a real failure.
                if not self._shutdown.is_set():
                    raise

        def close(self) -> None:
            super().close()
            for channel in self._channels:
                channel.close()
            for thread in self._node_threads:
                thread.join(timeout=10)
            shutil.rmtree(self._workdir, ignore_errors=True)

    def make_grpc(runners: Mapping[str, EchoNode]) -> Transport:
        return _GrpcWithNodes(runners, Path(tempfile.mkdtemp(prefix="fedcare-conformance-")))


TRANSPORTS: dict[str, Callable[[Mapping[str, EchoNode]], Transport]] = {"inproc": make_inproc}
if grpc is not None:
    TRANSPORTS["grpc"] = make_grpc


@pytest.fixture
def echo_nodes() -> dict[str, EchoNode]:
    """The runners of the nodes the factory attached, by node id."""
    return {}


@pytest.fixture(params=sorted(TRANSPORTS))
def factory(request, echo_nodes):
    build = TRANSPORTS[request.param]

    def make(delays: Mapping[str, float]) -> Transport:
        runners = {node_id: EchoNode(node_id, delay) for node_id, delay in delays.items()}
        echo_nodes.update(runners)
        return build(runners)

    return make


def job(job_id: str, round_number: int = 1) -> Job:
    return Job("run", round_number, job_id, JobKind.EVALUATE, plan_hash="h")


def test_transport_lists_attached_nodes(factory):
    with factory({"b": 0.0, "a": 0.0}) as transport:
        assert transport.nodes() == ["a", "b"]


def test_every_submitted_job_gets_its_result(factory):
    with factory({"a": 0.0, "b": 0.0}) as transport:
        transport.submit("a", job("ja"))
        transport.submit("b", job("jb"))
        results = {r.job_id: r.node_id for r in transport.results(["ja", "jb"], timeout_s=10)}
    assert results == {"ja": "a", "jb": "b"}


def test_results_arrive_as_they_complete(factory):
    with factory({"slow": 0.5, "fast": 0.0}) as transport:
        transport.submit("slow", job("js"))
        transport.submit("fast", job("jf"))
        order = [r.node_id for r in transport.results(["js", "jf"], timeout_s=10)]
    assert order == ["fast", "slow"]


def test_results_stop_at_the_deadline_without_the_straggler(factory):
    with factory({"slow": 2.0, "fast": 0.0}) as transport:
        transport.submit("slow", job("js"))
        transport.submit("fast", job("jf"))
        started = time.monotonic()
        got = [r.job_id for r in transport.results(["js", "jf"], timeout_s=0.5)]
        elapsed = time.monotonic() - started
    assert got == ["jf"]
    assert elapsed < 1.5


def test_stale_results_of_earlier_jobs_are_dropped(factory):
    with factory({"slow": 0.6, "fast": 0.0}) as transport:
        transport.submit("slow", job("old", 1))
        assert [r.job_id for r in transport.results(["old"], timeout_s=0.1)] == []
        time.sleep(0.8)  # the late answer to "old" is now waiting
        transport.submit("fast", job("new", 2))
        assert [r.job_id for r in transport.results(["new"], timeout_s=5)] == ["new"]


def test_node_that_answered_late_keeps_serving(factory):
    with factory({"slow": 0.6}) as transport:
        transport.submit("slow", job("old", 1))
        assert [r.job_id for r in transport.results(["old"], timeout_s=0.1)] == []
        time.sleep(0.8)  # the node has answered "old" after its deadline
        transport.submit("slow", job("next", 2))
        assert [r.job_id for r in transport.results(["next"], timeout_s=5)] == ["next"]


def test_jobs_left_outstanding_by_an_early_stop_answer_a_later_call(factory):
    # Buffered aggregation: take the first answer, stop, submit a new job, ask for all outstanding ones.
    with factory({"slow": 0.4, "fast": 0.0}) as transport:
        transport.submit("slow", job("js", 1))
        transport.submit("fast", job("jf1", 1))
        answers = transport.results(["js", "jf1"], timeout_s=5)
        first = next(iter(answers))
        answers.close()  # type: ignore[attr-defined]
        transport.submit("fast", job("jf2", 2))
        later = [r.job_id for r in transport.results(["js", "jf2"], timeout_s=5)]
    assert first.job_id == "jf1"
    assert later == ["jf2", "js"]


def test_submit_to_unknown_node_raises_transport_error(factory):
    with factory({"a": 0.0}) as transport:
        with pytest.raises(TransportError, match="'ghost'"):
            transport.submit("ghost", job("j"))


def test_closed_transport_refuses_submit_and_stops_nodes(factory, echo_nodes):
    transport = factory({"a": 0.0})
    transport.close()
    with pytest.raises(TransportError):
        transport.submit("a", job("j"))
    assert echo_nodes["a"].finished.wait(timeout=5)
