"""Secure aggregation between real processes over mutual TLS, with nodes killed mid-protocol."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.deployment.conftest import ProcessGroup, deploy, endpoint_port, read_events

SITES = [f"site-{i}" for i in range(6)]
DYING_NODE = [sys.executable, str(Path(__file__).with_name("node_that_dies.py"))]


def test_secure_round_completes_when_nodes_die_before_and_after_sending_masked_input(
    tmp_path: Path, processes: ProcessGroup
) -> None:
    # Six sites: threshold 4 of 6. One dies before sending its masked input (its pairwise
    # masks must be removed), one right after (its self mask must be rebuilt from shares).
    layout = deploy(
        tmp_path,
        dataset={"name": "breast-cancer", "num_nodes": 6, "normalization": "per-site"},
        nodes=SITES,
        rounds=2,
        min_nodes=3,
        evaluation={"every_rounds": 2},
        round_timeout_s=60,
        local={"epochs": 1, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.1},
        secure_aggregation={"enabled": True},
    )
    coordinator = processes.serve("coordinator", layout)
    port = endpoint_port(coordinator, layout.run_dir)
    dying = {"site-1": ("masked_input", "before"), "site-4": ("masked_input", "after")}
    for site, config in layout.node_configs.items():
        common = ("node", "--config", config, "--coordinator", f"127.0.0.1:{port}", "--certs", layout.certs_dir)
        if site in dying:
            processes.start(site, *dying[site], *common, program=DYING_NODE)
        else:
            processes.start(site, *common)

    assert coordinator.wait(timeout_s=240) == 0, coordinator.stderr()[-3000:]
    summary = json.loads(coordinator.stdout().strip().splitlines()[-1])
    assert summary["rounds"] == 2
    assert summary["privacy"]["secure_aggregation"] is True
    events = read_events(layout.run_dir)
    [first] = [e for e in events if e["event"] == "round_end" and e["round"] == 1]
    # site-4's masked input is in the sum; site-1's is not.
    assert first["nodes_ok"] == ["site-0", "site-2", "site-3", "site-4", "site-5"]
    assert first["secure_aggregation"]["phases"] == {"u1": 6, "u2": 6, "u3": 5, "u4": 4, "u5": 4}
    left_out = {e["node_id"] for e in events if e["event"] in ("node_failed", "node_late") and e["round"] == 1}
    assert left_out == {"site-1", "site-4"}
    [second] = [e for e in events if e["event"] == "round_end" and e["round"] == 2]
    assert second["nodes_ok"] == ["site-0", "site-2", "site-3", "site-5"]
    assert summary["mean_site_accuracy"] > 0.85
