"""The migrations produce exactly the schema the code queries, and the default tenant."""

from __future__ import annotations

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
