"""200 nodes join one coordinator over mutual TLS on loopback and complete 2 rounds of FedAvg.

One run serves every test of this module (``load_run``): the coordinator
(a real :class:`GrpcTransport` and :class:`Coordinator`) runs in this
process; 200 light nodes, each a real :class:`GrpcNodeChannel` with its own
certificate, run as threads of 4 child processes (``light_nodes.py``). The
model has 2,000,000 float32 values (8 MB), so a coordinator that held one
update per node would grow by 200 x 8 MB = 1.6 GB; one that holds
O(model x upload slots) grows by far less.

The heartbeat interval is 6 s (a node is taken for gone after 19 s of
silence): 50 nodes share each process's interpreter lock and the machine may
have only 2 cores, so a node's heartbeat thread can wait seconds for its turn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .harness import LoadRun, issue_certificates, run_load
from .light_nodes import expected_fedavg, node_names

NUM_NODES = 200
NUM_VALUES = 2_000_000
ROUNDS = 2
PROCESSES = 4
UPLOAD_SLOTS = 4
CHUNK_BYTES = 1 << 20
MiB = 1 << 20


@pytest.fixture(scope="module")
def load_run(tmp_path_factory: pytest.TempPathFactory) -> LoadRun:
    workdir = tmp_path_factory.mktemp("load")
    issue_certificates(workdir / "certs", NUM_NODES)
    return run_load(
        workdir / "certs",
        num_nodes=NUM_NODES,
        num_values=NUM_VALUES,
        rounds=ROUNDS,
        processes=PROCESSES,
        max_concurrent_uploads=UPLOAD_SLOTS,
        heartbeat_interval_s=6.0,
        chunk_bytes=CHUNK_BYTES,
        log_dir=workdir,
    )


def memory_bound_bytes(*, model_bytes: int, nodes: int, slots: int, chunk_bytes: int) -> int:
    """The most the coordinator's RSS may grow during the rounds.

    * ``(slots + 8) x model``: the updates being received (one buffer per
      upload slot) plus the global model, its serialized copy, FedAvg's
      float64 accumulator (2 models) and the temporaries of finalizing a
      round (about 3 models);
    * ``5 x chunk`` per node: what an open stream may hold whatever the model
      size (a chunk being sent and its copies, the one-chunk receive window
      of an upload waiting for its slot, a worker thread's stack and its
      share of the allocator's arenas), measured at about 3.5 MiB per node
      with 1 MiB chunks, for a 4 MB and for an 8 MB model alike;
    * 128 MiB for gRPC, TLS and the allocator's arenas.

    Nothing in it is model x nodes. Measured: 846 MiB; before the server
    fixed its receive window (every waiting upload buffered whole), 1589 MiB.
    """
    return (slots + 8) * model_bytes + nodes * 5 * chunk_bytes + 128 * MiB


def test_every_node_joins_over_mutual_tls(load_run: LoadRun) -> None:
    assert sum(report["joined"] for report in load_run.node_reports) == NUM_NODES
    assert [report["errors"] for report in load_run.node_reports] == [[]] * PROCESSES
    assert load_run.node_exit_codes == [0] * PROCESSES
    assert load_run.join_s < 60


def test_every_round_aggregates_the_updates_of_all_nodes(load_run: LoadRun) -> None:
    assert load_run.failures == []
    assert load_run.participation == {round_number: node_names(NUM_NODES) for round_number in range(1, ROUNDS + 1)}
    # Each node answered 3 training jobs and the final evaluation.
    assert sum(report["jobs"] for report in load_run.node_reports) == NUM_NODES * (ROUNDS + 1)


def test_aggregated_model_is_exactly_fedavg_of_the_known_updates(load_run: LoadRun) -> None:
    expected = expected_fedavg(load_run.initial, node_names(NUM_NODES), rounds=ROUNDS)
    np.testing.assert_array_equal(load_run.final, expected)
    assert not np.array_equal(load_run.final, load_run.initial)


def test_coordinator_memory_grows_with_upload_slots_not_with_nodes(load_run: LoadRun) -> None:
    bound = memory_bound_bytes(model_bytes=load_run.model_bytes, nodes=NUM_NODES, slots=UPLOAD_SLOTS,
                               chunk_bytes=CHUNK_BYTES)  # fmt: skip
    one_update_per_node = load_run.model_bytes * NUM_NODES
    assert bound < 0.85 * one_update_per_node  # the bound tells the two apart
    assert load_run.rss_growth_bytes < bound, (
        f"coordinator RSS grew {load_run.rss_growth_bytes / MiB:.0f} MiB during the rounds, over the "
        f"{bound / MiB:.0f} MiB bound (one update per node would be {one_update_per_node / MiB:.0f} MiB)"
    )


def test_coordinator_threads_stay_near_one_per_node(load_run: LoadRun) -> None:
    # A long poll, a heartbeat, a download or an upload holds a worker thread; a node has at most two at once.
    assert load_run.peak_threads < 2 * NUM_NODES + 64
