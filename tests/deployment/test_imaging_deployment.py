"""The two-hospital DICOM example deployed: a coordinator and two node processes over mutual TLS."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fedcare.demo import DemoLayout
from fedcare.federation.audit_log import read_entries, verify
from fedcare.plan import load_plan, plan_hash
from fedcare.transport import pki

from tests.deployment.conftest import ProcessGroup, endpoint_port, read_events, wait_for
from tests.sites.conftest import write_example_sites

SITES = ("hospital-a", "hospital-b")


def test_the_dicom_example_runs_deployed_over_mtls(tmp_path: Path, processes: ProcessGroup) -> None:
    example = write_example_sites(tmp_path / "example", images=400) / "dicom"
    plan = yaml.safe_load((example / "plan.yaml").read_text())
    plan.update(rounds=3, evaluation={"every_rounds": 3}, approval={"wait_s": 120, "proceed": "when-all-approved"})
    (example / "plan.yaml").write_text(yaml.safe_dump(plan))
    certs = tmp_path / "certs"
    pki.init_ca(certs, federation="chest-xray", lifetime_days=7)
    pki.issue_certificate(certs, role="server", name="coordinator", lifetime_days=1)
    for site in SITES:
        pki.issue_certificate(certs, role="node", name=site, lifetime_days=1)
    layout = DemoLayout(
        run_dir=tmp_path / "run",
        certs_dir=certs,
        plan_path=example / "plan.yaml",
        node_configs={site: example / site / "node.yaml" for site in SITES},
    )
    coordinator = processes.serve("coordinator", layout)
    port = endpoint_port(coordinator, layout.run_dir)
    for site in SITES:
        processes.node(site, layout.node_configs[site], port=port, certs_dir=certs)
    # Each hospital's officer approves the plan once it arrives; the coordinator waits for both.
    digest = plan_hash(load_plan(example / "plan.yaml"))
    for site in SITES:
        record = example / site / f"{site}-approvals" / f"{digest}.json"
        wait_for(record.exists, timeout_s=60, what=f"{site}'s pending plan")
        approved = processes.start(f"approve-{site}", "node", "approve", digest[:12], "--config", layout.node_configs[site])
        assert approved.wait(60) == 0, approved.stderr()
    assert coordinator.wait(240) == 0, coordinator.stderr()[-3000:]
    summary = json.loads(coordinator.stdout())
    assert summary["rounds"] == 3 and sorted(summary["sites"]) == list(SITES)
    ends = [e for e in read_events(layout.run_dir) if e["event"] == "round_end"]
    assert [sorted(e["nodes_ok"]) for e in ends] == [list(SITES)] * 3
    evaluation = [e for e in read_events(layout.run_dir) if e["event"] == "evaluation"][-1]
    assert set(evaluation["sites"]) == set(SITES)
    assert evaluation["pooled"]["roc_auc"] >= 0.8
    # Nothing identifying reached the nodes' logs: no patient identifier, no file name.
    for site in SITES:
        log = (processes.log_dir / f"{site}.err").read_text() + (processes.log_dir / f"{site}.out").read_text()
        assert "A-0" not in log and "B-0" not in log and ".dcm" not in log
    # Both sides kept a tamper-evident record, and they agree on every update's hash.
    sent = set()
    for site in SITES:
        log = example / site / f"{site}-audit.jsonl"
        assert verify(log).ok
        sent |= {(site, e.data["sha256"]) for e in read_entries(log) if e.event == "update_sent" and e.data["round"] >= 1}
    coordinator_log = layout.run_dir / "audit.jsonl"
    assert verify(coordinator_log).ok
    received = {(e.data["peer"], e.data["sha256"]) for e in read_entries(coordinator_log) if e.event == "update_received"}
    assert received and received <= sent
