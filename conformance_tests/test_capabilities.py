"""The CapabilityStatement describes an R4 JSON server."""

from __future__ import annotations

from conformance_tests.client import FhirClient, parse


def test_metadata(fhir: FhirClient) -> None:
    r = fhir.get("metadata")
    assert r.status_code == 200
    cs = parse(r)
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"].startswith("4.0")
    assert cs["kind"] == "instance" and cs["status"] == "active"
    assert any("json" in f for f in cs["format"])
    rest = cs["rest"][0]
    assert rest["mode"] == "server"
    types = {r["type"] for r in rest["resource"]}
    assert {"Patient", "Observation", "Encounter", "Bundle", "Binary"} <= types
    patient = next(r for r in rest["resource"] if r["type"] == "Patient")
    codes = {i["code"] for i in patient["interaction"]}
    assert {"read", "vread", "update", "create", "delete", "history-instance"} <= codes
