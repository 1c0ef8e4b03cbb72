"""``fhir-server hl7``: the stored HL7 v2 messages (list) and their reprocessing after a mapping fix (replay)."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

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


@hl7.command("mllp")
@click.option("--tenant", "tenant_name", required=True, help="The tenant whose data the messages are.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; off loopback, mutual TLS "
                                                                      "is required.")
@click.option("--port", type=int, default=None, help="Port (default FHIR_HL7_MLLP_PORT, 2575; 0: any free port).")
@click.option("--processes", type=int, default=None, help="Listener processes (default FHIR_HL7_MLLP_PROCESSES, 1); "
                                                          "more than one: this process accepts and hands them the "
                                                          "connections.")
@click.option("--tls-cert", default=None, help="PEM certificate (default FHIR_HL7_TLS_CERT).")
@click.option("--tls-key", default=None, help="PEM private key of --tls-cert (default FHIR_HL7_TLS_KEY).")
@click.option("--tls-client-ca", default=None, help="PEM CA certificates senders' client certificates must chain "
                                                    "to (default FHIR_HL7_TLS_CLIENT_CA).")
def hl7_mllp(tenant_name: str, host: str, port: int | None, processes: int | None, tls_cert: str | None,
             tls_key: str | None, tls_client_ca: str | None) -> None:
    """Receive HL7 v2 over MLLP for one tenant: each message stored, processed as one transaction, acknowledged
    after the commit. Runs until SIGTERM or SIGINT (messages in hand are finished and acknowledged first)."""
    import asyncio
    import ssl

    from fhir_server import logs
    from fhir_server.hl7v2 import supervisor
    from fhir_server.hl7v2.listener import is_loopback, tls_context
    from fhir_server.security.keys import provider_from_settings
    from fhir_server.settings import Settings, SettingsError
    from fhir_server.storage.tenants import TenantNotFound

    given: dict[str, Any] = {k: v for k, v in (("hl7_mllp_port", port), ("hl7_mllp_processes", processes),
                                               ("hl7_tls_cert", tls_cert), ("hl7_tls_key", tls_key),
                                               ("hl7_tls_client_ca", tls_client_ca)) if v is not None}
    try:
        settings = Settings.load(**given)
        provider = provider_from_settings(settings)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    logs.configure(settings.log_level)
    tls_files = (settings.hl7_tls_cert, settings.hl7_tls_key, settings.hl7_tls_client_ca)
    if any(tls_files) and not all(tls_files):
        raise click.ClickException("--tls-cert, --tls-key and --tls-client-ca (FHIR_HL7_TLS_*) go together")
    tls = None
    if all(tls_files):
        try:
            tls = tls_context(*tls_files)  # type: ignore[arg-type]
        except (OSError, ssl.SSLError) as exc:
            raise click.ClickException(f"cannot use the TLS certificate, key or client CA: {exc}") from None
    elif not is_loopback(host):
        raise click.ClickException(
            f"refusing to take HL7 v2 on {host} without mutual TLS: give --tls-cert, --tls-key and --tls-client-ca, "
            "or bind to a loopback address (127.0.0.1, ::1) behind a TLS-terminating proxy")

    def ready(addresses: list[tuple[str, int]]) -> None:
        for h, p in addresses:
            click.echo(f"listening on {h}:{p}" + (" (mutual TLS)" if tls else ""))

    if settings.hl7_mllp_processes == 1:
        with _listener(settings, provider, tenant_name, tls) as listener:
            try:
                asyncio.run(listener.run(host, settings.hl7_mllp_port, ready=ready, signals=True))
            except OSError as exc:
                raise click.ClickException(f"cannot listen on {host}:{settings.hl7_mllp_port}: "
                                           f"{exc.strerror or exc}") from None
        return
    _storage_with_tenant(settings, provider, tenant_name).db.dispose()  # checked, and closed before the fork
    try:
        sockets = supervisor.bind(host, settings.hl7_mllp_port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{settings.hl7_mllp_port}: {exc.strerror or exc}") from None

    def child(channel: Any) -> int:
        try:
            with _listener(settings, provider, tenant_name, tls) as listener:
                asyncio.run(listener.run_handed(channel, signals=True))
        except TenantNotFound:
            return 2
        return 0

    status = supervisor.Supervisor(sockets, settings.hl7_mllp_processes, child,
                                   max_connections=settings.hl7_mllp_max_connections).run(ready)
    raise SystemExit(status)


def _storage_with_tenant(settings: Any, provider: Any, tenant_name: str) -> Any:
    """A storage over the settings' database; a click error when it has no tenant ``tenant_name``."""
    from fhir_server.hl7v2.store import MessageStore
    from fhir_server.security.crypto import cipher_named
    from fhir_server.storage.database import Database
    from fhir_server.storage.store import Storage
    from fhir_server.storage.tenants import TenantNotFound

    storage = Storage(Database(settings.effective_database_url, settings), provider, cipher_named(settings.cipher),
                      settings)
    try:
        next(iter(MessageStore(storage).listing(tenant_name, limit=1)), None)
    except TenantNotFound:
        storage.db.dispose()
        raise click.ClickException(f"no tenant {tenant_name!r}") from None
    return storage


@contextlib.contextmanager
def _listener(settings: Any, provider: Any, tenant_name: str, tls: Any) -> Iterator[Any]:
    """A listener for the tenant over an engine of its own (its storage released at the end)."""
    from fhir_server.capability.registry import load_registry
    from fhir_server.engine.engine import Engine
    from fhir_server.hl7v2.intake import Intake
    from fhir_server.hl7v2.listener import Listener

    storage = _storage_with_tenant(settings, provider, tenant_name)
    try:
        engine = Engine(load_registry(), storage, settings)
        workers = min(settings.hl7_mllp_workers, settings.db_pool_size)
        yield Listener(Intake(engine), tenant_name, _base_url(engine, tenant_name),
                       max_bytes=settings.hl7_max_message_bytes, idle_seconds=settings.hl7_mllp_idle_seconds,
                       workers=workers, max_connections=settings.hl7_mllp_max_connections, tls=tls)
    finally:
        storage.audit_log.stop()
        storage.db.dispose()
