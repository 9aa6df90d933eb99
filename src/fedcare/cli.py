"""The ``fedcare`` command: thin wrappers that parse, call one library function, render.

The node and certificate groups live in :mod:`fedcare.cli_node` and
:mod:`fedcare.cli_certs`; what every command shares in :mod:`fedcare.cli_common`.

Exit codes follow the class of the error (:data:`EXIT_CODES`, shown in
``fedcare --help`` and docs/cli.md): the most specific class in the table wins.
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
from rich.markup import escape
from rich.table import Table

from fedcare.cli_audit import audit_app
from fedcare.cli_certs import certs_app
from fedcare.cli_common import (
    EXIT_CODES,
    JSON_HELP,
    QUIET_HELP,
    Output,
    approval_line,
    console,
    errors,
    exit_code,
    fedcare_errors,
    log_to_stderr,
    output_mode,
    with_event_progress,
)
from fedcare.cli_data import data_app
from fedcare.cli_node import node_app
from fedcare.cli_report import report_command
from fedcare.errors import (
    ConfigError,
)
from fedcare.tracking import chain_events


def _epilog() -> str:
    rows = "\n".join(f"  [bold]{entry.code:>3}[/]  {escape(entry.meaning)}" for entry in EXIT_CODES)
    return (
        "[bold]Typical commands[/]\n"
        "  fedcare demo --inproc                          four hospitals, one process\n"
        "  fedcare simulate plan.yaml --out runs/study    a plan's whole federation here\n"
        "  fedcare serve plan.yaml --certs certs          coordinate deployed sites\n\n"
        f"[bold]Exit codes[/]\n{rows}"
    )


app = typer.Typer(
    name="fedcare",
    help="Federated learning for healthcare: train one model across sites; records stay put.",
    epilog=_epilog(),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_RUN = "Run a federation"
_INSPECT = "Inspect"
_SET_UP = "Set up"

_SHOWN_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "calibration_error")
_SURVIVAL_METRICS = ("c_index",)  # shown instead when the task reports a C-index (tabular-cox)
_HEADERS = {
    "accuracy": "acc", "balanced_accuracy": "bal acc", "roc_auc": "AUC", "sensitivity": "sens", "specificity": "spec",
    "calibration_error": "ECE", "c_index": "C-index",
}  # fmt: skip

def demo_plan_path(*, private: bool = True) -> Path:
    """The packaged plan ``fedcare demo`` runs: ``examples/heart_disease_dp.yaml``.

    With ``private=False``, ``examples/heart_disease.yaml``: the same
    federation without record-level differential privacy.

    Examples
    --------
    >>> demo_plan_path(private=False).name
    'heart_disease.yaml'
    """
    name = "heart_disease_dp.yaml" if private else "heart_disease.yaml"
    return Path(str(resources.files("fedcare").joinpath("plans", name)))


def _number(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _scalars(metrics: dict[str, float]) -> dict[str, Any]:
    from fedcare.metrics import split_curves

    scalars, _ = split_curves(metrics)
    return {k: _number(v) for k, v in scalars.items()}


def _curves(sites: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Each site's ROC curve (TPR at each ``roc_fpr_grid`` point), apart from its scalar metrics."""
    from fedcare.metrics import ROC_FPR_GRID, split_curves

    curves = {site: {k: [_number(v) for v in points] for k, points in split_curves(m)[1].items()} for site, m in sites.items()}
    return {"curves": {site: c for site, c in curves.items() if c}, "roc_fpr_grid": list(ROC_FPR_GRID)}


