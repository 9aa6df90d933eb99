"""The ``fedcare`` command: thin wrappers that parse, call one library function, render.

Exit codes: 0 success, 2 configuration error, 3 data error, 4 federation
error (too few nodes), 1 any other fedcare error.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from fedcare.cli_audit import audit_app
from fedcare.cli_data import data_app
from fedcare.errors import ConfigError, DataError, FedcareError, FederationError

app = typer.Typer(
    name="fedcare",
    help="Federated learning for healthcare: train one model across sites; records stay put.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_console = Console()
_errors = Console(stderr=True)

_EXIT_CODES: list[tuple[type[FedcareError], int]] = [
    (ConfigError, 2),
    (DataError, 3),
    (FederationError, 4),
    (FedcareError, 1),
]

_SHOWN_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity")
_SURVIVAL_METRICS = ("c_index",)  # shown instead when the task reports a C-index (tabular-cox)
_HEADERS = {
    "accuracy": "acc", "balanced_accuracy": "bal acc", "roc_auc": "AUC", "sensitivity": "sens", "specificity": "spec",
    "c_index": "C-index",
}  # fmt: skip


@contextmanager
def _fedcare_errors() -> Iterator[None]:
    try:
        yield
    except FedcareError as exc:
        code = next(code for kind, code in _EXIT_CODES if isinstance(exc, kind))
        _errors.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None


def demo_plan_path(*, private: bool = True) -> Path:
    """The packaged plan ``fedcare demo`` runs: ``examples/heart_disease_dp.yaml``.

    With ``private=False``, ``examples/heart_disease.yaml``: the same
    federation without record-level differential privacy.
    """
    name = "heart_disease_dp.yaml" if private else "heart_disease.yaml"
    return Path(str(resources.files("fedcare").joinpath("plans", name)))


def _number(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _summary(result: Any) -> dict[str, Any]:
    final = result.final_evaluation
    return {
        "run_dir": result.run_dir,
        "rounds": result.rounds_completed,
        "sites": {site: {k: _number(v) for k, v in m.items()} for site, m in final.sites.items()} if final else {},
        "examples": final.examples if final else {},
        "mean": {k: _number(v) for k, v in final.mean.items()} if final else {},
        "pooled": {k: _number(v) for k, v in final.pooled.items()} if final else {},
        "mean_site_accuracy": _number(final.mean.get("accuracy")) if final else None,
        "failures": result.failures,
        "participation": {str(r): nodes for r, nodes in sorted(result.participation.items())},
        "privacy": result.privacy,
        "epsilon_spent": dict(sorted(result.epsilon_spent.items())),
        "wall_s": result.wall_s,
    }


def _site_table(
    title: str,
    sites: dict[str, dict[str, float]],
    examples: dict[str, int],
    rows: dict[str, dict[str, float]],
    *,
    epsilon: dict[str, float] | None = None,
) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("site", no_wrap=True)
    table.add_column("n test", justify="right")
    survival = any("c_index" in metrics for metrics in (*sites.values(), *rows.values()))
    shown = _SURVIVAL_METRICS if survival else _SHOWN_METRICS
    for name in shown:
        table.add_column(_HEADERS[name], justify="right")
    if epsilon:
        table.add_column("ε spent", justify="right")

    def cells(metrics: dict[str, float]) -> list[str]:
        values = [metrics.get(name, math.nan) for name in shown]
        return ["–" if v is None or math.isnan(v) else f"{v:.3f}" for v in values]

    spent = [f"{epsilon[site]:.3f}" if site in epsilon else "–" for site in sites] if epsilon else [None] * len(sites)
    for (site, metrics), site_epsilon in zip(sites.items(), spent, strict=True):
        table.add_row(site, str(examples.get(site, "")), *cells(metrics), *([site_epsilon] if epsilon else []))
    table.add_section()
    for label, metrics in rows.items():
        pooled = str(sum(examples.values())) if label.startswith("pooled") else ""
        table.add_row(label, pooled, *cells(metrics), *([""] if epsilon else []), style="bold")
    return table


def _approval_line(event: dict[str, Any]) -> str:
    """The sites' answers to the plan, as the coordinator shows them."""
    parts = []
    if event["pending"]:
        parts.append(f"waiting for approval: {', '.join(event['pending'])}")
    for verdict in ("rejected", "refused"):
        parts.extend(f"{node} {verdict}: {reason}" for node, reason in event[verdict].items())
    if event["approved"]:
        parts.append(f"approved: {', '.join(event['approved'])}")
    return "; ".join(parts)


