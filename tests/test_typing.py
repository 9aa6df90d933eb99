"""The package stays clean under strict mypy (py.typed promises it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_package_passes_strict_mypy():
    if shutil.which("mypy", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mypy is not installed (pip install -e '.[test]' brings it)")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", str(ROOT / "src" / "fedcare")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