def _summary(result: Any) -> dict[str, Any]:
    final = result.final_evaluation
    return {
        "run_dir": result.run_dir,
        "rounds": result.rounds_completed,
        "sites": {site: _scalars(m) for site, m in final.sites.items()} if final else {},
        "examples": final.examples if final else {},
        "mean": _scalars(final.mean) if final else {},
        "pooled": _scalars(final.pooled) if final else {},
        "mean_site_accuracy": _number(final.mean.get("accuracy")) if final else None,
        **_curves(final.sites if final else {}),
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


_DASHBOARD_HELP = "Serve the live dashboard while the run goes on; its address is printed (docs/dashboard.md)."
_DASHBOARD_LISTEN_HELP = (
    "HOST:PORT of the dashboard (port 0: any free port). Off 127.0.0.1 it asks for a token, which is generated "
    "and printed with the address."
)


@contextmanager
def _dashboard(
    plan: Any, output: Output, *, enabled: bool, listen: str, certs: Path | None = None
) -> Iterator[tuple[Callable[[dict[str, Any]], None] | None, dict[str, Any]]]:
    """The live dashboard for one run: ``(on_event or None, holder)``; the holder takes the transport.

    The address (with its token, if any) goes to stderr and, readable by the
    owner only, to ``RUN/dashboard.json``; the server stops when the run ends.
    """
    holder: dict[str, Any] = {}
    if not enabled:
        yield None, holder
        return
    from fedcare.dashboard import start_dashboard

    server, state = start_dashboard(
        plan,
        listen=listen,
        certs_dir=certs,
        nodes_online=lambda: holder["transport"].nodes() if "transport" in holder else [],
        statuses=lambda: holder["transport"].statuses() if "transport" in holder else {},
    )
    url = server.url_with_token()
    if output.run_dir is not None:
        output.run_dir.mkdir(parents=True, exist_ok=True)
        path = output.run_dir / "dashboard.json"
        path.touch(mode=0o600)
        path.write_text(json.dumps({"url": url}))
    if output.mode != "quiet":
        errors.print(f"live dashboard: {url}", highlight=False, soft_wrap=True)
    try:
        yield state.on_event, holder
    except BaseException as exc:
        state.mark_failed(str(exc) or type(exc).__name__)
        raise
    finally:
        server.close()


def _simulate_and_render(
    plan_path: Path,
    out: Path | None,
    output: Output,
    resume: bool,
    title: str,
    sites: Sequence[Path] = (),
    *,
    dashboard: bool = False,
    dashboard_listen: str = "127.0.0.1:0",
    backend: str = "inproc",
    address: str | None = None,
) -> None:
    from fedcare.plan import load_plan
    from fedcare.simulation import check_plan, default_run_dir, simulate

    started = time.perf_counter()
    with fedcare_errors(output):
        plan = load_plan(plan_path)
        catalog = None
        if sites:
            from fedcare.deployment import load_node_config, manifest_catalog

            catalog = manifest_catalog(plan, [load_node_config(path) for path in sites])
        check_plan(plan, catalog=catalog)
        out_dir = out or default_run_dir(plan)
        output.run_dir = Path(out_dir)
        if backend not in ("inproc", "ray"):
            raise ConfigError(f"must be 'inproc' or 'ray', got {backend!r}", field="--backend")
        if address is not None and backend != "ray":
            raise ConfigError("--address names a Ray cluster: use it with --backend ray", field="--address")

        def run(on_event: Callable[[dict[str, Any]], None] | None, on_progress: Any) -> Any:
            events = chain_events(on_event, live)
            if backend == "ray":
                from fedcare.scale import simulate_on_ray

                return simulate_on_ray(plan, out_dir=out_dir, address=address, catalog=catalog, on_event=events, resume=resume)
            return simulate(plan, out_dir=out_dir, on_event=events, resume=resume, catalog=catalog, on_progress=on_progress)

        with _dashboard(plan, output, enabled=dashboard, listen=dashboard_listen) as (live, _):
            result = with_event_progress(plan, run, show=output.progress, local_training=backend == "inproc")
    summary = _summary(result)
    summary["wall_s"] = time.perf_counter() - started
    _render_summary(summary, output, title=title)


@app.command(rich_help_panel=_RUN)
def simulate(
    plan: Annotated[Path, typer.Argument(help="Plan file (YAML).")],
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/NAME-TIME).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")] = False,
    site: Annotated[
        list[Path] | None,
        typer.Option("--site", help="A site's node.yaml whose manifest describes the plan's dataset (repeat per site)."),
    ] = None,
    dashboard: Annotated[bool, typer.Option("--dashboard", help=_DASHBOARD_HELP)] = False,
    dashboard_listen: Annotated[str, typer.Option("--dashboard-listen", help=_DASHBOARD_LISTEN_HELP)] = "127.0.0.1:0",
    backend: Annotated[
        str,
        typer.Option("--backend", help="inproc: the sites as threads of this process; ray: as Ray actors (docs/scale.md)."),
    ] = "inproc",
    address: Annotated[
        str | None, typer.Option("--address", help="With --backend ray: the Ray cluster to use (default: a local instance).")
    ] = None,
) -> None:
    """Run a plan's whole federation in this process, one node per site (or on Ray, --backend ray).

    With --site, the sites are the listed node.yaml files, each reading its
    own files through its dataset manifest, as it would deployed.
    """
    output = output_mode(as_json, quiet)
    _simulate_and_render(
        plan, out, output, resume, title=plan.stem, sites=site or (), dashboard=dashboard,
        dashboard_listen=dashboard_listen, backend=backend, address=address,
    )  # fmt: skip


