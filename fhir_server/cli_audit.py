"""The ``fhir-server audit`` commands (verify, export, chain) and the audit records of the command line itself.

Every administrative command that changes the security configuration (tenants, keys, users, clients) leaves
an AuditEvent naming the operating-system user who ran it; reading the log (verify, export) does too.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import getpass
import json
import sys
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

import click

from fhir_server.security import audit_events as ae

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine


def operator() -> ae.Actor:
    """The person at the command line (their operating-system account)."""
    try:
        name = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment: say so
        name = "unknown"
    return ae.Actor(internal=True, os_user=name)


def admin_event(tenant: str, code: str, description: str, *, dicom: str = ae.SECURITY_CONFIGURATION) -> dict[str, Any]:
    """A change of security configuration made at the command line, for ``tenant``'s log."""
    return ae.security_event(code, description, operator(), ae.Place(tenant), dicom_subtype=dicom)


def record(engine: Engine, tenant: str, event: dict[str, Any]) -> None:
    """Commit one command-line event in ``tenant``'s log (its own transaction)."""
    engine.audit.append(tenant, [event])


def record_server_wide(engine: Engine, code: str, description: str, *, required: bool = False) -> None:
    """An event of the whole server (a tenant deleted, the master key rotated), in the server's own log.

    ``required``: the command must not go on unrecorded (it is about to destroy something): a missing server
    log stops it."""
    from fhir_server.storage.tenants import TenantNotFound

    tenant = engine.settings.audit_server_tenant
    try:
        record(engine, tenant, admin_event(tenant, code, description))
    except TenantNotFound:
        if required:
            raise click.ClickException(
                f"the server's audit log (tenant {tenant}) is missing: run `fhir-server migrate` first") from None
        click.echo(f"warning: the server's audit log (tenant {tenant}) is missing: run `fhir-server migrate`", err=True)


def _engine() -> Engine:
    from fhir_server.cli import _engine as make

    engine: Engine = make()
    return engine


@click.group()
def audit() -> None:
    """Verify and export the audit log."""


@audit.command("verify")
@click.option("--tenant", "tenant_name", required=True)
@click.option("--grace-seconds", default=300, show_default=True,
              help="Records waiting to be chained longer than this are reported (the server chains within moments).")
def audit_verify(tenant_name: str, grace_seconds: int) -> None:
    """Recompute the tenant's hash chain and checkpoints; exit 1 naming the first record changed, removed, inserted or
    reordered, or the log cut short."""
    from fhir_server.storage.tenants import TenantNotFound

    engine = _engine()
    try:
        report = engine.storage.audit_log.verify(tenant_name, grace_seconds=grace_seconds)
    except TenantNotFound:
        raise click.ClickException(f"no tenant {tenant_name!r}") from None
    summary = (f"tenant {tenant_name}: {report.records} records verified, {report.checkpoints} signed checkpoints, "
               f"{report.pending} waiting to be chained")
    outcome = "0" if report.ok else "4"
    description = summary if report.ok else f"{summary}; {report.findings[0].message}"
    record(engine, tenant_name, ae.log_use_event("verify", description, operator(),
                                                  ae.Place(tenant_name), export=False, outcome=outcome))
    if report.ok:
        click.echo(f"{summary}: the log is intact")
        return
    finding = report.findings[0]
    click.echo(summary, err=True)
    click.echo(f"TAMPERED ({finding.kind}): {finding.message}", err=True)
    sys.exit(1)


@audit.command("chain")
@click.option("--tenant", "tenant_name", required=True)
def audit_chain(tenant_name: str) -> None:
    """Chain and index the records waiting (a server that was killed may leave some; a busy one leaves indexing for
    idle moments) and sign a checkpoint now."""
    from fhir_server.storage.tenants import TenantNotFound

    engine = _engine()
    log = engine.storage.audit_log
    try:
        n = log.chain(tenant_name, checkpoint=True) or 0
        indexed = 0
        while (done := log.index(tenant_name)) > 0:
            indexed += done
    except TenantNotFound:
        raise click.ClickException(f"no tenant {tenant_name!r}") from None
    click.echo(f"tenant {tenant_name}: {n} records chained, {indexed} indexed; checkpoint signed")


