"""The migrations produce exactly the schema the code queries, and the default tenant."""

from __future__ import annotations

import base64
import re

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select

from fhir_server.storage import migrate, schema
from fhir_server.storage.store import Storage


def test_migrated_schema_matches_the_tables_in_code(owner_storage: Storage) -> None:
    def not_a_partition(name, type_, parent_names):  # type: ignore[no-untyped-def]
        # PostgreSQL partitions (and their indexes) are tables of their own that the metadata does not list.
        table = name if type_ == "table" else parent_names.get("table_name") or ""
        return re.search(r"_p\d+$", table) is None

    with owner_storage.db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"include_name": not_a_partition})
        diff = compare_metadata(ctx, schema.metadata)
    assert diff == []


def test_schema_is_at_head_and_default_tenant_exists(owner_storage: Storage) -> None:
    with owner_storage.db.transaction(write=False) as conn:
        assert migrate.is_current(conn)
        assert conn.execute(select(schema.tenants.c.name).where(schema.tenants.c.name == "default")).scalar_one() == "default"


def test_upgrade_is_idempotent(settings, owner_storage: Storage) -> None:  # type: ignore[no-untyped-def]
    done = migrate.upgrade(settings, owner_storage.provider)
    assert not any("migrated" in line for line in done)


def test_audit_events_stored_before_the_audit_log_are_listed_as_legacy(fresh_db, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Migration 0006 lists the AuditEvents clients stored before the server kept its own log, in every tenant
    (row-level security is forced on PostgreSQL: each tenant is bound in turn), so verification leaves them be."""
    from alembic import command
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from fhir_server.security.keys import provider_from_settings
    from fhir_server.settings import Settings

    engine = create_engine(migrate.normalise_url(fresh_db.owner_url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            cfg = migrate.alembic_config(fresh_db.owner_url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0005")
            conn.commit()
        with engine.begin() as conn:
            ids = []
            for name in ("older-a", "older-b"):
                ids.append(conn.execute(text("INSERT INTO tenants (name, status, created_at, data_key_version) "
                                             "VALUES (:n, 'active', 0, 1) RETURNING id"), {"n": name}).scalar_one())
            for tid in ids:
                if fresh_db.backend == "postgresql":
                    conn.execute(text("SELECT set_config('fhir.tenant_id', :t, true)"), {"t": str(tid)})
                for res_type, res_id in (("AuditEvent", f"client-event-{tid}"), ("Patient", "p")):
                    conn.execute(text("INSERT INTO resources (tenant_id, res_type, res_id, version, last_updated, deleted) "
                                      "VALUES (:t, :rt, :rid, 1, 0, false)"), {"t": tid, "rt": res_type, "rid": res_id})
        settings = Settings.load(environ={}, env="test", database_url=fresh_db.app_url, migration_database_url=fresh_db.owner_url,
                                 master_key=base64.b64encode(bytes(32)).decode(), data_dir=str(tmp_path), access_log=False)
        migrate.upgrade(settings, provider_from_settings(settings))
        with engine.begin() as conn:
            listed = set()
            for tid in ids:
                if fresh_db.backend == "postgresql":
                    conn.execute(text("SELECT set_config('fhir.tenant_id', :t, true)"), {"t": str(tid)})
                listed |= {tuple(r) for r in conn.execute(text("SELECT tenant_id, res_id FROM audit_legacy WHERE tenant_id = :t"), {"t": tid})}
        assert listed == {(tid, f"client-event-{tid}") for tid in ids}
    finally:
        engine.dispose()
