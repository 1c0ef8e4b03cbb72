"""Bad input gets a 4xx with an OperationOutcome, and the server keeps serving."""

from __future__ import annotations

import pytest

from conformance_tests.client import FhirClient, parse

CASES = {
    "invalid-json": (b'{"resourceType": "Patient",', "application/fhir+json"),
    "empty-body": (b"", "application/fhir+json"),
    "wrong-content-type": (b'{"resourceType": "Patient"}', "text/plain"),
    "unknown-element": (b'{"resourceType": "Patient", "favouriteColour": "blue"}', "application/fhir+json"),
    "wrong-primitive-type": (b'{"resourceType": "Patient", "active": "yes"}', "application/fhir+json"),
    "invalid-date": (b'{"resourceType": "Patient", "birthDate": "2021-02-31"}', "application/fhir+json"),
    "wrong-resource-type": (b'{"resourceType": "Observation", "status": "final", "code": {"text": "x"}}', "application/fhir+json"),
    "missing-resource-type": (b'{"name": [{"family": "x"}]}', "application/fhir+json"),
    "not-an-object": (b'[1, 2, 3]', "application/fhir+json"),
    "too-deep": (b'{"resourceType": "Patient", "extension": ' + b"[{" * 300 + b'"url": "x"' + b"}]" * 300 + b"}", "application/fhir+json"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_create(fhir: FhirClient, case: str) -> None:
    data, content_type = CASES[case]
    r = fhir.request("POST", "Patient", data=data, headers={"Content-Type": content_type})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    body = parse(r)
    assert body["resourceType"] == "OperationOutcome" and body["issue"]
    assert fhir.get("metadata").status_code == 200


def test_unknown_type_and_bad_ids(fhir: FhirClient) -> None:
    for path in ("NotAResource/1", "Patient/" + "x" * 65, "Patient/has_underscore"):
        r = fhir.get(path)
        assert 400 <= r.status_code < 500
        assert parse(r)["resourceType"] == "OperationOutcome"
    bad_put = fhir.put("Patient/bad$id", {"resourceType": "Patient", "id": "bad$id"})
    assert 400 <= bad_put.status_code < 500


def test_id_mismatch_on_update(fhir: FhirClient) -> None:
    r = fhir.put("Patient/one-id", {"resourceType": "Patient", "id": "another-id"})
    assert r.status_code == 400 and parse(r)["resourceType"] == "OperationOutcome"
    r = fhir.put("Patient/one-id", {"resourceType": "Patient"})
    assert r.status_code == 400


def test_xml_is_refused_politely(fhir: FhirClient) -> None:
    assert fhir.get("metadata", headers={"Accept": "application/fhir+xml"}).status_code == 406
    r = fhir.request("POST", "Patient", data=b"<Patient xmlns='http://hl7.org/fhir'/>", headers={"Content-Type": "application/fhir+xml"})
    assert r.status_code == 415 and parse(r)["resourceType"] == "OperationOutcome"
