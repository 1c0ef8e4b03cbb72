"""Applying and checking schema migrations (Alembic), programmatically.

Migrations run as the owner of the tables (``FHIR_MIGRATION_DATABASE_URL``, or
the main URL when unset). When the server connects as another role
(``FHIR_DATABASE_URL`` names a different user), that role is granted data
access only: it does not own the tables and cannot bypass row-level security.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

from fhir_server.security.keys import KeyProvider
from fhir_server.settings import Settings
from fhir_server.storage import pgddl, schema, tenants
from fhir_server.storage.database import Database, normalise_url


def _script_location() -> str:
    return str(Path(str(resources.files("fhir_server.storage"))) / "migrations")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", _script_location())
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(settings: Settings, provider: KeyProvider) -> list[str]:
    """Migrate to head, grant the application role, give every tenant its keys. Returns what was done."""
    done: list[str] = []
    owner = Database(settings.effective_migration_url, settings, pooled=False)
    try:
        with owner.engine.connect() as conn:
            before = current_revision(conn)
            cfg = alembic_config(owner.url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
            after = current_revision(conn)
        if before != after:
            done.append(f"schema migrated from {before or 'empty'} to {after}")
        app_user = make_url(normalise_url(settings.effective_database_url)).username
        owner_user = make_url(owner.url).username
        if owner.is_postgres and app_user and app_user != owner_user:
            _grant(owner, app_user)
            done.append(f"granted data access to role {app_user}")
        with owner.transaction(write=True) as conn:
            existing = tenants.list_tenants(conn)
            for tenant in existing:
                if tenant.status == "active" and tenants.ensure_keys(conn, tenant, provider):
                    done.append(f"created keys for tenant {tenant.name}")
            if settings.audit_server_tenant not in {t.name for t in existing}:
                tenants.create(conn, settings.audit_server_tenant, provider)
                done.append(f"created tenant {settings.audit_server_tenant} for the server's own audit log")
    finally:
        owner.dispose()
    return done


def _grant(owner: Database, role: str) -> None:
    quoted = '"' + role.replace('"', '""') + '"'
    with owner.transaction(write=True) as conn:
        conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {quoted}"))
        conn.execute(text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {quoted}"))
        conn.execute(text(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {quoted}"))
        # The audit chain and its checkpoints are append-only for the server: it reads and inserts, never
        # rewrites (the owner's maintenance commands, such as deleting a tenant, still can).
        for table in schema.APPEND_ONLY_TABLES:
            for name in [table, *pgddl.partition_names(table)]:
                conn.execute(text(f"REVOKE UPDATE, DELETE, TRUNCATE ON {name} FROM {quoted}"))
        for table in schema.READ_ONLY_TABLES:
            for name in [table, *pgddl.partition_names(table)]:
                conn.execute(text(f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {name} FROM {quoted}"))


def is_current(conn: Connection) -> bool:
    return current_revision(conn) == head_revision()
