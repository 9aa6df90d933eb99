"""The node policy's rules and refusals, plan approvals, and the task code hash they pin."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from fedcare.deployment import load_node_config
from fedcare.errors import ConfigError, PolicyViolation
from fedcare.federation.approvals import PlanApprovals
from fedcare.federation.policy import NodePolicy
from fedcare.plan import Plan, parse_plan, plan_hash
from fedcare.tasks.registry import TaskInfo, TaskRegistry, code_sha256

INSTALLED = TaskRegistry.from_entry_points().info("tabular-logistic")


def _plan(**extra: Any) -> Plan:
    base: dict[str, Any] = {"task": "tabular-logistic", "dataset": {"name": "heart-disease"}, "rounds": 10,
                            "nodes": ["a", "b", "c"]}  # fmt: skip
    base.update(extra)
    return parse_plan(base)


def _refusal(policy: dict[str, Any], plan: Plan, task: TaskInfo = INSTALLED) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as caught:
        NodePolicy.model_validate(policy).check_plan(plan, task=task)
    return caught.value


@pytest.mark.parametrize(
    ("policy", "plan_extra", "field", "words"),
    [
        ({"allowed_tasks": [{"name": "image-cnn"}]}, {}, "policy.allowed_tasks", "not allowed at this site"),
        ({"allowed_tasks": [{"name": "tabular-logistic", "version": "9.9"}]}, {}, "policy.allowed_tasks", "installed at version"),
        ({"allowed_tasks": [{"name": "tabular-logistic", "sha256": "ab" * 32}]}, {}, "policy.allowed_tasks", "code changed"),
        ({"allowed_strategies": ["fedprox", "fedbn"]}, {}, "policy.allowed_strategies", "strategy 'fedavg' is not allowed"),
        ({"require_record_level_dp": True}, {}, "policy.require_record_level_dp", "requires record-level differential privacy"),
        ({"max_epsilon": 2.0}, {}, "policy.max_epsilon", "the plan has none"),
        ({"max_epsilon": 2.0}, {"privacy": {"record_level": {"enabled": True, "epsilon": 4.0}}}, "policy.max_epsilon", "weaker"),
        ({"require_secure_aggregation": True}, {}, "policy.require_secure_aggregation", "requires secure aggregation"),
        ({"min_participants": 5}, {}, "policy.min_participants", "3 sites per round"),
        ({"max_rounds": 5}, {}, "policy.max_rounds", "at most 5"),
        ({"allowed_statistics": ["evaluation_metrics"]}, {}, "policy.allowed_statistics", "does not release feature statistics"),
    ],
)
def test_each_rule_refuses_a_plan_naming_its_key(policy: dict[str, Any], plan_extra: dict[str, Any], field: str, words: str) -> None:
    refusal = _refusal(policy, _plan(**plan_extra))
    assert refusal.field == field and words in refusal.message


def test_a_plan_within_the_policy_passes() -> None:
    policy = NodePolicy(
        allowed_tasks=({"name": INSTALLED.name, "version": INSTALLED.version, "sha256": INSTALLED.sha256},),  # type: ignore[arg-type]
        allowed_strategies=("fedavg",),
        max_epsilon=2.0,
        min_participants=3,
        max_rounds=10,
    )
    policy.check_plan(_plan(privacy={"record_level": {"enabled": True, "epsilon": 1.5}}), task=INSTALLED)


def test_the_coordinator_pin_accepts_its_certificate_only() -> None:
    policy = NodePolicy(coordinator_fingerprint=":".join(["ab"] * 32))
    policy.check_coordinator("ab" * 32)
    with pytest.raises(PolicyViolation, match="not the trusted") as caught:
        policy.check_coordinator("cd" * 32)
    assert caught.value.field == "policy.coordinator_fingerprint"


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ("  allow_tasks: [image-cnn]", "policy.allow_tasks: Extra inputs are not permitted"),
        ("  max_epsilon: 1.0\n  require_record_level_dp: false", "policy.max_epsilon: max_epsilon caps the epsilon"),
        ("  auto_approve: true", "policy.auto_approve: auto_approve runs plans unattended"),
        ("  allowed_strategies: [fedavg, fedsgd]", "unknown strategies fedsgd"),
        ("  coordinator_fingerprint: abc", "must be a SHA-256 in hex"),
        ("  allowed_statistics: [raw_rows]", "policy.allowed_statistics"),
    ],
)
def test_unknown_keys_and_contradictions_are_errors_naming_the_key(tmp_path: Path, policy: str, words: str) -> None:
    node = tmp_path / "node.yaml"
    node.write_text(f"name: st-mary\ndatasets:\n  heart-disease: {{site: cleveland}}\npolicy:\n{policy}\n")
    with pytest.raises(ConfigError) as caught:
        load_node_config(node)
    assert words in str(caught.value)


def test_the_task_code_hash_changes_with_the_code(tmp_path: Path) -> None:
    source = tmp_path / "site_task.py"

    def load(text: str) -> type:
        source.write_text(text)
        spec = importlib.util.spec_from_file_location("site_task", source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["site_task"] = module
        spec.loader.exec_module(module)
        return module.SiteTask  # type: ignore[no-any-return]

    template = "from fedcare.tasks.tabular import LogisticTask\nclass SiteTask(LogisticTask):\n    name = 'site'\n    LR = {}\n"
    try:
        first, same, changed = (code_sha256(load(template.format(v))) for v in (1, 1, 2))
    finally:
        sys.modules.pop("site_task", None)
    assert first == same != changed
    # The fedcare base classes count too: the built-in task's hash is not its module's alone.
    assert code_sha256(TaskRegistry.from_entry_points().get("tabular-logistic").__class__) == INSTALLED.sha256


def test_plans_wait_pending_until_approved_or_rejected(tmp_path: Path) -> None:
    approvals = PlanApprovals(tmp_path / "approvals")
    plan = _plan(privacy={"record_level": {"enabled": True, "epsilon": 1.0}}, secure_aggregation={"enabled": True})
    record = approvals.receive(plan)
    assert record.status == "pending" and record.plan_hash == plan_hash(plan)
    assert record.summary["task"] == "tabular-logistic" and "epsilon 1" in record.summary["privacy"]
    assert "secure aggregation" in record.summary["privacy"]
    assert approvals.receive(plan).status == "pending"  # received again: the same record
    other = approvals.receive(_plan(rounds=3), auto_approve=True)
    assert other.status == "approved" and other.decided_by == "auto-approve"
    rejected = approvals.reject(record.plan_hash[:10], reason="no ethics approval")
    assert rejected.status == "rejected" and rejected.reason == "no ethics approval"
    assert sorted(r.status for r in approvals.records()) == ["approved", "rejected"]
    assert '"task": "tabular-logistic"' in approvals.plan_text(record.plan_hash)
    with pytest.raises(ConfigError, match="no received plan"):
        approvals.approve("deadbeef")
    with pytest.raises(ConfigError, match="8 to 64 hex digits"):
        approvals.approve("abc")


def test_the_node_command_lists_approves_and_rejects(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedcare.cli import app

    node = tmp_path / "node.yaml"
    node.write_text("name: st-mary\ndatasets:\n  heart-disease: {site: cleveland}\n")
    config = load_node_config(node)
    assert config.approvals_dir == tmp_path / "st-mary-approvals"
    record = PlanApprovals(config.approvals_dir).receive(_plan())
    runner = CliRunner()
    listed = runner.invoke(app, ["node", "plans", "--config", str(node), "--json"])
    assert listed.exit_code == 0 and '"status": "pending"' in listed.output
    approved = runner.invoke(app, ["node", "approve", record.plan_hash[:12], "--config", str(node)])
    assert approved.exit_code == 0 and "approved" in approved.output
    assert PlanApprovals(config.approvals_dir).get(record.plan_hash).status == "approved"  # type: ignore[union-attr]
    unknown = runner.invoke(app, ["node", "reject", "0123456789", "--config", str(node)])
    assert unknown.exit_code == 2 and "no received plan" in unknown.output
    tasks = runner.invoke(app, ["node", "tasks", "--json"])
    assert tasks.exit_code == 0 and INSTALLED.sha256 in tasks.output


def test_statistics_the_policy_does_not_list_never_leave_the_site() -> None:
    from fedcare.simulation import simulate

    plan = parse_plan({"task": "tabular-logistic", "dataset": {"name": "heart-disease", "normalization": "per-site"},
                       "rounds": 1})  # fmt: skip
    quiet = NodePolicy(allowed_statistics=("feature_statistics",))
    result = simulate(plan, policies={"cleveland": quiet})
    # No training loss from cleveland, and its evaluation is refused naming the policy key.
    [refusal] = [f for f in result.failures if f["node_id"] == "cleveland"]
    assert refusal["kind"] == "evaluate" and "policy.allowed_statistics" in refusal["error"]
    assert result.final_evaluation is not None and "cleveland" not in result.final_evaluation.sites
    assert result.train_examples["cleveland"] > 0  # its update still counts
