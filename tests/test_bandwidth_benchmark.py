"""Shortened benchmarks/bandwidth.py: heart disease, two seeds, every compression method."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bandwidth.py"


def test_bandwidth_benchmark_reports_each_method_as_the_mean_over_its_seeds(tmp_path: Path) -> None:
    out = tmp_path / "bandwidth.json"
    command = [sys.executable, str(SCRIPT), "--datasets", "heart", "--heart-rounds", "4", "--seeds", "0", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text(encoding="utf-8"))

    assert payload["seeds"] == [0, 1]
    assert payload["cases"]["heart"]["dataset"] == "heart" and payload["cases"]["heart"]["rounds"] == 4
    rows = payload["cases"]["heart"]["methods"]
    assert list(rows) == ["none", "float16", "int8", "topk 1%", "topk 1% no refit"]
    for label, row in rows.items():
        assert [run["seed"] for run in row["seeds"]] == [0, 1], label
        assert row["accuracy"] == statistics.fmean(run["accuracy"] for run in row["seeds"]), label
        assert row["failures"] == 0, label
    # The 961-weight MLP: float16 halves the update, int8 deflated is past 4x, top-k 1 % past 20x with or without refit.
    assert 1.9 < rows["float16"]["upload_ratio"] < 2.0
    assert rows["int8"]["upload_ratio"] > 4.0
    assert rows["topk 1%"]["upload_ratio"] > 20 and rows["topk 1% no refit"]["upload_ratio"] > 20
    assert rows["none"]["accuracy"] > 0.7
    assert rows["int8"]["meets_goal"] == (rows["int8"]["accuracy_loss_points"] <= 0.5)
    assert "per seed" in result.stdout and "topk 1% no refit" in result.stdout


def test_an_earlier_horizon_scores_what_a_run_stopped_there_would() -> None:
    """``--pneumonia-also-at``: round R of a longer run is the model a run of R rounds ends with, costs counted to R."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bandwidth
    finally:
        sys.path.remove(str(SCRIPT.parent))
    topk = bandwidth.METHODS["topk 1%"]
    long = bandwidth.run_case(bandwidth.heart_plan(rounds=4, compression=topk, evaluate_every=2), horizons=[2])
    short = bandwidth.run_case(bandwidth.heart_plan(rounds=2, compression=topk))
    assert sorted(long) == [2, 4] and sorted(short) == [2]
    for key in ("accuracy", "roc_auc", "up_bytes_per_round_mean", "update_ratio"):
        assert long[2][key] == short[2][key], key
    with pytest.raises(ValueError, match="round 3 was not evaluated"):
        bandwidth.run_case(bandwidth.heart_plan(rounds=4, compression=topk, evaluate_every=2), horizons=[3])
