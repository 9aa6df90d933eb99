"""What every ``fedcare`` command shares: exit codes, output modes, error handling, progress bars.

Exit codes follow the class of the error (:data:`EXIT_CODES`, shown in
``fedcare --help`` and docs/cli.md): the most specific class in the table wins.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from fedcare.errors import (
    ConfigError,
    DataError,
    FedcareError,
    FederationError,
    PolicyViolation,
    ProtocolError,
    TransportError,
)

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = [
    "EXIT_CODES",
    "JSON_HELP",
    "QUIET_HELP",
    "LocalTraining",
    "Output",
    "approval_line",
    "console",
    "errors",
    "exit_code",
    "fedcare_errors",
    "log_to_stderr",
    "output_mode",
    "progress_bars",
    "round_events",
    "with_event_progress",
]

@dataclass(frozen=True)
class ExitCode:
    code: int
    kind: type[BaseException] | None  # None: no error
    meaning: str


#: The single source of the command's exit codes: ``fedcare --help`` and docs/cli.md show this table.
EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode(0, None, "success"),
    ExitCode(1, FedcareError, "any other fedcare error"),
    ExitCode(2, ConfigError, "invalid plan, node.yaml or command-line option"),
    ExitCode(3, DataError, "local data missing or malformed"),
    ExitCode(4, FederationError, "the federation cannot go on: too few nodes, secure aggregation aborted"),
    ExitCode(5, TransportError, "a link to the coordinator or a node failed or timed out"),
    ExitCode(6, PolicyViolation, "a site's policy refuses the work, e.g. the privacy budget is spent"),
    ExitCode(7, ProtocolError, "a message broke the protocol (wrong shape, non-finite values, stale round)"),
    ExitCode(130, KeyboardInterrupt, "interrupted (Ctrl-C); the run's last checkpoint is intact"),
)


def exit_code(exc: BaseException) -> int:
    """The exit code of ``exc``: that of the most specific class of the table it is an instance of.

    Examples
    --------
    >>> from fedcare.errors import BudgetExceeded, SecAggAborted
    >>> exit_code(BudgetExceeded("spent")), exit_code(SecAggAborted("aborted")), exit_code(ConfigError("x"))
    (6, 4, 2)
    """
    codes = {entry.kind: entry.code for entry in EXIT_CODES if entry.kind is not None}
    for kind in type(exc).__mro__:
        if kind in codes:
            return codes[kind]
    return 1


console = Console()
errors = Console(stderr=True)


JSON_HELP = "Print exactly one JSON object on stdout (no progress, no tables)."
QUIET_HELP = "No progress and no tables: errors on stderr, then one line with the run directory."


@dataclass
class Output:
    """How a command reports: ``table`` (progress on stderr, tables on stdout), ``json`` or ``quiet``."""

    mode: Literal["table", "json", "quiet"]
    run_dir: Path | None = None  # known once the run has a directory: named when interrupted

    @property
    def progress(self) -> bool:
        return self.mode == "table"


def output_mode(as_json: bool, quiet: bool) -> Output:
    if as_json and quiet:
        errors.print("[bold red]error:[/] --json and --quiet: choose one", markup=True, highlight=False)
        raise typer.Exit(2)
    if quiet:
        logging.getLogger("fedcare").setLevel(logging.ERROR)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # MLflow configures its own logger at import
    return Output("json" if as_json else "quiet" if quiet else "table")


@contextmanager
def fedcare_errors(output: Output | None = None) -> Iterator[None]:
    """Turn a fedcare error into its message on stderr and its exit code; Ctrl-C into 130."""
    try:
        yield
    except FedcareError as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(exit_code(exc)) from None
    except KeyboardInterrupt:
        run_dir = output.run_dir if output is not None else None
        where = f"; the last checkpoint in {run_dir} is intact" if run_dir is not None else ""
        errors.print(f"interrupted{where}", highlight=False, soft_wrap=True)
        raise typer.Exit(exit_code(KeyboardInterrupt())) from None


def approval_line(event: dict[str, Any]) -> str:
    """The sites' answers to the plan, as the coordinator shows them."""
    parts = []
    if event["pending"]:
        parts.append(f"waiting for approval: {', '.join(event['pending'])}")
    for verdict in ("rejected", "refused"):
        parts.extend(f"{node} {verdict}: {reason}" for node, reason in event[verdict].items())
    if event["approved"]:
        parts.append(f"approved: {', '.join(event['approved'])}")
    return "; ".join(parts)