def _with_event_progress(plan: Any, run: Callable[[Callable[[dict[str, Any]], None] | None], Any], show: bool) -> Any:
    if not show:
        return run(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=_errors,
        transient=False,
    ) as progress:
        bar = progress.add_task("rounds", total=plan.rounds, status="")

        def on_event(event: dict[str, Any]) -> None:
            kind = event["event"]
            if kind == "round_end":
                loss = event.get("train_loss")
                status = f"loss {loss:.3f}" if loss is not None else ""
                progress.update(bar, completed=event["round"], status=status)
            elif kind == "run_start":
                progress.update(bar, completed=event["first_round"] - 1)
            elif kind == "evaluation":
                accuracy = event["mean"].get("accuracy")
                c_index = event["mean"].get("c_index")
                if accuracy is not None and not math.isnan(accuracy):
                    progress.update(bar, status=f"mean site accuracy {accuracy:.3f}")
                elif c_index is not None and not math.isnan(c_index):
                    progress.update(bar, status=f"mean site C-index {c_index:.3f}")
            elif kind == "approval":
                progress.console.print(_approval_line(event), highlight=False)
            elif kind in ("node_failed", "node_late"):
                progress.console.print(
                    f"[yellow]round {event['round']}: node {event['node_id']} "
                    f"{'failed: ' + event['error'] if kind == 'node_failed' else 'missed the deadline'}[/]"
                )

        return run(on_event)


def _simulate_and_render(
    plan_path: Path, out: Path | None, as_json: bool, resume: bool, title: str, sites: Sequence[Path] = ()
) -> None:
    from fedcare.plan import load_plan
    from fedcare.simulation import check_plan, default_run_dir, simulate

    started = time.perf_counter()
    with _fedcare_errors():
        plan = load_plan(plan_path)
        catalog = None
        if sites:
            from fedcare.deployment import load_node_config, manifest_catalog

            catalog = manifest_catalog(plan, [load_node_config(path) for path in sites])
        check_plan(plan, catalog=catalog)
        out_dir = out or default_run_dir(plan)
        result = _with_event_progress(
            plan,
            lambda on_event: simulate(plan, out_dir=out_dir, on_event=on_event, resume=resume, catalog=catalog),
            show=not as_json,
        )
    summary = _summary(result)
    summary["wall_s"] = time.perf_counter() - started
    _render_summary(summary, as_json, title=title)


@app.command()
def simulate(
    plan: Annotated[Path, typer.Argument(help="Plan file (YAML).")],
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/NAME-TIME).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")] = False,
    site: Annotated[
        list[Path] | None,
        typer.Option("--site", help="A site's node.yaml whose manifest describes the plan's dataset (repeat per site)."),
    ] = None,
) -> None:
    """Run a whole federation in this process, one node per site of the plan's dataset.

    With ``--site``, the sites are the listed node.yaml files, each reading
    its own files through its dataset manifest, as it would deployed.
    """
    _simulate_and_render(plan, out, as_json, resume, title=plan.stem, sites=site or ())


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/NAME-TIME).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    inproc: Annotated[bool, typer.Option("--inproc", help="Run the whole federation in this process.")] = False,
    no_dp: Annotated[
        bool, typer.Option("--no-dp", help="Train without record-level differential privacy (heart_disease.yaml).")
    ] = False,
) -> None:
    """Four hospitals (Cleveland, Hungary, Switzerland, Long Beach) learn heart disease together.

    By default the coordinator and each hospital run as separate processes on
    127.0.0.1, with freshly issued certificates and mutual TLS, secure
    aggregation, and record-level differential privacy at every hospital
    (epsilon 1, delta 1e-3); ``--inproc`` runs the same federation in one
    process, ``--no-dp`` without differential privacy.
    """
    plan_path = demo_plan_path(private=not no_dp)
    if inproc:
        _simulate_and_render(plan_path, out, as_json, resume=False, title="heart-disease demo")
        return
    from fedcare.demo import prepare_deployment, run_deployed
    from fedcare.plan import load_plan
    from fedcare.simulation import default_run_dir

    started = time.perf_counter()
    with _fedcare_errors():
        plan = load_plan(plan_path)
        layout = prepare_deployment(plan_path, out or default_run_dir(plan))
        if not as_json:
            _errors.print(
                f"coordinator + {len(layout.node_configs)} hospital processes on 127.0.0.1, mutual TLS"
                f"{', secure aggregation (SecAgg+)' if plan.secure_aggregation.enabled else ''}"
                f"{', record-level DP' if plan.privacy.record_level.enabled else ''} "
                f"(certificates in {layout.certs_dir})",
                highlight=False,
                soft_wrap=True,
            )
        summary = _with_event_progress(plan, lambda on_event: run_deployed(layout, on_event=on_event), show=not as_json)
    summary["wall_s"] = time.perf_counter() - started
    _render_summary(summary, as_json, title="heart-disease demo (deployed)")


