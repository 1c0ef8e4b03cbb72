"""HL7 v2 messages as received: stored sealed before processing, with their status and ACK.

On PostgreSQL hash-partitioned by tenant with forced row-level security, like every tenant table.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from fhir_server.storage import pgddl

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pg = pgddl.is_postgres()
    kwargs: dict[str, Any] = pgddl.tenant_table_kwargs() if pg else {}
    op.create_table(
        "hl7_messages",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("received", sa.BigInteger, nullable=False),
        sa.Column("updated", sa.BigInteger, nullable=False),
        sa.Column("dedupe", sa.LargeBinary(32), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(24), nullable=True),
        sa.Column("error_code", sa.String(8), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("owner", sa.String(96), nullable=True),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("ack_key_version", sa.Integer, nullable=True),
        sa.Column("ack", sa.LargeBinary, nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_hl7_messages"),
        **kwargs,
    )
    op.create_index("ix_hl7_messages_dedupe", "hl7_messages", ["tenant_id", "dedupe"], unique=True)
    op.create_index("ix_hl7_messages_status", "hl7_messages", ["tenant_id", "status", "received"])
    if pg:
        pgddl.create_partitions("hl7_messages")
        pgddl.secure("hl7_messages")


def downgrade() -> None:
    op.drop_table("hl7_messages")
