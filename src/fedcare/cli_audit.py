"""``fedcare audit``: check and read a tamper-evident audit log (for a data protection officer).

Exit codes: 0 the log verifies, 1 it does not (TAMPERED, or truncated against
``--expect-head`` / ``--expect-entries``), 2 the file cannot be read.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedcare.errors import FedcareError

if TYPE_CHECKING:
    from fedcare.federation.audit_log import AuditEntry

__all__ = ["audit_app"]

audit_app = typer.Typer(
    help="Audit logs: check that a node's or coordinator's audit log is whole, and read it.",
    no_args_is_help=True,
)

_console = Console()
_errors = Console(stderr=True)

_SUMMARY_CHARS = 80


@audit_app.callback()
def _audit() -> None:
    """Audit logs: check that a node's or coordinator's audit log is whole, and read it."""


def _fail_unreadable(exc: FedcareError, *, as_json: bool) -> typer.Exit:
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": str(exc)}, indent=2))
    else:
        _errors.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(2)


@audit_app.command("verify")
def verify_command(
    log: Annotated[Path, typer.Argument(help="The audit log (JSON Lines).")],
    expect_head: Annotated[
        str | None, typer.Option("--expect-head", help="A head hash noted earlier: fail if it is no longer in the log.")
    ] = None,
    expect_entries: Annotated[
        int | None, typer.Option("--expect-entries", help="An entry count noted earlier: fail if there are fewer.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a line.")] = False,
) -> None:
    """Check every entry of LOG; print its head hash (note it to detect truncation later)."""
    from fedcare.federation.audit_log import verify

    try:
        report = verify(log, expect_head=expect_head, expect_entries=expect_entries)
    except FedcareError as exc:
        raise _fail_unreadable(exc, as_json=as_json) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        _console.print(f"OK: {report.entries} entries, head {report.head}", highlight=False, soft_wrap=True)
    else:
        _console.print(
            Text.assemble(("TAMPERED: ", "bold red"), str(report.reason)), highlight=False, soft_wrap=True
        )
        _console.print(
            f"{report.entries} entries verified before it; their head is {report.head}", highlight=False, soft_wrap=True
        )
    raise typer.Exit(0 if report.ok else 1)


@audit_app.command("show")
def show_command(
    log: Annotated[Path, typer.Argument(help="The audit log (JSON Lines).")],
    last: Annotated[int | None, typer.Option("--last", min=1, help="Show only the last N entries.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Show the entries of LOG that verify; exit 1 after them if the log is broken."""
    from fedcare.federation.audit_log import read_entries, verify

    shown: deque[AuditEntry] = deque(maxlen=last)
    problem: str | None = None
    try:
        for entry in read_entries(log):
            shown.append(entry)
    except FedcareError as exc:
        try:
            report = verify(log)  # raises again only if the file cannot be read
        except FedcareError as unreadable:
            raise _fail_unreadable(unreadable, as_json=as_json) from None
        problem = report.reason or str(exc)
    if as_json:
        payload: dict[str, Any] = {"ok": problem is None, "reason": problem, "entries": [e.to_dict() for e in shown]}
        typer.echo(json.dumps(payload, indent=2))
    else:
        _console.print(_table(list(shown)))
        if problem is not None:
            _console.print(Text.assemble(("TAMPERED: ", "bold red"), problem), highlight=False, soft_wrap=True)
    raise typer.Exit(0 if problem is None else 1)


def _table(entries: list[AuditEntry]) -> Table:
    table = Table(title="audit log")
    table.add_column("seq", justify="right")
    table.add_column("time (UTC)")
    table.add_column("actor")
    table.add_column("event")
    table.add_column("data")
    for entry in entries:
        table.add_row(
            str(entry.seq), Text(entry.time), Text(entry.actor), Text(entry.event), Text(_summary(entry.data))
        )
    return table


def _summary(data: Any) -> str:
    """``key=value, ...``, hashes cut to 12 digits, the whole cut to a line."""
    parts = []
    for key in sorted(data):
        value = data[key]
        if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
            text = value[:12] + "…"
        elif isinstance(value, str):
            text = value
        else:
            text = json.dumps(value, separators=(",", ":"))
        parts.append(f"{key}={text}")
    summary = ", ".join(parts)
    return summary if len(summary) <= _SUMMARY_CHARS else summary[: _SUMMARY_CHARS - 1] + "…"