@app.command()
def serve(
    plan: Annotated[Path, typer.Argument(help="Plan file (YAML) listing the admitted nodes.")],
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to listen on (port 0: any free port).")] = "0.0.0.0:7443",
    certs: Annotated[Path, typer.Option("--certs", help="Directory with ca.pem, server.pem, server.key, crl.pem.")] = Path("certs"),
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/NAME-TIME).")] = None,
    wait_for_nodes_s: Annotated[float, typer.Option("--wait-for-nodes-s", help="How long to wait for nodes to join.")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object when the run ends.")] = False,
) -> None:
    """Coordinate a federation: listen for nodes over mutual TLS and run the plan."""
    import logging

    from fedcare.deployment import serve as serve_plan
    from fedcare.plan import load_plan
    from fedcare.simulation import default_run_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    with _fedcare_errors():
        loaded = load_plan(plan)
        out_dir = out or default_run_dir(loaded)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        host = listen.rsplit(":", 1)[0]

        def listening(port: int) -> None:
            (Path(out_dir) / "endpoint.json").write_text(json.dumps({"host": host, "port": port}))
            _errors.print(f"listening on {host}:{port}", highlight=False)

        def show_approvals(event: dict[str, Any]) -> None:
            if event["event"] == "approval":
                _errors.print(_approval_line(event), highlight=False, soft_wrap=True)

        result = serve_plan(
            loaded,
            listen=listen,
            certs_dir=certs,
            out_dir=out_dir,
            wait_for_nodes_s=wait_for_nodes_s,
            on_listening=listening,
            capture_handshake_log=True,
            on_event=show_approvals,
        )
    summary = _summary(result)
    summary["wall_s"] = time.perf_counter() - started
    _render_summary(summary, as_json, title=loaded.name)


node_app = typer.Typer(
    help="A site's node: run it, list the installed tasks, and approve or reject the plans it received.",
    invoke_without_command=True,
)


@node_app.callback()
def node(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="The site's node.yaml.")] = None,
    coordinator: Annotated[str | None, typer.Option("--coordinator", help="HOST:PORT of the coordinator.")] = None,
    certs: Annotated[Path, typer.Option("--certs", help="Directory with ca.pem and this node's NAME.pem, NAME.key.")] = Path("certs"),
    give_up_after_s: Annotated[float | None, typer.Option("--give-up-after-s", help="Stop retrying an unreachable coordinator after this long (default: never).")] = None,
) -> None:
    """Run a site's node: dial out to the coordinator and serve its jobs until the run ends.

    The node runs a plan only once the site approved it (``fedcare node
    approve``) or its policy approves it unattended (``auto_approve``).
    """
    if ctx.invoked_subcommand is not None:
        return
    if config is None or coordinator is None:
        _errors.print("[bold red]error:[/] fedcare node needs --config NODE.yaml and --coordinator HOST:PORT", markup=True)
        raise typer.Exit(2)
    import logging

    from fedcare.deployment import load_node_config, run_node

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # pydicom's own warnings about malformed elements quote the element's value, which can be a
    # patient's name or identifier: a node process keeps only pydicom's errors.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    with _fedcare_errors():
        node_config = load_node_config(config)
        run_node(node_config, coordinator=coordinator, certs_dir=certs, give_up_after_s=give_up_after_s)
    _errors.print(f"node {node_config.name}: the run is over", highlight=False)


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

    with _fedcare_errors():
        _, approvals = _approvals(config)
        records = approvals.records()
    if as_json:
        sys.stdout.write(json.dumps([asdict(r) for r in records]) + "\n")
        return
    if not records:
        _console.print("no plan received yet")
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
    _console.print(table)


