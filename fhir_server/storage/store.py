"""The storage service: a tenant-bound repository inside one database transaction."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from sqlalchemy import text

from fhir_server.security.crypto import Cipher, Sealer
from fhir_server.security.keys import KeyProvider
from fhir_server.settings import Settings
from fhir_server.storage import tenants
from fhir_server.storage.audit_log import AuditLog, ChainPolicy
from fhir_server.storage.database import Database
from fhir_server.storage.repository import ResourceRepository


# A read unit of work shared by everything one request reads (see Storage.shared_reads).
_shared_read: ContextVar[ResourceRepository | None] = ContextVar("fhir_shared_read", default=None)
# The write unit of work open in this thread or context, if any (see Storage.open_write).
_open_write: ContextVar[ResourceRepository | None] = ContextVar("fhir_open_write", default=None)
# What to do once the shared read unit of work has given its connection back (see Storage.after_shared_reads).
_after_shared: ContextVar[list[Callable[[], None]] | None] = ContextVar("fhir_after_shared_reads", default=None)

# Called as a write unit of work is about to commit, inside its transaction (the audit trail appends the
# records of what it did); returns what to call once it has committed, if anything.
BeforeCommit = Callable[[ResourceRepository], "Callable[[], None] | None"]


class Storage:
    """Opens units of work: one transaction, bound to one tenant, with that tenant's keys."""

    def __init__(self, db: Database, provider: KeyProvider, cipher: Cipher, settings: Settings) -> None:
        self.db = db
        self.provider = provider
        self.cipher = cipher
        self.keyring = tenants.KeyRing(db, provider, settings.key_cache_seconds)
        self.before_commit: BeforeCommit | None = None
        self.audit_log = AuditLog(self, ChainPolicy(settings.audit_checkpoint_records, settings.audit_checkpoint_seconds))

    @contextmanager
    def session(self, tenant_name: str, *, write: bool, exclusive: bool = False, audited: bool = True,
                tenant_lock: bool = True, shared: bool = True) -> Iterator[ResourceRepository]:
        """A repository for ``tenant_name``: committed when the block ends, rolled back if it raises.

        ``exclusive`` locks the tenant row for update (a write that changes the tenant's search
        parameters waits for the writes in flight and holds off new ones until it commits); a write that
        indexes nothing needs no share of that lock (``tenant_lock`` False: the audit chainer, which runs all
        the time, would otherwise keep the tenant row share-locked under every read).
        Raises ``tenants.TenantNotFound`` for an unknown or deleted tenant.

        Inside ``shared_reads`` a read session of the same tenant is the shared one (no new connection,
        no second tenant lookup), unless ``shared`` is False (a read that must see what was committed after the
        shared one began: on SQLite a read transaction keeps the snapshot of its first statement).

        A write unit of work ends, before it commits, with ``before_commit`` (the audit trail's records of
        what was done go into the same transaction), unless ``audited`` is False (the audit trail's own
        writes, and maintenance that records itself).
        """
        shared_repo = _shared_read.get()
        if shared_repo is not None and shared and not write and shared_repo.tenant.name == tenant_name:
            yield shared_repo
            return
        after: Callable[[], None] | None = None
        with self.db.transaction(write=write, binds_tenant_first=True) as conn:
            conn.info["fhir_lock_tenant"] = "update" if exclusive else None if tenant_lock or not write else "none"
            tenant = tenants.lookup(conn, tenant_name)
            keys = self.keyring.keys_for(conn, tenant)
            repo = ResourceRepository(conn, tenant, Sealer(self.cipher, keys))
            if not write:
                yield repo
                return
            token = _open_write.set(repo)
            try:
                yield repo
                if audited and self.before_commit is not None:
                    after = self.before_commit(repo)
                elif repo.pending_audit:
                    raise RuntimeError("audit records queued on a unit of work that has no audit trail to write them")
            finally:
                _open_write.reset(token)
        if after is not None:
            after()

    @staticmethod
    def open_write(tenant_name: str) -> ResourceRepository | None:
        """The write unit of work of ``tenant_name`` open in this thread or context, if any (what is read inside
        it is audited in its transaction: a second writer would wait for it on SQLite)."""
        repo = _open_write.get()
        return repo if repo is not None and repo.tenant.name == tenant_name else None

    @contextmanager
    def shared_reads(self, tenant_name: str) -> Iterator[ResourceRepository]:
        """One read session for a whole read-only request (its bearer token check and the interaction):
        the read sessions opened inside the block, in this thread or context, are this one."""
        callbacks: list[Callable[[], None]] = []
        try:
            with self.session(tenant_name, write=False) as repo:
                token, later = _shared_read.set(repo), _after_shared.set(callbacks)
                try:
                    yield repo
                finally:
                    _shared_read.reset(token)
                    _after_shared.reset(later)
        finally:
            for callback in callbacks:  # the connection is back in the pool: writing now cannot starve it
                callback()

    @staticmethod
    def shared_read(tenant_name: str) -> ResourceRepository | None:
        """The shared read unit of work of ``tenant_name`` open in this thread or context, if any."""
        repo = _shared_read.get()
        return repo if repo is not None and repo.tenant.name == tenant_name else None

    @staticmethod
    def after_shared_reads(tenant_name: str, callback: Callable[[], None]) -> bool:
        """Inside ``shared_reads`` of ``tenant_name``: call ``callback`` when it ends (whether or not its block
        raised), after its connection is released, and return True; outside it, False. A read's audit record is
        committed then, on a connection of its own, so that a thread never holds one connection while it waits for
        a second (with more threads than the pool has connections, that would deadlock)."""
        callbacks, shared = _after_shared.get(), _shared_read.get()
        if callbacks is None or shared is None or shared.tenant.name != tenant_name:
            return False
        callbacks.append(callback)
        return True

    def ping(self) -> None:
        with self.db.transaction(write=False) as conn:
            conn.execute(text("SELECT 1"))