@audit.command("export")
@click.option("--tenant", "tenant_name", required=True)
@click.option("--since", help="Records from this instant on (ISO 8601, e.g. 2026-12-01 or 2026-12-01T08:00:00Z).")
@click.option("--until", help="Records before this instant.")
@click.option("--format", "fmt", type=click.Choice(["ndjson", "csv"]), default="ndjson", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, writable=True), help="Write here instead of standard output.")
def audit_export(tenant_name: str, since: str | None, until: str | None, fmt: str, output: str | None) -> None:
    """Stream the tenant's AuditEvents (oldest first) for a SIEM: one JSON object per line, or CSV."""
    from fhir_server.storage.tenants import TenantNotFound

    low, high = _instant(since, "--since"), _instant(until, "--until")
    engine = _engine()
    query = f"audit export --tenant {tenant_name} --since {since or '-'} --until {until or '-'} --format {fmt}"
    count = 0
    sink: IO[str] = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout
    try:
        rows = engine.storage.audit_log.events(tenant_name, since=low, until=high)
        count = (_write_ndjson if fmt == "ndjson" else _write_csv)(sink, rows)
    except TenantNotFound:
        raise click.ClickException(f"no tenant {tenant_name!r}") from None
    finally:
        if output:
            sink.close()
        record(engine, tenant_name, ae.log_use_event("export", f"{count} records exported ({fmt})",
                                                      operator(), ae.Place(tenant_name), export=True, query=query))
    click.echo(f"tenant {tenant_name}: {count} records exported", err=True)


def _instant(value: str | None, option: str) -> int | None:
    if value is None:
        return None
    from fhir_server.clock import from_datetime

    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.UsageError(f"{option} takes an ISO 8601 date or instant, not {value!r}") from None
    return from_datetime(parsed)


def _write_ndjson(out: IO[str], bodies: Iterator[bytes]) -> int:
    n = 0
    for body in bodies:
        out.write(body.decode())
        out.write("\n")
        n += 1
    return n


CSV_COLUMNS = ["recorded", "id", "type", "subtype", "action", "outcome", "outcome_description", "user", "client",
               "address", "patients", "entities", "query", "request_id"]


def _write_csv(out: IO[str], bodies: Iterator[bytes]) -> int:
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    n = 0
    for body in bodies:
        writer.writerow(csv_row(json.loads(body)))
        n += 1
    return n


def csv_row(event: dict[str, Any]) -> list[str]:
    """One AuditEvent, flattened for a spreadsheet or a SIEM that takes CSV."""
    user = client = address = ""
    for agent in event.get("agent", []):
        identifier = agent.get("who", {}).get("identifier", {})
        if identifier.get("system") in (ae.USERNAME, ae.OS_USER):
            user = identifier.get("value", "")
        elif identifier.get("system") == ae.CLIENT_ID:
            client = identifier.get("value", "")
        if agent.get("network", {}).get("type") == "2":
            address = agent["network"].get("address", "")
    patients, entities, queries, request_id = [], [], [], ""
    for entity in event.get("entity", []):
        what = entity.get("what", {})
        if entity.get("type", {}).get("code") == "XrequestId":
            request_id = what.get("identifier", {}).get("value", "")
        elif entity.get("role", {}).get("code") == "1":
            patients.append(what.get("reference", ""))
        elif "query" in entity:
            queries.append(base64.b64decode(entity["query"]).decode(errors="replace"))
        elif what.get("reference"):
            entities.append(what["reference"])
    return [event.get("recorded", ""), event.get("id", ""), event.get("type", {}).get("code", ""),
            " ".join(c.get("code", "") for c in event.get("subtype", [])), event.get("action", ""), event.get("outcome", ""),
            event.get("outcomeDesc", ""), user, client, address, " ".join(patients), " ".join(entities), " ".join(queries),
            request_id]
