"""Shared helpers for the benchmarks: measure a child process, save results, print tables.

A benchmark runs each workload in a fresh subprocess (so interpreter start,
imports and exit count) through :func:`measure_process`, which polls the
resident set size of the whole process tree with psutil. Results go to
``benchmarks/results/<name>.json`` through :func:`write_results`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "Measurement",
    "format_table",
    "machine_info",
    "measure_process",
    "median",
    "write_results",
]

#: Where benchmark JSON files are written.
RESULTS_DIR = Path(__file__).resolve().parent / "results"

MB = 1_000_000  # decimal megabyte, the unit the goals are stated in


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure_process` observed of one child process.

    Attributes
    ----------
    wall_s : float
        Seconds from just before the process was started to its exit.
    peak_rss_bytes : int
        Largest sum of the resident set sizes of the process and all its
        descendants seen at any poll, in bytes.
    polls : int
        Number of RSS samples taken.
    returncode : int
        The exit status.
    stdout, stderr : str
        What the process wrote.
    """

    wall_s: float
    peak_rss_bytes: int
    polls: int
    returncode: int
    stdout: str
    stderr: str

    def last_json_line(self) -> dict[str, Any]:
        """The last line of stdout that parses as a JSON object.

        Raises
        ------
        ValueError
            If no line does; the message carries the tail of stderr.
        """
        for line in reversed(self.stdout.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    return value
        raise ValueError(f"no JSON object on stdout (exit {self.returncode}); stderr ends: {self.stderr[-2000:]}")


def _tree_rss(process: Any) -> int:
    """Sum of RSS over ``process`` and its descendants; 0 once it is gone."""
    import psutil

    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue  # exited between listing and reading
    return total


def measure_process(
    command: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    poll_s: float = 0.02,
    timeout_s: float = 600.0,
) -> Measurement:
    """Run ``command`` to completion, timing it and polling its process tree's memory.

    Parameters
    ----------
    command : sequence of str
        The program and its arguments.
    cwd : str or Path, optional
        Working directory of the child.
    env : mapping, optional
        Environment of the child; defaults to this process's.
    poll_s : float
        Seconds between RSS samples (about 20 ms by default).
    timeout_s : float
        The child is killed after this many seconds.

    Returns
    -------
    Measurement

    Raises
    ------
    subprocess.TimeoutExpired
        If the child runs past ``timeout_s`` (it is killed first).

    Examples
    --------
    >>> m = measure_process([sys.executable, "-c", "print(1)"])
    >>> m.returncode, m.stdout.strip(), m.peak_rss_bytes > 0
    (0, '1', True)
    """
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(list(command), cwd=cwd, env=dict(env) if env is not None else None, stdout=out, stderr=err)
        try:
            process = psutil.Process(child.pid)
        except psutil.NoSuchProcess:  # exited before we looked
            process = None
        peak = 0
        polls = 0
        deadline = started + timeout_s
        while True:
            if process is not None:
                peak = max(peak, _tree_rss(process))
                polls += 1
            try:
                child.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                if time.perf_counter() > deadline:
                    child.kill()
                    child.wait()
                    raise
        wall_s = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return Measurement(
            wall_s=wall_s,
            peak_rss_bytes=peak,
            polls=polls,
            returncode=child.returncode,
            stdout=out.read(),
            stderr=err.read(),
        )


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    return float(statistics.median(values))


def machine_info() -> dict[str, Any]:
    """Python, platform, core count and current load, to record beside the numbers."""
    try:
        import psutil

        memory_bytes: int | None = int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil is required by the benchmarks anyway
        memory_bytes = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory_bytes,
        "load_average_1m": os.getloadavg()[0],  # other work on the machine skews timings
    }


def write_results(name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as ``benchmarks/results/<name>.json`` and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with left-aligned text and right-aligned numbers.

    Examples
    --------
    >>> print(format_table(["name", "s"], [["a", 1.5], ["bb", 10]]))
    name    s
    ----  ---
    a     1.5
    bb     10
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(_looks_numeric(row[i]) for row in cells[1:]) if len(cells) > 1 else False for i in range(len(headers))
    ]

    def render(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    lines = [render(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [render(row) for row in cells[1:]]
    return "\n".join(lines)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