@app.command(rich_help_panel=_RUN)
def demo(
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/NAME-TIME).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    inproc: Annotated[bool, typer.Option("--inproc", help="Run the whole federation in this process.")] = False,
    no_dp: Annotated[
        bool, typer.Option("--no-dp", help="Train without record-level differential privacy (heart_disease.yaml).")
    ] = False,
    dashboard: Annotated[bool, typer.Option("--dashboard", help=_DASHBOARD_HELP)] = False,
    dashboard_listen: Annotated[str, typer.Option("--dashboard-listen", help=_DASHBOARD_LISTEN_HELP)] = "127.0.0.1:0",
) -> None:
    """Four hospitals learn heart disease together, over mutual TLS on this machine.

    Cleveland, Hungary, Switzerland and Long Beach run as separate processes
    on 127.0.0.1 beside the coordinator, with freshly issued certificates,
    mutual TLS, secure aggregation and record-level differential privacy at
    every hospital (epsilon 1, delta 1e-3). --inproc runs the same federation
    in one process, --no-dp without differential privacy.
    """
    output = output_mode(as_json, quiet)
    plan_path = demo_plan_path(private=not no_dp)
    if inproc:
        _simulate_and_render(
            plan_path, out, output, resume=False, title="heart-disease demo", dashboard=dashboard, dashboard_listen=dashboard_listen
        )
        return
    from fedcare.demo import prepare_deployment, run_deployed
    from fedcare.plan import load_plan
    from fedcare.simulation import default_run_dir

    started = time.perf_counter()
    with fedcare_errors(output):
        plan = load_plan(plan_path)
        output.run_dir = Path(out or default_run_dir(plan))
        layout = prepare_deployment(plan_path, output.run_dir)
        if output.progress:
            errors.print(
                f"coordinator + {len(layout.node_configs)} hospital processes on 127.0.0.1, mutual TLS"
                f"{', secure aggregation (SecAgg+)' if plan.secure_aggregation.enabled else ''}"
                f"{', record-level DP' if plan.privacy.record_level.enabled else ''} "
                f"(certificates in {layout.certs_dir})",
                highlight=False,
                soft_wrap=True,
            )
        with _dashboard(plan, output, enabled=dashboard, listen=dashboard_listen) as (live, _):
            summary = with_event_progress(
                plan, lambda on_event, _: run_deployed(layout, on_event=chain_events(on_event, live)), show=output.progress
            )
    summary["wall_s"] = time.perf_counter() - started
    _render_summary(summary, output, title="heart-disease demo (deployed)")