@node_app.command("approve")
def node_approve(
    plan_hash: Annotated[str, typer.Argument(help="The plan's hash, or its first 8 or more hex digits.")],
    config: Annotated[Path, typer.Option("--config", help="The site's node.yaml.")],
) -> None:
    """Approve a received plan: a node waiting for it starts serving its jobs."""
    with _fedcare_errors():
        _, approvals = _approvals(config)
        record = approvals.approve(plan_hash)
    _console.print(f"approved {record.plan_hash[:16]}: {record.summary['task']} on {record.summary['dataset']}, "
                   f"{record.summary['rounds']} rounds; {record.summary['privacy']}", highlight=False)  # fmt: skip


@node_app.command("reject")
def node_reject(
    plan_hash: Annotated[str, typer.Argument(help="The plan's hash, or its first 8 or more hex digits.")],
    config: Annotated[Path, typer.Option("--config", help="The site's node.yaml.")],
    reason: Annotated[str, typer.Option("--reason", help="Why; the coordinator is told.")] = "",
) -> None:
    """Reject a received plan: the node tells the coordinator, with the reason, and takes no part."""
    with _fedcare_errors():
        _, approvals = _approvals(config)
        record = approvals.reject(plan_hash, reason=reason)
    _console.print(f"rejected {record.plan_hash[:16]}", highlight=False)


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
    _console.print(table)


