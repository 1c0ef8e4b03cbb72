"""The ``fhir-server`` command: serve, migrate, tenants, keys, reindex; clients, users, launch (cli_auth)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from fhir_server import cli_audit
from fhir_server.settings import Settings, SettingsError


def _settings() -> Settings:
    try:
        return Settings.load()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _storage(settings: Settings, *, migration_role: bool = False) -> Any:
    from fhir_server.security.crypto import cipher_named
    from fhir_server.security.keys import provider_from_settings
    from fhir_server.storage.database import Database
    from fhir_server.storage.store import Storage

    url = settings.effective_migration_url if migration_role else settings.effective_database_url
    try:
        provider = provider_from_settings(settings)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    return Storage(Database(url, settings, pooled=False), provider, cipher_named(settings.cipher), settings)


def _engine(settings: Settings | None = None, *, migration_role: bool = False) -> Any:
    """An engine over a storage of the command line's own: it writes the audit records of what the command does."""
    from fhir_server.capability.registry import load_registry
    from fhir_server.engine.engine import Engine

    settings = settings or _settings()
    engine = Engine(load_registry(), _storage(settings, migration_role=migration_role), settings)
    engine.storage.audit_log.inline = True  # a command's records are chained before it exits
    return engine


@click.group()
def main() -> None:
    """A FHIR R4 server: encrypted storage, tenants, SMART on FHIR."""


@main.command()
@click.option("--host", default=None, help="Address to bind (default FHIR_HOST, 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port (default FHIR_PORT, 8080).")
@click.option("--workers", default=None, type=int, help="Worker processes (default FHIR_WORKERS).")
@click.option("--threads", default=None, type=int, help="Threads per worker (default FHIR_THREADS).")
@click.option("--tls-cert", default=None, help="PEM certificate: serve HTTPS (TLS 1.2 or newer) (default FHIR_TLS_CERT).")
@click.option("--tls-key", default=None, help="PEM private key of --tls-cert (default FHIR_TLS_KEY).")
def serve(host: str | None, port: int | None, workers: int | None, threads: int | None, tls_cert: str | None,
          tls_key: str | None) -> None:
    """Run the server under gunicorn."""
    from fhir_server import logs
    from fhir_server.security.keys import provider_from_settings
    from fhir_server.serve import run
    from fhir_server.storage import migrate
    from fhir_server.storage.database import Database

    try:
        settings = Settings.load(host=host, port=port, workers=workers, threads=threads, tls_cert=tls_cert, tls_key=tls_key)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    logs.configure(settings.log_level)
    tls = _check_transport(settings)
    if settings.production and not settings.base_url:
        click.echo("warning: FHIR_BASE_URL is not set, so the base URL, and with it the SMART issuer and the audience "
                   "tokens are checked against, follows each request's Host header; set it to the public URL", err=True)
    try:
        provider_from_settings(settings)  # make (or check) the master key before workers start
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    db = Database(settings.effective_database_url, settings, pooled=False)
    try:
        with db.transaction(write=False) as conn:
            current = migrate.current_revision(conn)
    except Exception as exc:  # noqa: BLE001 - any connection failure ends here with a clear message
        raise click.ClickException(f"cannot reach the database: {type(exc).__name__}") from None
    finally:
        db.dispose()
    if current != migrate.head_revision():
        raise click.ClickException(
            f"the database schema is at {current or 'nothing'}, this build needs {migrate.head_revision()}: "
            "run `fhir-server migrate` first"
        )
    scheme = "https" if tls else "http"
    click.echo(f"fhir-server listening on {scheme}://{_host_for_url(settings.host)}:{settings.port}/fhir/default", err=True)
    run(settings)


