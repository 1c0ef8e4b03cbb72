"""The HTTP layer: negotiation, headers, errors as OperationOutcomes."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

FHIR = "application/fhir+json"


def put(client: FlaskClient, tenant: str, path: str, body: Any, **headers: str) -> Any:
    return client.put(f"/fhir/{tenant}/{path}", json=body, headers={"Content-Type": FHIR, **headers})


def outcome(resp: Any) -> dict[str, Any]:
    body = resp.get_json(force=True)
    assert body["resourceType"] == "OperationOutcome", body
    return body  # type: ignore[no-any-return]


def test_read_headers_and_content_type(client: FlaskClient, tenant: str) -> None:
    r = put(client, tenant, "Patient/h", {"resourceType": "Patient", "id": "h"})
    assert r.status_code == 201
    assert r.headers["Location"].endswith(f"/fhir/{tenant}/Patient/h/_history/1")
    assert r.headers["ETag"] == 'W/"1"' and "Last-Modified" in r.headers
    g = client.get(f"/fhir/{tenant}/Patient/h")
    assert g.status_code == 200 and g.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    assert g.headers["ETag"] == 'W/"1"' and g.headers["X-Request-Id"]
    assert client.get(f"/fhir/{tenant}/Patient/h", headers={"Accept": "application/json"}).headers["Content-Type"].startswith("application/json")
    assert client.get(f"/fhir/{tenant}/Patient/h?_format=json").status_code == 200
    assert client.get(f"/fhir/{tenant}/Patient/h", headers={"Accept": "application/fhir+json; fhirVersion=4.0"}).status_code == 200
    assert client.get(f"/fhir/{tenant}/Patient/h", headers={"Accept": "text/html,*/*;q=0.8"}).status_code == 200
    head = client.head(f"/fhir/{tenant}/Patient/h")
    assert head.status_code == 200 and head.data == b"" and head.headers["ETag"] == 'W/"1"'
    pretty = client.get(f"/fhir/{tenant}/Patient/h?_pretty=true")
    assert b'\n  "resourceType": "Patient"' in pretty.data
    assert client.get(f"/fhir/{tenant}/Patient/h", headers={"If-None-Match": 'W/"1"'}).status_code == 304
    assert client.get(f"/fhir/{tenant}/Patient/h", headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"


@pytest.mark.parametrize(
    ("kwargs", "status", "fragment"),
    [
        ({"data": b"{not json", "content_type": FHIR}, 400, "not valid JSON"),
        ({"data": b"", "content_type": FHIR}, 400, "empty"),
        ({"data": b'{"resourceType":"Patient"}', "content_type": "text/plain"}, 415, "Content-Type"),
        ({"data": b'{"resourceType":"Patient"}'}, 415, "Content-Type"),
        ({"data": b"<Patient/>", "content_type": "application/fhir+xml"}, 415, "XML"),
        ({"data": b'{"resourceType":"Patient","bogus":1}', "content_type": FHIR}, 400, "bogus"),
        ({"data": b'{"resourceType":"Patient","birthDate":"1999-13-01"}', "content_type": FHIR}, 400, "birthDate"),
        ({"data": b'{"resourceType":"Patient","active":1}', "content_type": FHIR}, 400, "active"),
        ({"data": b'{"resourceType":"Observation"}', "content_type": FHIR}, 400, "does not match"),
        ({"data": b'{"id":"x"}', "content_type": FHIR}, 400, "resourceType"),
        ({"data": b'{"resourceType":"Patient","a":' * 200 + b"1" + b"}" * 200, "content_type": FHIR}, 400, "nested deeper"),
        ({"data": b'{"resourceType":"Patient","birthDate":"2000","birthDate":"2001"}', "content_type": FHIR}, 400, "duplicate"),
    ],
)
def test_bad_create_requests(client: FlaskClient, tenant: str, kwargs: dict[str, Any], status: int, fragment: str) -> None:
    r = client.post(f"/fhir/{tenant}/Patient", **kwargs)
    assert r.status_code == status
    issues = outcome(r)["issue"]
    assert any(fragment in (i.get("diagnostics", "") + " ".join(i.get("expression", []))) for i in issues), issues
    history = client.get(f"/fhir/{tenant}/_history").get_json()
    assert "entry" not in history  # nothing was written


def test_body_over_the_limit_is_413(client: FlaskClient, tenant: str, app: Any) -> None:
    limit = app.config["MAX_CONTENT_LENGTH"]
    r = client.post(f"/fhir/{tenant}/Patient", data=b" " * (limit + 1), content_type=FHIR)
    assert r.status_code == 413 and outcome(r)["issue"][0]["code"] == "too-long"


@pytest.mark.parametrize(
    ("method", "url", "headers", "status"),
    [
        ("GET", "/fhir/{t}/Patient/x", {"Accept": "application/fhir+xml"}, 406),
        ("GET", "/fhir/{t}/Patient/x?_format=xml", {}, 406),
        ("GET", "/fhir/{t}/Patient/x", {"Accept": "application/fhir+json; fhirVersion=3.0"}, 406),
        ("GET", "/fhir/{t}/NotAType/x", {}, 404),
        ("GET", "/fhir/no-such-tenant/Patient/x", {"Authorization": "Bearer some-token"}, 404),
        ("GET", "/fhir/Bad_Tenant/Patient/x", {"Authorization": "Bearer some-token"}, 400),
        ("GET", "/fhir/{t}/Patient/x", {}, 404),
        ("GET", "/nowhere", {}, 404),
        ("DELETE", "/fhir/{t}/metadata", {}, 405),
        ("PATCH", "/fhir/{t}/Patient", {}, 400),
        ("GET", "/fhir/{t}/Patient/" + "a" * 65, {}, 400),
        ("GET", "/fhir/{t}/Patient/a%20b", {}, 400),
        ("GET", "/fhir/{t}/Patient/x/_history/1/extra", {}, 404),
        ("GET", "/fhir/{t}/Patient/x/$everything", {}, 404),
        ("GET", "/fhir/{t}/_history?_count=abc", {}, 400),
    ],
)
def test_errors_are_operation_outcomes(client: FlaskClient, tenant: str, method: str, url: str, headers: dict[str, str], status: int) -> None:
    r = client.open(url.replace("{t}", tenant), method=method, headers=headers)
    assert r.status_code == status
    assert outcome(r)["issue"][0]["severity"] in ("error", "fatal")


def test_health_endpoints(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["database"] == "ok"


def test_metadata(client: FlaskClient, tenant: str) -> None:
    r = client.get(f"/fhir/{tenant}/metadata")
    body = r.get_json()
    assert r.status_code == 200 and body["resourceType"] == "CapabilityStatement"
    assert body["implementation"]["url"].endswith(f"/fhir/{tenant}")
    assert "application/fhir+json" in body["format"]


def test_summary_and_elements_on_read(client: FlaskClient, tenant: str) -> None:
    put(client, tenant, "Patient/s", {"resourceType": "Patient", "id": "s", "gender": "male", "birthDate": "1970",
                                      "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'}})
    body = client.get(f"/fhir/{tenant}/Patient/s?_elements=gender").get_json()
    assert set(body) == {"resourceType", "id", "meta", "gender"}
    assert body["meta"]["tag"][-1]["code"] == "SUBSETTED"
    assert "text" not in client.get(f"/fhir/{tenant}/Patient/s?_summary=data").get_json()
    assert client.get(f"/fhir/{tenant}/Patient/s?_summary=nonsense").status_code == 400


def test_prefer_minimal_over_http(client: FlaskClient, tenant: str) -> None:
    r = put(client, tenant, "Patient/m", {"resourceType": "Patient", "id": "m"}, Prefer="return=minimal")
    assert r.status_code == 201 and r.data == b""
    r = put(client, tenant, "Patient/m", {"resourceType": "Patient", "id": "m"}, Prefer="return=OperationOutcome")
    assert outcome(r)["issue"][0]["severity"] == "information"


def test_delete_over_http(client: FlaskClient, tenant: str) -> None:
    put(client, tenant, "Patient/d", {"resourceType": "Patient", "id": "d"})
    assert client.delete(f"/fhir/{tenant}/Patient/d").status_code == 204
    gone = client.get(f"/fhir/{tenant}/Patient/d")
    assert gone.status_code == 410 and outcome(gone)["issue"][0]["code"] == "deleted"
