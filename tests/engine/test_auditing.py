"""Every engine interaction leaves exactly one AuditEvent, of the right shape, committed with what it did."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest

from fhir_server.capability.validation import validate_resource
from fhir_server.engine.audit_trail import AuditUnavailable
from fhir_server.engine.engine import Engine
from fhir_server.errors import FhirError
from fhir_server.security import audit_events as ae
from fhir_server.security.access import AccessContext
from fhir_server.security.scopes import parse_scopes
from testsupport.engine_calls import call, in_threads, patient, resource

GRANT = uuid.uuid4().hex
DOCTOR = AccessContext(parse_scopes("user/*.cruds"), client_id="ehr-app", subject="dr-who", username="dr-who",
                       fhir_user="Practitioner/dr", roles=("clinician",), token_id=GRANT)


def events(engine: Engine, tenant: str) -> list[dict[str, Any]]:
    """The tenant's AuditEvents, oldest first (read from storage: reading them through the engine is audited too)."""
    return [json.loads(body) for body in engine.storage.audit_log.events(tenant)]


def observation(oid: str, pid: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final", "code": {"text": "weight"},
            "subject": {"reference": f"Patient/{pid}"}}


@pytest.fixture
def data(engine: Engine, tenant: str) -> str:
    call(engine, tenant, "PUT", "Patient/p1", patient("p1", "Quixotezzyx"))
    call(engine, tenant, "PUT", "Patient/p2", patient("p2"))
    call(engine, tenant, "PUT", "Observation/o1", observation("o1", "p1"))
    call(engine, tenant, "PUT", "Observation/o2", observation("o2", "p2"))
    return tenant


def one_new(engine: Engine, tenant: str, before: int) -> dict[str, Any]:
    after = events(engine, tenant)
    assert len(after) == before + 1, [e["subtype"][0]["code"] for e in after[before:]]
    return after[-1]


def codes(event: dict[str, Any]) -> tuple[str, str, str]:
    return event["subtype"][0]["code"], event["action"], event["outcome"]


def entity_refs(event: dict[str, Any], role: str) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if e.get("role", {}).get("code") == role]


def query_of(event: dict[str, Any]) -> str:
    found = [base64.b64decode(e["query"]).decode() for e in event.get("entity", []) if "query" in e]
    assert len(found) == 1, event.get("entity")
    return found[0]


CASES: list[tuple[str, str, str, Any, dict[str, Any], tuple[str, str], list[str], list[str]]] = [
    # (method, path, kind, body, call options, (action, BALP profile), resources, patients)
    ("GET", "Observation/o1", "read", None, {}, ("R", "PatientRead"), ["Observation/o1/_history/1"], ["p1"]),
    ("GET", "Patient/p2/_history/1", "vread", None, {}, ("R", "PatientRead"), ["Patient/p2/_history/1"], ["p2"]),
    ("POST", "Observation", "create", {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                         "subject": {"reference": "Patient/p2"}}, {}, ("C", "PatientCreate"), ["Observation/"], ["p2"]),
    ("PUT", "Observation/o1", "update", {**observation("o1", "p1"), "status": "amended"}, {}, ("U", "PatientUpdate"),
     ["Observation/o1/_history/2"], ["p1"]),
    # The same content again: no new version, still an update (of the current version) in the log
    ("PUT", "Observation/o1", "update", observation("o1", "p1"), {}, ("U", "PatientUpdate"), ["Observation/o1/_history/1"], ["p1"]),
    ("PATCH", "Patient/p1", "patch", [{"op": "add", "path": "/active", "value": True}],
     {"content_type": "application/json-patch+json"}, ("U", "PatientUpdate"), ["Patient/p1/_history/2"], ["p1"]),
    ("DELETE", "Observation/o2", "delete", None, {}, ("D", "PatientDelete"), ["Observation/o2/_history/2"], ["p2"]),
    ("GET", "Observation", "search-type", None, {"params": (("subject", "Patient/p1"),)}, ("E", "PatientQuery"), [], ["p1"]),
    ("GET", "", "search-system", None, {"params": (("_type", "Observation,Patient"),)}, ("E", "Query"), [], ["p1", "p2"]),
    ("GET", "Patient/p1/Observation", "search-type", None, {}, ("E", "PatientQuery"), [], ["p1"]),
    ("GET", "Patient/p1/_history", "history-instance", None, {}, ("R", None), ["Patient/p1"], ["p1"]),
    ("GET", "Observation/_history", "history-type", None, {}, ("R", None), [], ["p1", "p2"]),
    ("GET", "metadata", "capabilities", None, {}, ("R", None), [], []),
]


