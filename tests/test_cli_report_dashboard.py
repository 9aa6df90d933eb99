"""`fedcare report` and `--dashboard` through the real command."""

from __future__ import annotations

import json
import re
import stat
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedcare.cli import app, demo_plan_path


@pytest.fixture(scope="module")
def short_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = yaml.safe_load(demo_plan_path(private=False).read_text())
    raw["rounds"] = 2
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_simulate_with_the_dashboard_prints_its_address_and_leaves_a_report(short_plan: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", str(short_plan), "--out", str(out), "--dashboard"])

    assert result.exit_code == 0, result.output
    url = json.loads((out / "dashboard.json").read_text())["url"]
    assert re.search(r"live dashboard: http://127\.0\.0\.1:\d+/", result.output)
    assert url in result.output
    assert stat.S_IMODE((out / "dashboard.json").stat().st_mode) == 0o600
    assert (out / "report.html").stat().st_size > 10_000
    with pytest.raises(OSError):  # the dashboard stops with the run
        urllib.request.urlopen(url, timeout=2)


def test_dashboard_off_loopback_gets_a_token(short_plan: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["simulate", str(short_plan), "--out", str(out), "--json", "--dashboard", "--dashboard-listen", "0.0.0.0:0"]
    )

    assert result.exit_code == 0, result.output
    url = json.loads((out / "dashboard.json").read_text())["url"]
    assert "token=" in url and len(url.split("token=")[1]) >= 32


def test_a_bad_dashboard_address_is_a_configuration_error(short_plan: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["simulate", str(short_plan), "--out", str(tmp_path / "run"), "--dashboard", "--dashboard-listen", "nowhere"]
    )

    assert result.exit_code == 2
    assert "dashboard" in result.output


def test_report_rebuilds_report_html(short_plan: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["simulate", str(short_plan), "--out", str(out), "--quiet"]).exit_code == 0
    (out / "report.html").unlink()

    result = CliRunner().invoke(app, ["report", str(out), "--json"])

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == {"report": str(out / "report.html"), "sites": 4, "rounds": 2}
    assert "site-metrics" in (out / "report.html").read_text()


def test_report_of_a_missing_run_exits_with_the_data_error_code(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])

    assert result.exit_code == 3
    assert "error:" in result.output
