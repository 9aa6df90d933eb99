"""``fedcare report RUN`` through Typer."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from fedcare.cli_report import report_command
from fedcare.federation.rundir import RunDirectory


def app() -> typer.Typer:
    application = typer.Typer()
    application.command("report")(report_command)
    return application


def small_run(path: Path) -> Path:
    run = RunDirectory(path)
    run.log_event({"time": 1.0, "event": "run_start", "run_id": "r1", "nodes": ["a", "b"], "rounds": 2, "first_round": 1})
    run.log_event({"time": 1.1, "event": "round_start", "round": 1, "nodes": ["a", "b"]})
    run.log_event({"time": 2.0, "event": "round_end", "round": 1, "nodes_ok": ["a", "b"], "nodes_failed": [],
                   "train_loss": 0.4, "duration_s": 0.9, "bytes": {"a": {"down": 3, "up": 2}}})  # fmt: skip
    return run.path


def test_report_command_writes_the_report_and_prints_json(tmp_path: Path) -> None:
    run = small_run(tmp_path / "run")
    result = CliRunner().invoke(app(), [str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"report": str(run / "report.html"), "sites": 2, "rounds": 1}
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_report_command_prints_the_written_path(tmp_path: Path) -> None:
    run = small_run(tmp_path / "run")
    result = CliRunner().invoke(app(), [str(run)])
    assert result.exit_code == 0
    assert "report.html" in result.stdout


def test_report_command_exits_3_when_the_log_is_missing(tmp_path: Path) -> None:
    result = CliRunner().invoke(app(), [str(tmp_path)])
    assert result.exit_code == 3
    assert "error:" in result.stderr and "metrics.jsonl" in result.stderr
    assert not (tmp_path / "report.html").exists()


def test_report_command_exits_3_on_a_malformed_line(tmp_path: Path) -> None:
    run = small_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", lines[2]]) + "\n")
    result = CliRunner().invoke(app(), [str(run)])
    assert result.exit_code == 3
    assert "line 2" in result.stderr
