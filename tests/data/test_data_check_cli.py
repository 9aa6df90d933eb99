"""``fedcare data check``: run at a site, before joining, on the site's own node.yaml."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.data.check import check_site
from fedcare.plan import parse_plan

from .conftest import write_node, write_png_folder

runner = CliRunner()


@pytest.fixture
def good_site(tmp_path, breastmnist):
    images, labels = breastmnist
    write_png_folder(tmp_path / "images", images[:100], labels[:100], names={0: "MAL", 1: "BEN"})
    datasets = {
        "heart-disease": {"site": "cleveland"},
        "breast-us": {"format": "imagefolder", "path": "images", "label_map": {"MAL": "malignant", "BEN": "benign"}},
    }
    return write_node(tmp_path, datasets), labels[:100]


def plan_file(tmp_path, labels=("malignant", "benign")):
    plan = {
        "name": "imaging", "task": "tabular-logistic", "rounds": 1,
        "dataset": {"name": "breast-us", "labels": list(labels), "input_shape": [1, 28, 28]},
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_good_site_exits_0_and_prints_the_counts(good_site):
    node, labels = good_site
    result = runner.invoke(app, ["data", "check", str(node)])
    assert result.exit_code == 0, result.output
    assert "bundled dataset, site cleveland" in result.output
    assert "malignant" in result.output and "benign" in result.output
    assert f"records read {len(labels)}" in result.output


def test_json_output_parses_with_counts_per_federation_label(good_site):
    node, labels = good_site
    result = runner.invoke(app, ["data", "check", str(node), "--dataset", "breast-us", "--json"])
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output)["datasets"]
    counts = entry["report"]["labels"]
    assert counts["malignant"]["train"] + counts["malignant"]["test"] == int((labels == 0).sum())
    assert entry["report"]["read"]["shapes"] == {"1x28x28": len(labels)}
    assert entry["ok"] and entry["errors"] == []


def test_unmapped_label_exits_3_naming_it(good_site):
    node, _ = good_site
    (node.parent / "images" / "OTHER").mkdir()
    (node.parent / "images" / "OTHER" / "x.png").write_bytes(next((node.parent / "images" / "MAL").iterdir()).read_bytes())
    result = runner.invoke(app, ["data", "check", str(node)])
    assert result.exit_code == 3
    assert "OTHER" in result.output and "label_map" in result.output


def test_unknown_manifest_key_exits_3_naming_it(tmp_path):
    node = write_node(tmp_path, {"scans": {"format": "imagefolder", "path": "images", "lable_map": {"a": "b"}}})
    result = runner.invoke(app, ["data", "check", str(node)])
    assert result.exit_code == 3
    assert "node.datasets.scans.lable_map" in result.output


def test_plan_vocabulary_refuses_labels_it_does_not_list(good_site, tmp_path):
    node, _ = good_site
    plan = plan_file(tmp_path, labels=("malignant", "normal"))
    result = runner.invoke(app, ["data", "check", str(node), "--plan", str(plan), "--json"])
    assert result.exit_code == 3
    [entry] = json.loads(result.output)["datasets"]
    assert any("'benign'" in error for error in entry["errors"])


def test_check_with_plan_reports_rare_and_missing_classes(good_site, tmp_path):
    node, _ = good_site
    plan = parse_plan(yaml.safe_load(plan_file(tmp_path).read_text()))
    [check] = check_site(node, plan=plan, min_examples=1000)
    assert check.ok
    assert any("fewer than 1000" in warning for warning in check.warnings)
    assert check.report is not None and check.report.train_size + check.report.test_size == 100


def test_missing_path_is_an_error_naming_the_field(tmp_path):
    node = write_node(tmp_path, {"scans": {"format": "imagefolder", "path": "nowhere"}})
    [check] = check_site(node)
    assert check.errors and check.errors[0].startswith("path:")


def test_unreadable_node_yaml_exits_2(tmp_path):
    result = runner.invoke(app, ["data", "check", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
