"""Tenants and their keys.

A tenant is a name (lowercase letters, digits and hyphens, 1 to 63 characters)
and a numeric id that every tenant row carries. Each tenant has data keys (one
per key version; new writes use the newest) and an index key, stored wrapped by
the master key. ``KeyRing`` unwraps them on demand and caches them per process.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Connection, delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from fhir_server.clock import now_us
from fhir_server.security import crypto
from fhir_server.security.keys import KeyProvider
from fhir_server.storage import schema
from fhir_server.storage.database import TENANT_SETTING, Database

TENANT_NAME = re.compile(r"[a-z0-9-]{1,63}")
DATA = "data"
INDEX = "index"
AUDIT = "audit"  # the Ed25519 seed that signs the audit log's checkpoints
# Tenant tables in the order a purge empties them (keys last: they were shredded already).
PURGE_ORDER = (*schema.INDEX_TABLES, "search_param_state", "resource_versions", "resources", "reindex_jobs",
               *schema.OAUTH_TABLES, *schema.AUDIT_TABLES, *schema.HL7_TABLES, "tenant_keys")


class TenantNotFound(Exception):
    pass


class InvalidTenantName(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Tenant:
    id: int
    name: str
    status: str
    data_key_version: int
    search_epoch: int = 0


def check_name(name: str) -> str:
    if not TENANT_NAME.fullmatch(name):
        raise InvalidTenantName(
            f"invalid tenant name {name[:80]!r}: use 1 to 63 lowercase letters, digits and hyphens"
        )
    return name


def bind_tenant(conn: Connection, tenant_id: int) -> None:
    """Bind this transaction to a tenant: on PostgreSQL, row-level security then admits only its rows."""
    if conn.dialect.name == "postgresql":
        local = not conn.info.get("fhir_autocommit")
        conn.execute(text("SELECT set_config(:k, :v, :local)"), {"k": TENANT_SETTING, "v": str(tenant_id), "local": local})


# One round trip: resolve the tenant and bind row-level security to it. The setting is always
# written, empty when the tenant is unknown or inactive, so no earlier binding can linger.
_LOOKUP_PG = text(
    "SELECT t.id, t.status, t.data_key_version, t.search_epoch, "
    "set_config('" + TENANT_SETTING + "', COALESCE(CASE WHEN t.status = 'active' THEN CAST(t.id AS TEXT) END, ''), :local) "
    "FROM (SELECT 1) AS one LEFT JOIN tenants AS t ON t.name = :name"
)
# Writers share-lock the tenant row for their transaction: a write of a SearchParameter (which updates
# search_epoch) waits for the writes in flight, and writes after it see the new epoch, so no resource is
# indexed with a stale set of custom parameters behind the reindex job's back.
_LOOKUP_PG_WRITE = (
    "SELECT id, status, data_key_version, search_epoch, "
    "set_config('" + TENANT_SETTING + "', CAST(id AS TEXT), true) "
    "FROM tenants WHERE name = :name AND status = 'active' "
)
_LOOKUP_PG_SHARE = text(_LOOKUP_PG_WRITE + "FOR SHARE")
_LOOKUP_PG_UPDATE = text(_LOOKUP_PG_WRITE + "FOR UPDATE")
_LOOKUP = text("SELECT id, status, data_key_version, search_epoch FROM tenants WHERE name = :name")


def lookup(conn: Connection, name: str) -> Tenant:
    """The active tenant called ``name``, bound to this transaction; TenantNotFound otherwise."""
    if not TENANT_NAME.fullmatch(name):
        raise TenantNotFound(name)
    if conn.dialect.name == "postgresql":
        lock = conn.info.get("fhir_lock_tenant")
        if conn.info.get("fhir_write") and lock != "none":
            stmt = _LOOKUP_PG_UPDATE if lock == "update" else _LOOKUP_PG_SHARE
            row = conn.execute(stmt, {"name": name}).first()
        else:
            row = conn.execute(_LOOKUP_PG, {"name": name, "local": not conn.info.get("fhir_autocommit")}).first()
    else:
        row = conn.execute(_LOOKUP, {"name": name}).first()
    if row is None or row.id is None or row.status != "active":
        raise TenantNotFound(name)
    return Tenant(row.id, name, row.status, row.data_key_version, row.search_epoch)


def list_tenants(conn: Connection) -> list[Tenant]:
    t = schema.tenants
    rows = conn.execute(select(t.c.id, t.c.name, t.c.status, t.c.data_key_version).order_by(t.c.name))
    return [Tenant(r.id, r.name, r.status, r.data_key_version) for r in rows]


def create(conn: Connection, name: str, provider: KeyProvider) -> Tenant:
    check_name(name)
    t = schema.tenants
    if conn.execute(select(t.c.id).where(t.c.name == name)).first() is not None:
        raise ValueError(f"tenant {name!r} already exists")
    tenant_id = conn.execute(
        insert(t).values(name=name, status="active", created_at=now_us(), data_key_version=0).returning(t.c.id)
    ).scalar_one()
    ensure_keys(conn, Tenant(tenant_id, name, "active", 0), provider)
    return Tenant(tenant_id, name, "active", 1)


def ensure_keys(conn: Connection, tenant: Tenant, provider: KeyProvider) -> bool:
    """Give a tenant its first data key and its index key if it has none. True if keys were made."""
    bind_tenant(conn, tenant.id)
    k = schema.tenant_keys
    have = {r.purpose for r in conn.execute(select(k.c.purpose).where(k.c.tenant_id == tenant.id))}
    made = False
    for purpose in (DATA, INDEX):
        if purpose not in have:
            _insert_key(conn, tenant.id, purpose, 1, provider)
            made = True
    if tenant.data_key_version == 0:
        conn.execute(update(schema.tenants).where(schema.tenants.c.id == tenant.id).values(data_key_version=1))
    return made


def _insert_key(conn: Connection, tenant_id: int, purpose: str, version: int, provider: KeyProvider) -> None:
    key_id, wrapped = provider.wrap(crypto.new_key(), crypto.key_wrap_context(tenant_id, purpose, version))
    conn.execute(
        insert(schema.tenant_keys).values(
            tenant_id=tenant_id,
            purpose=purpose,
            version=version,
            master_key_id=key_id,
            wrapped_key=wrapped,
            created_at=now_us(),
        )
    )


def rotate_data_key(conn: Connection, tenant: Tenant, provider: KeyProvider) -> int:
    """Add a data-key version and make it the one new writes use. Returns the new version."""
    bind_tenant(conn, tenant.id)
    k = schema.tenant_keys
    current = conn.execute(
        select(func.max(k.c.version)).where(k.c.tenant_id == tenant.id, k.c.purpose == DATA)
    ).scalar_one()
    version = int(current or 0) + 1
    _insert_key(conn, tenant.id, DATA, version, provider)
    conn.execute(update(schema.tenants).where(schema.tenants.c.id == tenant.id).values(data_key_version=version))
    return version


def rewrap_keys(conn: Connection, tenant: Tenant, old: KeyProvider, new: KeyProvider) -> int:
    """Re-wrap every key of a tenant under the new master key; the data keys themselves do not change."""
    bind_tenant(conn, tenant.id)
    k = schema.tenant_keys
    rows = conn.execute(
        select(k.c.purpose, k.c.version, k.c.master_key_id, k.c.wrapped_key).where(k.c.tenant_id == tenant.id)
    ).all()
    for r in rows:
        context = crypto.key_wrap_context(tenant.id, r.purpose, r.version)
        key = old.unwrap(r.master_key_id, r.wrapped_key, context)
        key_id, wrapped = new.wrap(key, context)
        conn.execute(
            update(k)
            .where(k.c.tenant_id == tenant.id, k.c.purpose == r.purpose, k.c.version == r.version)
            .values(master_key_id=key_id, wrapped_key=wrapped)
        )
    return len(rows)


def audit_signing_keys(conn: Connection, tenant_id: int, provider: KeyProvider, *, create: bool) -> dict[int, bytes]:
    """The tenant's audit signing keys (32-byte Ed25519 seeds) by version; with ``create``, the first one is made
    when there is none (inside the caller's transaction, which holds the tenant's audit head lock)."""
    bind_tenant(conn, tenant_id)
    k = schema.tenant_keys
    rows = conn.execute(
        select(k.c.version, k.c.master_key_id, k.c.wrapped_key).where(k.c.tenant_id == tenant_id, k.c.purpose == AUDIT)
    ).all()
    if not rows and create:
        _insert_key(conn, tenant_id, AUDIT, 1, provider)
        return audit_signing_keys(conn, tenant_id, provider, create=False)
    return {r.version: provider.unwrap(r.master_key_id, r.wrapped_key, crypto.key_wrap_context(tenant_id, AUDIT, r.version))
            for r in rows}


def shred_keys(conn: Connection, tenant: Tenant) -> None:
    """Crypto-shred: mark the tenant deleted and destroy its keys; its rows can never be opened again."""
    bind_tenant(conn, tenant.id)
    conn.execute(update(schema.tenants).where(schema.tenants.c.id == tenant.id).values(status="deleting"))
    conn.execute(delete(schema.tenant_keys).where(schema.tenant_keys.c.tenant_id == tenant.id))


class KeyRing:
    """Unwrapped tenant keys, cached per process for ``cache_seconds``."""

    def __init__(self, db: Database, provider: KeyProvider, cache_seconds: int) -> None:
        self.db = db
        self.provider = provider
        self.cache_seconds = cache_seconds
        self._cache: dict[int, tuple[float, crypto.TenantKeys]] = {}
        self._lock = threading.Lock()

    def keys_for(self, conn: Connection, tenant: Tenant) -> crypto.TenantKeys:
        cached = self._cache.get(tenant.id)
        if (
            cached is not None
            and cached[1].write_version == tenant.data_key_version
            and time.monotonic() - cached[0] < self.cache_seconds
        ):
            return cached[1]
        keys = self._load(conn, tenant)
        if keys is None:
            if conn.info.get("fhir_write"):
                # Already the writer (SQLite allows one): make the keys in this transaction.
                ensure_keys(conn, tenant, self.provider)
                keys = self._load(conn, Tenant(tenant.id, tenant.name, tenant.status, max(1, tenant.data_key_version)))
            else:
                self._create_missing(tenant)
                keys = self._load(conn, tenant, fresh_connection=True)
            if keys is None:
                raise crypto.IntegrityError(f"tenant {tenant.name} has no keys")
        with self._lock:
            self._cache[tenant.id] = (time.monotonic(), keys)
        return keys

    def forget(self, tenant_id: int) -> None:
        with self._lock:
            self._cache.pop(tenant_id, None)

    def forget_all(self) -> None:
        with self._lock:
            self._cache.clear()

    def _load(self, conn: Connection, tenant: Tenant, *, fresh_connection: bool = False) -> crypto.TenantKeys | None:
        if fresh_connection:
            with self.db.transaction(write=False) as fresh:
                bind_tenant(fresh, tenant.id)
                row = fresh.execute(
                    select(schema.tenants.c.data_key_version).where(schema.tenants.c.id == tenant.id)
                ).scalar_one()
                return self._load(fresh, Tenant(tenant.id, tenant.name, tenant.status, row))
        k = schema.tenant_keys
        rows = conn.execute(
            select(k.c.purpose, k.c.version, k.c.master_key_id, k.c.wrapped_key).where(k.c.tenant_id == tenant.id)
        ).all()
        data: dict[int, bytes] = {}
        index: bytes | None = None
        for r in rows:
            key = self.provider.unwrap(
                r.master_key_id, r.wrapped_key, crypto.key_wrap_context(tenant.id, r.purpose, r.version)
            )
            if r.purpose == DATA:
                data[r.version] = key
            elif r.purpose == INDEX:
                index = key
        if index is None or tenant.data_key_version not in data:
            return None
        return crypto.TenantKeys(tenant.id, tenant.data_key_version, data, index)

    def _create_missing(self, tenant: Tenant) -> None:
        try:
            with self.db.transaction(write=True) as conn:
                current = conn.execute(
                    select(schema.tenants.c.data_key_version).where(schema.tenants.c.id == tenant.id)
                ).scalar_one()
                ensure_keys(conn, Tenant(tenant.id, tenant.name, tenant.status, current), self.provider)
        except IntegrityError:
            pass  # another process created them first
