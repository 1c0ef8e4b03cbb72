"""The storage service: a tenant-bound repository inside one database transaction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from sqlalchemy import text

from fhir_server.security.crypto import Cipher, Sealer
from fhir_server.security.keys import KeyProvider
from fhir_server.settings import Settings
from fhir_server.storage import tenants
from fhir_server.storage.database import Database
from fhir_server.storage.repository import ResourceRepository


# A read unit of work shared by everything one request reads (see Storage.shared_reads).
_shared_read: ContextVar[ResourceRepository | None] = ContextVar("fhir_shared_read", default=None)


class Storage:
    """Opens units of work: one transaction, bound to one tenant, with that tenant's keys."""

    def __init__(self, db: Database, provider: KeyProvider, cipher: Cipher, settings: Settings) -> None:
        self.db = db
        self.provider = provider
        self.cipher = cipher
        self.keyring = tenants.KeyRing(db, provider, settings.key_cache_seconds)

    @contextmanager
    def session(self, tenant_name: str, *, write: bool, exclusive: bool = False) -> Iterator[ResourceRepository]:
        """A repository for ``tenant_name``: committed when the block ends, rolled back if it raises.

        ``exclusive`` locks the tenant row for update (a write that changes the tenant's search
        parameters waits for the writes in flight and holds off new ones until it commits).
        Raises ``tenants.TenantNotFound`` for an unknown or deleted tenant.

        Inside ``shared_reads`` a read session of the same tenant is the shared one (no new connection,
        no second tenant lookup).
        """
        shared = _shared_read.get()
        if shared is not None and not write and shared.tenant.name == tenant_name:
            yield shared
            return
        with self.db.transaction(write=write, binds_tenant_first=True) as conn:
            conn.info["fhir_lock_tenant"] = "update" if exclusive else None
            tenant = tenants.lookup(conn, tenant_name)
            keys = self.keyring.keys_for(conn, tenant)
            yield ResourceRepository(conn, tenant, Sealer(self.cipher, keys))

    @contextmanager
    def shared_reads(self, tenant_name: str) -> Iterator[ResourceRepository]:
        """One read session for a whole read-only request (its bearer token check and the interaction):
        the read sessions opened inside the block, in this thread or context, are this one."""
        with self.session(tenant_name, write=False) as repo:
            token = _shared_read.set(repo)
            try:
                yield repo
            finally:
                _shared_read.reset(token)

    def ping(self) -> None:
        with self.db.transaction(write=False) as conn:
            conn.execute(text("SELECT 1"))
