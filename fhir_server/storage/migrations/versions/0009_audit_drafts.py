"""Pending audit records that a read's own statement wrote before the read's outcome was known (drafts).

On PostgreSQL a read's AuditEvent is written by the statement that reads the resource, with the version it
found and the
patients whose record it is in (as indexed); the chainer completes the record (version, patients, outcome) before it chains it. NULL in every row
written before this revision, and in every other record.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_pending") as batch:
        batch.add_column(sa.Column("draft", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("read_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("read_deleted", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("read_patients", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_pending") as batch:
        batch.drop_column("read_patients")
        batch.drop_column("read_deleted")
        batch.drop_column("read_version")
        batch.drop_column("draft")
