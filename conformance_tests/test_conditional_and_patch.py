"""Conditional interactions, PATCH and batch/transaction behaviour over HTTP (FHIR R4 http.html)."""

from __future__ import annotations

import base64
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from conformance_tests.client import FhirClient, parse

SYSTEM = "http://conformance.example/mrn"


def unique() -> str:
    return uuid.uuid4().hex[:12]


def patient(mrn: str, family: str = "Conditional") -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": mrn}], "name": [{"family": family}]}


def total(fhir: FhirClient, query: str) -> int:
    return int(parse(fhir.get(f"Patient?{query}&_total=accurate"))["total"])


def test_conditional_create(fhir: FhirClient) -> None:
    mrn = unique()
    header = {"If-None-Exist": f"identifier={SYSTEM}|{mrn}"}
    first = fhir.post("Patient", patient(mrn), headers=header)
    assert first.status_code == 201
    again = fhir.post("Patient", patient(mrn), headers=header)
    assert again.status_code == 200  # the existing one, nothing created
    assert parse(again)["id"] == parse(first)["id"]
    fhir.post("Patient", patient(mrn))  # a second match, made without the condition
    assert fhir.post("Patient", patient(mrn), headers=header).status_code == 412
    assert total(fhir, f"identifier={SYSTEM}|{mrn}") == 2


def test_concurrent_conditional_creates_make_one(fhir: FhirClient) -> None:
    mrn = unique()
    header = {"If-None-Exist": f"identifier={SYSTEM}|{mrn}"}
    with ThreadPoolExecutor(6) as pool:
        statuses = sorted(pool.map(lambda _: fhir.post("Patient", patient(mrn), headers=header).status_code, range(6)))
    assert statuses == [200] * 5 + [201]
    assert total(fhir, f"identifier={SYSTEM}|{mrn}") == 1


def test_conditional_update(fhir: FhirClient) -> None:
    mrn = unique()
    url = f"Patient?identifier={SYSTEM}|{mrn}"
    created = fhir.put(url, patient(mrn, "First"))
    assert created.status_code == 201
    updated = fhir.put(url, patient(mrn, "Second"))
    assert updated.status_code == 200 and parse(updated)["meta"]["versionId"] == "2"
    fhir.post("Patient", patient(mrn))
    assert fhir.put(url, patient(mrn, "Third")).status_code == 412


def test_conditional_delete(fhir: FhirClient) -> None:
    mrn = unique()
    pid = parse(fhir.post("Patient", patient(mrn)))["id"]
    assert fhir.delete(f"Patient?identifier={SYSTEM}|{mrn}").status_code in (200, 204)
    assert fhir.get(f"Patient/{pid}").status_code == 410
    assert fhir.delete(f"Patient?identifier={SYSTEM}|{mrn}").status_code in (200, 204)  # nothing matches: fine


def test_json_patch_and_fhirpath_patch(fhir: FhirClient) -> None:
    created = parse(fhir.post("Patient", patient(unique(), "Before")))
    pid = created["id"]
    json_patch = [{"op": "replace", "path": "/name/0/family", "value": "After"}, {"op": "add", "path": "/active", "value": True}]
    r = fhir.request("PATCH", f"Patient/{pid}", data=json.dumps(json_patch).encode(),
                     headers={"Content-Type": "application/json-patch+json", "If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text[:500]
    got = parse(fhir.get(f"Patient/{pid}"))
    assert got["name"][0]["family"] == "After" and got["active"] is True and got["meta"]["versionId"] == "2"
    fhirpath_patch = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"},
        {"name": "name", "valueString": "birthDate"}, {"name": "value", "valueDate": "1980-02-03"}]}]}
    r = fhir.request("PATCH", f"Patient/{pid}", fhirpath_patch)
    assert r.status_code == 200, r.text[:500]
    assert parse(fhir.get(f"Patient/{pid}"))["birthDate"] == "1980-02-03"
    stale = fhir.request("PATCH", f"Patient/{pid}", data=json.dumps(json_patch).encode(),
                         headers={"Content-Type": "application/json-patch+json", "If-Match": 'W/"1"'})
    assert stale.status_code == 412
    invalid = fhir.request("PATCH", f"Patient/{pid}", data=json.dumps([{"op": "replace", "path": "/birthDate", "value": "soon"}]).encode(),
                           headers={"Content-Type": "application/json-patch+json"})
    assert invalid.status_code in (400, 422) and parse(invalid)["resourceType"] == "OperationOutcome"
    failed_test = fhir.request("PATCH", f"Patient/{pid}", data=json.dumps([{"op": "test", "path": "/active", "value": False}]).encode(),
                               headers={"Content-Type": "application/json-patch+json"})
    assert failed_test.status_code in (400, 409, 412, 422)
    assert parse(fhir.get(f"Patient/{pid}"))["meta"]["versionId"] == "3"


def test_transaction_is_atomic_and_batch_is_not(fhir: FhirClient) -> None:
    mrn = unique()
    good = {"resource": patient(mrn), "request": {"method": "POST", "url": "Patient"}}
    bad = {"resource": {"resourceType": "Patient", "birthDate": "not a date"}, "request": {"method": "POST", "url": "Patient"}}
    tx = fhir.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [good, bad]})
    assert 400 <= tx.status_code < 500
    outcome = parse(tx)
    assert outcome["resourceType"] == "OperationOutcome" and "Bundle.entry[1]" in json.dumps(outcome)
    assert total(fhir, f"identifier={SYSTEM}|{mrn}") == 0
    batch = fhir.post("", {"resourceType": "Bundle", "type": "batch", "entry": [good, bad]})
    assert batch.status_code == 200
    statuses = [e["response"]["status"][:3] for e in parse(batch)["entry"]]
    assert statuses[0] == "201" and statuses[1].startswith("4")
    assert total(fhir, f"identifier={SYSTEM}|{mrn}") == 1


def test_transaction_patch_entry_and_conditional_reference(fhir: FhirClient) -> None:
    mrn = unique()
    pid = parse(fhir.post("Patient", patient(mrn)))["id"]
    patch = base64.b64encode(json.dumps([{"op": "add", "path": "/gender", "value": "female"}]).encode()).decode()
    out = fhir.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": patch},
         "request": {"method": "PATCH", "url": f"Patient/{pid}"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "note"},
                      "subject": {"reference": f"Patient?identifier={SYSTEM}|{mrn}"}},
         "request": {"method": "POST", "url": "Observation"}},
    ]})
    assert out.status_code == 200, out.text[:500]
    entries = parse(out)["entry"]
    assert parse(fhir.get(f"Patient/{pid}"))["gender"] == "female"
    observation = parse(fhir.get(entries[1]["response"]["location"].split("/_history")[0]))
    assert observation["subject"]["reference"] == f"Patient/{pid}"
