"""PostgreSQL DDL for tenant tables: hash partitions by tenant, and forced row-level security.

Used by the migrations. Row-level security is enabled and forced on the parent
table and on every partition (a query naming a partition directly would
otherwise skip the parent's policy), bound to the per-transaction setting
``fhir.tenant_id``: with the setting absent or wrong, a query sees no rows.
"""

from __future__ import annotations

from typing import Any

from alembic import op

PARTITIONS = 8
TENANT_PREDICATE = "tenant_id = NULLIF(current_setting('fhir.tenant_id', true), '')::integer"


def partition_names(table: str) -> list[str]:
    return [f"{table}_p{i}" for i in range(PARTITIONS)]


def create_partitions(table: str) -> None:
    for i, name in enumerate(partition_names(table)):
        op.execute(
            f"CREATE TABLE {name} PARTITION OF {table} FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i})"
        )


def secure(table: str) -> None:
    for name in [table, *partition_names(table)]:
        op.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {name} USING ({TENANT_PREDICATE}) WITH CHECK ({TENANT_PREDICATE})"
        )


def statistics_target(table: str, column: str, target: int) -> None:
    """A larger sample of a column's most common values (on the parent and every partition), so the
    planner knows that a common code matches many rows (blind indexes hide values, not frequencies)."""
    for name in [table, *partition_names(table)]:
        op.execute(f"ALTER TABLE {name} ALTER COLUMN {column} SET STATISTICS {target}")


def tenant_table_kwargs() -> dict[str, Any]:
    return {"postgresql_partition_by": "HASH (tenant_id)"}


def is_postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"