def _check_transport(settings: Settings) -> bool:
    """True when the server itself speaks TLS. Production needs TLS here or a TLS-terminating proxy in front."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise click.ClickException("--tls-cert and --tls-key (FHIR_TLS_CERT, FHIR_TLS_KEY) go together")
    if settings.tls_cert and settings.tls_key:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(settings.tls_cert, settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise click.ClickException(f"cannot use the TLS certificate and key: {exc}") from None
        return True
    if settings.production and not settings.trusted_proxy:
        raise click.ClickException(
            "refusing to serve plain HTTP in production: give --tls-cert and --tls-key, or set FHIR_TRUSTED_PROXY "
            "to the address of the TLS-terminating proxy in front of this server"
        )
    return False


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@main.command()
def migrate() -> None:
    """Apply database migrations (as the table owner) and give every tenant its keys."""
    from fhir_server.security.keys import provider_from_settings
    from fhir_server.storage import migrate as migration

    settings = _settings()
    try:
        provider = provider_from_settings(settings)
        done = migration.upgrade(settings, provider)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    for line in done or ["the database is up to date"]:
        click.echo(line)


@main.group()
def tenants() -> None:
    """Create, list and delete tenants."""


@tenants.command("create")
@click.argument("name")
def tenants_create(name: str) -> None:
    """Add a tenant (served at /fhir/NAME)."""
    from fhir_server.storage import tenants as tenant_store

    engine = _engine(migration_role=True)
    storage = engine.storage
    try:
        with storage.db.transaction(write=True) as conn:
            tenant = tenant_store.create(conn, name, storage.provider)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    cli_audit.record(engine, name, cli_audit.admin_event(name, "tenant-created", f"tenant {name} created"))
    cli_audit.record_server_wide(engine, "tenant-created", f"tenant {name} (id {tenant.id}) created")
    click.echo(f"created tenant {tenant.name} (id {tenant.id})")


@tenants.command("list")
def tenants_list() -> None:
    """List tenants."""
    from fhir_server.storage import tenants as tenant_store

    storage = _storage(_settings())
    with storage.db.transaction(write=False) as conn:
        for t in tenant_store.list_tenants(conn):
            click.echo(f"{t.name}\t{t.status}\tdata-key v{t.data_key_version}")


@tenants.command("delete")
@click.argument("name")
@click.option("--crypto-shred", is_flag=True, required=True, help="Destroy the tenant's keys first (required).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def tenants_delete(name: str, crypto_shred: bool, yes: bool) -> None:
    """Delete a tenant: destroy its keys (its data is unreadable from that moment), then remove its rows."""
    from fhir_server.storage import maintenance
    from fhir_server.storage import tenants as tenant_store

    settings = _settings()
    if name == settings.audit_server_tenant:
        raise click.ClickException(f"{name} holds the server's own audit log; it cannot be deleted")
    if not yes:
        click.confirm(f"Destroy tenant {name!r} and all its data? This cannot be undone", abort=True)
    engine = _engine(settings, migration_role=True)
    storage = engine.storage
    with storage.db.transaction(write=False) as conn:
        found = [t for t in tenant_store.list_tenants(conn) if t.name == name]
    if not found:
        raise click.ClickException(f"no tenant {name!r}")
    tenant = found[0]
    # The server's log records the deletion before the keys go: if it cannot, nothing is destroyed.
    cli_audit.record_server_wide(engine, "tenant-deleted",
                                 f"tenant {name} (id {tenant.id}) deleted: its keys destroyed, then its rows removed",
                                 required=True)
    with storage.db.transaction(write=True) as conn:
        tenant_store.shred_keys(conn, tenant)
    click.echo(f"tenant {name}: keys destroyed; its data can no longer be decrypted")
    with click.progressbar(length=0, label="removing rows", show_pos=True) as bar:
        removed = maintenance.purge_tenant(storage, tenant.id, progress=bar.update)
    click.echo(f"tenant {name}: {removed} rows removed")


@main.command()
@click.option("--tenant", "tenant_name", required=True)
@click.option("--type", "types", multiple=True, help="Resource type(s) to reindex (default: every type).")
def reindex(tenant_name: str, types: tuple[str, ...]) -> None:
    """Extract the search index of stored resources again (resumable; also makes custom parameters usable)."""
    import json
    import time

    from sqlalchemy import select

    from fhir_server.capability.registry import load_registry
    from fhir_server.engine import reindex as jobs
    from fhir_server.engine.custom_params import create_job
    from fhir_server.engine.engine import Engine
    from fhir_server.storage import schema
    from fhir_server.storage.tenants import TenantNotFound

    settings = _settings()
    storage = _storage(settings)
    engine = Engine(load_registry(), storage, settings)
    wanted = sorted(set(types)) if types else list(engine.registry.resource_types)
    for t in wanted:
        if not engine.registry.is_resource_type(t):
            raise click.ClickException(f"unknown resource type {t!r}")
    J = schema.reindex_jobs
    try:
        with storage.session(tenant_name, write=True) as repo:
            existing = repo.conn.execute(
                select(J.c.id).where(J.c.tenant_id == repo.tenant.id, J.c.status.in_(("pending", "running")),
                                     J.c.types == json.dumps(wanted)).order_by(J.c.id)
            ).first()
            job_id = existing.id if existing is not None else create_job(repo, wanted)
    except TenantNotFound:
        raise click.ClickException(f"no tenant {tenant_name!r}") from None
    owner = jobs.owner_id()
    with storage.db.transaction(write=False) as conn:
        job = conn.execute(select(J).where(J.c.id == job_id)).one()
    click.echo(f"reindex job {job_id}: {job.total} resources of {len(wanted)} type(s)" + (" (resuming)" if existing else ""), err=True)
    with click.progressbar(length=max(job.total, 1), label="reindexing", show_pos=True, file=sys.stderr) as bar:
        bar.update(min(job.processed, job.total))
        while True:
            if jobs.claim(engine, job_id, owner):
                status = jobs.run(engine, job_id, owner, progress=bar.update)
                if status == "done":
                    break
            with storage.db.transaction(write=False) as conn:
                job = conn.execute(select(J).where(J.c.id == job_id)).one()
            if job.status == "done":
                break
            time.sleep(1)  # another worker holds the lease: follow its progress
    with storage.db.transaction(write=False) as conn:
        job = conn.execute(select(J).where(J.c.id == job_id)).one()
    click.echo(f"reindex job {job_id}: {job.status}, {job.processed} resources indexed")


@main.group()
def keys() -> None:
    """Rotate data keys and master keys; re-encrypt."""


@keys.command("rotate")
@click.option("--tenant", "tenant_name", required=True)
def keys_rotate(tenant_name: str) -> None:
    """Add a data-key version for a tenant; new writes use it, older versions stay readable."""
    from fhir_server.storage import tenants as tenant_store

    engine = _engine(migration_role=True)
    storage = engine.storage
    try:
        # The rotation and its audit record commit together (the record is sealed with the key it replaces).
        with storage.session(tenant_name, write=True, exclusive=True) as repo:
            version = tenant_store.rotate_data_key(repo.conn, repo.tenant, storage.provider)
            repo.pending_audit.append(cli_audit.admin_event(
                tenant_name, "data-key-rotated", f"data key version {version} is now used for new writes"))
    except tenant_store.TenantNotFound:
        raise click.ClickException(f"no tenant {tenant_name!r}") from None
    click.echo(f"tenant {tenant_name}: data key version {version} is now used for new writes")


@keys.command("reencrypt")
@click.option("--tenant", "tenant_name", required=True)
@click.option("--batch-size", default=500, show_default=True)
def keys_reencrypt(tenant_name: str, batch_size: int) -> None:
    """Re-seal every stored version under the tenant's current data key (resumable)."""
    from fhir_server.storage import maintenance
    from fhir_server.storage.tenants import TenantNotFound

    engine = _engine(migration_role=True)
    storage = engine.storage
    try:
        storage.audit_log.chain(tenant_name)  # audit records still pending become versions to re-seal too
        total = maintenance.count_stale_versions(storage, tenant_name)
        with click.progressbar(length=total, label="re-encrypting", show_pos=True, file=sys.stderr) as bar:
            done = maintenance.reencrypt(storage, tenant_name, batch_size=batch_size, progress=bar.update)
    except TenantNotFound:
        raise click.ClickException(f"no tenant {tenant_name!r}") from None
    cli_audit.record(engine, tenant_name, cli_audit.admin_event(tenant_name, "reencrypted",
                                                               f"{done} versions re-sealed under the current data key"))
    click.echo(f"tenant {tenant_name}: {done} versions re-encrypted")


