"""The coordinator is SIGKILLed mid-run and resumed with ``fedcare serve PLAN --resume RUN``.

Real processes over mutual TLS on 127.0.0.1. The nodes are never restarted:
they notice the coordinator is gone, keep retrying, and carry on with the
resumed coordinator by themselves. The resumed run must end with the model an
uninterrupted run gives, lose no completed round, and count no site's epsilon
twice.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare.params import Parameters
from fedcare.plan import load_plan
from fedcare.simulation import simulate

from .conftest import Launched, ProcessGroup, deploy, free_port, read_events, wait_for

ROUNDS = 4


def checkpointed_round(run_dir: Path) -> int:
    meta = run_dir / "checkpoints" / "latest.json"
    try:
        return int(json.loads(meta.read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def kill_after_round(coordinator: Launched, run_dir: Path, round_number: int) -> int:
    """SIGKILL the coordinator as soon as round ``round_number`` is checkpointed; the round it had reached."""
    wait_for(
        lambda: (not coordinator.running() and _fail(coordinator)) or checkpointed_round(run_dir) >= round_number,
        timeout_s=150,
        what=f"round {round_number} to be checkpointed",
        interval_s=0.01,
    )
    os.kill(coordinator.pid, signal.SIGKILL)
    coordinator.wait(timeout_s=10)
    return checkpointed_round(run_dir)


def _fail(coordinator: Launched) -> bool:
    raise AssertionError(f"the coordinator exited early:\n{coordinator.stderr()[-3000:]}")


def run_killed_and_resumed(tmp_path: Path, processes: ProcessGroup, **plan: Any) -> tuple[Any, int, list[dict[str, Any]]]:
    layout = deploy(tmp_path, rounds=ROUNDS, evaluation={"every_rounds": ROUNDS}, **plan)
    port = free_port()
    listen = f"127.0.0.1:{port}"
    first = processes.serve("coordinator", layout, listen=listen)
    for site, config in layout.node_configs.items():
        processes.node(site, config, port=port, certs_dir=layout.certs_dir)

    killed_at = kill_after_round(first, layout.run_dir, 2)
    assert killed_at < ROUNDS, "the run finished before the kill: nothing was resumed"
    resumed = processes.start(
        "coordinator-resumed", "serve", layout.plan_path, "--listen", listen, "--certs", layout.certs_dir,
        "--resume", layout.run_dir, "--wait-for-nodes-s", "120", "--json",
    )  # fmt: skip

    assert resumed.wait(timeout_s=240) == 0, resumed.stderr()[-3000:]
    return layout, killed_at, read_events(layout.run_dir)


def test_resumed_coordinator_ends_with_the_model_of_an_uninterrupted_run(tmp_path: Path, processes: ProcessGroup) -> None:
    layout, killed_at, events = run_killed_and_resumed(tmp_path, processes)
    uninterrupted = simulate(load_plan(layout.plan_path))

    starts = [e for e in events if e["event"] == "run_start"]
    assert len(starts) == 2 and starts[0]["run_id"] == starts[1]["run_id"]
    assert starts[1]["first_round"] == killed_at + 1
    completed = sorted({e["round"] for e in events if e["event"] == "round_end"})
    assert completed == list(range(1, ROUNDS + 1)), "a completed round was lost"
    assert not [e for e in events if e["event"] in ("node_failed", "node_late")]
    resumed_model = Parameters.from_bytes((layout.run_dir / "model.safetensors").read_bytes())
    np.testing.assert_allclose(resumed_model.flatten(), uninterrupted.parameters.flatten(), rtol=0, atol=1e-6)
    assert (layout.run_dir / "report.html").exists()


def test_no_site_spends_its_privacy_budget_twice_across_a_coordinator_restart(tmp_path: Path, processes: ProcessGroup) -> None:
    layout, killed_at, events = run_killed_and_resumed(
        tmp_path,
        processes,
        secure_aggregation={"enabled": True, "clip": 1.0},
        privacy={"record_level": {"enabled": True, "epsilon": 3.0, "delta": 1e-3, "max_grad_norm": 1.0}},
    )
    uninterrupted = simulate(load_plan(layout.plan_path))

    assert sorted({e["round"] for e in events if e["event"] == "round_end"}) == list(range(1, ROUNDS + 1))
    run_id = next(e["run_id"] for e in events if e["event"] == "run_start")
    for site, config in layout.node_configs.items():
        [ledger_file] = (config.parent / f"{site}-privacy-ledger").glob("*.ledger.json")
        entries = [e for e in json.loads(ledger_file.read_text())["entries"] if e["run_id"] == run_id]
        rounds = [e["round"] for e in entries]
        assert sorted(rounds) == list(range(0, ROUNDS + 1)), f"{site} recorded rounds {sorted(rounds)}"
        # the same releases as an uninterrupted run: the same epsilon, to the accountant's precision
        assert entries[-1]["epsilon_after"] == pytest.approx(uninterrupted.epsilon_spent[site], rel=1e-9)

