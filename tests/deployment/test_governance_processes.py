"""Site governance over mTLS: one site approves, one rejects, one approves late, and every policy refusal
reaches the coordinator with its reason and lands in both audit logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fedcare.demo import DemoLayout
from fedcare.federation.audit_log import read_entries, verify
from fedcare.plan import load_plan, plan_hash
from fedcare.tasks.registry import TaskRegistry
from fedcare.transport import pki

from tests.deployment.conftest import ProcessGroup, endpoint_port, read_events, wait_for, write_plan

#: Each site's policy, and what it must make of the plan (fedavg, no DP, 9 sites per round, 300 short rounds).
INFO = TaskRegistry.from_entry_points().info("tabular-logistic")
PINNED = {"name": INFO.name, "version": INFO.version, "sha256": INFO.sha256}
SITES: dict[str, dict[str, Any]] = {
    "approves": {"auto_approve": True, "allowed_tasks": [PINNED]},
    "rejects": {},
    "late": {},
    "unapproved": {},
    "code-changed": {"allowed_tasks": [{**PINNED, "sha256": "ab" * 32}]},
    "strategy": {"allowed_strategies": ["fedprox"]},
    "dp-floor": {"max_epsilon": 1.0},
    "participants": {"min_participants": 20},
    "wrong-coordinator": {"coordinator_fingerprint": "cd" * 32},
}
REFUSED = {  # site -> (policy key, words of the reason)
    "code-changed": ("policy.allowed_tasks", "the code changed since it was approved"),
    "strategy": ("policy.allowed_strategies", "strategy 'fedavg' is not allowed"),
    "dp-floor": ("policy.max_epsilon", "requires record-level DP with epsilon at most 1"),
    "participants": ("policy.min_participants", "this site requires at least 20"),
    "wrong-coordinator": ("policy.coordinator_fingerprint", "not the trusted"),
}
ROUNDS = 300


def _write_sites(root: Path) -> dict[str, Path]:
    configs = {}
    for site, policy in SITES.items():
        folder = root / site
        folder.mkdir(parents=True)
        node = {"name": site, "datasets": {"heart-disease": {"site": "cleveland" if len(configs) % 2 else "hungary"}}}
        if policy:
            node["policy"] = policy
        (folder / "node.yaml").write_text(yaml.safe_dump(node, sort_keys=False))
        configs[site] = folder / "node.yaml"
    return configs


def test_sites_approve_reject_and_refuse_and_both_audit_logs_agree(tmp_path: Path, processes: ProcessGroup) -> None:
    plan_path = write_plan(
        tmp_path / "plan.yaml", nodes=list(SITES), rounds=ROUNDS, min_nodes=1, evaluation={"every_rounds": ROUNDS},
        approval={"wait_s": 8, "proceed": "with-approved"},  # the sites answer within a second or two
    )  # fmt: skip
    digest = plan_hash(load_plan(plan_path))
    certs = tmp_path / "certs"
    pki.init_ca(certs, federation="governance", lifetime_days=7)
    pki.issue_certificate(certs, role="server", name="coordinator", lifetime_days=1)
    for site in SITES:
        pki.issue_certificate(certs, role="node", name=site, lifetime_days=1)
    configs = _write_sites(tmp_path / "sites")
    layout = DemoLayout(run_dir=tmp_path / "run", certs_dir=certs, plan_path=plan_path, node_configs=configs)
    coordinator = processes.serve("coordinator", layout)
    port = endpoint_port(coordinator, layout.run_dir)
    for site, config in configs.items():
        processes.node(site, config, port=port, certs_dir=certs)

    def pending(site: str) -> Path:
        return tmp_path / "sites" / site / f"{site}-approvals" / f"{digest}.json"

    wait_for(lambda: pending("rejects").exists(), timeout_s=90, what="the plan pending at 'rejects'")
    rejected = processes.start("reject", "node", "reject", digest[:10], "--config", configs["rejects"],
                               "--reason", "no ethics approval for this cohort")  # fmt: skip
    assert rejected.wait(60) == 0, rejected.stderr()
    # 'late' approves once the run is under way.
    wait_for(lambda: any(e["event"] == "round_end" for e in read_events(layout.run_dir)), timeout_s=120, what="round 1")
    late = processes.start("approve-late", "node", "approve", digest, "--config", configs["late"])
    assert late.wait(60) == 0, late.stderr()
    assert coordinator.wait(300) == 0, coordinator.stderr()[-3000:]
    summary = json.loads(coordinator.stdout())
    events = read_events(layout.run_dir)

    # Who took part in which round.
    took_part = {e["round"]: e["nodes_ok"] for e in events if e["event"] == "round_end"}
    assert len(took_part) == ROUNDS
    assert all(nodes[0] == "approves" for nodes in took_part.values())
    late_rounds = [r for r, nodes in took_part.items() if "late" in nodes]
    assert 1 not in late_rounds and late_rounds and max(late_rounds) == ROUNDS
    assert late_rounds == list(range(min(late_rounds), ROUNDS + 1))  # from its approval on, every round
    assert all(set(nodes) <= {"approves", "late"} for nodes in took_part.values())
    assert summary["participation"][str(ROUNDS)] == ["approves", "late"]

    # The coordinator heard every answer, with its reason, and showed who was still pending.
    shown = coordinator.stderr()
    assert "waiting for approval:" in shown and "rejects rejected: the site rejected the plan" in shown
    final = [e for e in events if e["event"] == "approval"][-1]
    assert final["approved"] == ["approves", "late"]
    assert final["pending"] == ["unapproved"]
    assert "no ethics approval for this cohort" in final["rejected"]["rejects"]
    for site, (field, words) in REFUSED.items():
        assert field in final["refused"][site] and words in final["refused"][site], (site, final["refused"].get(site))

    # Both audit logs verify, and hold the same refusals.
    coordinator_log = layout.run_dir / "audit.jsonl"
    assert verify(coordinator_log).ok
    coordinator_entries = list(read_entries(coordinator_log))
    by_peer: dict[str, list[Any]] = {}
    for entry in coordinator_entries:
        if "peer" in entry.data:
            by_peer.setdefault(entry.data["peer"], []).append(entry)
    for site, (field, words) in REFUSED.items():
        node_log = tmp_path / "sites" / site / f"{site}-audit.jsonl"
        assert verify(node_log).ok
        [refusal] = [e for e in read_entries(node_log) if e.event == "refusal"]
        assert refusal.data["field"] == field and words in refusal.data["reason"]
        assert any(e.event == "refusal" and words in e.data["reason"] for e in by_peer[site])
        # A refusing site sent nothing: no update ever left it.
        assert not any(e.event == "update_sent" for e in read_entries(node_log))
    assert any(e.event == "plan_rejected" for e in by_peer["rejects"])
    assert any(e.event == "plan_pending" for e in by_peer["unapproved"])
    assert [e.event for e in by_peer["late"] if e.event.startswith("plan_")] == ["plan_pending", "plan_approved"]
    rejects_log = list(read_entries(tmp_path / "sites" / "rejects" / "rejects-audit.jsonl"))
    assert [e.event for e in rejects_log if e.event.startswith("plan_")] == ["plan_received", "plan_pending", "plan_rejected"]
    # Every update the coordinator received is one a site logged sending.
    sent = {
        (site, e.data["sha256"])
        for site in ("approves", "late")
        for e in read_entries(tmp_path / "sites" / site / f"{site}-audit.jsonl")
        if e.event == "update_sent"
    }
    received = {(e.data["peer"], e.data["sha256"]) for e in coordinator_entries if e.event == "update_received"}
    assert len(received) == sum(len(nodes) for nodes in took_part.values()) and received <= sent
