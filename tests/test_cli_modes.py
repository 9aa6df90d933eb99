"""The command's output modes, local-training progress, help and exit codes, run as a user runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedcare.cli import _EXIT_CODES, exit_code
from fedcare.data.catalog import DatasetCatalog
from fedcare.errors import (
    BudgetExceeded,
    ConfigError,
    DataError,
    FedcareError,
    FederationError,
    PolicyViolation,
    ProtocolError,
    SecAggAborted,
    TransportError,
)
from fedcare.federation.node import Node
from fedcare.messages import Job, JobKind
from fedcare.metrics import ROC_FPR_GRID
from fedcare.plan import parse_plan, plan_hash
from fedcare.simulation import initial_parameters
from fedcare.tasks.tabular import LogisticTask

ROOT = Path(__file__).resolve().parents[1]
FEDCARE = [sys.executable, "-m", "fedcare.cli"]


def run(*args: str, cwd: Path | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([*FEDCARE, *args], capture_output=True, text=True, timeout=timeout_s, cwd=cwd, env=env)


def write_plan(path: Path, **changes: object) -> Path:
    plan = {
        "name": "modes",
        "task": "tabular-logistic",
        "dataset": {"name": "breast-cancer", "num_nodes": 2},
        "rounds": 2,
        "local": {"batch_size": 32, "learning_rate": 0.1},
        "evaluation": {"every_rounds": 2},
    }
    plan.update(changes)
    path.write_text(yaml.safe_dump(plan))
    return path


# -- output modes ------------------------------------------------------------------------------


def test_json_prints_exactly_one_object_with_curves_apart_from_scalars(tmp_path):
    out = run("simulate", str(write_plan(tmp_path / "plan.yaml")), "--out", str(tmp_path / "run"), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)  # the whole of stdout is one JSON document
    assert out.stdout.count("\n") == 1
    assert summary["roc_fpr_grid"] == list(ROC_FPR_GRID)
    assert set(summary["curves"]) == set(summary["sites"]) == {"site-0", "site-1"}
    for site, metrics in summary["sites"].items():
        assert not any(key.startswith("roc_tpr@") for key in metrics)
        assert 0 <= metrics["calibration_error"] <= 1
        assert len(summary["curves"][site]["roc"]) == len(ROC_FPR_GRID)
    assert not any(key.startswith("roc_tpr@") for key in (*summary["mean"], *summary["pooled"]))
    assert "local training" not in out.stderr and "rounds" not in out.stderr  # no progress with --json


def test_quiet_prints_only_the_run_directory(tmp_path):
    out = run("simulate", str(write_plan(tmp_path / "plan.yaml")), "--out", str(tmp_path / "run"), "--quiet")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{tmp_path / 'run'}\n"
    assert out.stderr == ""


def test_quiet_tracked_run_keeps_stderr_empty_and_tracks_into_the_run_directory(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", tracking="mlflow")
    out = run("simulate", str(plan), "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{tmp_path / 'run'}\n" and out.stderr == ""
    assert (tmp_path / "run" / "mlflow.db").is_file() and not (tmp_path / "mlruns").exists()


def test_json_and_quiet_together_exit_2(tmp_path):
    out = run("simulate", str(write_plan(tmp_path / "plan.yaml")), "--json", "--quiet")
    assert out.returncode == 2
    assert "choose one" in out.stderr and out.stdout == ""


def test_table_mode_shows_a_local_training_bar_per_site_and_an_ece_column(tmp_path):
    out = run("simulate", str(write_plan(tmp_path / "plan.yaml")), "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    for site in ("site-0", "site-1"):
        assert re.search(rf"{site}\s+local training .* (\d+)/\1 steps", out.stderr), out.stderr
    assert "rounds" in out.stderr and "mean site accuracy" in out.stderr  # the rounds bar keeps its status
    header = next(line for line in out.stdout.splitlines() if "acc" in line and "AUC" in line)
    assert "ECE" in header


def test_baseline_json_splits_curves_and_quiet_prints_one_line(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml")
    out = run("baseline", str(plan), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert set(summary["curves"]) == {"site-0", "site-1"} and "calibration_error" in summary["sites"]["site-0"]
    quiet = run("baseline", str(plan), "--mode", "local", "--quiet")
    assert quiet.returncode == 0 and quiet.stdout.startswith("local baseline: mean site accuracy ")
    assert quiet.stdout.count("\n") == 1


# -- local-training progress -------------------------------------------------------------------

PROGRESS_PLAN = parse_plan(
    {"task": "tabular-logistic", "rounds": 1, "dataset": {"name": "heart-disease", "normalization": "per-site"},
     "local": {"epochs": 3, "batch_size": 8}}
)  # fmt: skip


def train_once(on_progress=None):
    data = DatasetCatalog.bundled().get("heart-disease").load_site(PROGRESS_PLAN.dataset, "hungary")
    node = Node("hungary", task=LogisticTask(), data=data, plan=PROGRESS_PLAN, on_progress=on_progress)
    params = initial_parameters(LogisticTask(), data.spec, PROGRESS_PLAN).freeze()
    job = Job("run", 1, "j", JobKind.TRAIN, plan_hash=plan_hash(PROGRESS_PLAN), parameters=params, config={"seed": 3})
    result = node.handle(job)
    assert result.ok, result.error
    return result


def test_progress_hook_leaves_the_trained_parameters_bit_identical():
    calls = []
    with_hook = train_once(lambda *args: calls.append(args))
    without = train_once()
    assert with_hook.update.flatten().tobytes() == without.update.flatten().tobytes()
    assert with_hook.metrics == without.metrics
    assert calls


def test_progress_hook_leaves_dp_sgd_training_bit_identical(tmp_path):
    plan = parse_plan(
        {"task": "tabular-logistic", "rounds": 1, "dataset": {"name": "heart-disease", "normalization": "per-site"},
         "local": {"epochs": 1, "batch_size": 16}, "privacy": {"record_level": {"enabled": True, "epsilon": 1.0}}}
    )  # fmt: skip
    data = DatasetCatalog.bundled().get("heart-disease").load_site(plan.dataset, "hungary")
    params = initial_parameters(LogisticTask(), data.spec, plan).freeze()
    calls = []
    updates = []
    for ledger, on_progress in (("with", lambda *args: calls.append(args)), ("without", None)):
        node = Node(
            "hungary", task=LogisticTask(), data=data, plan=plan, ledger_dir=tmp_path / ledger, secure_noise=False,
            on_progress=on_progress,
        )  # fmt: skip
        job = Job("run", 1, "j", JobKind.TRAIN, plan_hash=plan_hash(plan), parameters=params, config={"seed": 3})
        result = node.handle(job)
        assert result.ok, result.error
        updates.append(result.update.flatten().tobytes())
    assert updates[0] == updates[1]
    assert calls[-1][2] == calls[-1][3] == -(-172 // 16)


def test_progress_reports_the_planned_steps_throttled_to_about_ten_a_second():
    calls = []
    started = time.monotonic()
    result = train_once(lambda *args: calls.append(args))
    elapsed_s = time.monotonic() - started
    planned = int(result.metrics["steps"])
    assert planned == 3 * -(-172 // 8)
    assert calls[-1] == ("hungary", 1, planned, planned)
    assert len(calls) <= 2 + 10 * elapsed_s + 1
    assert [c[2] for c in calls] == sorted(c[2] for c in calls)


# -- help --------------------------------------------------------------------------------------


def test_help_groups_commands_and_shows_the_exit_codes():
    out = run("--help")
    assert out.returncode == 0, out.stderr
    for panel in ("Run a federation", "Inspect", "Set up", "Typical commands", "Exit codes"):
        assert panel in out.stdout
    for entry in _EXIT_CODES:
        assert re.search(rf"^\s*{entry.code}\s+{re.escape(entry.meaning[:30])}", out.stdout, re.MULTILINE), entry


def test_docs_exit_code_table_matches_the_command():
    text = (ROOT / "docs" / "cli.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.MULTILINE)
    assert [(int(code), meaning) for code, meaning in rows] == [(e.code, e.meaning) for e in _EXIT_CODES]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (FedcareError("x"), 1),
        (ConfigError("x"), 2),
        (DataError("x"), 3),
        (FederationError("x"), 4),
        (SecAggAborted("x"), 4),
        (TransportError("x"), 5),
        (PolicyViolation("x"), 6),
        (BudgetExceeded("x"), 6),
        (ProtocolError("x"), 7),
        (KeyboardInterrupt(), 130),
    ],
)
def test_most_specific_error_class_sets_the_exit_code(error, code):
    assert exit_code(error) == code


# -- exit codes through real commands ----------------------------------------------------------


def test_invalid_yaml_plan_exits_2(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("task: [unclosed\n")
    out = run("simulate", str(plan))
    assert out.returncode == 2 and "not valid YAML" in out.stderr


def test_data_check_of_a_missing_data_folder_exits_3(tmp_path):
    node = tmp_path / "node.yaml"
    node.write_text(yaml.safe_dump({"name": "st-mary", "datasets": {"scans": {"format": "imagefolder", "path": "nowhere"}}}))
    out = run("data", "check", str(node), "--quiet")
    assert out.returncode == 3
    assert "does not exist" in out.stderr and out.stdout == ""


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    for args in (
        ("certs", "init", "--federation", "t", "--out", str(directory)),
        ("certs", "issue", "--role", "server", "--name", "server", "--certs", str(directory)),
        ("certs", "issue", "--role", "node", "--name", "st-mary", "--certs", str(directory)),
    ):
        assert run(*args).returncode == 0
    return directory


def test_serve_without_nodes_joining_exits_4(tmp_path, certs):
    plan = write_plan(tmp_path / "plan.yaml", dataset={"name": "heart-disease"}, nodes=["cleveland", "hungary"])
    out = run(
        "serve", str(plan), "--listen", "127.0.0.1:0", "--certs", str(certs), "--out", str(tmp_path / "run"),
        "--wait-for-nodes-s", "0.5", "--quiet",
    )  # fmt: skip
    assert out.returncode == 4, out.stderr
    assert out.stdout == ""


def test_node_that_cannot_reach_the_coordinator_exits_5(tmp_path, certs):
    node = tmp_path / "node.yaml"
    node.write_text(yaml.safe_dump({"name": "st-mary", "datasets": {"heart-disease": {"site": "cleveland"}}}))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = run(
        "node", "--config", str(node), "--coordinator", f"127.0.0.1:{port}", "--certs", str(certs),
        "--give-up-after-s", "1", "--quiet",
    )  # fmt: skip
    assert out.returncode == 5, out.stderr


def test_ctrl_c_exits_130_naming_the_intact_checkpoint(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", rounds=100_000, evaluation={"every_rounds": 100_000})
    process = subprocess.Popen(
        [*FEDCARE, "simulate", str(plan), "--out", str(tmp_path / "run"), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A suite started in the background (nohup, `&`) ignores SIGINT, and children inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120  # a loaded 2-core machine can take a minute to import torch
        while time.monotonic() < deadline and not (metrics.exists() and '"round_end"' in metrics.read_text()):
            time.sleep(0.1)
        assert '"round_end"' in metrics.read_text(), "no round ended within 120 s"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()  # a run of 100,000 rounds must not outlive a failed test
    assert process.returncode == 130, stderr
    assert f"interrupted; the last checkpoint in {tmp_path / 'run'} is intact" in stderr
    assert stdout == ""