@pytest.mark.parametrize("method,path,kind,body,options,shape,resources,patients", CASES, ids=[f"{c[2]}:{c[1]}" for c in CASES])
def test_each_interaction_leaves_one_event_of_its_shape(engine: Engine, data: str, method: str, path: str, kind: str,
                                                       body: Any, options: dict[str, Any], shape: tuple[str, str | None],
                                                       resources: list[str], patients: list[str]) -> None:
    engine.storage.audit_log.chain(data)
    before = len(events(engine, data))
    call(engine, data, method, path, body, access=DOCTOR, **options)
    event = one_new(engine, data, before)
    assert codes(event) == (kind, shape[0], "0")
    assert event["type"]["code"] == "rest" and "outcomeDesc" not in event
    profile = event.get("meta", {}).get("profile")
    assert profile == ([f"{ae.BALP_PROFILE}{shape[1]}"] if shape[1] else None)
    recorded = entity_refs(event, "4")
    assert len(recorded) == len(resources) and all(r.startswith(want) for r, want in zip(recorded, resources))
    assert sorted(entity_refs(event, "1")) == [f"Patient/{p}" for p in patients]
    if kind.startswith(("search", "history-type", "capabilities")):
        assert query_of(event).startswith(f"GET http://test/fhir/{data}/{path}".rstrip("/"))
    # who: the app (with its client id) and the user (requestor, with their roles and the grant, never the token)
    by_type = {a["type"]["coding"][0]["code"]: a for a in event["agent"]}
    user = next(a for a in event["agent"] if a["who"].get("identifier", {}).get("system") == ae.USERNAME)
    assert user["requestor"] is True and user["who"]["reference"] == "Practitioner/dr" and user["name"] == "dr-who"
    assert user["role"] == [{"coding": [{"system": ae.ROLE, "code": "clinician"}]}]
    assert user["policy"] == [str(uuid.UUID(hex=GRANT).urn)]
    client = next(a for a in event["agent"] if a["who"].get("identifier", {}).get("system") == ae.CLIENT_ID)
    assert client["who"]["identifier"]["value"] == "ehr-app" and client["requestor"] is False
    assert len(by_type) == 3 and event["source"]["site"] == data
    assert validate_resource(engine.registry, event) == []  # a valid R4 AuditEvent


def test_bundles_record_the_bundle_and_each_entry(engine: Engine, data: str) -> None:
    engine.storage.audit_log.chain(data)
    before = len(events(engine, data))
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:5f0b7a8e-0000-4000-8000-000000000001", "resource": patient(None, "New"),
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {**observation("o9", "x"), "subject": {"reference": "urn:uuid:5f0b7a8e-0000-4000-8000-000000000001"}},
         "request": {"method": "PUT", "url": "Observation/o9"}},
        {"request": {"method": "GET", "url": "Patient/p1"}}]}
    out = resource(call(engine, data, "POST", "", transaction, access=DOCTOR))
    new_patient = out["entry"][0]["response"]["location"].split("/")[1]
    after = events(engine, data)[before:]
    assert sorted(codes(e)[0] for e in after) == ["read", "transaction"]  # the GET entry is an interaction of its own
    tx = next(e for e in after if codes(e)[0] == "transaction")
    assert sorted(entity_refs(tx, "4")) == sorted([f"Patient/{new_patient}/_history/1", "Observation/o9/_history/1"])
    assert entity_refs(tx, "1") == [f"Patient/{new_patient}"]
    before = len(events(engine, data))
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/p2"}}, {"request": {"method": "GET", "url": "Patient/missing"}}]}
    call(engine, data, "POST", "", batch, access=DOCTOR)
    after = events(engine, data)[before:]
    assert sorted(codes(e) for e in after) == [("batch", "E", "0"), ("read", "R", "0"), ("read", "R", "4")]


