"""A keyed digest of each resource's current content, so an update that changes nothing writes nothing.

NULL for rows written before this revision (and for AuditEvents, which are never updated): their next
update is written as before, and sets it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # On PostgreSQL the column goes to every partition with the parent (no rewrite: NULL default).
    with op.batch_alter_table("resources") as batch:
        batch.add_column(sa.Column("content_digest", sa.LargeBinary(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("resources") as batch:
        batch.drop_column("content_digest")
