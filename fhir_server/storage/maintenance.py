"""Long-running storage chores: re-encryption after a key rotation, and purging a deleted tenant.

Both work in small batches, each its own short transaction, so they never block
reads or writes for long, and a killed run resumes where it stopped: what a batch
committed stays done, and the next run picks up what remains.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import delete, func, select, tuple_, update

from fhir_server.security.crypto import Sealer
from fhir_server.storage import schema, tenants
from fhir_server.storage.store import Storage

V = schema.resource_versions
Progress = Callable[[int], None]


def count_stale_versions(storage: Storage, tenant_name: str) -> int:
    with storage.session(tenant_name, write=False) as repo:
        keys = repo.sealer.keys
        return int(
            repo.conn.execute(
                select(func.count()).select_from(V).where(
                    V.c.tenant_id == keys.tenant_id, V.c.key_version != keys.write_version, V.c.body.is_not(None)
                )
            ).scalar_one()
        )


def reencrypt(storage: Storage, tenant_name: str, *, batch_size: int = 500, progress: Progress | None = None) -> int:
    """Re-seal every version still sealed with an older data key under the current one."""
    done = 0
    while True:
        with storage.session(tenant_name, write=True) as repo:
            keys = repo.sealer.keys
            sealer: Sealer = repo.sealer
            rows = repo.conn.execute(
                select(V.c.res_type, V.c.res_id, V.c.version, V.c.key_version, V.c.body)
                .where(V.c.tenant_id == keys.tenant_id, V.c.key_version != keys.write_version, V.c.body.is_not(None))
                .order_by(V.c.res_type, V.c.res_id, V.c.version)
                .limit(batch_size)
            ).all()
            for r in rows:
                plain = sealer.open_resource(r.res_type, r.res_id, r.version, r.key_version, r.body)
                new_version, sealed = sealer.seal_resource(r.res_type, r.res_id, r.version, plain)
                repo.conn.execute(
                    update(V)
                    .where(
                        V.c.tenant_id == keys.tenant_id,
                        V.c.res_type == r.res_type,
                        V.c.res_id == r.res_id,
                        V.c.version == r.version,
                        V.c.key_version == r.key_version,
                    )
                    .values(key_version=new_version, body=sealed)
                )
        if not rows:
            return done
        done += len(rows)
        if progress:
            progress(len(rows))


def purge_tenant(storage: Storage, tenant_id: int, *, batch_size: int = 2000, progress: Progress | None = None) -> int:
    """Remove every row of a crypto-shredded tenant, then the tenant itself."""
    removed = 0
    for table in tenants.PURGE_ORDER:
        t = schema.metadata.tables[table]
        while True:
            with storage.db.transaction(write=True) as conn:
                tenants.bind_tenant(conn, tenant_id)
                # Batch by resource where the table has one (index rows), else by primary key.
                cols = [t.c.res_type, t.c.res_id] if "res_type" in t.c and "res_id" in t.c else list(t.primary_key.columns)
                keys = conn.execute(select(*cols).where(t.c.tenant_id == tenant_id).distinct().limit(batch_size)).all()
                n = 0
                if keys:
                    n = conn.execute(
                        delete(t).where(t.c.tenant_id == tenant_id, tuple_(*cols).in_([tuple(k) for k in keys]))
                    ).rowcount
            removed += n
            if progress and n:
                progress(n)
            if len(keys) < batch_size:
                break
    with storage.db.transaction(write=True) as conn:
        conn.execute(delete(schema.tenants).where(schema.tenants.c.id == tenant_id))
    return removed