@app.command(rich_help_panel=_RUN)
def serve(
    plan: Annotated[Path, typer.Argument(help="Plan file (YAML) listing the admitted nodes.")],
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to listen on (port 0: any free port).")] = "0.0.0.0:7443",
    certs: Annotated[Path, typer.Option("--certs", help="Directory with ca.pem, server.pem, server.key, crl.pem.")] = Path("certs"),
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/NAME-TIME).")] = None,
    wait_for_nodes_s: Annotated[float, typer.Option("--wait-for-nodes-s", help="How long to wait for nodes to join.")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the run in this directory from its last completed round (after a crash); "
            "the nodes, still running, reconnect by themselves.",
        ),
    ] = None,
    dashboard: Annotated[bool, typer.Option("--dashboard", help=_DASHBOARD_HELP)] = False,
    dashboard_listen: Annotated[str, typer.Option("--dashboard-listen", help=_DASHBOARD_LISTEN_HELP)] = "127.0.0.1:0",
    dashboard_tls: Annotated[
        bool,
        typer.Option(
            "--dashboard-tls",
            help="Serve the dashboard over HTTPS with --certs' server certificate, admitting only browsers that "
            "present a certificate from the federation's CA.",
        ),
    ] = False,
) -> None:
    """Coordinate a federation: listen for the sites' nodes over mutual TLS and run the plan."""
    from fedcare.deployment import serve as serve_plan
    from fedcare.plan import load_plan
    from fedcare.simulation import default_run_dir

    output = output_mode(as_json, quiet)
    log_to_stderr(output)
    started = time.perf_counter()
    with fedcare_errors(output):
        loaded = load_plan(plan)
        if resume is not None and out is not None and Path(out) != resume:
            raise ConfigError("--resume names the run directory; give it alone, without another --out", field="--out")
        out_dir = Path(resume or out or default_run_dir(loaded))
        out_dir.mkdir(parents=True, exist_ok=True)
        output.run_dir = out_dir
        host = listen.rsplit(":", 1)[0]

        def listening(port: int) -> None:
            (out_dir / "endpoint.json").write_text(json.dumps({"host": host, "port": port}))
            if output.mode != "quiet":
                errors.print(f"listening on {host}:{port}", highlight=False)

        def show_approvals(event: dict[str, Any]) -> None:
            if event["event"] == "approval" and output.mode != "quiet":
                errors.print(approval_line(event), highlight=False, soft_wrap=True)

        with _dashboard(
            loaded, output, enabled=dashboard, listen=dashboard_listen, certs=certs if dashboard_tls else None
        ) as (live, holder):
            result = serve_plan(
                loaded,
                listen=listen,
                certs_dir=certs,
                out_dir=out_dir,
                wait_for_nodes_s=wait_for_nodes_s,
                on_listening=listening,
                capture_handshake_log=True,
                on_event=chain_events(show_approvals, live),
                on_transport=lambda transport: holder.__setitem__("transport", transport),
                resume=resume is not None,
            )
    summary = _summary(result)
    summary["wall_s"] = time.perf_counter() - started
    _render_summary(summary, output, title=loaded.name)


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


def _render_summary(summary: dict[str, Any], output: Output, *, title: str) -> None:
    if output.mode == "json":
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    if output.mode == "quiet":
        sys.stdout.write(f"{summary['run_dir']}\n")
        return
    if summary["sites"]:
        console.print(
            _site_table(
                f"{title}: round {summary['rounds']}, each site's own test split",
                summary["sites"],
                summary["examples"],
                {"mean of sites": summary["mean"], "pooled (by n)": summary["pooled"]},
                epsilon=summary.get("epsilon_spent") or None,
            )
        )
    for failure in summary["failures"]:
        console.print(f"[yellow]round {failure['round']}: {failure['node_id']}: {failure['error']}[/]")
    rounds_by_site: dict[str, list[int]] = {}
    for round_key, nodes in summary.get("participation", {}).items():
        for node_id in nodes:
            rounds_by_site.setdefault(node_id, []).append(int(round_key))
    total = summary["rounds"]
    partial = {site: rounds for site, rounds in rounds_by_site.items() if len(rounds) < total}
    if partial:
        spans = "; ".join(f"{site} {_spans(rounds)}" for site, rounds in sorted(partial.items()))
        console.print(f"took part in some rounds only: {spans} (of {total})", highlight=False)
    privacy = summary.get("privacy") or {}
    if privacy:
        secure = "on (SecAgg+): the coordinator saw only sums" if privacy.get("secure_aggregation") else "off"
        console.print(f"secure aggregation: {secure}; left the sites: {privacy.get('data_leaving_sites')}", highlight=False)
        record_level = (privacy.get("differential_privacy") or {}).get("record_level")
        if record_level:
            console.print(
                f"record-level DP (DP-SGD) at every site: ε spent per site in the table, at δ = {record_level['delta']:g} "
                f"(planned ε {record_level['planned_epsilon']:g})",
                highlight=False,
            )
    console.print(f"run directory: {summary['run_dir']}  ({summary['wall_s']:.1f} s)")


