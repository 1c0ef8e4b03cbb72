"""Instance interactions over HTTP: create, read, vread, update, delete and their headers."""

from __future__ import annotations

import uuid

from conformance_tests.client import FhirClient, parse


def new_id() -> str:
    return "c-" + uuid.uuid4().hex[:16]


def patient(pid: str | None = None, family: str = "Conformance") -> dict:  # type: ignore[type-arg]
    body = {"resourceType": "Patient", "name": [{"family": family}], "gender": "other"}
    if pid:
        body["id"] = pid
    return body


def test_create_then_read(fhir: FhirClient) -> None:
    r = fhir.post("Patient", patient())
    assert r.status_code == 201
    location = r.headers["Location"]
    assert "/Patient/" in location and "/_history/1" in location
    created = parse(r)
    assert created["meta"]["versionId"] == "1"
    read = fhir.get(f"Patient/{created['id']}")
    assert read.status_code == 200 and parse(read)["id"] == created["id"]
    assert read.headers["ETag"] in ('W/"1"', '"1"') or read.headers["ETag"].endswith('"1"')
    assert "Last-Modified" in read.headers
    assert read.headers["Content-Type"].startswith("application/fhir+json")


def test_update_creates_then_versions(fhir: FhirClient) -> None:
    pid = new_id()
    first = fhir.put(f"Patient/{pid}", patient(pid))
    assert first.status_code == 201
    second = fhir.put(f"Patient/{pid}", patient(pid, "Second"))
    assert second.status_code == 200 and parse(second)["meta"]["versionId"] == "2"
    v1 = fhir.get(f"Patient/{pid}/_history/1")
    assert v1.status_code == 200 and parse(v1)["name"][0]["family"] == "Conformance"
    assert parse(fhir.get(f"Patient/{pid}"))["name"][0]["family"] == "Second"


def test_if_match(fhir: FhirClient) -> None:
    pid = new_id()
    fhir.put(f"Patient/{pid}", patient(pid))
    stale = fhir.put(f"Patient/{pid}", patient(pid), headers={"If-Match": 'W/"9"'})
    assert stale.status_code == 412 and parse(stale)["resourceType"] == "OperationOutcome"
    ok = fhir.put(f"Patient/{pid}", patient(pid), headers={"If-Match": 'W/"1"'})
    assert ok.status_code == 200


def test_conditional_read(fhir: FhirClient) -> None:
    pid = new_id()
    r = fhir.put(f"Patient/{pid}", patient(pid))
    assert fhir.get(f"Patient/{pid}", headers={"If-None-Match": r.headers["ETag"]}).status_code == 304
    assert fhir.get(f"Patient/{pid}", headers={"If-Modified-Since": r.headers["Last-Modified"]}).status_code == 304
    assert fhir.get(f"Patient/{pid}", headers={"If-Modified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}).status_code == 200


def test_delete(fhir: FhirClient) -> None:
    pid = new_id()
    fhir.put(f"Patient/{pid}", patient(pid))
    d = fhir.delete(f"Patient/{pid}")
    assert d.status_code in (200, 204)
    gone = fhir.get(f"Patient/{pid}")
    assert gone.status_code == 410
    assert fhir.delete(f"Patient/{pid}").status_code in (200, 204)  # idempotent
    assert fhir.delete(f"Patient/{new_id()}").status_code in (200, 204)
    assert fhir.get(f"Patient/{pid}/_history/1").status_code == 200


def test_prefer_return(fhir: FhirClient) -> None:
    pid = new_id()
    minimal = fhir.put(f"Patient/{pid}", patient(pid), headers={"Prefer": "return=minimal"})
    assert minimal.status_code == 201 and minimal.content == b""
    outcome = fhir.put(f"Patient/{pid}", patient(pid), headers={"Prefer": "return=OperationOutcome"})
    assert parse(outcome)["resourceType"] == "OperationOutcome"
    full = fhir.put(f"Patient/{pid}", patient(pid), headers={"Prefer": "return=representation"})
    assert parse(full)["resourceType"] == "Patient"


def test_tags_security_and_profiles_are_kept(fhir: FhirClient) -> None:
    pid = new_id()
    body = patient(pid)
    body["meta"] = {
        "profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"],
        "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
        "tag": [{"system": "http://example.org/tags", "code": "conformance"}],
    }
    fhir.put(f"Patient/{pid}", body)
    meta = parse(fhir.get(f"Patient/{pid}"))["meta"]
    for key in ("profile", "security", "tag"):
        assert meta[key] == body["meta"][key]
