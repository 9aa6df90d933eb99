"""Reports of real (short, simulated) federations: heart disease and TCGA-BRCA survival."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fedcare.plan import load_plan, parse_plan
from fedcare.report import RunRecord, build_report, write_report
from fedcare.simulation import simulate

ROOT = Path(__file__).resolve().parents[2]
HEART_PLAN = ROOT / "src" / "fedcare" / "plans" / "heart_disease.yaml"
HEART_SITES = ["cleveland", "hungary", "switzerland", "va-long-beach"]


@pytest.fixture(scope="module")
def heart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    plan = load_plan(HEART_PLAN)
    short = parse_plan({**plan.model_dump(mode="json"), "rounds": 3})
    out = tmp_path_factory.mktemp("heart-run")
    simulate(short, out_dir=out)
    return out


@pytest.fixture(scope="module")
def heart_report(heart_run: Path) -> str:
    return write_report(heart_run).read_text(encoding="utf-8")


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def site_rows(page: str) -> list[list[str]]:
    body = re.search(r'<table id="site-metrics">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert body is not None
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body.group(1))]


def test_report_has_one_row_per_site_named_as_in_the_run(heart_report: str) -> None:
    rows = site_rows(heart_report)
    assert [row[0] for row in rows] == HEART_SITES


def test_report_table_numbers_equal_the_final_evaluation_event(heart_run: Path, heart_report: str) -> None:
    final = [e for e in events(heart_run) if e["event"] == "evaluation"][-1]
    columns = ["accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "calibration_error"]
    for row in site_rows(heart_report):
        site = row[0]
        assert int(row[1]) == final["examples"][site]
        for name, cell in zip(columns, row[2:], strict=True):
            assert cell == f"{final['sites'][site][name]:.3f}", (site, name)
    foot = re.search(r"<tfoot><tr>(.*?)</tr>", heart_report)
    assert foot is not None
    cells = re.findall(r"<td>(.*?)</td>", foot.group(1))
    assert cells[0] == "mean of sites"
    assert cells[2] == f"{final['mean']['accuracy']:.3f}"


def test_every_plot_is_a_real_png_with_many_colours(heart_report: str) -> None:
    images = re.findall(r'<img class="plot" alt="[^"]+" src="data:image/png;base64,([^"]+)"', heart_report)
    assert len(images) == 4  # learning curves, ROC, participation, traffic (no DP in this plan)
    import base64

    for data in images:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 150
        colours = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 20


def test_report_references_nothing_outside_itself(heart_report: str) -> None:
    assert "http://" not in heart_report and "https://" not in heart_report
    assert "<script" not in heart_report
    assert re.findall(r'src="([^"]{0,22})', heart_report) == ["data:image/png;base64,"] * 4


def test_record_of_real_run_is_completed_with_every_site_training_every_round(heart_run: Path) -> None:
    record = RunRecord.from_run_dir(heart_run)
    assert (record.status, record.rounds_completed, record.rounds_planned) == ("completed", 3, 3)
    assert record.participation == {r: dict.fromkeys(HEART_SITES, "trained") for r in (1, 2, 3)}
    assert record.privacy is not None and record.privacy["secure_aggregation"] is True
    assert "masked model updates" in record.data_leaving_sites


def test_traffic_totals_equal_the_sums_in_the_events(heart_run: Path, heart_report: str) -> None:
    expected = dict.fromkeys(HEART_SITES, (0, 0))
    for event in events(heart_run):
        for site, pair in event.get("bytes", {}).items():
            down, up = expected[site]
            expected[site] = (down + pair["down"], up + pair["up"])
    totals = RunRecord.from_run_dir(heart_run).total_traffic()
    assert {site: (t.down, t.up) for site, t in totals.items()} == expected
    table = re.search(r'<table id="traffic">.*?<tbody>(.*?)</tbody>', heart_report, re.S)
    assert table is not None
    for row in re.findall(r"<tr>(.*?)</tr>", table.group(1)):
        site, down, up, _ = re.findall(r"<td>(.*?)</td>", row)
        assert (int(down.replace(",", "")), int(up.replace(",", ""))) == expected[site]


def test_report_of_sample_demo_run_builds_in_well_under_a_second_and_a_half(heart_run: Path) -> None:
    import time

    import matplotlib.figure  # noqa: F401 - the import itself is not what is measured

    record = RunRecord.from_run_dir(heart_run)
    build_report(record)  # warm: fonts and the Agg renderer
    started = time.perf_counter()
    build_report(RunRecord.from_run_dir(heart_run))
    assert time.perf_counter() - started < 1.5


def test_survival_report_shows_the_c_index_per_site(tmp_path: Path) -> None:
    plan = parse_plan({
        "name": "tcga-brca-cox", "task": "tabular-cox",
        "dataset": {"name": "tcga-brca", "normalization": "federated"}, "rounds": 2,
        "local": {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "learning_rate": 0.5},
        "evaluation": {"every_rounds": 1}, "seed": 0,
    })  # fmt: skip
    simulate(plan, out_dir=tmp_path)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    head = re.search(r'<table id="site-metrics"><thead>(.*?)</thead>', page)
    assert head is not None and "C-index" in head.group(1) and "AUC" not in head.group(1)
    final = [e for e in events(tmp_path) if e["event"] == "evaluation"][-1]
    rows = site_rows(page)
    assert len(rows) == 6
    for site, _, c_index in rows:
        assert c_index == f"{final['sites'][site]['c_index']:.3f}"
    assert "ROC curves" not in page  # no ROC for survival
