"""``fedcare node``: a site's node, its received plans and its installed tasks."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedcare.cli_common import (
    LocalTraining,
    console,
    errors,
    fedcare_errors,
    log_to_stderr,
    output_mode,
    progress_bars,
)

node_app = typer.Typer(
    help="A site's node: serve a coordinator's jobs; approve or reject plans; list tasks.",
    invoke_without_command=True,
    rich_markup_mode="rich",
)


@node_app.callback()
def node(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="The site's node.yaml.")] = None,
    coordinator: Annotated[str | None, typer.Option("--coordinator", help="HOST:PORT of the coordinator (default: node.yaml's coordinator).")] = None,
    certs: Annotated[Path | None, typer.Option("--certs", help="Directory with ca.pem and this node's NAME.pem, NAME.key (default: node.yaml's certs_dir, else certs).")] = None,
    give_up_after_s: Annotated[float | None, typer.Option("--give-up-after-s", help="Stop retrying an unreachable coordinator after this long (default: never).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar: only errors on stderr.")] = False,
) -> None:
    """Run a site's node: dial out to the coordinator and serve its jobs until the run ends.

    The node runs a plan only once the site approved it (fedcare node
    approve) or its policy approves it unattended (auto_approve). Each local
    training job shows a progress bar on stderr, unless --quiet.
    """
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        errors.print("[bold red]error:[/] fedcare node needs --config NODE.yaml and --coordinator HOST:PORT", markup=True)
        raise typer.Exit(2)
    from fedcare.deployment import load_node_config, run_node

    output = output_mode(False, quiet)
    log_to_stderr(output)
    # pydicom's own warnings about malformed elements quote the element's value, which can be a
    # patient's name or identifier: a node process keeps only pydicom's errors.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    with fedcare_errors(output):
        node_config = load_node_config(config)
        coordinator = coordinator or node_config.coordinator
        certs = certs or node_config.certs_dir or Path("certs")
        if coordinator is None:
            errors.print("[bold red]error:[/] fedcare node needs --coordinator HOST:PORT (or coordinator: in node.yaml)", markup=True)
            raise typer.Exit(2)
        if output.progress:
            with progress_bars() as progress:
                run_node(
                    node_config, coordinator=coordinator, certs_dir=certs, give_up_after_s=give_up_after_s,
                    on_progress=LocalTraining(progress),
                )  # fmt: skip
        else:
            run_node(node_config, coordinator=coordinator, certs_dir=certs, give_up_after_s=give_up_after_s)
    if not quiet:
        errors.print(f"node {node_config.name}: the run is over", highlight=False)



def _approvals(config: Path) -> Any:
    from fedcare.deployment import load_node_config
    from fedcare.federation.approvals import PlanApprovals

    node_config = load_node_config(config)
    assert node_config.approvals_dir is not None  # load_node_config resolves it
    return node_config, PlanApprovals(node_config.approvals_dir)


@node_app.command("plans")
def node_plans(
    config: Annotated[Path, typer.Option("--config", help="The site's node.yaml.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the plans this site received: pending, approved and rejected, with what each asks for."""
    from dataclasses import asdict

    with fedcare_errors():
        _, approvals = _approvals(config)
        records = approvals.records()
    if as_json:
        sys.stdout.write(json.dumps([asdict(r) for r in records]) + "\n")
        return
    if not records:
        console.print("no plan received yet")
        return
    table = Table(title="plans received", title_justify="left")
    for column in ("plan hash", "status", "task", "dataset", "rounds", "strategy", "privacy", "received", "decided"):
        table.add_column(column)
    for r in records:
        style = {"pending": "yellow", "approved": "green", "rejected": "red"}[r.status]
        decided = f"{r.decided_at} ({r.decided_by})" if r.decided_at else ""
        table.add_row(
            r.plan_hash[:16], f"[{style}]{r.status}[/]", r.summary["task"], r.summary["dataset"], str(r.summary["rounds"]),
            r.summary["strategy"], r.summary["privacy"], r.received_at, decided,
        )  # fmt: skip
    console.print(table)


@node_app.command("approve")
def node_approve(
    plan_hash: Annotated[str, typer.Argument(help="The plan's hash, or its first 8 or more hex digits.")],
    config: Annotated[Path, typer.Option("--config", help="The site's node.yaml.")],
) -> None:
    """Approve a received plan: a node waiting for it starts serving its jobs."""
    with fedcare_errors():
        _, approvals = _approvals(config)
        record = approvals.approve(plan_hash)
    console.print(f"approved {record.plan_hash[:16]}: {record.summary['task']} on {record.summary['dataset']}, "
                   f"{record.summary['rounds']} rounds; {record.summary['privacy']}", highlight=False)  # fmt: skip


@node_app.command("reject")
def node_reject(
    plan_hash: Annotated[str, typer.Argument(help="The plan's hash, or its first 8 or more hex digits.")],
    config: Annotated[Path, typer.Option("--config", help="The site's node.yaml.")],
    reason: Annotated[str, typer.Option("--reason", help="Why; the coordinator is told.")] = "",
) -> None:
    """Reject a received plan: the node tells the coordinator, with the reason, and takes no part."""
    with fedcare_errors():
        _, approvals = _approvals(config)
        record = approvals.reject(plan_hash, reason=reason)
    console.print(f"rejected {record.plan_hash[:16]}", highlight=False)


@node_app.command("tasks")
def node_tasks(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The tasks installed here, with the version and code SHA-256 a policy's allowed_tasks pins."""
    from dataclasses import asdict

    from fedcare.tasks.registry import TaskRegistry

    registry = TaskRegistry.from_entry_points()
    infos = [registry.info(name) for name in registry.names()]
    if as_json:
        sys.stdout.write(json.dumps([asdict(i) for i in infos]) + "\n")
        return
    table = Table(title="installed tasks", title_justify="left")
    for column in ("name", "version", "sha256"):
        table.add_column(column, no_wrap=True)
    for info in infos:
        table.add_row(info.name, info.version, info.sha256)
    console.print(table)


from fedcare.cli_site import node_doctor, node_init  # noqa: E402 - the site set-up commands live in their own module

node_app.command("init")(node_init)
node_app.command("doctor")(node_doctor)
