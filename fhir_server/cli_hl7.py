"""``fhir-server hl7``: the stored HL7 v2 messages (list) and their reprocessing after a mapping fix (replay)."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine


def _engine() -> Engine:
    from fhir_server.cli import _engine as make

    engine: Engine = make()
    return engine


def _base_url(engine: Engine, tenant: str) -> str:
    s = engine.settings
    root = s.base_url.rstrip("/") if s.base_url else f"http://{s.host}:{s.port}"
    return f"{root}/fhir/{tenant}"


def _when(us: int) -> str:
    return datetime.datetime.fromtimestamp(us / 1e6, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@click.group()
def hl7() -> None:
    """HL7 v2 messages received: list them, replay the failed ones."""


@hl7.command("list")
@click.option("--tenant", "tenant_name", required=True)
@click.option("--status", type=click.Choice(["processing", "processed", "error", "rejected"]),
              help="Only messages with this status (error: the dead letters, for replay).")
@click.option("--limit", default=1000, show_default=True)
def hl7_list(tenant_name: str, status: str | None, limit: int) -> None:
    """One line a message, oldest first: id, received, status, type, error code (table 0357), attempts."""
    from fhir_server.hl7v2.store import MessageStore
    from fhir_server.storage.tenants import TenantNotFound

    engine = _engine()
    try:
        for m in MessageStore(engine.storage).listing(tenant_name, status=status, limit=limit):
            click.echo("\t".join([m.id, _when(m.received), m.status, m.kind or "-", m.error_code or "-", str(m.attempts)]))
    except TenantNotFound:
        raise click.ClickException(f"no tenant {tenant_name!r}") from None


@hl7.command("replay")
@click.option("--tenant", "tenant_name", required=True)
@click.option("--id", "ids", multiple=True, help="A stored message's id (repeatable); without it, every message "
                                                  "with status error.")
def hl7_replay(tenant_name: str, ids: tuple[str, ...]) -> None:
    """Process stored messages again (as the server itself), each as it was received; print each one's new ACK code.
    Exits 1 if any is still not accepted."""
    from fhir_server.hl7v2.intake import Intake
    from fhir_server.security.access import INTERNAL
    from fhir_server.storage.tenants import TenantNotFound

    engine = _engine()
    intake = Intake(engine)
    try:
        todo = list(ids) or [m.id for m in intake.store.listing(tenant_name, status="error", limit=100_000)]
        failed = 0
        for message_id in todo:
            try:
                outcome = intake.replay(tenant_name, _base_url(engine, tenant_name), INTERNAL, message_id)
            except KeyError:
                raise click.ClickException(f"no stored message {message_id!r} in tenant {tenant_name}") from None
            if outcome is None:
                click.echo(f"{message_id}\tbusy (being processed elsewhere)")
                failed += 1
                continue
            detail = "; ".join(str(e) for e in outcome.errors if e.severity == "E")
            click.echo(f"{message_id}\t{outcome.code}" + (f"\t{detail}" if detail else ""))
            failed += outcome.code != "AA"
    except TenantNotFound:
        raise click.ClickException(f"no tenant {tenant_name!r}") from None
    click.echo(f"{len(todo)} replayed, {len(todo) - failed} accepted")
    if failed:
        raise SystemExit(1)
