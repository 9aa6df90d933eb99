"""``fedcare data``: commands about a site's own data (run at the site; nothing leaves it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedcare.errors import FedcareError

if TYPE_CHECKING:
    from fedcare.data.check import DatasetCheck

__all__ = ["data_app"]

data_app = typer.Typer(
    help="Site data: check what this node would read before it joins a federation.",
    no_args_is_help=True,
)

_console = Console()
_errors = Console(stderr=True)


@data_app.callback()
def _data() -> None:
    """Site data: check what this node would read before it joins a federation."""


@data_app.command("check")
def check(
    node_yaml: Annotated[Path, typer.Argument(help="The site's node.yaml.")],
    dataset: Annotated[str | None, typer.Option("--dataset", help="Check only this dataset.")] = None,
    plan: Annotated[
        Path | None, typer.Option("--plan", help="The plan to check against (labels, input_shape, features).")
    ] = None,
    min_examples: Annotated[int, typer.Option("--min-examples", help="Warn about classes with fewer examples.")] = 10,
    json_output: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No tables: only the errors, on stderr.")] = False,
) -> None:
    """Read every dataset of NODE_YAML as the node would; exit 3 if any has an error (2: bad node.yaml)."""
    from fedcare.cli_common import exit_code
    from fedcare.data.check import check_site
    from fedcare.errors import DataError
    from fedcare.plan import load_plan

    try:
        loaded = load_plan(plan) if plan is not None else None
        results = check_site(node_yaml, dataset=dataset, plan=loaded, min_examples=min_examples)
    except FedcareError as exc:
        if json_output:
            typer.echo(json.dumps({"ok": False, "error": str(exc), "datasets": []}, indent=2))
        else:
            _errors.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(exit_code(exc)) from None
    ok = all(result.ok for result in results)
    if json_output:
        typer.echo(json.dumps({"ok": ok, "datasets": [r.to_dict() for r in results]}, indent=2))
    elif quiet:
        for result in results:
            for error in result.errors:
                _errors.print(f"[bold red]error:[/] {escape(result.name)}: {escape(error)}", highlight=False, soft_wrap=True)
    else:
        for result in results:
            _render(result)
    raise typer.Exit(0 if ok else exit_code(DataError("")))


def _render(result: DatasetCheck) -> None:
    if result.kind == "bundled":
        _console.print(f"[bold]{escape(result.name)}[/]: bundled dataset, site {escape(str(result.site))}", highlight=False)
        return
    status = "[green]ok[/]" if result.ok else "[bold red]error[/]"
    _console.print(
        f"[bold]{escape(result.name)}[/] ({escape(result.format or '?')}, {escape(result.path or '?')}): {status}", highlight=False, soft_wrap=True
    )
    report = result.report
    if report is not None:
        read = report.read
        labels = Table(title="records per federation label")
        for column in ("label", "train", "test"):
            labels.add_column(column, justify="left" if column == "label" else "right")
        for label in report.vocabulary:
            labels.add_row(escape(label), str(report.train_counts.get(label, 0)), str(report.test_counts.get(label, 0)))
        labels.add_row("total", str(report.train_size), str(report.test_size), style="bold")
        _console.print(labels)
        if report.unmapped or report.dropped:
            local = Table(title="local labels not used")
            for column in ("local label", "records", "why"):
                local.add_column(column)
            for name, count in report.unmapped.items():
                local.add_row(escape(name), str(count), "not in label_map")
            for name, count in report.dropped.items():
                local.add_row(escape(name), str(count), "dropped by label_map (null)")
            _console.print(local)
        if read.skipped:
            skipped = Table(title="skipped")
            skipped.add_column("reason")
            skipped.add_column("count", justify="right")
            for reason, count in sorted(read.skipped.items()):
                skipped.add_row(reason, str(count))
            _console.print(skipped)
        summary = read.to_dict()
        shapes = ", ".join(f"{shape} ({n})" for shape, n in summary["shapes"].items()) or "none"
        _console.print(
            f"files seen {read.files_seen}, records read {read.records_read}, patients {report.patients}, "
            f"series {read.series}",
            highlight=False,
        )
        _console.print(f"shapes as read: {escape(shapes)}", highlight=False, soft_wrap=True)
        for axis, (low, high) in read.size_range().items():
            _console.print(f"  {axis}: {low}..{high}", highlight=False)
        if read.spacing_min is not None and read.spacing_max is not None:
            _console.print(
                escape(f"spacing (mm): min {summary['spacing_min_mm']}, max {summary['spacing_max_mm']}"), highlight=False
            )
    for warning in result.warnings:
        _console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    for error in result.errors:
        _console.print(f"[bold red]error:[/] {escape(error)}", highlight=False, soft_wrap=True)
