"""Instance interactions through the engine, without HTTP, on every back-end."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_server import fhirjson
from fhir_server.engine.engine import Engine
from fhir_server.errors import BadRequest, FhirError, Gone, MethodNotAllowed, NotFound, PreconditionFailed
from testsupport.engine_calls import call, patient, resource


def test_create_assigns_id_and_ignores_client_id_and_meta(engine: Engine, tenant: str) -> None:
    body = patient("client-id")
    body["meta"] = {"versionId": "99", "lastUpdated": "2000-01-01T00:00:00Z", "tag": [{"code": "keep"}]}
    resp = call(engine, tenant, "POST", "Patient", body)
    assert resp.status == 201
    created = resource(resp)
    assert created["id"] != "client-id" and len(created["id"]) == 36
    assert created["meta"]["versionId"] == "1" and created["meta"]["tag"] == [{"code": "keep"}]
    assert created["meta"]["lastUpdated"] != "2000-01-01T00:00:00Z"
    assert resp.headers["ETag"] == 'W/"1"'
    assert resp.headers["Location"] == f"http://test/fhir/{tenant}/Patient/{created['id']}/_history/1"
    read = call(engine, tenant, "GET", f"Patient/{created['id']}")
    assert read.status == 200 and resource(read) == created


def test_update_versions_and_create_on_update(engine: Engine, tenant: str) -> None:
    first = call(engine, tenant, "PUT", "Patient/abc", patient("abc"))
    assert first.status == 201 and first.headers["ETag"] == 'W/"1"' and "Location" in first.headers
    second = call(engine, tenant, "PUT", "Patient/abc", patient("abc", "Roe"))
    assert second.status == 200 and second.headers["ETag"] == 'W/"2"' and "Location" not in second.headers
    assert resource(call(engine, tenant, "GET", "Patient/abc"))["name"] == [{"family": "Roe"}]
    assert resource(call(engine, tenant, "GET", "Patient/abc/_history/1"))["name"] == [{"family": "Doe"}]
    assert resource(call(engine, tenant, "GET", "Patient/abc/_history/1"))["meta"]["versionId"] == "1"


def test_last_updated_increases_with_each_version(engine: Engine, tenant: str) -> None:
    stamps = []
    for n in range(3):
        stamps.append(resource(call(engine, tenant, "PUT", "Patient/t", patient("t", f"Doe{n}")))["meta"]["lastUpdated"])
    assert stamps == sorted(stamps) and len(set(stamps)) == 3


def test_an_update_that_changes_nothing_writes_nothing(engine: Engine, tenant: str) -> None:
    first = resource(call(engine, tenant, "PUT", "Patient/same", patient("same")))
    # The same content with the properties in another order and the client's own versionId and lastUpdated
    again_body = {"name": [{"family": "Doe"}], "id": "same", "resourceType": "Patient",
                  "meta": {"versionId": "7", "lastUpdated": "2001-01-01T00:00:00Z"}}
    again = call(engine, tenant, "PUT", "Patient/same", again_body)
    assert again.status == 200 and again.headers["ETag"] == 'W/"1"'
    assert resource(again) == first  # the current version, lastUpdated included
    assert "unchanged" in str(resource(call(engine, tenant, "PUT", "Patient/same", patient("same"), prefer_return="OperationOutcome")))
    history = resource(call(engine, tenant, "GET", "Patient/same/_history"))
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["1"]
    # If-Match is still checked, against the current version
    with pytest.raises(PreconditionFailed):
        call(engine, tenant, "PUT", "Patient/same", patient("same"), if_match='W/"2"')
    assert call(engine, tenant, "PUT", "Patient/same", patient("same"), if_match='W/"1"').headers["ETag"] == 'W/"1"'
    # meta is content (but for the server's versionId and lastUpdated): a tag makes a version
    tagged = {**patient("same"), "meta": {"tag": [{"system": "urn:t", "code": "x"}]}}
    assert call(engine, tenant, "PUT", "Patient/same", tagged).headers["ETag"] == 'W/"2"'
    assert call(engine, tenant, "PUT", "Patient/same", tagged).headers["ETag"] == 'W/"2"'
    # A decimal's precision is content too: 1.50 is not 1.5
    obs = {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"},
           "valueQuantity": {"value": fhirjson.loads_stored(b"1.50")}}
    assert call(engine, tenant, "PUT", "Observation/o", obs).headers["ETag"] == 'W/"1"'
    obs["valueQuantity"] = {"value": fhirjson.loads_stored(b"1.5")}
    assert call(engine, tenant, "PUT", "Observation/o", obs).headers["ETag"] == 'W/"2"'
    # A deleted resource written again with its last content is restored: a version of its own
    call(engine, tenant, "DELETE", "Patient/same")
    restored = call(engine, tenant, "PUT", "Patient/same", tagged)
    assert restored.status == 201 and restored.headers["ETag"] == 'W/"4"'
    # In a transaction: the entry answers 200 with the current version, and the index still finds it
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": tagged, "request": {"method": "PUT", "url": "Patient/same"}},
        {"resource": patient(None, "Roe"), "request": {"method": "PUT", "url": "Patient?family=Roe"}},
    ]}
    out = resource(call(engine, tenant, "POST", "", bundle))
    assert [e["response"]["status"] for e in out["entry"]] == ["200 OK", "201 Created"]
    assert out["entry"][0]["response"]["etag"] == 'W/"4"'
    out = resource(call(engine, tenant, "POST", "", bundle))
    assert [e["response"]["status"] for e in out["entry"]] == ["200 OK", "200 OK"]
    assert out["entry"][1]["response"]["etag"] == 'W/"1"'
    found = resource(call(engine, tenant, "GET", "Patient", params=(("family", "Doe"), ("_tag", "urn:t|x"))))
    assert [e["resource"]["id"] for e in found["entry"]] == ["same"]


def test_if_match(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/m", patient("m"))
    with pytest.raises(PreconditionFailed) as info:
        call(engine, tenant, "PUT", "Patient/m", patient("m"), if_match='W/"7"')
    assert info.value.headers["ETag"] == 'W/"1"'
    ok = call(engine, tenant, "PUT", "Patient/m", patient("m", "Roe"), if_match='W/"1"')
    assert ok.headers["ETag"] == 'W/"2"'
    with pytest.raises(PreconditionFailed):
        call(engine, tenant, "PUT", "Patient/new", patient("new"), if_match='W/"1"')
    with pytest.raises(BadRequest):
        call(engine, tenant, "PUT", "Patient/m", patient("m"), if_match="garbage")
    with pytest.raises(PreconditionFailed):
        call(engine, tenant, "DELETE", "Patient/m", if_match='W/"1"')
    assert call(engine, tenant, "DELETE", "Patient/m", if_match='W/"2"').status == 204


def test_delete_then_read_is_gone_and_delete_is_idempotent(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/d", patient("d"))
    resp = call(engine, tenant, "DELETE", "Patient/d")
    assert resp.status == 204 and resp.headers["ETag"] == 'W/"2"'
    with pytest.raises(Gone):
        call(engine, tenant, "GET", "Patient/d")
    with pytest.raises(Gone):
        call(engine, tenant, "GET", "Patient/d/_history/2")
    assert call(engine, tenant, "DELETE", "Patient/d").status == 204
    assert call(engine, tenant, "DELETE", "Patient/never").status == 204
    assert resource(call(engine, tenant, "GET", "Patient/d/_history/1"))["id"] == "d"
    again = call(engine, tenant, "PUT", "Patient/d", patient("d"))
    assert again.status == 201 and again.headers["ETag"] == 'W/"3"'


def test_read_errors(engine: Engine, tenant: str) -> None:
    with pytest.raises(NotFound):
        call(engine, tenant, "GET", "Patient/missing")
    with pytest.raises(NotFound):
        call(engine, tenant, "GET", "Patient/missing/_history/1")
    call(engine, tenant, "PUT", "Patient/v", patient("v"))
    with pytest.raises(NotFound):
        call(engine, tenant, "GET", "Patient/v/_history/2")
    with pytest.raises(NotFound):
        call(engine, tenant, "GET", "Patient/v/_history/abc")
    with pytest.raises(NotFound):
        call(engine, tenant, "GET", "Foo/1")
    with pytest.raises(NotFound):
        call(engine, "no-such-tenant", "GET", "Patient/1")
    with pytest.raises(BadRequest):
        call(engine, tenant, "GET", "Patient/" + "x" * 65)
    with pytest.raises(MethodNotAllowed):
        call(engine, tenant, "POST", "Patient/v", patient("v"))


def test_conditional_read(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/c", patient("c"))
    assert call(engine, tenant, "GET", "Patient/c", if_none_match='W/"1"').status == 304
    assert call(engine, tenant, "GET", "Patient/c", if_none_match='W/"0"').status == 200
    assert call(engine, tenant, "GET", "Patient/c", if_modified_since="Fri, 01 Jan 2100 00:00:00 GMT").status == 304
    assert call(engine, tenant, "GET", "Patient/c", if_modified_since="Fri, 01 Jan 2000 00:00:00 GMT").status == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("PUT", "Patient/x", {"resourceType": "Patient"}, 400),  # no id
        ("PUT", "Patient/x", {"resourceType": "Patient", "id": "y"}, 400),  # id mismatch
        ("PUT", "Patient/x", {"resourceType": "Observation", "id": "x"}, 400),  # type mismatch
        ("POST", "Patient", {"id": "x"}, 400),  # no resourceType
        ("POST", "Patient", ["not", "an", "object"], 400),
        ("POST", "Patient", None, 400),
        ("PUT", "Patient/bad_id", {"resourceType": "Patient", "id": "bad_id"}, 400),
    ],
)
def test_bad_writes_store_nothing(engine: Engine, tenant: str, method: str, path: str, body: Any, status: int) -> None:
    with pytest.raises(FhirError) as info:
        call(engine, tenant, method, path, body)
    assert info.value.status == status
    with pytest.raises(NotFound):
        call(engine, tenant, "GET", "Patient/x")


def test_prefer_return(engine: Engine, tenant: str) -> None:
    minimal = call(engine, tenant, "PUT", "Patient/p", patient("p"), prefer_return="minimal")
    assert minimal.status == 201 and minimal.body is None and minimal.headers["ETag"] == 'W/"1"'
    outcome = call(engine, tenant, "PUT", "Patient/p", patient("p"), prefer_return="OperationOutcome")
    assert outcome.status == 200 and outcome.body["resourceType"] == "OperationOutcome"  # type: ignore[index]


def test_missing_required_elements_are_reported_as_warnings(engine: Engine, tenant: str) -> None:
    resp = call(engine, tenant, "PUT", "Observation/o", {"resourceType": "Observation", "id": "o", "code": {"text": "x"}}, prefer_return="OperationOutcome")
    issues = resp.body["issue"]  # type: ignore[index]
    assert any(i["severity"] == "warning" and i["expression"] == ["Observation.status"] for i in issues)


def test_decimal_precision_round_trips(engine: Engine, tenant: str) -> None:
    obs = {"resourceType": "Observation", "id": "dec", "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": fhirjson.parse(b"1.50", max_depth=2)}}
    call(engine, tenant, "PUT", "Observation/dec", obs)
    raw = call(engine, tenant, "GET", "Observation/dec").body
    assert b'"value":1.50' in bytes(raw)  # type: ignore[arg-type]


def test_capabilities(engine: Engine, tenant: str) -> None:
    resp = call(engine, tenant, "GET", "metadata")
    statement = resource(resp)
    assert statement["fhirVersion"] == "4.0.1" and statement["kind"] == "instance"
    types = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert len(types) == 146
    assert {i["code"] for i in types["Patient"]["interaction"]} == {
        "read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"
    }
    patient = types["Patient"]
    assert patient["conditionalCreate"] is True and patient["conditionalUpdate"] is True
    assert patient["conditionalDelete"] == "single" and patient["conditionalRead"] == "full-support"
    assert {i["code"] for i in statement["rest"][0]["interaction"]} == {"transaction", "batch", "history-system", "search-system"}
    assert statement["patchFormat"] == ["application/json-patch+json", "application/fhir+json"]
    names = {p["name"] for p in types["Patient"]["searchParam"]}
    assert {"name", "birthdate", "identifier", "_id", "_lastUpdated", "_tag"} <= names
    assert "_text" not in names and "_content" not in names
    with pytest.raises(NotFound):
        call(engine, "unknown-tenant", "GET", "metadata")
