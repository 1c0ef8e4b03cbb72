"""The audit log: pending records, records waiting for their index, the hash chain, its head, signed checkpoints,
and the monitoring marks.

On PostgreSQL every table is hash-partitioned by tenant with forced row-level security, and the
application role may only read and append the chain and its checkpoints (migrate.py revokes UPDATE and
DELETE on them after granting data access).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from fhir_server.storage import pgddl

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TABLES = ("audit_pending", "audit_unindexed", "audit_legacy", "audit_log", "audit_heads", "audit_checkpoints",
          "audit_alert_marks")


def upgrade() -> None:
    pg = pgddl.is_postgres()
    kwargs: dict[str, Any] = pgddl.tenant_table_kwargs() if pg else {}
    op.create_table(
        "audit_pending",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("res_id", sa.String(64), nullable=False),
        sa.Column("recorded", sa.BigInteger, nullable=False),
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "res_id", name="pk_audit_pending"),
        **kwargs,
    )
    op.create_table(
        "audit_unindexed",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("res_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "res_id", name="pk_audit_unindexed"),
        **kwargs,
    )
    op.create_table(
        "audit_legacy",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("res_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "res_id", name="pk_audit_legacy"),
        **kwargs,
    )
    op.create_table(
        "audit_log",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("res_id", sa.String(64), nullable=False),
        sa.Column("recorded", sa.BigInteger, nullable=False),
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("prev_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "seq", name="pk_audit_log"),
        **kwargs,
    )
    op.create_index("ix_audit_log_res", "audit_log", ["tenant_id", "res_id"], unique=True)
    op.create_index("ix_audit_log_recorded", "audit_log", ["tenant_id", "recorded"])
    op.create_table(
        "audit_heads",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.Column("checkpoint_seq", sa.BigInteger, nullable=False),
        sa.Column("checkpoint_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_audit_heads"),
        **kwargs,
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.Column("signed_at", sa.BigInteger, nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("signature", sa.LargeBinary(64), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "seq", name="pk_audit_checkpoints"),
        **kwargs,
    )
    op.create_table(
        "audit_alert_marks",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("rule", sa.String(32), nullable=False),
        sa.Column("subject", sa.LargeBinary(16), nullable=False),
        sa.Column("window_start", sa.BigInteger, nullable=False),
        sa.Column("item", sa.LargeBinary(16), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "rule", "subject", "window_start", "item", name="pk_audit_alert_marks"),
        **kwargs,
    )
    if pg:
        for name in TABLES:
            pgddl.create_partitions(name)
            pgddl.secure(name)
    _keep_legacy_audit_events(pg)


def _keep_legacy_audit_events(pg: bool) -> None:
    """Clients could create AuditEvents before the server kept its own log: list them as legacy, so that the log's
    verification does not take them for records inserted behind its back (row-level security is forced even on
    the owner: bind each tenant in turn)."""
    conn = op.get_bind()
    for (tid,) in conn.execute(sa.text("SELECT id FROM tenants")).all():
        if pg:
            conn.execute(sa.text("SELECT set_config('fhir.tenant_id', :t, true)"), {"t": str(tid)})
        conn.execute(sa.text("INSERT INTO audit_legacy (tenant_id, res_id) SELECT tenant_id, res_id FROM resources "
                             "WHERE tenant_id = :t AND res_type = 'AuditEvent'"), {"t": tid})
    if pg:
        conn.execute(sa.text("SELECT set_config('fhir.tenant_id', '', true)"))


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
