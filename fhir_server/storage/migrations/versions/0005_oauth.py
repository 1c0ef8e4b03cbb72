"""SMART on FHIR authorization: clients, users, codes, tokens, launches, assertion ids, sessions, signing keys.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from fhir_server.storage import pgddl

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ('oauth_clients', 'oauth_users', 'oauth_codes', 'oauth_tokens', 'oauth_launches', 'oauth_jtis', 'oauth_sessions', 'oauth_keys')


def upgrade() -> None:
    pg = pgddl.is_postgres()
    kwargs: dict[str, Any] = pgddl.tenant_table_kwargs() if pg else {}
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("require_mfa", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_table(
        "oauth_clients",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("secret_hash", sa.LargeBinary(32), nullable=True),
        sa.Column("redirect_uris", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("jwks", sa.Text, nullable=True),
        sa.Column("jwks_uri", sa.Text, nullable=True),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "client_id", name="pk_oauth_clients"),
        **kwargs,
    )
    op.create_table(
        "oauth_users",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("fhir_user", sa.String(200), nullable=True),
        sa.Column("roles", sa.Text, nullable=False),
        sa.Column("mfa_secret", sa.LargeBinary, nullable=True),
        sa.Column("mfa_required", sa.Boolean, nullable=False),
        sa.Column("mfa_last_step", sa.BigInteger, nullable=False),
        sa.Column("failed_logins", sa.Integer, nullable=False),
        sa.Column("locked_until", sa.BigInteger, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "username", name="pk_oauth_users"),
        **kwargs,
    )
    op.create_table(
        "oauth_codes",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("code_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("grant_id", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("context", sa.Text, nullable=False),
        sa.Column("code_challenge", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("used_at", sa.BigInteger, nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "code_hash", name="pk_oauth_codes"),
        **kwargs,
    )
    op.create_table(
        "oauth_tokens",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("token_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("grant_id", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("username", sa.String(128), nullable=True),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("context", sa.Text, nullable=False),
        sa.Column("issued_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("revoked_at", sa.BigInteger, nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "token_hash", name="pk_oauth_tokens"),
        **kwargs,
    )
    op.create_index("ix_oauth_tokens_grant", "oauth_tokens", ["tenant_id", "grant_id"])
    op.create_table(
        "oauth_launches",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("launch_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("context", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "launch_hash", name="pk_oauth_launches"),
        **kwargs,
    )
    op.create_table(
        "oauth_jtis",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("jti", sa.String(255), nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "client_id", "jti", name="pk_oauth_jtis"),
        **kwargs,
    )
    op.create_table(
        "oauth_sessions",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("session_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("username", sa.String(128), nullable=True),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("pending", sa.Text, nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("last_seen", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "session_hash", name="pk_oauth_sessions"),
        **kwargs,
    )
    op.create_table(
        "oauth_keys",
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("kid", sa.String(64), nullable=False),
        sa.Column("private_key", sa.LargeBinary, nullable=False),
        sa.Column("public_jwk", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "kid", name="pk_oauth_keys"),
        **kwargs,
    )
    if pg:
        for name in TABLES:
            pgddl.create_partitions(name)
            pgddl.secure(name)


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("require_mfa")
