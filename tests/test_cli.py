"""The fedcare command, run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedcare.cli import demo_plan_path
from fedcare.plan import load_plan

ROOT = Path(__file__).resolve().parents[1]
FEDCARE = [sys.executable, "-m", "fedcare.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([*FEDCARE, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def write_plan(path: Path, **changes: object) -> Path:
    plan = {
        "name": "cli-test",
        "task": "tabular-logistic",
        "dataset": {"name": "breast-cancer", "num_nodes": 3},
        "rounds": 3,
        "local": {"batch_size": 32, "learning_rate": 0.1},
        "evaluation": {"every_rounds": 3},
    }
    plan.update(changes)
    path.write_text(yaml.safe_dump(plan))
    return path


def test_simulate_json_prints_run_summary(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml")
    out = run("simulate", str(plan), "--out", str(tmp_path / "run"), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["run_dir"] == str(tmp_path / "run")
    assert summary["rounds"] == 3
    assert set(summary["sites"]) == {"site-0", "site-1", "site-2"}
    assert 0.85 < summary["mean_site_accuracy"] <= 1.0
    assert summary["wall_s"] > 0
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_simulate_prints_per_site_table(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml")
    out = run("simulate", str(plan), "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    for site in ("site-0", "site-1", "site-2", "mean of sites", "pooled (by n)"):
        assert site in out.stdout


def test_bad_plan_exits_2_naming_the_field(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", local={"learning_rate": -0.1})
    out = run("simulate", str(plan), "--json")
    assert out.returncode == 2
    assert "plan.local.learning_rate" in out.stderr and "-0.1" in out.stderr
    assert out.stdout == ""


def test_unknown_dataset_exits_2_naming_the_field(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", dataset={"name": "mimic-iv"})
    out = run("simulate", str(plan))
    assert out.returncode == 2
    assert "plan.dataset.name" in out.stderr and "mimic-iv" in out.stderr


def test_more_nodes_per_round_than_sites_exits_2(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", nodes_per_round=5)
    out = run("simulate", str(plan))
    assert out.returncode == 2
    assert "plan.nodes_per_round" in out.stderr and "5" in out.stderr


def test_demo_runs_heart_disease_federation_and_prints_table_and_epsilon_spent(tmp_path):
    out = run("demo", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    for hospital in ("cleveland", "hungary", "switzerland", "va-long-beach"):
        assert hospital in out.stdout
    assert "rounds" in out.stderr  # the progress bar
    assert "ε spent" in out.stdout and "record-level DP" in out.stdout
    for hospital in ("cleveland", "hungary", "switzerland", "va-long-beach"):
        [row] = [line for line in out.stdout.splitlines() if f" {hospital} " in line]
        assert 0.9 <= float(row.strip(" │").split("│")[-1]) <= 1.0  # its epsilon spent


def test_demo_json_has_required_keys(tmp_path):
    # In one process and without DP (the DP demo's JSON is checked deployed, in tests/deployment).
    out = run("demo", "--inproc", "--no-dp", "--json", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert {"run_dir", "rounds", "sites", "mean_site_accuracy", "epsilon_spent", "wall_s"} <= set(summary)
    assert len(summary["sites"]) == 4
    assert summary["epsilon_spent"] == {}
    assert 0.7 < summary["mean_site_accuracy"] <= 1.0


def test_demo_runs_the_example_plans():
    assert load_plan(demo_plan_path()) == load_plan(ROOT / "examples" / "heart_disease_dp.yaml")
    assert load_plan(demo_plan_path(private=False)) == load_plan(ROOT / "examples" / "heart_disease.yaml")


def test_demo_plan_turns_record_level_dp_on_at_epsilon_1_and_delta_1e_3():
    record_level = load_plan(demo_plan_path()).privacy.record_level
    assert (record_level.enabled, record_level.epsilon, record_level.delta) == (True, 1.0, 1e-3)


def test_datasets_lists_bundled_data_with_licences():
    out = run("datasets")
    assert out.returncode == 0, out.stderr
    assert "heart-disease" in out.stdout and "breast-cancer" in out.stdout
    assert "CC BY 4.0" in out.stdout


def test_baseline_pooled_and_local_print_json_per_site(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml")
    for mode in ("pooled", "local"):
        out = run("baseline", str(plan), "--mode", mode, "--json")
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["mode"] == mode
        assert set(summary["sites"]) == {"site-0", "site-1", "site-2"}
        assert 0.8 < summary["mean_site_accuracy"] <= 1.0


def test_baseline_unknown_mode_exits_2(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml")
    out = run("baseline", str(plan), "--mode", "federated")
    assert out.returncode == 2
    assert "--mode" in out.stderr and "federated" in out.stderr



@pytest.mark.parametrize(
    ("changes", "field", "value"),
    [
        ({"task": "tabular-xgboost"}, "plan.task", "tabular-xgboost"),
        ({"strategy": {"name": "fedsgd"}}, "plan.strategy.name", "fedsgd"),
        ({"rounds": 0}, "plan.rounds", "0"),
    ],
)
def test_invalid_plan_field_exits_2_naming_field_and_value(tmp_path, changes, field, value):
    plan = write_plan(tmp_path / "plan.yaml", **changes)
    out = run("simulate", str(plan))
    assert out.returncode == 2
    assert field in out.stderr and value in out.stderr
    assert not (tmp_path / "runs").exists()
