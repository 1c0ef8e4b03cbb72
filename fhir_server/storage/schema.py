"""The database schema, as SQLAlchemy Core tables.

Every tenant table carries ``tenant_id`` first in its primary key and its indexes.
Times are integers (microseconds since the Unix epoch, UTC) so that SQLite and
PostgreSQL sort and compare them alike. Resource bodies are ciphertext.

The DDL itself lives in the Alembic migrations (``migrations/versions``); a test
checks that a migrated database matches these tables.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
)

metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(63), nullable=False, unique=True),
    Column("status", String(16), nullable=False),  # active | deleting
    Column("created_at", BigInteger, nullable=False),
    Column("data_key_version", Integer, nullable=False),  # the data-key version used for new writes
)

# Keys of a tenant, each wrapped (encrypted) by a master key. purpose: "data" keys seal
# resource bodies and are rotated; the "index" key derives blind-index keys and is not.
tenant_keys = Table(
    "tenant_keys",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("purpose", String(8), nullable=False),
    Column("version", Integer, nullable=False),
    Column("master_key_id", String(64), nullable=False),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", "purpose", "version", name="pk_tenant_keys"),
)

# The current state of every resource: found by primary key without touching history.
resources = Table(
    "resources",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False),
    PrimaryKeyConstraint("tenant_id", "res_type", "res_id", name="pk_resources"),
    Index("ix_resources_type_updated", "tenant_id", "res_type", "last_updated"),
)

# Every version ever written, sealed. A deletion is a version with no body.
resource_versions = Table(
    "resource_versions",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("method", String(8), nullable=False),  # POST | PUT | PATCH | DELETE
    Column("deleted", Boolean, nullable=False),
    Column("key_version", Integer, nullable=False),
    Column("body", LargeBinary, nullable=True),
    PrimaryKeyConstraint("tenant_id", "res_type", "res_id", "version", name="pk_resource_versions"),
    Index("ix_versions_updated", "tenant_id", "last_updated"),
    Index("ix_versions_type_updated", "tenant_id", "res_type", "last_updated"),
)

# Tables whose rows belong to one tenant: partitioned and row-level secured on PostgreSQL.
TENANT_TABLES = ("tenant_keys", "resources", "resource_versions")
