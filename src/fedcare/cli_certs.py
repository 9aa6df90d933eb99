"""``fedcare certs``: the federation's CA and the certificates it issues."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from fedcare.cli_common import (
    console,
    fedcare_errors,
)
from fedcare.errors import ConfigError

certs_app = typer.Typer(
    help="The federation's certificates: a CA, the coordinator's server certificate, one per node.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


@certs_app.command("init")
def certs_init(
    federation: Annotated[str, typer.Option("--federation", help="Federation name, used in the CA's name.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the CA (created if missing).")],
    lifetime_days: Annotated[int, typer.Option("--lifetime-days", help="CA validity in days.")] = 365,
) -> None:
    """Create the federation's CA: ca.pem, ca.key (mode 0600) and an empty crl.pem."""
    from fedcare.transport.pki import init_ca

    with fedcare_errors():
        ca_path = init_ca(out, federation=federation, lifetime_days=lifetime_days)
    console.print(f"CA certificate: {ca_path}", highlight=False, soft_wrap=True)
    console.print(f"CA key (keep it off the nodes): {ca_path.with_name('ca.key')}", highlight=False, soft_wrap=True)
    console.print(f"revocation list: {ca_path.with_name('crl.pem')}", highlight=False, soft_wrap=True)


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

    with fedcare_errors():
        if role not in ("server", "node"):
            raise ConfigError(f"must be 'server' or 'node', got {role!r}", field="--role")
        chosen: Literal["server", "node"] = "server" if role == "server" else "node"
        hosts = tuple(host) if host else ("localhost", "127.0.0.1")
        cert_path, key_path = issue_certificate(
            certs, role=chosen, name=name, lifetime_days=lifetime_days, hosts=hosts
        )
    console.print(f"{chosen} certificate for {name}: {cert_path}", highlight=False, soft_wrap=True)
    console.print(f"private key (mode 0600): {key_path}", highlight=False, soft_wrap=True)


@certs_app.command("revoke")
def certs_revoke(
    name: Annotated[str, typer.Argument(help="The node's name, or the server's.")],
    certs: Annotated[Path, typer.Option("--certs", help="The CA directory.")] = Path("certs"),
) -> None:
    """Put a certificate on the CA's revocation list (crl.pem)."""
    from fedcare.transport.pki import revoke_certificate

    with fedcare_errors():
        serial = revoke_certificate(certs, name)
    console.print(f"revoked {name} (serial {serial:x}); updated {certs / 'crl.pem'}", highlight=False, soft_wrap=True)


@certs_app.command("fingerprint")
def certs_fingerprint(
    name: Annotated[str, typer.Argument(help="The certificate's stem in --certs (default: server, the coordinator's).")] = "server",
    certs: Annotated[Path, typer.Option("--certs", help="The directory holding NAME.pem.")] = Path("certs"),
) -> None:
    """Print a certificate's SHA-256 fingerprint: what a site pins as policy.coordinator_fingerprint."""
    from fedcare.transport.pki import certificate_sha256, read_pem

    with fedcare_errors():
        fingerprint = certificate_sha256(read_pem(certs / f"{name}.pem"))
    console.print(fingerprint, highlight=False)


@certs_app.command("list")
def certs_list(
    certs: Annotated[Path, typer.Option("--certs", help="The CA directory.")] = Path("certs"),
) -> None:
    """List the server and node certificates the CA in --certs issued."""
    from fedcare.transport.pki import list_certificates

    with fedcare_errors():
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
    console.print(table)
