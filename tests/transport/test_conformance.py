"""One conformance suite that every transport passes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from fedcare.errors import TransportError
from fedcare.messages import Job, JobKind, JobResult
from fedcare.transport.base import NodeChannel, Transport
from fedcare.transport.inproc import InProcTransport


def echo_node(node_id: str, delay_s: float = 0.0) -> Callable[[NodeChannel], None]:
    def serve(channel: NodeChannel) -> None:
        while not channel.closed:
            job = channel.pull_job(timeout_s=0.05)
            if job is None:
                continue
            time.sleep(delay_s)
            channel.push_result(
                JobResult(job.run_id, job.round, job.job_id, job.kind, node_id=node_id, num_examples=job.round)
            )

    return serve


def make_inproc(nodes: dict[str, float]) -> Transport:
    transport = InProcTransport(max_concurrency=len(nodes))
    for node_id, delay in nodes.items():
        transport.add_node(node_id, echo_node(node_id, delay))
    return transport


TRANSPORTS = {"inproc": make_inproc}


@pytest.fixture(params=sorted(TRANSPORTS))
def factory(request):
    return TRANSPORTS[request.param]


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


def test_submit_to_unknown_node_raises_transport_error(factory):
    with factory({"a": 0.0}) as transport:
        with pytest.raises(TransportError, match="'ghost'"):
            transport.submit("ghost", job("j"))


def test_closed_transport_refuses_submit_and_stops_nodes(factory):
    transport = factory({"a": 0.0})
    transport.close()
    with pytest.raises(TransportError):
        transport.submit("a", job("j"))
    assert not [t for t in threading.enumerate() if t.name == "fedcare-node-a" and t.is_alive()]