@app.command(rich_help_panel=_INSPECT)
def datasets() -> None:
    """List the bundled datasets, with their sites, sources and licences."""
    from fedcare.data.catalog import DatasetCatalog

    catalog = DatasetCatalog.bundled()
    for name in catalog.names():
        info = catalog.get(name).info
        console.print(f"[bold]{info.name}[/]  {info.patients} patients  sites: {info.sites}", highlight=False)
        console.print(f"  {info.description}", highlight=False)
        console.print(f"  licence {info.licence}; source {info.source}", highlight=False)


@app.command(rich_help_panel=_INSPECT)
def baseline(
    plan: Annotated[Path, typer.Argument(help="Plan file (YAML).")],
    mode: Annotated[str, typer.Option("--mode", help="pooled: one model on all sites' data; local: each site alone.")] = "pooled",
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table: errors on stderr, then one summary line.")] = False,
) -> None:
    """Train without federation (pooled, or each site alone) on the same per-site test splits."""
    from fedcare.baselines import run_baseline
    from fedcare.plan import load_plan

    output = output_mode(as_json, quiet)
    with fedcare_errors(output):
        if mode not in ("pooled", "local"):
            raise ConfigError(f"must be 'pooled' or 'local', got {mode!r}", field="--mode")
        chosen: Literal["pooled", "local"] = "pooled" if mode == "pooled" else "local"
        loaded = load_plan(plan)
        result = run_baseline(loaded, mode=chosen)
    if output.mode == "json":
        payload = {
            "mode": chosen,
            "sites": {s: _scalars(m) for s, m in result.sites.items()},
            "examples": result.examples,
            "mean": _scalars(result.mean),
            "pooled": _scalars(result.pooled),
            "mean_site_accuracy": _number(result.mean.get("accuracy")),
            **_curves(result.sites),
        }
        sys.stdout.write(json.dumps(payload) + "\n")
        return
    if output.mode == "quiet":
        accuracy = _number(result.mean.get("accuracy"))
        sys.stdout.write(f"{chosen} baseline: mean site accuracy {'–' if accuracy is None else f'{accuracy:.3f}'}\n")
        return
    what = "one model trained on pooled data" if chosen == "pooled" else "each site's own model"
    console.print(
        _site_table(
            f"{chosen} baseline: {what}, each site's own test split",
            result.sites,
            result.examples,
            {"mean of sites": result.mean, "pooled (by n)": result.pooled},
        )
    )


@app.command("audit-privacy", rich_help_panel=_INSPECT)
def audit_privacy(
    run: Annotated[Path, typer.Argument(help="Run directory written by fedcare simulate.")],
    shadow_models: Annotated[int, typer.Option("--shadow-models", help="Shadow federations for LiRA (at least 2).")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shadows' data halves, weights and batches.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table: errors on stderr, then the audit file's path.")] = False,
) -> None:
    """Membership inference against a run's final model: can an attacker tell who trained it?"""
    from fedcare.privacy.audit import AUDIT_FILENAME, audit_run

    output = output_mode(as_json, quiet)
    output.run_dir = run
    with fedcare_errors(output):
        audit = audit_run(run, shadow_models=shadow_models, seed=seed)
    if output.mode == "json":
        sys.stdout.write(json.dumps(audit.to_dict()) + "\n")
        return
    if output.mode == "quiet":
        sys.stdout.write(f"{run / AUDIT_FILENAME}\n")
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
    console.print(table)
    console.print("AUC 0.5: the attack does no better than guessing; 1.0: it tells every member apart.", highlight=False)
    if coarse:
        console.print(
            "* below the resolution of the site's non-members: the TPR is read at FPR = 1 / non-members.",
            highlight=False,
        )
    console.print(f"written to {run / AUDIT_FILENAME}  ({audit.wall_s:.1f} s)", highlight=False, soft_wrap=True)


app.add_typer(certs_app, name="certs", rich_help_panel=_SET_UP)
app.add_typer(node_app, name="node", rich_help_panel=_RUN)
app.add_typer(data_app, name="data", rich_help_panel=_INSPECT)
app.add_typer(audit_app, name="audit", rich_help_panel=_INSPECT)

app.command("report", rich_help_panel=_INSPECT)(report_command)

#: The exit-code table (see :data:`fedcare.cli_common.EXIT_CODES`).
_EXIT_CODES = EXIT_CODES
__all__ = ["app", "demo_plan_path", "exit_code", "main"]


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
