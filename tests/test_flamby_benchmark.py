"""Smoke test of benchmarks/flamby.py: the quick run ends and writes a row per baseline and strategy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "flamby.py"


def test_flamby_benchmark_quick_run_writes_every_row_for_both_datasets(tmp_path: Path) -> None:
    out = tmp_path / "flamby.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text(encoding="utf-8"))

    assert payload["quick"] is True and payload["seeds"] == [0]
    assert set(payload["datasets"]) == {"heart-disease", "tcga-brca"}
    for name, metric in (("heart-disease", "accuracy"), ("tcga-brca", "c_index")):
        dataset = payload["datasets"][name]
        assert dataset["metric"] == metric and dataset["rounds"] == 3
        assert list(dataset["rows"]) == ["pooled", "local", "FedAvg", "Cyclic"]
        for row in dataset["rows"].values():
            assert len(row["per_seed"]) == 1 and 0.0 <= row["mean"] <= 1.0 and row["sd"] == 0.0
        assert dataset["best_federated"]["strategy"] in ("FedAvg", "Cyclic")
        goal = dataset["goal"]
        assert goal["met"] == (dataset["best_federated"]["mean"] >= goal["best_federated_at_least"])
        assert set(dataset["flamby_reference"]) == {"pooled", "best federated"}
    assert payload["all_goals_met"] == all(d["goal"]["met"] for d in payload["datasets"].values())
    assert "FLamby best federated" in result.stdout