def test_failures_and_denials_are_recorded_and_say_why(engine: Engine, data: str) -> None:
    # an app launched for p2: reading p1's Observation is refused after it was looked at, so the record names p1
    nurse = AccessContext(parse_scopes("patient/Observation.rs"), patient="p2", client_id="ehr-app", username="nurse", subject="nurse")
    cases = [
        ("GET", "Patient/nope", {}, DOCTOR, 404, "Patient/nope"),
        ("GET", "Observation/o1", {}, nurse, 403, "Observation/o1"),
        ("PUT", "Patient/p2", {"if_match": 'W/"9"'}, DOCTOR, 412, "Patient/p2"),
        ("POST", "Patient", {}, DOCTOR, 400, None),
        ("DELETE", "AuditEvent/x", {}, DOCTOR, 405, "AuditEvent/x"),
        ("GET", "Patient/$everything", {}, DOCTOR, 404, None),
    ]
    for method, path, options, who, status, target in cases:
        before = len(events(engine, data))
        body = patient("p2") if method == "PUT" else {"resourceType": "Patient", "birthDate": "1999-02-30"} if method == "POST" else None
        with pytest.raises(FhirError) as caught:
            call(engine, data, method, path, body, access=who, **options)
        assert caught.value.status == status
        event = one_new(engine, data, before)
        assert event["outcome"] == "4" and event["outcomeDesc"].startswith(f"HTTP {status}: ")
        assert "profile" not in event["meta"]  # BALP's profiles are for successes
        if target:
            assert [r.split("/_history/")[0] for r in entity_refs(event, "4")] == [target]
    invalid = events(engine, data)[-3]  # the 400: where and what kind, never the values it refused (PHI)
    assert "1999-02-30" not in invalid["outcomeDesc"] and "Patient.birthDate" in invalid["outcomeDesc"], invalid["outcomeDesc"]
    denied = events(engine, data)[-5]
    assert "outside what the access token's scopes allow" in denied["outcomeDesc"] and entity_refs(denied, "1") == ["Patient/p1"]
    assert codes(events(engine, data)[-1])[0] == "operation"


def test_a_rolled_back_write_has_no_success_record_and_writes_nothing(engine: Engine, data: str) -> None:
    """The record of a write commits with it: a transaction that fails leaves only the record of its failure."""
    before = len(events(engine, data))
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("t1"), "request": {"method": "PUT", "url": "Patient/t1"}},
        {"resource": patient("p1"), "request": {"method": "PUT", "url": "Patient/p1", "ifMatch": 'W/"7"'}}]}
    with pytest.raises(FhirError):
        call(engine, data, "POST", "", transaction, access=DOCTOR)
    event = one_new(engine, data, before)
    assert codes(event) == ("transaction", "E", "4") and "Bundle.entry[1]" in event["outcomeDesc"]
    with pytest.raises(FhirError):
        call(engine, data, "GET", "Patient/t1")


def test_no_body_and_no_token_in_a_record(engine: Engine, data: str) -> None:
    call(engine, data, "GET", "Patient/p1", access=DOCTOR)
    text = json.dumps(events(engine, data))
    assert "Quixotezzyx" not in text  # the patient's name was read, never recorded
    assert "dr-who" in text and GRANT not in text.replace(str(uuid.UUID(hex=GRANT)), "")