def progress_bars() -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=errors,
        transient=False,
    )


class LocalTraining:
    """One bar per site, ``cleveland  local training  ████  37/120 steps``, reset each round.

    Fed by :class:`~fedcare.federation.node.Node`'s ``on_progress`` from the
    nodes' threads; Rich's progress display is thread-safe.
    """

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._bars: dict[str, tuple[TaskID, int]] = {}
        self._lock = threading.Lock()

    def add_sites(self, sites: Sequence[str]) -> None:
        """Reserve a (hidden) bar per site, in the plan's order, under the bars already shown."""
        for site in sites:
            self._bar(site)

    def __call__(self, node_id: str, round_number: int, steps_done: int, steps_planned: int) -> None:
        task, shown_round = self._bar(node_id)
        if shown_round != round_number:
            self.progress.reset(task, total=max(steps_planned, steps_done, 1), completed=0, visible=True)
            with self._lock:
                self._bars[node_id] = (task, round_number)
        self.progress.update(task, completed=steps_done, total=max(steps_planned, steps_done, 1), visible=True)

    def _bar(self, site: str) -> tuple[TaskID, int]:
        with self._lock:
            if site not in self._bars:
                task = self.progress.add_task(
                    f"{escape(site)}  local training", total=1, unit="steps", status="", visible=False
                )
                self._bars[site] = (task, 0)
            return self._bars[site]


def round_events(progress: Progress, plan: Any, local: LocalTraining | None) -> Callable[[dict[str, Any]], None]:
    """The rounds bar's event callback: round counter, last loss or mean site metric, approvals, failures."""
    bar = progress.add_task("[bold]rounds[/]", total=plan.rounds, unit="", status="")

    def on_event(event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "round_end":
            loss = event.get("train_loss")
            status = f"loss {loss:.3f}" if loss is not None else ""
            progress.update(bar, completed=event["round"], status=status)
        elif kind == "run_start":
            progress.update(bar, completed=event["first_round"] - 1)
            if local is not None:
                local.add_sites(event.get("nodes") or [])
        elif kind == "evaluation":
            accuracy = event["mean"].get("accuracy")
            c_index = event["mean"].get("c_index")
            if accuracy is not None and not math.isnan(accuracy):
                progress.update(bar, status=f"mean site accuracy {accuracy:.3f}")
            elif c_index is not None and not math.isnan(c_index):
                progress.update(bar, status=f"mean site C-index {c_index:.3f}")
        elif kind == "approval":
            progress.console.print(approval_line(event), highlight=False)
        elif kind in ("node_failed", "node_late"):
            progress.console.print(
                f"[yellow]round {event['round']}: node {escape(str(event['node_id']))} "
                f"{'failed: ' + escape(str(event['error'])) if kind == 'node_failed' else 'missed the deadline'}[/]"
            )

    return on_event


Run = Callable[[Callable[[dict[str, Any]], None] | None, Callable[[str, int, int, int], None] | None], Any]


def with_event_progress(plan: Any, run: Run, show: bool, *, local_training: bool = False) -> Any:
    """``run(on_event, on_progress)`` with the rounds bar and, with ``local_training``, a bar per site."""
    if not show:
        return run(None, None)
    with progress_bars() as progress:
        local = LocalTraining(progress) if local_training else None
        return run(round_events(progress, plan, local), local)


def log_to_stderr(output: Output) -> None:
    """Log records on stderr: INFO and above, only errors with --quiet."""
    level = logging.ERROR if output.mode == "quiet" else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("fedcare").setLevel(level)


