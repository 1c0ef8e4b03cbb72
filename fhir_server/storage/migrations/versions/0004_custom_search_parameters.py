"""Custom search parameters: the tenant's search epoch, parameter readiness, reindex jobs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from fhir_server.storage import pgddl

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pg = pgddl.is_postgres()
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("search_epoch", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "search_param_state",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("res_type", sa.String(64), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("job_id", sa.Integer, nullable=True),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "res_type", "code", name="pk_search_param_state"),
        **(pgddl.tenant_table_kwargs() if pg else {}),
    )
    op.create_table(
        "reindex_jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("types", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("cursor_type", sa.String(64), nullable=True),
        sa.Column("cursor_id", sa.String(64), nullable=True),
        sa.Column("processed", sa.BigInteger, nullable=False),
        sa.Column("total", sa.BigInteger, nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_reindex_jobs_status", "reindex_jobs", ["status", "lease_until"])
    if pg:
        pgddl.create_partitions("search_param_state")
        pgddl.secure("search_param_state")


def downgrade() -> None:
    op.drop_table("reindex_jobs")
    op.drop_table("search_param_state")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("search_epoch")