def test_when_the_record_cannot_be_written_the_interaction_fails(engine: Engine, data: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk full")

    monkeypatch.setattr(engine.audit, "append_in", broken)
    with pytest.raises(AuditUnavailable) as caught:  # a read: nothing is returned
        call(engine, data, "GET", "Patient/p1", access=DOCTOR)
    assert caught.value.status == 503
    with pytest.raises(AuditUnavailable):  # a write: nothing is changed
        call(engine, data, "PUT", "Patient/p9", patient("p9"), access=DOCTOR)
    monkeypatch.undo()
    with pytest.raises(FhirError) as gone:
        call(engine, data, "GET", "Patient/p9")
    assert gone.value.status == 404


def test_concurrent_reads_are_group_committed_and_all_recorded(engine: Engine, data: str) -> None:
    engine.storage.audit_log.chain(data)
    before = len(events(engine, data))

    def reader() -> None:
        for _ in range(10):
            call(engine, data, "GET", "Observation/o1", access=DOCTOR)

    in_threads(reader, 8)
    assert len(events(engine, data)) == before + 80
    engine.storage.audit_log.chain(data)
    assert engine.storage.audit_log.verify(data).ok


# --- who may read the audit log --------------------------------------------------------------------------

def who(scopes: str, *roles: str) -> AccessContext:
    return AccessContext(parse_scopes(scopes), client_id="c", username="u" if roles else None, roles=roles)


@pytest.mark.parametrize("scopes,roles,allowed", [
    ("system/*.rs", (), False),
    ("system/*.cruds", (), False),
    ("system/AuditEvent.rs", (), True),
    ("system/AuditEvent.read", (), True),
    ("user/*.rs", ("clinician",), False),
    ("user/*.rs", ("auditor",), True),
    ("user/AuditEvent.rs", ("auditor",), True),
    ("patient/*.rs", ("auditor",), False),
])
def test_only_auditors_read_the_audit_log(engine: Engine, data: str, scopes: str, roles: tuple[str, ...], allowed: bool) -> None:
    access = who(scopes, *roles)
    if not allowed:
        for path in ("AuditEvent", "AuditEvent/_history"):
            with pytest.raises(FhirError) as caught:
                call(engine, data, "GET", path, access=access)
            assert caught.value.status == 403
        return
    found = resource(call(engine, data, "GET", "AuditEvent", params=(("patient", "p1"),), access=access))
    assert found["total"] >= 2  # the writes of p1 and o1
    one = found["entry"][0]["resource"]
    assert resource(call(engine, data, "GET", f"AuditEvent/{one['id']}", access=access))["id"] == one["id"]


def test_nobody_changes_the_audit_log(engine: Engine, data: str) -> None:
    one = events(engine, data)[0]
    for method, path, body in (("PUT", f"AuditEvent/{one['id']}", one), ("DELETE", f"AuditEvent/{one['id']}", None),
                               ("PATCH", f"AuditEvent/{one['id']}", [{"op": "remove", "path": "/agent"}]),
                               ("POST", "AuditEvent", one), ("DELETE", "AuditEvent", None)):
        with pytest.raises(FhirError) as caught:  # not even the server's own calls
            call(engine, data, method, path, body, params=(("_id", one["id"]),) if path == "AuditEvent" else (),
                 content_type="application/json-patch+json" if method == "PATCH" else None)
        assert caught.value.status == 405
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": one, "request": {"method": "PUT", "url": f"AuditEvent/{one['id']}"}}]}
    with pytest.raises(FhirError) as caught:
        call(engine, data, "POST", "", transaction)
    assert caught.value.status == 405


def test_interactions_over_every_type_leave_the_audit_log_out(engine: Engine, data: str) -> None:
    full = who("system/*.rs")
    for path, params in (("_history", ()), ("", ()), ("Patient/p1/*", ())):
        body = resource(call(engine, data, "GET", path, params=params, access=full))
        assert not [e for e in body.get("entry", []) if e["resource"]["resourceType"] == "AuditEvent"], path
    auditor = who("system/*.rs system/AuditEvent.rs")
    body = resource(call(engine, data, "GET", "_history", params=(("_count", "1000"),), access=auditor))
    assert any(e["resource"]["resourceType"] == "AuditEvent" for e in body["entry"])


# --- settings ------------------------------------------------------------------------------------------

def test_the_sink_mirrors_every_record(engine_with: Any, tenant: str, tmp_path: Any) -> None:
    sink = tmp_path / "audit.jsonl"
    engine = engine_with(audit_sink=str(sink))
    call(engine, tenant, "PUT", "Patient/s1", patient("s1"))
    call(engine, tenant, "GET", "Patient/s1")
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [(line["tenant"], line["auditEvent"]["subtype"][0]["code"]) for line in lines] == [(tenant, "update"), (tenant, "read")]
    assert oct(sink.stat().st_mode & 0o777) == "0o600"


def test_audit_off_records_nothing(engine_with: Any, tenant: str) -> None:
    engine = engine_with(audit=False)
    call(engine, tenant, "PUT", "Patient/q1", patient("q1"))
    call(engine, tenant, "GET", "Patient/q1")
    assert events(engine, tenant) == []


@pytest.mark.parametrize("status, description, version, patients", [
    (200, None, 3, ["p1"]), (200, None, 3, ["p1", "p2"]), (200, None, 1, []), (304, None, 3, ["p1"]),
    (404, "HTTP 404: Observation/o1 is not known", None, []), (410, "HTTP 410: Observation/o1 was deleted", 2, []),
])
def test_a_completed_read_draft_is_the_event_the_read_would_have_recorded(status: int, description: str | None,
                                                                            version: int | None, patients: list[str]) -> None:
    """On PostgreSQL a read's record is made before the read (a draft) and completed when it is chained: the result is
    the event made after the read, field for field (but for its id and time)."""
    actor = ae.Actor(client_id="backend", address="10.0.0.9", grant_id=GRANT)
    place = ae.Place("t1", "https://fhir.example/fhir/t1")
    line, rid = "GET https://fhir.example/fhir/t1/Observation/o1", "req-1"
    draft = ae.rest_event("read", 200, None, actor, place, resources=["Observation/o1"], patients=[], request_line=line,
                          request_id=rid)
    reference = f"Observation/o1/_history/{version}" if status < 400 else "Observation/o1"
    wanted = ae.rest_event("read", status, description, actor, place, resources=[reference], patients=patients,
                           request_line=line, request_id=rid)
    done = ae.complete_read(draft, status=status, description=description, version=version, patients=patients)
    assert {k: v for k, v in done.items() if k not in ("id", "recorded")} == {
        k: v for k, v in wanted.items() if k not in ("id", "recorded")}
