"""Search index tables: blind-indexed hashes, dates, numbers, quantities, references.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from fhir_server.storage import pgddl

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLES = ("idx_hash", "idx_date", "idx_number", "idx_quantity", "idx_reference")


def _owner_columns() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("res_type", sa.String(64), nullable=False),
        sa.Column("res_id", sa.String(64), nullable=False),
        sa.Column("param_key", sa.BigInteger, nullable=False),
    ]


def upgrade() -> None:
    pg = pgddl.is_postgres()
    part = pgddl.tenant_table_kwargs() if pg else {}
    with op.batch_alter_table("resources") as batch:
        batch.add_column(sa.Column("index_mask", sa.SmallInteger, nullable=False, server_default="0"))
    op.create_table(
        "idx_hash",
        *_owner_columns(),
        sa.Column("hash", sa.LargeBinary(16), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "res_type", "res_id", "param_key", "hash", name="pk_idx_hash"),
        **part,
    )
    op.create_index("ix_idx_hash_lookup", "idx_hash", ["tenant_id", "param_key", "hash", "res_id"])
    op.create_table(
        "idx_date",
        *_owner_columns(),
        sa.Column("low", sa.BigInteger, nullable=False),
        sa.Column("high", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "res_type", "res_id", "param_key", "low", "high", name="pk_idx_date"),
        **part,
    )
    op.create_index("ix_idx_date_low", "idx_date", ["tenant_id", "param_key", "low"])
    op.create_index("ix_idx_date_high", "idx_date", ["tenant_id", "param_key", "high"])
    op.create_table(
        "idx_number",
        *_owner_columns(),
        sa.Column("low", sa.Float, nullable=False),
        sa.Column("high", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "res_type", "res_id", "param_key", "low", "high", name="pk_idx_number"),
        **part,
    )
    op.create_index("ix_idx_number_low", "idx_number", ["tenant_id", "param_key", "low"])
    op.create_table(
        "idx_quantity",
        *_owner_columns(),
        sa.Column("low", sa.Float, nullable=False),
        sa.Column("high", sa.Float, nullable=False),
        sa.Column("system_code_hash", sa.LargeBinary(16), nullable=True),
        sa.Column("code_hash", sa.LargeBinary(16), nullable=True),
        sa.Column("unit_hash", sa.LargeBinary(16), nullable=True),
        sa.Column("canonical", sa.Boolean, nullable=False),
        **part,
    )
    op.create_index("ix_idx_quantity_res", "idx_quantity", ["tenant_id", "res_type", "res_id"])
    op.create_index("ix_idx_quantity_low", "idx_quantity", ["tenant_id", "param_key", "low"])
    op.create_table(
        "idx_reference",
        *_owner_columns(),
        sa.Column("target_type", sa.String(64), nullable=True),
        sa.Column("target_id", sa.String(64), nullable=True),
        sa.Column("target_version", sa.String(64), nullable=True),
        sa.Column("url", sa.String(4096), nullable=True),
        sa.Column("url_hash", sa.LargeBinary(16), nullable=True),
        **part,
    )
    op.create_index("ix_idx_reference_res", "idx_reference", ["tenant_id", "res_type", "res_id"])
    op.create_index("ix_idx_reference_target", "idx_reference", ["tenant_id", "param_key", "target_id", "target_type"])
    op.create_index("ix_idx_reference_any_target", "idx_reference", ["tenant_id", "target_type", "target_id"])
    op.create_index("ix_idx_reference_url", "idx_reference", ["tenant_id", "param_key", "url_hash"])
    if pg:
        for table in TABLES:
            pgddl.create_partitions(table)
            pgddl.secure(table)
        pgddl.statistics_target("idx_hash", "hash", 2000)
        pgddl.statistics_target("idx_reference", "target_id", 1000)


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
    with op.batch_alter_table("resources") as batch:
        batch.drop_column("index_mask")
