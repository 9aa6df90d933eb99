"""``fedcare node init`` and ``fedcare node doctor``: set up a site, then check it, before it joins."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fedcare.cli_common import JSON_HELP, console, errors, exit_code, fedcare_errors, output_mode

__all__ = ["node_doctor", "node_init"]

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def node_init(
    data: Annotated[Path, typer.Argument(help="A folder of images in one folder per label, or a CSV table.")],
    name: Annotated[str, typer.Option("--name", help="The node's name: its certificate's common name.")],
    dataset: Annotated[str | None, typer.Option("--dataset", help="The dataset's name as the federation's plans use it (default: the plan's).")] = None,
    labels: Annotated[str | None, typer.Option("--labels", help="The federation's labels, comma-separated (default: the plan's).")] = None,
    plan: Annotated[Path | None, typer.Option("--plan", help="A plan of the federation: dataset name, labels, features, privacy.")] = None,
    cert: Annotated[Path | None, typer.Option("--cert", help="This node's certificate (NAME.pem) from the federation's operator.")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="This node's private key (NAME.key).")] = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="The federation's CA certificate (ca.pem).")] = None,
    coordinator: Annotated[str | None, typer.Option("--coordinator", help="HOST:PORT of the coordinator.")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column", help="CSV: the label column, if the proposed one is wrong.")] = None,
    out: Annotated[Path, typer.Option("--out", help="The node.yaml to write.")] = Path("node.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing node.yaml and certificate files.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Write a working node.yaml from a data folder or CSV: format, label map, a cautious policy, certificates.

    Local labels that match no federation label are left out of label_map
    and listed as a TODO in node.yaml (the node refuses to run until they
    are mapped). Certificate files are checked (signed by the CA, matching
    key, naming NAME) and copied to certs/ beside node.yaml, the key with
    mode 0600. Next: fedcare data check node.yaml, then fedcare node doctor
    node.yaml.
    """
    from fedcare.site_setup import init_site

    output = output_mode(as_json, False)
    federation = [label.strip() for label in labels.split(",") if label.strip()] if labels is not None else None
    with fedcare_errors(output):
        setup = init_site(
            data, name=name, dataset=dataset, labels=federation, plan=plan, cert=cert, key=key, ca=ca,
            coordinator=coordinator, out=out, label_column=label_column, force=force,
        )  # fmt: skip
    found = setup.dataset
    if as_json:
        sys.stdout.write(json.dumps({
            "node_yaml": str(setup.node_yaml), "format": found.format, "kind": found.kind,
            "label_counts": found.label_counts, "label_map": setup.labels.label_map, "unmapped": setup.labels.unmapped,
            "label_column": found.label_column, "feature_columns": list(found.feature_columns),
            "certs_dir": None if setup.certs_dir is None else str(setup.certs_dir), "notes": setup.notes,
        }) + "\n")  # fmt: skip
        return
    console.print(f"wrote {escape(str(setup.node_yaml))}: {found.kind} ({found.format}), {found.total} record(s)", highlight=False, soft_wrap=True)
    table = Table(title="label map", title_justify="left")
    for column in ("local label", "records", "federation label", "matched"):
        table.add_column(column)
    for local, count in found.label_counts.items():
        target = setup.labels.label_map.get(local)
        how = setup.labels.how.get(local, "")
        table.add_row(escape(local), str(count), escape(target) if target else "[bold red]TODO[/]", how)
    console.print(table)
    if found.format == "csv":
        console.print(f"label column {escape(str(found.label_column))}; numeric feature columns: "
                      f"{escape(', '.join(found.feature_columns) or 'none')}", highlight=False, soft_wrap=True)  # fmt: skip
    for note in setup.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    console.print(f"next: fedcare data check {escape(str(setup.node_yaml))}; fedcare node doctor {escape(str(setup.node_yaml))}", highlight=False, soft_wrap=True)


def node_doctor(
    node_yaml: Annotated[Path, typer.Argument(help="The site's node.yaml.")],
    coordinator: Annotated[str | None, typer.Option("--coordinator", help="HOST:PORT of the coordinator (default: node.yaml's).")] = None,
    certs: Annotated[Path | None, typer.Option("--certs", help="The certificates folder (default: node.yaml's certs_dir, else certs/ beside it).")] = None,
    plan: Annotated[Path | None, typer.Option("--plan", help="Check the data against this plan's labels, shape and features.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Check what a site can get wrong before joining, and say how to fix it.

    Certificate (files, CA, expiry, key, name), clock, coordinator (listening,
    TLS with this site's certificate, its name, admission), data (readable,
    counts per split), label mapping, free disk, accelerator. Exits non-zero
    when a check fails, with the exit code of the first failure's kind (2
    certificate or clock, 3 data or labels, 5 coordinator unreachable, 6
    refused by the coordinator).
    """
    from fedcare.doctor import diagnose, failure_error
    from fedcare.plan import load_plan

    output = output_mode(as_json, False)
    with fedcare_errors(output):
        loaded = load_plan(plan) if plan is not None else None
        results = diagnose(node_yaml, coordinator=coordinator, certs_dir=certs, plan=loaded)
    failure = failure_error(results)
    if as_json:
        sys.stdout.write(json.dumps({"ok": failure is None, "checks": [r.to_dict() for r in results]}) + "\n")
    else:
        table = Table(title=f"node doctor: {escape(node_yaml.name)}", title_justify="left")
        for column in ("check", "status", "found", "what to do"):
            table.add_column(column, overflow="fold")
        for r in results:
            table.add_row(escape(r.check), f"[{_STYLE[r.status]}]{r.status.upper()}[/]", escape(r.message), escape(r.fix))
        console.print(table)
        failed = sum(r.status == "fail" for r in results)
        warned = sum(r.status == "warn" for r in results)
        if failed:
            errors.print(f"[bold red]{failed} problem(s) to fix[/] before this site joins; {warned} warning(s)", highlight=False)
        else:
            console.print(f"[green]ready to join[/]; {warned} warning(s)", highlight=False)
    if failure is not None:
        raise typer.Exit(exit_code(failure))
