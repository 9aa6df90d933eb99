"""MLflow tracking: the plan's ``tracking`` field, and a real run read back with MlflowClient."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import yaml

from fedcare.cli import demo_plan_path
from fedcare.errors import ConfigError
from fedcare.plan import parse_plan, plan_hash
from fedcare.simulation import check_plan, simulate
from fedcare.tracking import MlflowTracker, flatten_plan

BASE = {"task": "tabular-logistic", "dataset": {"name": "heart-disease"}, "rounds": 1}


def heart_plan(**changes: object):
    data = yaml.safe_load(demo_plan_path(private=False).read_text())  # the bundled heart_disease.yaml
    data.update(rounds=2, **changes)
    return parse_plan(data)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One real 2-round simulation of heart_disease.yaml with tracking on, from an empty working directory."""
    root = tmp_path_factory.mktemp("tracked")
    cwd = root / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(cwd)
        plan = heart_plan(tracking="mlflow")
        result = simulate(plan, out_dir=root / "run")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'run' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(plan.name)
    [run] = client.search_runs([experiment.experiment_id])
    events = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"root": root, "cwd": cwd, "plan": plan, "result": result, "client": client, "run": run, "events": events}


def history(tracked, key):
    return [(m.step, m.value) for m in tracked["client"].get_metric_history(tracked["run"].info.run_id, key)]


def test_tracking_shorthand_and_mapping_parse():
    assert parse_plan({**BASE, "tracking": "mlflow"}).tracking.backend == "mlflow"
    mapping = parse_plan({**BASE, "tracking": {"backend": "mlflow", "uri": "sqlite:///t.db", "experiment": "hd"}})
    assert (mapping.tracking.uri, mapping.tracking.experiment) == ("sqlite:///t.db", "hd")
    assert parse_plan(BASE).tracking is None


@pytest.mark.parametrize("tracking", ["wandb", {"backend": "wandb"}])
def test_unknown_tracking_backend_is_refused_naming_the_field(tracking):
    with pytest.raises(ConfigError, match=r"plan\.tracking\.backend: .*'mlflow', got 'wandb'"):
        parse_plan({**BASE, "tracking": tracking})


def test_missing_mlflow_is_a_config_error_when_the_run_starts_not_at_parse(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    plan = parse_plan({**BASE, "tracking": "mlflow"})  # a site without MLflow still reads the plan
    with pytest.raises(ConfigError, match=r"pip install 'fedcare\[mlflow\]'") as raised:
        check_plan(plan)
    assert raised.value.field == "plan.tracking"


def test_plan_without_tracking_keeps_its_hash():
    """A plan that leaves the later sections at their defaults hashes as before they existed."""
    plan = parse_plan(BASE)
    dumped = plan.model_dump(mode="json")
    for later in ("tracking", "compression"):
        del dumped[later]
    del dumped["local"]["max_local_seconds"], dumped["strategy"]["buffered"]
    import hashlib

    expected = hashlib.sha256(json.dumps(dumped, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert plan_hash(plan) == expected
    for changed in ({"tracking": "mlflow"}, {"compression": {"method": "int8"}}, {"local": {"max_local_seconds": 60}},
                    {"strategy": {"buffered": {"buffer_size": 2}}}):  # fmt: skip
        assert plan_hash(parse_plan({**BASE, **changed})) != expected, changed


def test_params_leave_out_the_tracking_uri_and_cut_long_values():
    plan = parse_plan({**BASE, "name": "x" * 600, "tracking": {"backend": "mlflow", "uri": "http://user:secret@host"}})
    flat = flatten_plan(plan)
    assert "tracking.uri" not in flat and "secret" not in json.dumps(flat)
    assert len(flat["name"]) == 500 and flat["tracking.backend"] == "mlflow"


def test_tracked_run_metric_history_equals_the_round_events(tracked_run):
    rounds = [e for e in tracked_run["events"] if e["event"] == "round_end"]
    evaluations = [e for e in tracked_run["events"] if e["event"] == "evaluation"]
    assert [r["round"] for r in rounds] == [1, 2]
    for key in ("duration_s", "num_examples"):
        assert history(tracked_run, key) == [(r["round"], pytest.approx(r[key])) for r in rounds]
    assert history(tracked_run, "bytes_up") == [(r["round"], sum(b["up"] for b in r["bytes"].values())) for r in rounds]
    assert history(tracked_run, "mean.accuracy") == [(e["round"], pytest.approx(e["mean"]["accuracy"])) for e in evaluations]
    assert history(tracked_run, "site.cleveland.calibration_error") == [
        (e["round"], pytest.approx(e["sites"]["cleveland"]["calibration_error"])) for e in evaluations
    ]
    # secure aggregation hides the sites' training losses: nothing is invented
    assert all(r["train_loss"] is None for r in rounds) and history(tracked_run, "train_loss") == []
    assert not any("roc_tpr" in key for key in tracked_run["run"].data.metrics)


def test_tracked_run_has_params_tags_artifacts_and_run_name(tracked_run):
    run = tracked_run["run"]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    assert run.data.params["rounds"] == "2" and run.data.params["local.learning_rate"] == "0.01"
    assert run.data.params["secure_aggregation.enabled"] == "True"
    assert run.data.tags["fedcare.plan_hash"] == plan_hash(tracked_run["plan"])
    assert run.data.tags["fedcare.run_id"] == tracked_run["result"].run_id
    artifacts = {a.path for a in tracked_run["client"].list_artifacts(run.info.run_id)}
    assert {"plan.yaml", "model_card.json"} <= artifacts
    assert (tracked_run["root"] / "run" / "mlruns").is_dir()


def test_tracked_run_writes_nothing_to_the_current_directory(tracked_run):
    assert list(tracked_run["cwd"].iterdir()) == []


def test_mlflow_failure_is_a_warning_and_the_run_completes(tmp_path, monkeypatch, caplog):
    def fail(self, event):
        raise RuntimeError("tracking server down")

    monkeypatch.setattr(MlflowTracker, "_start", fail)
    plan = parse_plan({**BASE, "tracking": "mlflow", "dataset": {"name": "breast-cancer", "num_nodes": 2}})
    with caplog.at_level(logging.WARNING, logger="fedcare.tracking"):
        result = simulate(plan, out_dir=tmp_path / "run")
    assert result.rounds_completed == 1
    assert any("MLflow tracking failed" in record.getMessage() for record in caplog.records)


def test_tracking_without_run_directory_or_uri_is_refused():
    plan = parse_plan({**BASE, "tracking": "mlflow", "dataset": {"name": "breast-cancer", "num_nodes": 2}})
    with pytest.raises(ConfigError, match="plan.tracking: the default tracking store lives in the run directory"):
        simulate(plan)


def test_command_names_the_extra_to_install_when_mlflow_is_missing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedcare.cli import app

    monkeypatch.setitem(sys.modules, "mlflow", None)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({**BASE, "tracking": "mlflow"}))
    result = CliRunner().invoke(app, ["simulate", str(plan), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "plan.tracking" in result.output and "pip install 'fedcare[mlflow]'" in result.output
    assert not (tmp_path / "run").exists()
