"""No plaintext PHI at rest; ciphertexts bound to their rows; tampering detected."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import make_url

from fhir_server import fhirjson
from fhir_server.engine.engine import Engine
from fhir_server.errors import IntegrityFailure
from fhir_server.storage import schema, tenants
from fhir_server.storage.store import Storage
from testsupport.backends import DatabaseUrls, admin_url
from testsupport.examples import iter_examples

from testsupport.engine_calls import call

DISTINCTIVE = {
    "family": "Quixotezzyx",
    "identifier": "MRN-7788-ZQ-4411",
    "phone": "+1-555-0199-8877",
    "address": "742 Evergreenzz Terrace",
}


def distinctive_patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "distinctive",
        "identifier": [{"system": "http://hospital.example/mrn", "value": DISTINCTIVE["identifier"]}],
        "name": [{"family": DISTINCTIVE["family"], "given": ["Alonso"]}],
        "telecom": [{"system": "phone", "value": DISTINCTIVE["phone"]}],
        "address": [{"line": [DISTINCTIVE["address"]], "city": "Springfield"}],
    }


def database_bytes(db_urls: DatabaseUrls, tmp_path: Path) -> bytes:
    if db_urls.backend == "sqlite":
        path = Path(make_url(db_urls.app_url).database or "")
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    url = make_url(db_urls.app_url)
    admin = make_url(admin_url())
    dump_url = admin.set(drivername="postgresql", database=url.database).render_as_string(hide_password=False)
    out = tmp_path / "dump.sql"
    subprocess.run(["pg_dump", "--no-owner", "--file", str(out), dump_url], check=True, timeout=300)
    return out.read_bytes()


def test_no_plaintext_in_the_database(engine: Engine, tenant: str, db_urls: DatabaseUrls, tmp_path: Path) -> None:
    stored = 0
    for name, raw in iter_examples():
        body = fhirjson.parse(raw, max_depth=200)
        if body["resourceType"] == "AuditEvent":
            continue  # the server writes AuditEvents; clients cannot (its own records of this test are in the dump)
        call(engine, tenant, "PUT", f"{body['resourceType']}/{body['id']}", body)
        stored += 1
    call(engine, tenant, "PUT", "Patient/distinctive", distinctive_patient())
    assert stored == 700
    # Searches whose values are PHI: the audit records keep the query, sealed like every resource.
    call(engine, tenant, "GET", "Patient", params=(("family", DISTINCTIVE["family"]), ("phone", DISTINCTIVE["phone"])))
    call(engine, tenant, "GET", "Patient", params=(("identifier", DISTINCTIVE["identifier"]),))
    engine.storage.audit_log.chain(tenant, checkpoint=True)
    data = database_bytes(db_urls, tmp_path)
    assert b"distinctive" in data  # ids are plaintext (they are not PHI): the dump is the right one
    for label, value in DISTINCTIVE.items():
        assert value.encode() not in data, f"{label} found in plaintext"
    for marker in (b'"resourceType"', b"Chalmers", b"Peter James", b"<div xmlns"):
        assert marker not in data, f"{marker!r} found in plaintext"


def _version_row(storage: Storage, tenant: str, res_id: str, version: int = 1) -> Any:
    V = schema.resource_versions
    with storage.db.transaction(write=False) as conn:
        t = tenants.lookup(conn, tenant)
        return t, conn.execute(select(V).where(V.c.tenant_id == t.id, V.c.res_id == res_id, V.c.version == version)).one()


def _set_body(storage: Storage, tenant_id: int, res_id: str, body: bytes, version: int = 1) -> None:
    V = schema.resource_versions
    with storage.db.transaction(write=True) as conn:
        tenants.bind_tenant(conn, tenant_id)
        conn.execute(update(V).where(V.c.tenant_id == tenant_id, V.c.res_id == res_id, V.c.version == version).values(body=body))


def test_ciphertext_moved_to_another_id_does_not_open(engine: Engine, owner_storage: Storage, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/one", {"resourceType": "Patient", "id": "one"})
    call(engine, tenant, "PUT", "Patient/two", {"resourceType": "Patient", "id": "two"})
    t, row = _version_row(owner_storage, tenant, "one")
    _set_body(owner_storage, t.id, "two", row.body)
    with pytest.raises(IntegrityFailure) as info:
        call(engine, tenant, "GET", "Patient/two")
    assert info.value.status == 500 and "integrity check" in str(info.value)
    assert call(engine, tenant, "GET", "Patient/one").status == 200


def test_ciphertext_moved_to_another_tenant_does_not_open(engine: Engine, owner_storage: Storage, new_tenant: Any) -> None:
    a, b = new_tenant("a"), new_tenant("b")
    call(engine, a, "PUT", "Patient/same", {"resourceType": "Patient", "id": "same", "gender": "male"})
    call(engine, b, "PUT", "Patient/same", {"resourceType": "Patient", "id": "same", "gender": "female"})
    _, row_a = _version_row(owner_storage, a, "same")
    tb, _ = _version_row(owner_storage, b, "same")
    _set_body(owner_storage, tb.id, "same", row_a.body)
    with pytest.raises(IntegrityFailure):
        call(engine, b, "GET", "Patient/same")


def test_flipped_bit_is_detected(engine: Engine, owner_storage: Storage, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/flip", {"resourceType": "Patient", "id": "flip"})
    t, row = _version_row(owner_storage, tenant, "flip")
    tampered = bytearray(row.body)
    tampered[len(tampered) // 2] ^= 0x04
    _set_body(owner_storage, t.id, "flip", bytes(tampered))
    with pytest.raises(IntegrityFailure):
        call(engine, tenant, "GET", "Patient/flip")
