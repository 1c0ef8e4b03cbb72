"""Every interaction leaves exactly one AuditEvent (IHE BALP shapes), successes, denials and failures alike.

Each request carries its own X-Request-Id; the AuditEvent of the request is found by it (BALP records it as an
entity of type XrequestId) with ``AuditEvent?entity:identifier=...``, read with a token allowed to search the
audit log (``system/AuditEvent.rs``). Against another server, give that token with ``--audit-token``.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest

from conformance_tests import smart
from conformance_tests.client import FhirClient, parse

RESTFUL = "http://hl7.org/fhir/restful-interaction"


@pytest.fixture(scope="module")
def auditor(server: Any, request: pytest.FixtureRequest) -> FhirClient:
    if server.env is None:
        token = request.config.getoption("--audit-token")
        if not token:
            pytest.skip("the audit tests need --audit-token (a token that may search AuditEvent) for a server given with --base-url")
        return FhirClient(server.base, lambda renew: token)
    return _backend_client(server, "auditor", "system/AuditEvent.rs")


@pytest.fixture(scope="module")
def narrow(server: Any) -> FhirClient:
    """A client allowed to read Observations only (for denials)."""
    if server.env is None:
        pytest.skip("needs a second client of a server given with --base-url")
    return _backend_client(server, "narrow", "system/Observation.rs")


def _backend_client(server: Any, name: str, scope: str) -> FhirClient:
    """A backend-services client registered on the server the tests started, holding ``scope``."""
    client = json.loads(server.cli("clients", "create", "--tenant", "default", "--name", name, "--scope", scope, "--secret"))
    token_url = smart.discover(server.base)["token_endpoint"]
    return FhirClient(server.base, smart.ClientCredentialsToken(token_url, client["client_id"], client["client_secret"], scope))


@pytest.fixture(scope="module")
def data(fhir: FhirClient) -> dict[str, str]:
    patient = parse(fhir.post("Patient", {"resourceType": "Patient", "name": [{"family": "Audited"}]}))["id"]
    obs = parse(fhir.post("Observation", {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
                                          "subject": {"reference": f"Patient/{patient}"}}))["id"]
    return {"patient": patient, "observation": obs}


def records(auditor: FhirClient, request_id: str) -> list[dict[str, Any]]:
    resp = auditor.get("AuditEvent", params={"entity:identifier": request_id, "_count": "50"})
    assert resp.status_code == 200, resp.text[:500]
    return [e["resource"] for e in parse(resp).get("entry", []) if e.get("search", {}).get("mode") == "match"]


def send(client: FhirClient, method: str, path: str, body: Any = None, **headers: str) -> tuple[str, Any]:
    request_id = uuid.uuid4().hex
    resp = client.request(method, path, body, headers={"X-Request-Id": request_id, **headers})
    return request_id, resp


def subtype(event: dict[str, Any]) -> str:
    return next(c["code"] for c in event["subtype"] if c.get("system") == RESTFUL)


def refs(event: dict[str, Any]) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if "reference" in e.get("what", {})]


def check(event: dict[str, Any], kind: str, action: str, outcome: str) -> None:
    assert event["type"]["code"] == "rest" and event["type"]["system"] == "http://terminology.hl7.org/CodeSystem/audit-event-type"
    assert (subtype(event), event["action"], event["outcome"]) == (kind, action, outcome)
    assert event["recorded"] and event["source"]["observer"]
    assert any(a["requestor"] for a in event["agent"])
    if outcome != "0":
        assert event.get("outcomeDesc"), "a failure says what went wrong"


def test_reads_and_searches(fhir: FhirClient, auditor: FhirClient, data: dict[str, str]) -> None:
    patient, obs = data["patient"], data["observation"]
    cases = [
        ("GET", f"Observation/{obs}", "read", "R"),
        ("GET", f"Observation/{obs}/_history/1", "vread", "R"),
        ("GET", f"Observation?subject=Patient/{patient}", "search-type", "E"),
        ("GET", f"?_type=Observation&_id={obs}", "search-system", "E"),
        ("GET", f"Patient/{patient}/_history", "history-instance", "R"),
        ("GET", "Observation/_history?_count=1", "history-type", "R"),
        ("GET", "_history?_count=1", "history-system", "R"),
        ("GET", "metadata", "capabilities", "R"),
    ]
    for method, path, kind, action in cases:
        request_id, resp = send(fhir, method, path)
        assert resp.status_code == 200, (path, resp.text[:300])
        found = records(auditor, request_id)
        assert len(found) == 1, (path, [subtype(e) for e in found])
        check(found[0], kind, action, "0")
        if kind in ("read", "vread"):
            assert any(r.startswith(f"Observation/{obs}") for r in refs(found[0]))
        if kind in ("read", "vread", "search-type", "history-instance"):
            assert f"Patient/{patient}" in refs(found[0]), "the patient whose data was read"
        if kind.startswith("search"):
            queries = [base64.b64decode(e["query"]).decode() for e in found[0]["entity"] if "query" in e]
            assert queries and path.split("?", 1)[1].split("&")[0].replace("/", "%2F") in queries[0].replace("/", "%2F")


def test_writes(fhir: FhirClient, auditor: FhirClient, data: dict[str, str]) -> None:
    patient = data["patient"]
    body = {"resourceType": "Observation", "status": "final", "code": {"text": "height"}, "subject": {"reference": f"Patient/{patient}"}}
    request_id, resp = send(fhir, "POST", "Observation", body)
    assert resp.status_code == 201
    oid = parse(resp)["id"]
    [event] = records(auditor, request_id)
    check(event, "create", "C", "0")
    assert f"Observation/{oid}/_history/1" in refs(event) and f"Patient/{patient}" in refs(event)
    request_id, resp = send(fhir, "PUT", f"Observation/{oid}", {**body, "id": oid, "status": "amended"})
    assert resp.status_code == 200
    [event] = records(auditor, request_id)
    check(event, "update", "U", "0")
    patch = [{"op": "replace", "path": "/status", "value": "final"}]
    request_id = uuid.uuid4().hex
    resp = fhir.request("PATCH", f"Observation/{oid}", data=json.dumps(patch).encode(),
                        headers={"X-Request-Id": request_id, "Content-Type": "application/json-patch+json"})
    assert resp.status_code == 200, resp.text[:300]
    [event] = records(auditor, request_id)
    check(event, "patch", "U", "0")
    request_id, resp = send(fhir, "DELETE", f"Observation/{oid}")
    assert resp.status_code in (200, 204)
    [event] = records(auditor, request_id)
    check(event, "delete", "D", "0")
    assert f"Patient/{patient}" in refs(event)


def test_bundles(fhir: FhirClient, auditor: FhirClient, data: dict[str, str]) -> None:
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:9e1f0000-0000-4000-8000-00000000000a", "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}}]}
    request_id, resp = send(fhir, "POST", "", transaction)
    assert resp.status_code == 200
    [event] = records(auditor, request_id)
    check(event, "transaction", "E", "0")
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{data['patient']}"}}, {"request": {"method": "GET", "url": "Patient/no-such"}}]}
    request_id, resp = send(fhir, "POST", "", batch)
    assert resp.status_code == 200
    found = records(auditor, request_id)  # the batch, and each entry as an interaction of its own
    assert sorted((subtype(e), e["outcome"]) for e in found) == [("batch", "0"), ("read", "0"), ("read", "4")]


def test_denials(fhir: FhirClient, auditor: FhirClient, narrow: FhirClient, data: dict[str, str]) -> None:
    for client, method, path, status, kind in (
        (fhir.without_token(), "GET", f"Patient/{data['patient']}", 401, "read"),
        (narrow, "GET", f"Patient/{data['patient']}", 403, "read"),
        (fhir, "GET", "AuditEvent", 403, "search-type"),  # the audit log is the auditors'
        (auditor, "DELETE", "AuditEvent?_id=x", 405, "delete"),  # and nobody changes it
    ):
        request_id, resp = send(client, method, path)
        assert resp.status_code == status, (path, resp.text[:300])
        assert parse(resp)["resourceType"] == "OperationOutcome"
        [event] = records(auditor, request_id)
        check(event, kind, event["action"], "4")
        assert str(status) in event["outcomeDesc"]


def test_failures(fhir: FhirClient, auditor: FhirClient, data: dict[str, str]) -> None:
    patient = data["patient"]
    for method, path, body, headers, status, kind in (
        ("GET", "Patient/no-such-patient", None, {}, 404, "read"),
        ("POST", "Patient", {"resourceType": "Patient", "birthDate": "2001-02-30"}, {}, 400, "create"),
        ("PUT", f"Patient/{patient}", {"resourceType": "Patient", "id": patient}, {"If-Match": 'W/"999"'}, 412, "update"),
    ):
        request_id, resp = send(fhir, method, path, body, **headers)
        assert resp.status_code == status, (path, resp.text[:300])
        [event] = records(auditor, request_id)
        check(event, kind, event["action"], "4")


def test_who_looked_at_a_patient_and_reading_the_log_is_recorded(fhir: FhirClient, auditor: FhirClient,
                                                                 data: dict[str, str]) -> None:
    request_id, resp = send(fhir, "GET", f"Observation/{data['observation']}")
    assert resp.status_code == 200
    looked = auditor.get("AuditEvent", params={"patient": data["patient"], "subtype": f"{RESTFUL}|read", "_count": "200"})
    assert looked.status_code == 200
    ids = [e["resource"]["id"] for e in parse(looked).get("entry", [])]
    [mine] = records(auditor, request_id)
    assert mine["id"] in ids
    audit_read_id = uuid.uuid4().hex
    auditor.request("GET", "AuditEvent", headers={"X-Request-Id": audit_read_id}, params={"_count": "1"})
    [event] = records(auditor, audit_read_id)
    check(event, "search-type", "E", "0")
