"""``fedcare report RUN``: (re)build a run directory's ``report.html``.

Registered in :mod:`fedcare.cli` as ``app.command("report")(report_command)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedcare.cli_common import fedcare_errors

__all__ = ["report_command"]


def report_command(
    run: Annotated[Path, typer.Argument(help="The run directory (a run's --out).")],
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"report": PATH, "sites": N, "rounds": N} instead of a line.')
    ] = False,
) -> None:
    """Build the run's self-contained report (plots embedded) and write RUN/report.html.

    Works on finished, failed and still-running runs alike. Exit codes: 0
    written, 3 the run directory or its metrics.jsonl is missing or malformed;
    the others as for every command (``fedcare --help``).

    Examples
    --------
    >>> import tempfile
    >>> from typer.testing import CliRunner
    >>> app = typer.Typer()
    >>> _ = app.command("report")(report_command)
    >>> result = CliRunner().invoke(app, [tempfile.mkdtemp() + "/missing"])
    >>> result.exit_code
    3
    """
    from fedcare.report import RunRecord, write_report

    with fedcare_errors():
        record = RunRecord.from_run_dir(run)
        path = write_report(run, record=record)
    if as_json:
        sys.stdout.write(json.dumps({"report": str(path), "sites": len(record.sites), "rounds": record.rounds_completed}) + "\n")
        return
    Console().print(f"report written to [bold]{path}[/]", highlight=False, soft_wrap=True)
