"""Composite search parameters with range components: idx_composite.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from fhir_server.storage import pgddl

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pg = pgddl.is_postgres()
    op.create_table(
        "idx_composite",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("res_type", sa.String(64), nullable=False),
        sa.Column("res_id", sa.String(64), nullable=False),
        sa.Column("param_key", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.LargeBinary(16), nullable=False),
        sa.Column("low", sa.Float, nullable=False),
        sa.Column("high", sa.Float, nullable=False),
        sa.Column("low2", sa.Float, nullable=True),
        sa.Column("high2", sa.Float, nullable=True),
        sa.Column("system_code_hash", sa.LargeBinary(16), nullable=True),
        sa.Column("code_hash", sa.LargeBinary(16), nullable=True),
        sa.Column("unit_hash", sa.LargeBinary(16), nullable=True),
        sa.Column("canonical", sa.Boolean, nullable=False),
        **(pgddl.tenant_table_kwargs() if pg else {}),
    )
    op.create_index("ix_idx_composite_res", "idx_composite", ["tenant_id", "res_type", "res_id"])
    op.create_index("ix_idx_composite_lookup", "idx_composite", ["tenant_id", "param_key", "hash"])
    if pg:
        pgddl.create_partitions("idx_composite")
        pgddl.secure("idx_composite")


def downgrade() -> None:
    op.drop_table("idx_composite")
