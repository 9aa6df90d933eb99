"""Smoke test of benchmarks/secagg.py: a tiny grid runs end to end and writes the expected JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "secagg.py"


def test_secagg_benchmark_writes_a_row_per_case_with_positive_times(tmp_path):
    out = tmp_path / "secagg.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--nodes", "10", "20", "--sizes", "5000", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    payload = json.loads(out.read_text(encoding="utf-8"))

    assert result.returncode == (0 if payload["all_goals_met"] else 1), result.stderr
    assert [(c["num_nodes"], c["vector_length"], c["dropped"]) for c in payload["cases"]] == [
        (10, 5000, 0),
        (10, 5000, 1),
        (20, 5000, 0),
        (20, 5000, 2),
    ]
    for case in payload["cases"]:
        assert case["survivors"] == case["num_nodes"] - case["dropped"] == case["clients_timed"]
        assert case["client_mask_s"] > 0 and case["coordinator_s"] > 0 and case["plain_s"] > 0
        assert case["ratio"] == case["coordinator_s"] / case["plain_s"]
        assert case["sum_correct"] and case["max_abs_error"] < case["error_bound"]
        assert case["goal_ratio"] is None  # the goals are for 10,000,000 parameters
        assert (case["upload_bytes_32"], case["upload_bytes_16"]) == (4 * 5000, 2 * 5000)
        assert set(case["coordinator_phases_s"]) == {
            "receive_keys", "receive_shares", "add_masked_input", "survivors", "receive_signatures", "finish",
            "dequantize_sum",
        }
    assert payload["mask_expansion"]["words"] == 1_000_000 and payload["mask_expansion"]["gb_per_s"] > 0
    assert "secagg/plain" in result.stdout and "GB/s" in result.stdout
    assert "20,000 bytes in the 32-bit ring, 10,000 in the 16-bit ring" in result.stdout
