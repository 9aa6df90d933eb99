"""The two-site imaging examples: PNG folders and DICOM files, checked, harmonized and trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.deployment import load_node_config, manifest_catalog
from fedcare.plan import load_plan
from fedcare.simulation import simulate

SITES = ("hospital-a", "hospital-b")


@pytest.mark.parametrize("kind", ["png", "dicom"])
@pytest.mark.parametrize("site", SITES)
def test_data_check_passes_for_every_example_site(example_sites: Path, kind: str, site: str) -> None:
    node = example_sites / kind / site / "node.yaml"
    out = CliRunner().invoke(app, ["data", "check", str(node), "--plan", str(example_sites / kind / "plan.yaml"), "--json"])
    assert out.exit_code == 0, out.output
    [check] = json.loads(out.output)["datasets"]
    report = check["report"]
    counts = {label: sides["train"] + sides["test"] for label, sides in report["labels"].items()}
    assert counts["normal"] > 20 and counts["pneumonia"] > 20
    if (kind, site) == ("dicom", "hospital-b"):
        assert report["read"]["skipped"] == {"no pixel data": 3}  # the structured reports
    if (kind, site) == ("png", "hospital-b"):
        assert report["dropped"]["Not assessed"] > 0


@pytest.mark.parametrize("kind", ["png", "dicom"])
def test_two_hospitals_learn_together_from_their_own_files(example_sites: Path, kind: str, tmp_path: Path) -> None:
    plan = load_plan(example_sites / kind / "plan.yaml")
    configs = [load_node_config(example_sites / kind / site / "node.yaml") for site in SITES]
    catalog = manifest_catalog(plan, configs)
    a, b = (catalog.get("chest-xray").load_site(plan.dataset, site) for site in SITES)
    # Different local words, one encoding: both sites' labels are indices into [normal, pneumonia].
    assert a.spec == b.spec and a.spec.class_names == ("normal", "pneumonia")
    assert set(a.train.y.tolist()) == set(b.train.y.tolist()) == {0, 1}
    result = simulate(plan, catalog=catalog, out_dir=tmp_path / "run")
    assert result.rounds_completed == plan.rounds and not result.failures
    assert result.final_evaluation is not None
    pooled = result.final_evaluation.pooled
    assert pooled["roc_auc"] >= 0.9 and pooled["accuracy"] >= 0.8, pooled


def test_a_site_with_an_unmapped_label_refuses_and_the_coordinator_learns_why(example_sites: Path, tmp_path: Path) -> None:
    site_b = tmp_path / "hospital-b"
    shutil.copytree(example_sites / "png" / "hospital-b", site_b)
    node = yaml.safe_load((site_b / "node.yaml").read_text())
    del node["datasets"]["chest-xray"]["label_map"]["Pneumonia (viral)"]
    (site_b / "node.yaml").write_text(yaml.safe_dump(node))
    plan = load_plan(example_sites / "png" / "plan.yaml")
    plan = plan.model_copy(update={"min_nodes": 1, "rounds": 2, "evaluation": plan.evaluation.model_copy(update={"every_rounds": 2})})
    configs = [load_node_config(example_sites / "png" / "hospital-a" / "node.yaml"), load_node_config(site_b / "node.yaml")]
    result = simulate(plan, catalog=manifest_catalog(plan, configs), out_dir=tmp_path / "run")
    assert result.rounds_completed == 2
    refusals = [f for f in result.failures if f["node_id"] == "hospital-b"]
    assert refusals and all("refuses the plan" in f["error"] and "'Pneumonia (viral)'" in f["error"] for f in refusals)
    assert result.train_examples.get("hospital-a", 0) > 0 and "hospital-b" not in result.train_examples
    # data check says the same, and exits 3 (a data error).
    out = CliRunner().invoke(app, ["data", "check", str(site_b / "node.yaml")])
    assert out.exit_code == 3 and "Pneumonia (viral)" in out.output
