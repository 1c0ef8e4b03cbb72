"""Scope enforcement in the engine: every interaction, compiled into queries, on every back-end."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_server.engine.engine import Engine
from fhir_server.errors import FhirError
from fhir_server.security.access import AccessContext
from fhir_server.security.scopes import parse_scopes
from testsupport.engine_calls import call, resource

LAB = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"


def access(scopes: str, patient: str | None = None) -> AccessContext:
    return AccessContext(parse_scopes(scopes), patient=patient, client_id="test-client")


def observation(oid: str, patient: str, category: str = "laboratory", performer: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Observation", "id": oid, "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]}, "subject": {"reference": f"Patient/{patient}"},
    }
    if performer:
        body["performer"] = [{"reference": performer}]
    return body


@pytest.fixture
def data(engine: Engine, tenant: str) -> str:
    for pid in ("p1", "p2"):
        call(engine, tenant, "PUT", f"Patient/{pid}", {"resourceType": "Patient", "id": pid, "name": [{"family": pid}]})
    call(engine, tenant, "PUT", "Practitioner/dr", {"resourceType": "Practitioner", "id": "dr"})
    call(engine, tenant, "PUT", "Observation/lab1", observation("lab1", "p1", performer="Practitioner/dr"))
    call(engine, tenant, "PUT", "Observation/vit1", observation("vit1", "p1", "vital-signs"))
    call(engine, tenant, "PUT", "Observation/lab2", observation("lab2", "p2"))
    return tenant


def status(engine: Engine, tenant: str, method: str, path: str, body: Any = None, **kw: Any) -> int:
    try:
        return call(engine, tenant, method, path, body, **kw).status
    except FhirError as exc:
        return exc.status


def ids(engine: Engine, tenant: str, path: str, who: AccessContext, params: tuple[tuple[str, str], ...] = ()) -> list[str]:
    bundle = resource(call(engine, tenant, "GET", path, params=params, access=who))
    return sorted(f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", []))


def test_patient_scopes_keep_to_the_patients_compartment(engine: Engine, data: str) -> None:
    who = access("patient/Observation.rs patient/Patient.r", patient="p1")
    assert status(engine, data, "GET", "Observation/lab1", access=who) == 200
    assert status(engine, data, "GET", "Observation/lab2", access=who) == 403
    assert status(engine, data, "GET", "Observation/lab1/_history/1", access=who) == 200
    assert status(engine, data, "GET", "Observation/lab2/_history/1", access=who) == 403
    assert status(engine, data, "GET", "Patient/p1", access=who) == 200
    assert status(engine, data, "GET", "Patient/p2", access=who) == 403
    assert status(engine, data, "GET", "Observation/missing", access=who) == 404
    assert ids(engine, data, "Observation", who) == ["Observation/lab1", "Observation/vit1"]
    counted = resource(call(engine, data, "GET", "Observation", params=(("_total", "accurate"),), access=who))
    assert counted["total"] == 2  # counts are of what the grant allows, not filtered afterwards
    assert ids(engine, data, "Patient/p2/Observation", who) == []
    assert status(engine, data, "GET", "Patient", access=who) == 403  # Patient.r does not allow search


def test_granular_scopes_are_part_of_the_query(engine: Engine, data: str) -> None:
    who = access(f"patient/Observation.rs?category={LAB}", patient="p1")
    assert ids(engine, data, "Observation", who) == ["Observation/lab1"]
    assert status(engine, data, "GET", "Observation/vit1", access=who) == 403
    both = access(f"patient/Observation.rs?category={LAB} patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs",
                  patient="p1")
    assert ids(engine, data, "Observation", both) == ["Observation/lab1", "Observation/vit1"]
    user = access(f"user/Observation.rs?category={LAB}")
    assert ids(engine, data, "Observation", user) == ["Observation/lab1", "Observation/lab2"]


def test_v1_scopes_and_wildcards(engine: Engine, data: str) -> None:
    who = access("patient/*.read", patient="p1")
    assert status(engine, data, "GET", "Observation/lab1", access=who) == 200
    assert status(engine, data, "GET", "Practitioner/dr", access=who) == 403  # never in a patient's compartment
    assert status(engine, data, "PUT", "Observation/lab1", observation("lab1", "p1"), access=who) == 403
    system = access("system/*.read")
    assert status(engine, data, "GET", "Practitioner/dr", access=system) == 200
    assert status(engine, data, "DELETE", "Practitioner/dr", access=system) == 403
    assert status(engine, data, "GET", "Observation/lab1", access=access("launch openid")) == 403


def test_patient_scopes_without_a_patient_reach_nothing(engine: Engine, data: str) -> None:
    assert status(engine, data, "GET", "Observation/lab1", access=access("patient/Observation.rs")) == 403
    assert status(engine, data, "GET", "Observation", access=access("patient/Observation.rs")) == 403


def test_writes_inside_and_outside_the_compartment(engine: Engine, data: str) -> None:
    who = access("patient/Observation.cruds", patient="p1")
    assert status(engine, data, "POST", "Observation", observation("x", "p1"), access=who) == 201
    assert status(engine, data, "POST", "Observation", observation("x", "p2"), access=who) == 403
    assert status(engine, data, "PUT", "Observation/lab1", observation("lab1", "p2"), access=who) == 403  # moving it out
    assert status(engine, data, "PUT", "Observation/lab2", observation("lab2", "p1"), access=who) == 403  # taking one in
    assert status(engine, data, "DELETE", "Observation/lab2", access=who) == 403
    assert status(engine, data, "PUT", "Observation/lab1", observation("lab1", "p1", "social-history"), access=who) == 200
    assert status(engine, data, "DELETE", "Observation/lab1", access=who) == 204
    everyone = ids(engine, data, "Observation", access("system/Observation.rs"))
    assert "Observation/lab2" in everyone and "Observation/lab1" not in everyone
    assert len(everyone) == 3  # vit1, lab2 and the one created for p1: nothing for p2 was written
    patch = [{"op": "replace", "path": "/subject/reference", "value": "Patient/p2"}]
    assert status(engine, data, "PATCH", "Observation/vit1", patch, content_type="application/json-patch+json", access=who) == 403
    assert resource(call(engine, data, "GET", "Observation/vit1"))["subject"]["reference"] == "Patient/p1"


def test_includes_only_bring_what_may_be_read(engine: Engine, data: str) -> None:
    params = (("_include", "Observation:performer"), ("_id", "lab1"))
    assert ids(engine, data, "Observation", access("patient/Observation.rs", patient="p1"), params) == ["Observation/lab1"]
    assert ids(engine, data, "Observation", access("user/Observation.rs user/Practitioner.r"), params) == [
        "Observation/lab1", "Practitioner/dr"]


def test_history_and_system_search(engine: Engine, data: str) -> None:
    who = access("patient/Observation.rs", patient="p1")
    assert status(engine, data, "GET", "Observation/_history", access=who) == 403
    assert status(engine, data, "GET", "_history", access=who) == 403
    assert status(engine, data, "GET", "Observation/_history", access=access("user/Observation.r")) == 200
    assert status(engine, data, "GET", "_history", access=access("system/*.read")) == 200
    assert ids(engine, data, "", who) == ["Observation/lab1", "Observation/vit1"]  # system search: the types it may search
    assert status(engine, data, "GET", "", params=(("_type", "Patient"),), access=who) == 403
    assert status(engine, data, "GET", "metadata", access=access("launch")) == 200


def test_transaction_entries_are_each_authorized(engine: Engine, data: str) -> None:
    who = access("patient/Observation.cruds", patient="p1")

    def tx(*entries: dict[str, Any]) -> int:
        return status(engine, data, "POST", "", {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}, access=who)

    inside = {"resource": observation("t1", "p1"), "request": {"method": "PUT", "url": "Observation/t1"}}
    outside = {"resource": observation("t2", "p2"), "request": {"method": "PUT", "url": "Observation/t2"}}
    patient = {"resource": {"resourceType": "Patient", "id": "p3"}, "request": {"method": "PUT", "url": "Patient/p3"}}
    assert tx(inside, outside) == 403
    assert tx(inside, patient) == 403
    assert status(engine, data, "GET", "Observation/t1") == 404  # rolled back
    assert tx(inside, {"request": {"method": "DELETE", "url": "Observation/lab2"}}) == 403
    assert tx(inside) == 200
    batch = resource(call(engine, data, "POST", "", {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/lab1"}}, {"request": {"method": "GET", "url": "Observation/lab2"}}]}, access=who))
    assert [e["response"]["status"][:3] for e in batch["entry"]] == ["200", "403"]


def test_conditional_interactions_see_only_what_the_grant_allows(engine: Engine, data: str) -> None:
    who = access("patient/Observation.cruds", patient="p1")
    # lab2 (p2's) matches the criteria, but the client may not see it: the conditional create makes one of p1's
    created = call(engine, data, "POST", "Observation", observation("ignored", "p1"), if_none_exist="code=http://loinc.org|2339-0&subject=Patient/p2",
                   access=who)
    assert created.status == 201
    assert status(engine, data, "DELETE", "Observation", params=(("subject", "Patient/p2"),), access=who) == 204
    assert status(engine, data, "GET", "Observation/lab2") == 200  # not deleted: it was never matched


# --- regressions from an independent review ------------------------------------------------------------------

def test_deleted_resources_history_and_recreation_stay_out_of_reach(engine: Engine, data: str) -> None:
    call(engine, data, "DELETE", "Observation/lab2")  # p2's
    who = access("patient/Observation.crs", patient="p1")
    assert status(engine, data, "GET", "Observation/lab2/_history", access=who) == 403
    assert status(engine, data, "GET", "Observation/lab2/_history/1", access=who) == 403
    # Re-creating the deleted id as p1's would make p2's old versions readable as p1's.
    assert status(engine, data, "PUT", "Observation/lab2", observation("lab2", "p1"), access=who) == 403
    assert status(engine, data, "PUT", "Observation/lab2", observation("lab2", "p1"), access=access("user/Observation.crs")) == 201


def test_patient_writes_cannot_reach_into_another_patients_record(engine: Engine, data: str) -> None:
    who = access("patient/Observation.cruds", patient="p1")
    # In p1's compartment (performer) and in p2's (subject): refused, nothing written.
    sneaky = {**observation("x1", "p2"), "performer": [{"reference": "Patient/p1"}]}
    assert status(engine, data, "PUT", "Observation/x1", sneaky, access=who) == 403
    assert status(engine, data, "GET", "Observation/x1") == 404
    assert status(engine, data, "POST", "Observation", {k: v for k, v in sneaky.items() if k != "id"}, access=who) == 403
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": sneaky, "request": {"method": "PUT", "url": "Observation/x1"}}]}
    assert status(engine, data, "POST", "", transaction, access=who) == 403
    # An existing resource in both records: p1's app can neither change nor delete it.
    call(engine, data, "PUT", "Observation/shared", {**observation("shared", "p2"), "performer": [{"reference": "Patient/p1"}]})
    assert status(engine, data, "DELETE", "Observation/shared", access=who) == 403
    assert status(engine, data, "PUT", "Observation/shared", observation("shared", "p1"), access=who) == 403
    # Its own: fine, and a clinician's user/ grant is not limited to one patient.
    assert status(engine, data, "PUT", "Observation/mine", observation("mine", "p1", performer="Practitioner/dr"), access=who) == 201
    assert status(engine, data, "PUT", "Observation/x2", sneaky | {"id": "x2"}, access=access("user/Observation.cu")) == 201


def test_a_patient_users_user_scopes_reach_only_their_own_record(engine: Engine, data: str) -> None:
    patient_user = AccessContext(parse_scopes("user/*.rs"), fhir_user="Patient/p1", client_id="app")
    assert status(engine, data, "GET", "Observation/lab1", access=patient_user) == 200
    assert status(engine, data, "GET", "Observation/lab2", access=patient_user) == 403
    assert ids(engine, data, "Observation", patient_user) == ["Observation/lab1", "Observation/vit1"]
    clinician = AccessContext(parse_scopes("user/*.rs"), fhir_user="Practitioner/dr", client_id="app")
    assert status(engine, data, "GET", "Observation/lab2", access=clinician) == 200


def test_chains_and_has_are_held_to_the_grant(engine: Engine, data: str) -> None:
    only_patients = access("user/Patient.rs")
    has = (("_has:Observation:subject:code", "http://loinc.org|2339-0"),)
    assert status(engine, data, "GET", "Patient", params=has, access=only_patients) == 403
    assert status(engine, data, "GET", "Patient", params=has, access=access("user/Patient.rs user/Observation.rs")) == 200
    # A patient/ grant on the chained type: only that patient's resources count.
    p1 = access("patient/Patient.rs patient/Observation.rs", patient="p1")
    assert ids(engine, data, "Patient", p1, has) == ["Patient/p1"]
    chain = (("subject:Patient.name", "p2"),)
    assert ids(engine, data, "Observation", access("patient/Observation.rs user/Patient.rs", patient="p1"), chain) == []
    assert status(engine, data, "GET", "Observation", params=chain, access=access("user/Observation.rs")) == 403
    assert status(engine, data, "GET", "Observation", params=(("_list", "l1"),), access=access("user/Observation.rs")) == 403


def test_a_write_only_grant_does_not_read_through_conditional_create(engine: Engine, data: str) -> None:
    who = access("patient/Observation.c", patient="p1")
    found = call(engine, data, "POST", "Observation", {k: v for k, v in observation("_", "p1").items() if k != "id"},
                 if_none_exist="_id=lab1", access=who)
    assert found.status == 200 and found.body is None and found.headers["ETag"] == 'W/"1"'
    reader = access("patient/Observation.cr", patient="p1")
    found = call(engine, data, "POST", "Observation", {k: v for k, v in observation("_", "p1").items() if k != "id"},
                 if_none_exist="_id=lab1", access=reader)
    assert found.status == 200 and resource(found)["id"] == "lab1"
