"""``fedcare node init``: a node.yaml from a folder of PNG files or a CSV table that ``fedcare data check`` accepts."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.deployment import load_node_config
from fedcare.errors import ConfigError, DataError
from fedcare.site_setup import detect_dataset, init_site
from fedcare.transport import pki

from tests.sites.site_files import HEART_COLUMNS, make_federation, write_heart_csv, write_pngs

runner = CliRunner()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_federation(tmp_path_factory.mktemp("ca"), nodes=("hospital-a", "hospital-b"))


def _cert_options(ca: Path, name: str) -> list[str]:
    return ["--cert", str(ca / f"{name}.pem"), "--key", str(ca / f"{name}.key"), "--ca", str(ca / "ca.pem")]


def test_init_on_png_label_folders_writes_a_node_yaml_that_data_check_accepts(tmp_path: Path, federation: Path) -> None:
    write_pngs(tmp_path / "xrays", {"NORMAL": 8, "PNEUMONIA": 8})
    node = tmp_path / "site" / "node.yaml"
    made = runner.invoke(app, [
        "node", "init", str(tmp_path / "xrays"), "--name", "hospital-a", "--dataset", "chest-xray",
        "--labels", "normal,pneumonia", "--coordinator", "127.0.0.1:7443", "--out", str(node), "--json",
        *_cert_options(federation, "hospital-a"),
    ])  # fmt: skip
    assert made.exit_code == 0, made.output
    summary = json.loads(made.output)
    assert summary["format"] == "imagefolder" and summary["label_counts"] == {"NORMAL": 8, "PNEUMONIA": 8}
    config = load_node_config(node)
    manifest = config.datasets["chest-xray"]
    assert manifest.label_map == {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}  # type: ignore[union-attr]
    assert config.coordinator == "127.0.0.1:7443" and config.certs_dir == node.parent / "certs"
    assert config.policy.require_secure_aggregation and not config.policy.auto_approve
    key = node.parent / "certs" / "hospital-a.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() == (federation / "hospital-a.key").read_bytes()
    checked = runner.invoke(app, ["data", "check", str(node), "--json"])
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.output)["datasets"][0]["report"]
    assert report["train_size"] + report["test_size"] == 16


def test_init_on_a_csv_table_proposes_label_and_feature_columns_that_data_check_accepts(tmp_path: Path) -> None:
    table = write_heart_csv(tmp_path / "exports" / "heart.csv")
    features = list(HEART_COLUMNS[:-1])
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "name": "heart-own-files", "task": "tabular-logistic", "nodes": ["hospital-a", "hospital-b", "hospital-c"],
        "rounds": 1,
        "dataset": {"name": "heart-csv", "labels": ["absent", "present"], "features": features},
        "secure_aggregation": {"enabled": True, "clip": 1.0},
    }))  # fmt: skip
    node = tmp_path / "node.yaml"
    setup = init_site(table, name="hospital-b", plan=plan, out=node)
    assert setup.dataset.label_column == "diagnosis" and setup.dataset.patient_column == "patient_id"
    assert list(setup.dataset.feature_columns) == features
    assert setup.labels.label_map == {"no": "absent", "yes": "present"} and setup.labels.how["no"] == "synonym"
    manifest = load_node_config(node).datasets["heart-csv"]
    assert manifest.format == "csv" and manifest.labels.column == "diagnosis"  # type: ignore[union-attr]
    checked = runner.invoke(app, ["data", "check", str(node), "--plan", str(plan), "--json"])
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.output)["datasets"][0]["report"]
    assert report["train_size"] + report["test_size"] == 297  # 303 rows, 6 with a missing value ('?')


def test_init_leaves_unmapped_labels_out_of_the_map_as_a_todo_that_data_check_names(tmp_path: Path) -> None:
    write_pngs(tmp_path / "xrays", {"NORMAL": 6, "PNEUMONIA": 6, "QA_phantom": 3})
    node = tmp_path / "node.yaml"
    setup = init_site(tmp_path / "xrays", name="hospital-a", dataset="chest-xray", labels=["normal", "pneumonia"], out=node)
    assert setup.labels.unmapped == {"QA_phantom": 3}
    assert '# QA_phantom: ???   # 3 record(s)' in node.read_text()
    checked = runner.invoke(app, ["data", "check", str(node), "--json"])
    assert checked.exit_code == 3
    assert "'QA_phantom' (3)" in " ".join(json.loads(checked.output)["datasets"][0]["errors"])


def test_init_refuses_to_overwrite_a_node_yaml_without_force(tmp_path: Path) -> None:
    write_pngs(tmp_path / "xrays", {"NORMAL": 2, "PNEUMONIA": 2})
    node = tmp_path / "node.yaml"
    node.write_text("name: hand-written\n")
    args = ["node", "init", str(tmp_path / "xrays"), "--name", "hospital-a", "--dataset", "chest-xray", "--out", str(node)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--force" in refused.output
    assert node.read_text() == "name: hand-written\n"
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert load_node_config(node).name == "hospital-a"


def test_init_refuses_a_certificate_that_names_another_site_or_comes_from_another_ca(tmp_path: Path, federation: Path) -> None:
    write_pngs(tmp_path / "xrays", {"NORMAL": 2, "PNEUMONIA": 2})
    common = dict(name="hospital-a", dataset="chest-xray", out=tmp_path / "node.yaml")
    with pytest.raises(ConfigError, match="names 'hospital-b', not 'hospital-a'"):
        init_site(tmp_path / "xrays", cert=federation / "hospital-b.pem", key=federation / "hospital-b.key",
                  ca=federation / "ca.pem", **common)  # type: ignore[arg-type]  # fmt: skip
    other = tmp_path / "other-ca"
    pki.init_ca(other, federation="other")
    with pytest.raises(ConfigError, match="not signed by this CA"):
        init_site(tmp_path / "xrays", cert=federation / "hospital-a.pem", key=federation / "hospital-a.key",
                  ca=other / "ca.pem", **common)  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(ConfigError, match="key does not belong"):
        init_site(tmp_path / "xrays", cert=federation / "hospital-a.pem", key=federation / "hospital-b.key",
                  ca=federation / "ca.pem", **common)  # type: ignore[arg-type]  # fmt: skip
    assert not (tmp_path / "node.yaml").exists() and not (tmp_path / "certs").exists()


def test_detect_takes_a_low_cardinality_column_as_the_label_and_refuses_a_table_without_header(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("age,chol,group,score\n61,233,A,0.5\n50,250,B,0.7\n40,180,A,0.1\n")
    found = detect_dataset(table)
    assert found.label_column == "group" and found.feature_columns == ("age", "chol", "score")
    raw = tmp_path / "raw.csv"
    raw.write_text("63.0,1.0,145.0,0\n67.0,1.0,160.0,2\n")
    with pytest.raises(DataError, match="header"):
        detect_dataset(raw)
    flat = tmp_path / "flat"
    write_pngs(flat, {"x": 1})
    (flat / "x" / "P000_x.png").rename(flat / "loose.png")
    with pytest.raises(DataError, match="one folder per label"):
        detect_dataset(flat)