@keys.command("rotate-master")
@click.option("--new-key-file", type=click.Path(path_type=Path), help="Take the new master key from this file.")
def keys_rotate_master(new_key_file: Path | None) -> None:
    """Re-wrap every tenant key under a new master key (data keys and data are unchanged)."""
    from fhir_server.security.keys import LocalKeyProvider, key_file_path, read_key_file, write_key_file
    from fhir_server.storage import tenants as tenant_store

    settings = _settings()
    engine = _engine(settings, migration_role=True)
    storage = engine.storage
    old = storage.provider
    path = key_file_path(settings)
    if new_key_file is not None:
        new_key = read_key_file(new_key_file)[0]
    elif path is not None:
        new_key = os.urandom(32)
    else:
        raise click.ClickException("the master key comes from FHIR_MASTER_KEY: pass --new-key-file with the new key")
    if path is not None:
        # Keep the old keys in the file until every wrapped key has moved: a crash leaves both usable.
        existing = read_key_file(path)
        write_key_file(path, [new_key, *[k for k in existing if k != new_key]])
    new = LocalKeyProvider([new_key], source="new master key")
    count = 0
    with storage.db.transaction(write=True) as conn:
        rewrapped = [t.name for t in tenant_store.list_tenants(conn) if t.status == "active"]
        for tenant in tenant_store.list_tenants(conn):
            count += tenant_store.rewrap_keys(conn, tenant, old, new)
    if path is not None:
        write_key_file(path, [new_key])
    storage.provider = storage.keyring.provider = new  # the records below are sealed with keys it now unwraps
    storage.keyring.forget_all()
    for name in rewrapped:
        cli_audit.record(engine, name, cli_audit.admin_event(name, "master-key-rotated",
                                                             "the tenant's keys were re-wrapped under a new master key"))
    cli_audit.record_server_wide(engine, "master-key-rotated", f"{count} tenant keys re-wrapped")
    if path is not None:
        click.echo(f"re-wrapped {count} keys; {path} now holds only the new master key")
    else:
        click.echo(f"re-wrapped {count} keys; set FHIR_MASTER_KEY to the key in {new_key_file} and restart the server")


@keys.command("generate-master")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Key file to create (mode 0600).")
def keys_generate_master(output: Path) -> None:
    """Create a master key file for FHIR_MASTER_KEY_FILE."""
    from fhir_server.security.keys import write_key_file

    if output.exists():
        raise click.ClickException(f"{output} exists; refusing to overwrite a master key")
    write_key_file(output, [os.urandom(32)])
    click.echo(f"wrote a new master key to {output} (mode 0600); back it up: without it the data is lost")


def _register_auth_commands() -> None:
    from fhir_server import cli_auth

    cli_auth.register(main)
    tenants.add_command(cli_auth.tenants_require_mfa)
    main.add_command(cli_audit.audit)
    from fhir_server import cli_hl7

    main.add_command(cli_hl7.hl7)


_register_auth_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
