"""One federation over real gRPC links on 127.0.0.1, some or all of them through a :class:`FaultProxy`.

A coordinator (:class:`Coordinator` over :class:`GrpcTransport`, mutual TLS
with the certificates in ``certs``) runs in the caller's thread, and each site
(a :class:`Node` over a :class:`GrpcNodeChannel`) in a thread of its own. The
sites in ``proxied`` dial the coordinator through one :class:`FaultProxy`,
set up by ``arrange`` before any site dials; the others dial it directly.
``on_job`` sees each job a site pulls, before the node does it. Once the run
ends, or fails, everything is closed, and an error in a site's thread fails
the caller (unless the run was over and the channel closed under it).

Used by ``tests/faults/test_network_faults.py`` and ``tests/faults/test_throttled_link.py``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")  # grpcio is not a core dependency

from fedcare.data import DatasetCatalog  # noqa: E402
from fedcare.federation.coordinator import Coordinator, EventCallback, RunResult  # noqa: E402
from fedcare.federation.node import Node  # noqa: E402
from fedcare.federation.rundir import RunDirectory  # noqa: E402
from fedcare.messages import Job  # noqa: E402
from fedcare.plan import Plan  # noqa: E402
from fedcare.simulation import initial_parameters  # noqa: E402
from fedcare.strategies import make_strategy  # noqa: E402
from fedcare.tasks.registry import TaskRegistry  # noqa: E402
from fedcare.transport.grpc_client import GrpcNodeChannel  # noqa: E402
from fedcare.transport.grpc_server import GrpcTransport  # noqa: E402
from tests.faults.proxy import FaultProxy  # noqa: E402

#: Called with the site, the job it pulled and the proxy, before the site's node handles the job.
OnJob = Callable[[str, Job, FaultProxy], None]


@dataclass
class ProxiedRun:
    """What a run left: the coordinator's result, the (closed) proxy and the sites' (closed) channels."""

    result: RunResult
    proxy: FaultProxy
    channels: dict[str, GrpcNodeChannel]


def serve_site(node: Node, channel: GrpcNodeChannel, proxy: FaultProxy, on_job: OnJob | None) -> None:
    """``Node.serve``, with a look at each job before the node does it."""
    channel.join()
    channel.report_status("approved")
    while not channel.closed:
        job = channel.pull_job(timeout_s=0.5)
        if job is None:
            continue
        if on_job is not None:
            on_job(node.node_id, job, proxy)
        channel.push_result(node.handle(job))


def run_over_proxy(
    plan: Plan,
    certs: Path,
    sites: Sequence[str],
    *,
    proxy_seed: int,
    proxied: Collection[str] | None = None,
    arrange: Callable[[FaultProxy], None] | None = None,
    on_job: OnJob | None = None,
    transport_options: Mapping[str, Any] | None = None,
    channel_options: Mapping[str, Any] | None = None,
    run_dir: RunDirectory | None = None,
    on_event: EventCallback | None = None,
) -> ProxiedRun:
    """Run ``plan`` with ``sites``; those in ``proxied`` (all when ``None``) dial through the proxy.

    ``transport_options`` go to :class:`GrpcTransport` and ``channel_options``
    to every :class:`GrpcNodeChannel`; ``run_dir`` and ``on_event`` to the
    :class:`Coordinator`.
    """
    registry = TaskRegistry.from_entry_points()
    catalog = DatasetCatalog.bundled()
    task = registry.get(plan.task)
    spec = catalog.spec(plan.dataset)
    dataset = catalog.get(plan.dataset.name)
    run_id = uuid.uuid4().hex
    transport = GrpcTransport(plan, listen="127.0.0.1:0", certs_dir=certs, **(transport_options or {}))
    transport.set_run(run_id)
    proxy = FaultProxy(transport.port, seed=proxy_seed)
    if arrange is not None:
        arrange(proxy)
    channels = {
        site: GrpcNodeChannel(
            proxy.address if proxied is None or site in proxied else f"127.0.0.1:{transport.port}",
            certs_dir=certs,
            name=site,
            **(channel_options or {}),
        )
        for site in sites
    }
    errors: list[BaseException] = []
    stopping = threading.Event()

    def site_thread(site: str) -> None:
        node = Node(site, task=registry.get(plan.task), data=dataset.load_site(plan.dataset, site), plan=plan)
        try:
            serve_site(node, channels[site], proxy, on_job)
        except BaseException as exc:  # reported below, unless the run is over and the channel closed under it
            if not stopping.is_set():
                errors.append(exc)

    threads = [threading.Thread(target=site_thread, args=(site,), name=f"site-{site}", daemon=True) for site in sites]
    try:
        for thread in threads:
            thread.start()
        assert len(transport.wait_for_nodes(len(sites), timeout_s=30)) == len(sites), errors
        result = Coordinator(
            plan,
            strategy=make_strategy(plan.strategy),
            transport=transport,
            initial_parameters=initial_parameters(task, spec, plan),
            statistics_width=spec.channels,
            run_dir=run_dir,
            on_event=on_event,
            run_id=run_id,
        ).run()
    finally:
        stopping.set()
        transport.close()
        for channel in channels.values():  # a site still dialling when the run ends stops here
            channel.close()
        for thread in threads:
            thread.join(timeout=15)
        proxy.close()
    assert not errors, errors
    return ProxiedRun(result, proxy, channels)
