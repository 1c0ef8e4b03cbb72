"""Tenants, tenant keys, resources and their versions; the default tenant.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from fhir_server.storage import pgddl

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pg = pgddl.is_postgres()
    part = pgddl.tenant_table_kwargs() if pg else {}

    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("data_key_version", sa.Integer, nullable=False),
    )
    op.create_table(
        "tenant_keys",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("purpose", sa.String(8), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("master_key_id", sa.String(64), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "purpose", "version", name="pk_tenant_keys"),
        **part,
    )
    op.create_table(
        "resources",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("res_type", sa.String(64), nullable=False),
        sa.Column("res_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "res_type", "res_id", name="pk_resources"),
        **part,
    )
    op.create_index("ix_resources_type_updated", "resources", ["tenant_id", "res_type", "last_updated"])
    op.create_table(
        "resource_versions",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("res_type", sa.String(64), nullable=False),
        sa.Column("res_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.BigInteger, nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "res_type", "res_id", "version", name="pk_resource_versions"),
        **part,
    )
    op.create_index("ix_versions_updated", "resource_versions", ["tenant_id", "last_updated"])
    op.create_index("ix_versions_type_updated", "resource_versions", ["tenant_id", "res_type", "last_updated"])
    if pg:
        for table in ("tenant_keys", "resources", "resource_versions"):
            pgddl.create_partitions(table)
            pgddl.secure(table)

    # The tenant every installation starts with; its keys are made by `fhir-server migrate`
    # (or on first use), because only the server holds the master key.
    op.bulk_insert(
        tenants,
        [{"name": "default", "status": "active", "created_at": 0, "data_key_version": 0}],
    )


def downgrade() -> None:
    for table in ("resource_versions", "resources", "tenant_keys", "tenants"):
        op.drop_table(table)