def _spans(rounds: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``rounds 1-3, 7``."""
    ordered = sorted(rounds)
    runs: list[list[int]] = []
    for value in ordered:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return "rounds " + ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def _render_summary(summary: dict[str, Any], as_json: bool, *, title: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    if summary["sites"]:
        _console.print(
            _site_table(
                f"{title}: round {summary['rounds']}, each site's own test split",
                summary["sites"],
                summary["examples"],
                {"mean of sites": summary["mean"], "pooled (by n)": summary["pooled"]},
                epsilon=summary.get("epsilon_spent") or None,
            )
        )
    for failure in summary["failures"]:
        _console.print(f"[yellow]round {failure['round']}: {failure['node_id']}: {failure['error']}[/]")
    rounds_by_site: dict[str, list[int]] = {}
    for round_key, nodes in summary.get("participation", {}).items():
        for node_id in nodes:
            rounds_by_site.setdefault(node_id, []).append(int(round_key))
    total = summary["rounds"]
    partial = {site: rounds for site, rounds in rounds_by_site.items() if len(rounds) < total}
    if partial:
        spans = "; ".join(f"{site} {_spans(rounds)}" for site, rounds in sorted(partial.items()))
        _console.print(f"took part in some rounds only: {spans} (of {total})", highlight=False)
    privacy = summary.get("privacy") or {}
    if privacy:
        secure = "on (SecAgg+): the coordinator saw only sums" if privacy.get("secure_aggregation") else "off"
        _console.print(f"secure aggregation: {secure}; left the sites: {privacy.get('data_leaving_sites')}", highlight=False)
        record_level = (privacy.get("differential_privacy") or {}).get("record_level")
        if record_level:
            _console.print(
                f"record-level DP (DP-SGD) at every site: ε spent per site in the table, at δ = {record_level['delta']:g} "
                f"(planned ε {record_level['planned_epsilon']:g})",
                highlight=False,
            )
    _console.print(f"run directory: {summary['run_dir']}  ({summary['wall_s']:.1f} s)")


@app.command()
def datasets() -> None:
    """List the bundled datasets."""
    from fedcare.data.catalog import DatasetCatalog

    catalog = DatasetCatalog.bundled()
    for name in catalog.names():
        info = catalog.get(name).info
        _console.print(f"[bold]{info.name}[/]  {info.patients} patients  sites: {info.sites}", highlight=False)
        _console.print(f"  {info.description}", highlight=False)
        _console.print(f"  licence {info.licence}; source {info.source}", highlight=False)


@app.command()
def baseline(
    plan: Annotated[Path, typer.Argument(help="Plan file (YAML).")],
    mode: Annotated[str, typer.Option("--mode", help="pooled: one model on all sites' data; local: each site alone.")] = "pooled",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Train without federation, evaluated on the same per-site test splits."""
    from fedcare.baselines import run_baseline
    from fedcare.plan import load_plan

    with _fedcare_errors():
        if mode not in ("pooled", "local"):
            raise ConfigError(f"must be 'pooled' or 'local', got {mode!r}", field="--mode")
        chosen: Literal["pooled", "local"] = "pooled" if mode == "pooled" else "local"
        loaded = load_plan(plan)
        result = run_baseline(loaded, mode=chosen)
    if as_json:
        payload = {
            "mode": chosen,
            "sites": {s: {k: _number(v) for k, v in m.items()} for s, m in result.sites.items()},
            "examples": result.examples,
            "mean": {k: _number(v) for k, v in result.mean.items()},
            "pooled": {k: _number(v) for k, v in result.pooled.items()},
            "mean_site_accuracy": _number(result.mean.get("accuracy")),
        }
        sys.stdout.write(json.dumps(payload) + "\n")
        return
    what = "one model trained on pooled data" if chosen == "pooled" else "each site's own model"
    _console.print(
        _site_table(
            f"{chosen} baseline: {what}, each site's own test split",
            result.sites,
            result.examples,
            {"mean of sites": result.mean, "pooled (by n)": result.pooled},
        )
    )


@app.command("audit-privacy")
def audit_privacy(
    run: Annotated[Path, typer.Argument(help="Run directory written by `fedcare simulate`.")],
    shadow_models: Annotated[int, typer.Option("--shadow-models", help="Shadow federations for LiRA (at least 2).")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shadows' data halves, weights and batches.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Membership inference against a run's final model: can an attacker tell who trained it?"""
    from fedcare.privacy.audit import AUDIT_FILENAME, audit_run

    with _fedcare_errors():
        audit = audit_run(run, shadow_models=shadow_models, seed=seed)
    if as_json:
        sys.stdout.write(json.dumps(audit.to_dict()) + "\n")
        return
    table = Table(
        title=f"membership inference, {audit.shadow_models} shadow federations: members = training records, "
        "non-members = test records",
        title_justify="left",
    )
    for header in ("site", "members", "non-members", "loss AUC", "LiRA AUC", "LiRA TPR@1%FPR", "LiRA TPR@0.1%FPR"):
        table.add_column(header, justify="left" if header == "site" else "right", no_wrap=True)
    coarse = False

    def cell(value: float, *, target_fpr: float = 0.0, min_fpr: float = 0.0) -> str:
        nonlocal coarse
        if math.isnan(value):
            return "–"
        coarse = coarse or min_fpr > target_fpr
        return f"{value:.3f}{'*' if min_fpr > target_fpr else ''}"

    for name, site in audit.sites.items():
        lira = site.lira
        table.add_row(
            name,
            str(site.members),
            str(site.non_members),
            cell(site.loss_threshold.auc),
            cell(lira.auc),
            cell(lira.tpr_at_1pct_fpr, target_fpr=0.01, min_fpr=lira.min_fpr),
            cell(lira.tpr_at_0_1pct_fpr, target_fpr=0.001, min_fpr=lira.min_fpr),
        )
    table.add_section()
    mean = audit.mean_auc()
    table.add_row("mean of sites", "", "", cell(mean["loss_threshold"]), cell(mean["lira"]), "", "", style="bold")
    _console.print(table)
    _console.print("AUC 0.5: the attack does no better than guessing; 1.0: it tells every member apart.", highlight=False)
    if coarse:
        _console.print(
            "* below the resolution of the site's non-members: the TPR is read at FPR = 1 / non-members.",
            highlight=False,
        )
    _console.print(f"written to {run / AUDIT_FILENAME}  ({audit.wall_s:.1f} s)", highlight=False, soft_wrap=True)


certs_app = typer.Typer(
    help="The federation's certificates: a CA, the coordinator's server certificate, one per node.",
    no_args_is_help=True,
)
app.add_typer(certs_app, name="certs")
app.add_typer(node_app, name="node")
app.add_typer(data_app, name="data")
app.add_typer(audit_app, name="audit")


@certs_app.command("init")
def certs_init(
    federation: Annotated[str, typer.Option("--federation", help="Federation name, used in the CA's name.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the CA (created if missing).")],
    lifetime_days: Annotated[int, typer.Option("--lifetime-days", help="CA validity in days.")] = 365,
) -> None:
    """Create the federation's CA: ca.pem, ca.key (mode 0600) and an empty crl.pem."""
    from fedcare.transport.pki import init_ca

    with _fedcare_errors():
        ca_path = init_ca(out, federation=federation, lifetime_days=lifetime_days)
    _console.print(f"CA certificate: {ca_path}", highlight=False, soft_wrap=True)
    _console.print(f"CA key (keep it off the nodes): {ca_path.with_name('ca.key')}", highlight=False, soft_wrap=True)
    _console.print(f"revocation list: {ca_path.with_name('crl.pem')}", highlight=False, soft_wrap=True)


@certs_app.command("issue")
def certs_issue(
    role: Annotated[str, typer.Option("--role", help="server (the coordinator) or node (a site).")],
    name: Annotated[str, typer.Option("--name", help="Common name; a node's identity in the plan.")],
    certs: Annotated[Path, typer.Option("--certs", help="The CA directory.")] = Path("certs"),
    lifetime_days: Annotated[int, typer.Option("--lifetime-days", help="Validity in days.")] = 30,
    host: Annotated[
        list[str] | None, typer.Option("--host", help="Server only: a DNS name or IP clients dial (repeatable).")
    ] = None,
) -> None:
    """Issue a certificate and key signed by the CA in --certs."""
    from fedcare.transport.pki import issue_certificate

    with _fedcare_errors():
        if role not in ("server", "node"):
            raise ConfigError(f"must be 'server' or 'node', got {role!r}", field="--role")
        chosen: Literal["server", "node"] = "server" if role == "server" else "node"
        hosts = tuple(host) if host else ("localhost", "127.0.0.1")
        cert_path, key_path = issue_certificate(
            certs, role=chosen, name=name, lifetime_days=lifetime_days, hosts=hosts
        )
    _console.print(f"{chosen} certificate for {name}: {cert_path}", highlight=False, soft_wrap=True)
    _console.print(f"private key (mode 0600): {key_path}", highlight=False, soft_wrap=True)


@certs_app.command("revoke")
def certs_revoke(
    name: Annotated[str, typer.Argument(help="The node's name, or the server's.")],
    certs: Annotated[Path, typer.Option("--certs", help="The CA directory.")] = Path("certs"),
) -> None:
    """Put a certificate on the CA's revocation list (crl.pem)."""
    from fedcare.transport.pki import revoke_certificate

    with _fedcare_errors():
        serial = revoke_certificate(certs, name)
    _console.print(f"revoked {name} (serial {serial:x}); updated {certs / 'crl.pem'}", highlight=False, soft_wrap=True)


@certs_app.command("fingerprint")
def certs_fingerprint(
    name: Annotated[str, typer.Argument(help="The certificate's stem in --certs (default: server, the coordinator's).")] = "server",
    certs: Annotated[Path, typer.Option("--certs", help="The directory holding NAME.pem.")] = Path("certs"),
) -> None:
    """Print a certificate's SHA-256 fingerprint: what a site pins as policy.coordinator_fingerprint."""
    from fedcare.transport.pki import certificate_sha256, read_pem

    with _fedcare_errors():
        fingerprint = certificate_sha256(read_pem(certs / f"{name}.pem"))
    _console.print(fingerprint, highlight=False)


@certs_app.command("list")
def certs_list(
    certs: Annotated[Path, typer.Option("--certs", help="The CA directory.")] = Path("certs"),
) -> None:
    """List the server and node certificates the CA in --certs issued."""
    from fedcare.transport.pki import list_certificates

    with _fedcare_errors():
        issued = list_certificates(certs)
    table = Table(title=f"certificates in {certs}", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("role", no_wrap=True)
    table.add_column("serial", overflow="fold")
    table.add_column("not after", no_wrap=True)
    table.add_column("revoked?", no_wrap=True)
    for item in issued:
        table.add_row(
            item.name,
            item.role,
            f"{item.serial:x}",
            item.not_valid_after.strftime("%Y-%m-%d %H:%M UTC"),
            "[red]yes[/]" if item.revoked else "no",
        )
    _console.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
