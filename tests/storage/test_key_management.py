"""Data-key rotation, re-encryption (resumable), master-key re-wrapping and crypto-shredding."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import func, select

from fhir_server.engine.engine import Engine
from fhir_server.errors import NotFound
from fhir_server.security.keys import LocalKeyProvider
from fhir_server.storage import maintenance, schema, tenants
from fhir_server.storage.store import Storage

from testsupport.engine_calls import call, patient

V = schema.resource_versions


def key_versions(storage: Storage, tenant: str) -> dict[int, int]:
    with storage.db.transaction(write=False) as conn:
        t = tenants.lookup(conn, tenant)
        rows = conn.execute(
            select(V.c.key_version, func.count()).where(V.c.tenant_id == t.id, V.c.body.is_not(None), V.c.res_type != "AuditEvent")
            .group_by(V.c.key_version)
        ).all()
    return {r[0]: r[1] for r in rows}


def rotate(owner_storage: Storage, tenant: str) -> int:
    with owner_storage.db.transaction(write=True) as conn:
        return tenants.rotate_data_key(conn, tenants.lookup(conn, tenant), owner_storage.provider)


def test_rotation_then_reencryption_keeps_everything_readable(engine: Engine, owner_storage: Storage, storage: Storage, tenant: str) -> None:
    for i in range(25):
        call(engine, tenant, "PUT", f"Patient/p{i}", patient(f"p{i}"))
    assert rotate(owner_storage, tenant) == 2
    call(engine, tenant, "PUT", "Patient/after", patient("after"))  # written with key v2
    assert key_versions(storage, tenant) == {1: 25, 2: 1}
    for i in range(25):
        assert call(engine, tenant, "GET", f"Patient/p{i}").status == 200  # old key still opens old rows

    class Killed(Exception):
        pass

    def die_after_first_batch(n: int) -> None:
        raise Killed

    stale = maintenance.count_stale_versions(owner_storage, tenant)  # the Patients and the audit records so far
    assert stale >= 25
    with pytest.raises(Killed):
        maintenance.reencrypt(owner_storage, tenant, batch_size=10, progress=die_after_first_batch)
    assert maintenance.count_stale_versions(owner_storage, tenant) == stale - 10  # the committed batch stays done
    assert maintenance.reencrypt(owner_storage, tenant, batch_size=10) == stale - 10
    assert key_versions(storage, tenant) == {2: 26}
    for i in range(25):
        assert call(engine, tenant, "GET", f"Patient/p{i}/_history/1").status == 200
    # The audit records were re-sealed too; the chain hashes what they say, not their ciphertext, and still holds.
    storage.audit_log.chain(tenant)
    assert storage.audit_log.verify(tenant).ok


def test_master_key_rewrap_keeps_data_keys(engine: Engine, owner_storage: Storage, storage: Storage, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/m", patient("m"))
    new = LocalKeyProvider([os.urandom(32)])
    with owner_storage.db.transaction(write=True) as conn:
        assert tenants.rewrap_keys(conn, tenants.lookup(conn, tenant), owner_storage.provider, new) == 2
    # A fresh key ring holding only the new master key opens the old data.
    fresh = Storage(storage.db, new, storage.cipher, engine.settings)
    fresh_engine = Engine(engine.registry, fresh, engine.settings)
    assert call(fresh_engine, tenant, "GET", "Patient/m").status == 200
    # ...and the old master key no longer unwraps this tenant's keys.
    stale = Storage(storage.db, owner_storage.provider, storage.cipher, engine.settings)
    with pytest.raises(Exception):
        call(Engine(engine.registry, stale, engine.settings), tenant, "GET", "Patient/m")


def test_crypto_shred_makes_data_unreadable_then_removes_it(engine: Engine, owner_storage: Storage, tenant: str) -> None:
    for i in range(5):
        call(engine, tenant, "PUT", f"Patient/s{i}", patient(f"s{i}"))
    with owner_storage.db.transaction(write=True) as conn:
        t = tenants.lookup(conn, tenant)
        tenants.shred_keys(conn, t)
    with pytest.raises(NotFound):
        call(engine, tenant, "GET", "Patient/s0")
    with owner_storage.db.transaction(write=True) as conn:
        tenants.bind_tenant(conn, t.id)
        assert conn.execute(select(func.count()).select_from(schema.tenant_keys).where(schema.tenant_keys.c.tenant_id == t.id)).scalar_one() == 0
    with owner_storage.db.transaction(write=False) as conn:
        tenants.bind_tenant(conn, t.id)
        before = sum(
            conn.execute(select(func.count()).select_from(tbl).where(tbl.c.tenant_id == t.id)).scalar_one()
            for tbl in (schema.metadata.tables[name] for name in schema.TENANT_TABLES)
        )
    removed = maintenance.purge_tenant(owner_storage, t.id, batch_size=3)
    assert removed == before and removed > 10  # versions, current rows and index rows
    with owner_storage.db.transaction(write=False) as conn:
        tenants.bind_tenant(conn, t.id)
        for table in schema.TENANT_TABLES:
            tbl = schema.metadata.tables[table]
            assert conn.execute(select(func.count()).select_from(tbl).where(tbl.c.tenant_id == t.id)).scalar_one() == 0
        assert conn.execute(select(schema.tenants.c.id).where(schema.tenants.c.id == t.id)).first() is None


def test_keys_are_created_on_first_use_for_a_tenant_without_them(engine: Engine, owner_storage: Storage) -> None:
    name = "lazy-" + os.urandom(4).hex()
    with owner_storage.db.transaction(write=True) as conn:
        conn.execute(schema.tenants.insert().values(name=name, status="active", created_at=0, data_key_version=0))
    assert call(engine, name, "PUT", "Patient/x", patient("x")).status == 201
    assert call(engine, name, "GET", "Patient/x").status == 200
