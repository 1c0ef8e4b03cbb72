"""One tenant never sees another's data: through the engine, and at the database itself (RLS)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select, text

from fhir_server.engine.engine import Engine
from fhir_server.clock import now_us
from fhir_server.errors import NotFound, PreconditionFailed
from fhir_server.security.oauth.server import signing_key
from fhir_server.security.oauth.store import AuthStore
from fhir_server.hl7v2.store import MessageStore
from fhir_server.storage import audit_log, schema, tenants
from fhir_server.storage.store import Storage

from testsupport.engine_calls import call, patient


def test_resource_of_tenant_a_is_invisible_in_tenant_b(engine: Engine, new_tenant: Any) -> None:
    a, b = new_tenant("a"), new_tenant("b")
    call(engine, a, "PUT", "Patient/shared-id", patient("shared-id", "OnlyInA"))
    with pytest.raises(NotFound):
        call(engine, b, "GET", "Patient/shared-id")
    with pytest.raises(NotFound):
        call(engine, b, "GET", "Patient/shared-id/_history/1")
    with pytest.raises(NotFound):
        call(engine, b, "GET", "Patient/shared-id/_history")
    assert "entry" not in call(engine, b, "GET", "Patient/_history").body  # type: ignore[operator]
    assert "entry" not in call(engine, b, "GET", "_history").body  # type: ignore[operator]
    def matches(path: str, query: tuple[tuple[str, str], ...]) -> list[Any]:
        body = call(engine, b, "GET", path, params=query).body
        return [e for e in body.get("entry", []) if e["search"]["mode"] == "match"]  # type: ignore[union-attr]

    for query in ((), (("_id", "shared-id"),), (("_lastUpdated", "gt2000"),)):
        assert matches("Patient", query) == [] and matches("", query) == []
    assert matches("Patient", (("family", "OnlyInA"),)) == []
    assert call(engine, a, "GET", "Patient", params=(("family", "OnlyInA"),)).body["total"] == 1  # type: ignore[index]
    with pytest.raises(PreconditionFailed):
        call(engine, b, "PUT", "Patient/shared-id", patient("shared-id"), if_match='W/"1"')
    assert call(engine, b, "DELETE", "Patient/shared-id").status == 204  # nothing to delete in b
    # b may use the same id for its own resource; a's stays untouched.
    assert call(engine, b, "PUT", "Patient/shared-id", patient("shared-id", "InB")).status == 201
    body = call(engine, a, "GET", "Patient/shared-id").body
    assert b"OnlyInA" in bytes(body)  # type: ignore[arg-type]
    assert call(engine, a, "GET", "Patient/shared-id").headers["ETag"] == 'W/"1"'


def test_row_level_security_without_or_with_wrong_tenant_setting(storage: Storage, owner_storage: Storage, engine: Engine,
                                                               new_tenant: Any, backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("row-level security is PostgreSQL's; SQLite relies on the repository's tenant filter")
    a, b = new_tenant("a"), new_tenant("b")
    # Something in every table: hashes, dates, references (Patient), quantities and composites (Observation), numbers
    # (RiskAssessment), custom parameter state (SearchParameter).
    call(engine, a, "PUT", "Patient/x", {**patient("x"), "birthDate": "1970", "generalPractitioner": [{"reference": "Practitioner/1"}]})
    call(engine, a, "PUT", "Observation/o", {"resourceType": "Observation", "id": "o", "status": "final",
                                              "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
                                              "valueQuantity": {"value": 1, "system": "http://unitsofmeasure.org", "code": "mg"}})
    call(engine, a, "PUT", "SearchParameter/sp", {"resourceType": "SearchParameter", "id": "sp", "url": "http://x/sp", "name": "sp",
                                                   "status": "active", "description": "d", "code": "sp-code", "base": ["Patient"],
                                                   "type": "token", "expression": "Patient.gender"})
    call(engine, a, "PUT", "RiskAssessment/r", {"resourceType": "RiskAssessment", "id": "r", "status": "final",
                                                "subject": {"reference": "Patient/x"}, "prediction": [{"probabilityDecimal": 0.5}]})
    with storage.session(a, write=True) as repo:  # and the authorization server's records
        store = AuthStore(repo)
        client_id, _ = store.create_client(name="c", kind="public", scope="patient/*.rs", redirect_uris=["https://app/cb"],
                                           jwks=None, jwks_uri=None)
        store.create_user(username="u", password_hash="x", fhir_user=None, roles=[], mfa_required=False)
        store.save_code("code", grant_id="g", client_id=client_id, username="u", redirect_uri="https://app/cb", scope="",
                        context={}, code_challenge="c", lifetime_s=60)
        store.save_token("tok", kind="access", grant_id="g", client_id=client_id, username="u", scope="", context={}, lifetime_s=60)
        store.create_launch({"patient": "x"}, created_by="u")
        store.remember_jti(client_id, "jti", now_us() + 60_000_000)
        store.create_session()
        signing_key(store)
    storage.audit_log.stop()  # (its chainer would move the records below along)
    storage.audit_log.chain(a, checkpoint=True)  # the audit log of those writes: chained, with a signed checkpoint
    with storage.session(a, write=True, audited=False) as repo:  # and a record waiting for the chain, an alert mark
        audit_log.store_records(repo.conn, repo.tenant.id, [audit_log.Record("waiting", now_us(), 1, b"x", bytes(32))])
        repo.conn.execute(schema.audit_alert_marks.insert().values(tenant_id=repo.tenant.id, rule="r", subject=b"s",
                                                                   window_start=0, item=b"i"))
    MessageStore(storage).admit(a, b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5", "ADT^A01", ("A/B", "1"))  # an HL7 v2 message
    with owner_storage.session(a, write=True, audited=False) as repo:  # (only the migration lists legacy AuditEvents)
        repo.conn.execute(schema.audit_legacy.insert().values(tenant_id=repo.tenant.id, res_id="legacy"))
    with storage.db.transaction(write=False) as conn:
        tid_a = tenants.lookup(conn, a).id
    for table in schema.TENANT_TABLES:
        t = schema.metadata.tables[table]
        with storage.db.transaction(write=False) as conn:
            # No tenant bound: nothing visible, even when asking for tenant a's rows by id.
            assert conn.execute(select(func.count()).select_from(t)).scalar_one() == 0
            assert conn.execute(select(func.count()).select_from(t).where(t.c.tenant_id == tid_a)).scalar_one() == 0
        with storage.db.transaction(write=False) as conn:
            tenants.lookup(conn, b)  # binds tenant b
            assert conn.execute(select(func.count()).select_from(t).where(t.c.tenant_id == tid_a)).scalar_one() == 0
        for partition in range(8):
            with storage.db.transaction(write=False) as conn:
                assert conn.execute(text(f"SELECT count(*) FROM {table}_p{partition}")).scalar_one() == 0
        with storage.db.transaction(write=False) as conn:
            tenants.lookup(conn, a)
            assert conn.execute(select(func.count()).select_from(t)).scalar_one() > 0


def test_rls_refuses_writes_into_another_tenant(storage: Storage, new_tenant: Any, backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("row-level security is PostgreSQL's")
    a, b = new_tenant("a"), new_tenant("b")
    from sqlalchemy.exc import ProgrammingError

    with storage.db.transaction(write=False) as conn:
        tid_a = tenants.lookup(conn, a).id
    with pytest.raises(ProgrammingError, match="row-level security"):
        with storage.db.transaction(write=True) as conn:
            tenants.lookup(conn, b)
            conn.execute(schema.resources.insert().values(tenant_id=tid_a, res_type="Patient", res_id="evil", version=1, last_updated=0, deleted=False))


def test_application_role_does_not_own_the_tables(storage: Storage, backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("roles are PostgreSQL's")
    with storage.db.transaction(write=False) as conn:
        me = conn.execute(text("SELECT current_user")).scalar_one()
        owners = conn.execute(text("SELECT DISTINCT tableowner FROM pg_tables WHERE tablename LIKE 'resource%'")).scalars().all()
        bypass = conn.execute(text("SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = current_user")).scalar_one()
    assert me not in owners and not bypass


@pytest.mark.parametrize("name", ["UPPER", "under_score", "", "a" * 64, "spa ce", "dot.ted", "ümlaut"])
def test_invalid_tenant_names_are_refused(owner_storage: Storage, name: str) -> None:
    with owner_storage.db.transaction(write=True) as conn:
        with pytest.raises(tenants.InvalidTenantName):
            tenants.create(conn, name, owner_storage.provider)
