"""Batch and transaction Bundles, conditional interactions and PATCH, through the engine on every back-end."""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from fhir_server.engine.engine import Engine
from fhir_server.errors import BadRequest, FhirError, NotFound, PreconditionFailed
from testsupport.engine_calls import call, resource

MRN = "http://hospital.example/mrn"


def pat(mrn: str, family: str = "Doe", pid: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}], "name": [{"family": family}]}
    if pid:
        body["id"] = pid
    return body


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(engine: Engine, tenant: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    resp = call(engine, tenant, "POST", "", body, **kw)
    assert resp.status == 200
    return resource(resp)


def count(engine: Engine, tenant: str, rtype: str, query: tuple[tuple[str, str], ...] = ()) -> int:
    return int(resource(call(engine, tenant, "GET", rtype, params=(*query, ("_total", "accurate"))))["total"])


def test_transaction_resolves_references_and_orders_work(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/old", pat("0", "Old", "old"))
    out = post(engine, tenant, bundle(
        "transaction",
        {"fullUrl": "urn:uuid:11111111-1111-1111-1111-111111111111", "resource": pat("1", "New"),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:22222222-2222-2222-2222-222222222222",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"},
                      "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><a href="urn:uuid:11111111-1111-1111-1111-111111111111">patient</a></div>'},
                      "extension": [{"url": "http://example.org/x", "valueReference": {"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"}}],
                      "contained": [{"resourceType": "Provenance", "id": "p", "recorded": "2024-01-01T00:00:00Z",
                                     "target": [{"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"}],
                                     "agent": [{"who": {"display": "x"}}]}]},
         "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "DELETE", "url": "Patient/old"}},
        {"request": {"method": "GET", "url": "Patient?identifier=http://hospital.example/mrn|1"}},
    ))
    assert out["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in out["entry"]]
    assert statuses[0].startswith("201") and statuses[1].startswith("201") and statuses[2].startswith("204")
    patient_id = out["entry"][0]["response"]["location"].split("/")[1]
    obs_id = out["entry"][1]["response"]["location"].split("/")[1]
    obs = resource(call(engine, tenant, "GET", f"Observation/{obs_id}"))
    assert obs["subject"]["reference"] == f"Patient/{patient_id}"
    assert obs["extension"][0]["valueReference"]["reference"] == f"Patient/{patient_id}"
    assert obs["contained"][0]["target"][0]["reference"] == f"Patient/{patient_id}"
    assert f'href="Patient/{patient_id}"' in obs["text"]["div"]
    assert out["entry"][3]["resource"]["total"] == 1  # the GET ran after the writes
    with pytest.raises(FhirError):
        call(engine, tenant, "GET", "Patient/old")


def test_a_failing_entry_rolls_everything_back(engine: Engine, tenant: str) -> None:
    with pytest.raises(FhirError) as info:
        post(engine, tenant, bundle(
            "transaction",
            {"resource": pat("A"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": pat("B", pid="b"), "request": {"method": "PUT", "url": "Patient/b"}},
            {"resource": {"resourceType": "Patient", "birthDate": "not-a-date"}, "request": {"method": "POST", "url": "Patient"}},
        ))
    assert info.value.status == 400
    assert "Bundle.entry[2]" in info.value.issues[0].diagnostics
    assert info.value.issues[0].expression == ("Bundle.entry[2].resource.birthDate",)
    assert count(engine, tenant, "Patient") == 0


def test_conditional_create_update_delete_in_a_transaction(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/p7", pat("7", "Seven", "p7"))
    out = post(engine, tenant, bundle(
        "transaction",
        {"fullUrl": "urn:uuid:aaaaaaaa-0000-0000-0000-000000000001", "resource": pat("7", "Again"),
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MRN}|7"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:aaaaaaaa-0000-0000-0000-000000000001"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": pat("8", "Eight"), "request": {"method": "PUT", "url": f"Patient?identifier={MRN}|8"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "y"},
                      "subject": {"reference": f"Patient?identifier={MRN}|7"}},
         "request": {"method": "POST", "url": "Observation"}},
    ))
    assert out["entry"][0]["response"]["status"].startswith("200")  # matched: nothing created
    assert out["entry"][0]["response"]["location"].startswith("Patient/p7/")
    assert out["entry"][2]["response"]["status"].startswith("201")
    obs = resource(call(engine, tenant, "GET", "Observation", params=(("subject", "Patient/p7"),)))
    assert len(obs["entry"]) == 2
    assert count(engine, tenant, "Patient") == 2
    # a conditional reference that matches nothing fails the transaction
    with pytest.raises(FhirError) as info:
        post(engine, tenant, bundle("transaction", {
            "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "z"},
                         "subject": {"reference": f"Patient?identifier={MRN}|nobody"}},
            "request": {"method": "POST", "url": "Observation"}}))
    assert info.value.status == 412 and info.value.issues[0].diagnostics.startswith("Bundle.entry[0]")
    assert count(engine, tenant, "Observation") == 2


def test_batch_entries_are_independent(engine: Engine, tenant: str) -> None:
    out = post(engine, tenant, bundle(
        "batch",
        {"resource": pat("1"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "active": "maybe"}, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient/missing"}},
        {"resource": pat("2", pid="b2"), "request": {"method": "PUT", "url": "Patient/b2"}},
        {"request": {"method": "GET", "url": "metadata"}},
    ))
    assert out["type"] == "batch-response"
    statuses = [e["response"]["status"][:3] for e in out["entry"]]
    assert statuses == ["201", "400", "404", "201", "200"]
    assert out["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert count(engine, tenant, "Patient") == 2


def test_single_conditional_interactions(engine: Engine, tenant: str) -> None:
    first = call(engine, tenant, "POST", "Patient", pat("c1"), if_none_exist=f"identifier={MRN}|c1")
    again = call(engine, tenant, "POST", "Patient", pat("c1"), if_none_exist=f"identifier={MRN}|c1")
    assert first.status == 201 and again.status == 200 and first.headers["Location"] == again.headers["Content-Location"]
    call(engine, tenant, "POST", "Patient", pat("dup"))
    call(engine, tenant, "POST", "Patient", pat("dup"))
    with pytest.raises(PreconditionFailed):
        call(engine, tenant, "POST", "Patient", pat("dup"), if_none_exist=f"identifier={MRN}|dup")
    # conditional update: none -> create, one -> update, several -> 412
    created = call(engine, tenant, "PUT", "Patient", pat("u1", "First"), params=(("identifier", f"{MRN}|u1"),))
    updated = call(engine, tenant, "PUT", "Patient", pat("u1", "Second"), params=(("identifier", f"{MRN}|u1"),))
    assert created.status == 201 and updated.status == 200 and updated.headers["ETag"] == 'W/"2"'
    with pytest.raises(PreconditionFailed):
        call(engine, tenant, "PUT", "Patient", pat("dup"), params=(("identifier", f"{MRN}|dup"),))
    # conditional delete: several is refused under the default setting, one is deleted
    with pytest.raises(PreconditionFailed):
        call(engine, tenant, "DELETE", "Patient", params=(("identifier", f"{MRN}|dup"),))
    assert call(engine, tenant, "DELETE", "Patient", params=(("identifier", f"{MRN}|u1"),)).status == 204
    assert count(engine, tenant, "Patient", (("identifier", f"{MRN}|u1"),)) == 0
    assert call(engine, tenant, "DELETE", "Patient", params=(("identifier", f"{MRN}|none"),)).status == 204
    with pytest.raises(BadRequest):
        call(engine, tenant, "DELETE", "Patient", params=(("nonsense", "x"),))  # unknown criteria never match everything


def test_concurrent_conditional_creates_make_one_resource(engine: Engine, tenant: str) -> None:
    barrier = threading.Barrier(8)

    def create(i: int) -> int:
        barrier.wait()
        return call(engine, tenant, "POST", "Patient", pat("race"), if_none_exist=f"identifier={MRN}|race").status

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(create, range(8)))
    assert statuses == [200] * 7 + [201]
    assert count(engine, tenant, "Patient", (("identifier", f"{MRN}|race"),)) == 1


def test_concurrent_conditional_transactions_make_one_resource(engine: Engine, tenant: str) -> None:
    barrier = threading.Barrier(6)

    def send(i: int) -> str:
        barrier.wait()
        out = post(engine, tenant, bundle("transaction", {
            "resource": pat("tx-race", f"T{i}"), "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MRN}|tx-race"}}))
        return str(out["entry"][0]["response"]["status"][:3])

    with ThreadPoolExecutor(6) as pool:
        statuses = sorted(pool.map(send, range(6)))
    assert statuses == ["200"] * 5 + ["201"]


def test_patch(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/pp", pat("pp", "Before", "pp"))
    fhirpath_patch = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Patient.name[0].family"},
        {"name": "value", "valueString": "After"}]}]}
    resp = call(engine, tenant, "PATCH", "Patient/pp", fhirpath_patch, content_type="application/fhir+json")
    assert resp.status == 200 and resp.headers["ETag"] == 'W/"2"'
    assert resource(call(engine, tenant, "GET", "Patient/pp"))["name"][0]["family"] == "After"
    json_patch = [{"op": "add", "path": "/gender", "value": "female"}]
    call(engine, tenant, "PATCH", "Patient/pp", json_patch, content_type="application/json-patch+json", if_match='W/"2"')
    assert resource(call(engine, tenant, "GET", "Patient/pp"))["gender"] == "female"
    with pytest.raises(PreconditionFailed):
        call(engine, tenant, "PATCH", "Patient/pp", json_patch, content_type="application/json-patch+json", if_match='W/"1"')
    with pytest.raises(BadRequest):  # the patched resource is validated like any write
        call(engine, tenant, "PATCH", "Patient/pp", [{"op": "add", "path": "/gender", "value": 3}], content_type="application/json-patch+json")
    with pytest.raises(BadRequest):
        call(engine, tenant, "PATCH", "Patient/pp", [{"op": "replace", "path": "/id", "value": "other"}], content_type="application/json-patch+json")
    with pytest.raises(NotFound):
        call(engine, tenant, "PATCH", "Patient/none", json_patch, content_type="application/json-patch+json")
    # conditional patch, and patch inside a transaction (Binary holding a JSON Patch)
    call(engine, tenant, "PATCH", "Patient", [{"op": "add", "path": "/active", "value": True}],
         content_type="application/json-patch+json", params=(("identifier", f"{MRN}|pp"),))
    assert resource(call(engine, tenant, "GET", "Patient/pp"))["active"] is True
    data = base64.b64encode(json.dumps([{"op": "replace", "path": "/active", "value": False}]).encode()).decode()
    out = post(engine, tenant, bundle("transaction", {
        "resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": data},
        "request": {"method": "PATCH", "url": "Patient/pp"}}))
    assert out["entry"][0]["response"]["status"].startswith("200")
    rename = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Patient.name[0].family"},
        {"name": "value", "valueString": "InBundle"}]}]}
    post(engine, tenant, bundle("transaction", {"resource": rename, "request": {"method": "PATCH", "url": f"Patient?identifier={MRN}|pp"}}))
    final = resource(call(engine, tenant, "GET", "Patient/pp"))
    assert final["active"] is False and final["name"][0]["family"] == "InBundle" and final["meta"]["versionId"] == "6"


def test_bundle_limits_and_shape(engine: Engine, tenant: str) -> None:
    with pytest.raises(BadRequest):
        post(engine, tenant, {"resourceType": "Bundle", "type": "collection"})
    with pytest.raises(FhirError) as info:
        post(engine, tenant, bundle("transaction", *[{"request": {"method": "GET", "url": "metadata"}}] * (engine.settings.max_bundle_entries + 1)))
    assert info.value.status == 413
    with pytest.raises(FhirError) as info:  # one resource written twice
        post(engine, tenant, bundle("transaction",
                                    {"resource": pat("x", pid="same"), "request": {"method": "PUT", "url": "Patient/same"}},
                                    {"resource": pat("y", pid="same"), "request": {"method": "PUT", "url": "Patient/same"}}))
    assert info.value.status == 400 and "Bundle.entry[0]" in info.value.issues[0].diagnostics


def test_absolute_full_urls_and_foreign_request_urls(engine: Engine, tenant: str) -> None:
    """As in the R4 examples: entries named by absolute URLs of another server act on this one."""
    out = post(engine, tenant, bundle(
        "transaction",
        {"fullUrl": "http://other.example/fhir/Patient/a2", "resource": pat("abs", pid="a2"),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:bbbbbbbb-0000-0000-0000-000000000001",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "Patient/a2"}, "performer": [{"reference": "http://other.example/fhir/Patient/a2"}]},
         "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "http://hl7.org/fhir/us/sdc/ValueSet/vs1",
         "resource": {"resourceType": "ValueSet", "id": "vs1", "url": "http://hl7.org/fhir/us/sdc/ValueSet/vs1", "status": "active"},
         "request": {"method": "PUT", "url": "http://hl7.org/fhir/us/sdc/ValueSet/vs1"}},
        {"fullUrl": "http://hl7.org/fhir/us/sdc/Questionnaire/q1",
         "resource": {"resourceType": "Questionnaire", "id": "q1", "status": "active", "item": [
             {"linkId": "1", "type": "choice", "answerValueSet": "http://hl7.org/fhir/us/sdc/ValueSet/vs1"}]},
         "request": {"method": "PUT", "url": "http://hl7.org/fhir/us/sdc/Questionnaire/q1"}},
    ))
    patient_id = out["entry"][0]["response"]["location"].split("/")[1]
    assert patient_id != "a2"  # create assigns the id
    obs = resource(call(engine, tenant, "GET", out["entry"][1]["response"]["location"].rsplit("/_history", 1)[0]))
    assert obs["subject"]["reference"] == obs["performer"][0]["reference"] == f"Patient/{patient_id}"
    questionnaire = resource(call(engine, tenant, "GET", "Questionnaire/q1"))  # canonicals keep their meaning
    assert questionnaire["item"][0]["answerValueSet"] == "http://hl7.org/fhir/us/sdc/ValueSet/vs1"
    assert resource(call(engine, tenant, "GET", "ValueSet/vs1"))["url"] == "http://hl7.org/fhir/us/sdc/ValueSet/vs1"


def test_operations_and_failed_preconditions_fail_the_transaction(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/keep", pat("keep", pid="keep"))
    call(engine, tenant, "PUT", "Patient/other", pat("other", pid="other"))
    for entry, status in (
        ({"resource": {"resourceType": "Parameters"}, "request": {"method": "POST", "url": "CodeSystem/$lookup"}}, 404),
        ({"resource": pat("v", pid="keep"), "request": {"method": "PUT", "url": "Patient/keep", "ifMatch": 'W/"7"'}}, 412),
        ({"request": {"method": "PATCH", "url": f"Patient?identifier={MRN}|nobody"},
          "resource": {"resourceType": "Parameters", "parameter": []}}, 404),
    ):
        with pytest.raises(FhirError) as info:
            post(engine, tenant, bundle("transaction", {"request": {"method": "DELETE", "url": "Patient/other"}}, entry))
        assert info.value.status == status and info.value.issues[0].diagnostics.startswith("Bundle.entry[1]")
        assert resource(call(engine, tenant, "GET", "Patient/other"))["meta"]["versionId"] == "1"  # the DELETE rolled back
        assert resource(call(engine, tenant, "GET", "Patient/keep"))["meta"]["versionId"] == "1"


def test_a_transaction_updating_many_resources_checks_every_version_first(engine: Engine, tenant: str) -> None:
    for i in range(4):
        call(engine, tenant, "PUT", f"Patient/m{i}", pat(f"m{i}", "Before", f"m{i}"))
    updates = [{"resource": pat(f"m{i}", "After", f"m{i}"), "request": {"method": "PUT", "url": f"Patient/m{i}", "ifMatch": 'W/"1"'}}
               for i in range(4)]
    stale = [dict(u) for u in updates]
    stale[2] = {**updates[2], "request": {**updates[2]["request"], "ifMatch": 'W/"9"'}}
    with pytest.raises(FhirError) as info:
        post(engine, tenant, bundle("transaction", *stale))
    assert info.value.status == 412 and info.value.issues[0].diagnostics.startswith("Bundle.entry[2]")
    assert count(engine, tenant, "Patient", (("family", "After"),)) == 0
    out = post(engine, tenant, bundle("transaction", *updates,
                                      {"resource": pat("m9", "After"), "request": {"method": "POST", "url": "Patient"}}))
    assert [e["response"]["etag"] for e in out["entry"]] == ['W/"2"'] * 4 + ['W/"1"']
    assert count(engine, tenant, "Patient", (("family", "After"),)) == 5
    assert count(engine, tenant, "Patient", (("family", "Before"),)) == 0  # the old index rows are gone
    assert count(engine, tenant, "Patient", (("identifier", f"{MRN}|m3"),)) == 1


@pytest.mark.parametrize("request_part", [
    {"method": "PUT", "url": "Patient/w1", "ifMatch": 3},
    {"method": "POST", "url": "Patient", "ifNoneExist": 3},
    {"method": "GET", "url": "Patient/w1", "ifModifiedSince": 5},
    {"method": "GET", "url": "Patient/w1", "ifNoneMatch": ["x"]},
    {"method": "PUT", "url": "Patient/w1", "ifMatch": 'W/"abc"'},
])
def test_malformed_request_fields_are_400_and_write_nothing(engine: Engine, tenant: str, request_part: dict[str, Any]) -> None:
    with pytest.raises(FhirError) as info:
        post(engine, tenant, bundle("transaction",
                                    {"resource": pat("w1", pid="w1"), "request": {"method": "PUT", "url": "Patient/w1"}},
                                    {"resource": pat("w2", pid="w1"), "request": request_part}))
    assert info.value.status == 400 and "Bundle.entry[1]" in info.value.issues[0].diagnostics
    assert not info.value.headers
    assert count(engine, tenant, "Patient") == 0
    out = post(engine, tenant, bundle("batch",
                                      {"resource": pat("w1", pid="w1"), "request": {"method": "PUT", "url": "Patient/w1"}},
                                      {"resource": pat("w2", pid="w1"), "request": request_part}))
    assert [e["response"]["status"][:3] for e in out["entry"]] == ["201", "400"]


@pytest.mark.parametrize("binary", [
    {"resourceType": "Binary", "contentType": 5, "data": "W10="},
    {"resourceType": "Binary", "contentType": None, "data": "W10="},
    {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": 5},
    {"resourceType": "Binary", "contentType": "application/json-patch+json"},
    {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": "not base64!"},
    {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": base64.b64encode(b"[" * 5000).decode()},
    {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": base64.b64encode(b"[NaN]").decode()},
    {"resourceType": "Patient"},
    [1, 2],
])
def test_malformed_patch_entries_are_400(engine: Engine, tenant: str, binary: Any) -> None:
    call(engine, tenant, "PUT", "Patient/pb", pat("pb", pid="pb"))
    with pytest.raises(FhirError) as info:
        post(engine, tenant, bundle("transaction", {"resource": binary, "request": {"method": "PATCH", "url": "Patient/pb"}}))
    assert info.value.status == 400 and info.value.issues[0].expression[0].startswith("Bundle.entry[0]")


def test_references_are_rewritten_where_the_specification_says(engine: Engine, tenant: str) -> None:
    urn = "urn:uuid:4a1b3c5d-0000-4000-8000-00000000000a"
    out = post(engine, tenant, bundle(
        "transaction",
        {"fullUrl": urn, "resource": pat("r1"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {
            "resourceType": "DocumentReference", "status": "current",
            "subject": {"reference": urn.upper().replace("URN:UUID:", "urn:uuid:")},  # UUIDs compare in either case
            "identifier": [{"system": "urn:ietf:rfc:3986", "value": urn}],  # an identifier is not a link
            "description": urn,
            "content": [{"attachment": {"url": urn}}],  # type url: rewritten
            "extension": [{"url": "http://example.org/canonical", "valueCanonical": urn},
                          {"url": "http://example.org/uri", "valueUri": urn}],
            "text": {"status": "generated",
                     "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{urn}">{urn}</a></div>'}},
         "request": {"method": "POST", "url": "DocumentReference"}},
    ))
    pid = out["entry"][0]["response"]["location"].split("/")[1]
    doc = resource(call(engine, tenant, "GET", out["entry"][1]["response"]["location"].rsplit("/_history", 1)[0]))
    assert doc["subject"]["reference"] == f"Patient/{pid}"
    assert doc["identifier"][0]["value"] == urn and doc["description"] == urn
    assert doc["content"][0]["attachment"]["url"] == f"Patient/{pid}"
    assert doc["extension"][0]["valueCanonical"] == urn and doc["extension"][1]["valueUri"] == f"Patient/{pid}"
    assert f'href="Patient/{pid}">{urn}</a>' in doc["text"]["div"]
    with pytest.raises(FhirError) as info:  # a bundle-local name that names no entry
        post(engine, tenant, bundle("transaction", {"resource": {
            "resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "urn:uuid:0badc0de-0000-4000-8000-000000000000"}},
            "request": {"method": "POST", "url": "Observation"}}))
    assert info.value.status == 400 and info.value.issues[0].expression == ("Bundle.entry[0].resource.subject.reference",)


def test_patch_entries_have_their_references_rewritten(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Observation/o1", {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}})
    urn = "urn:uuid:4a1b3c5d-0000-4000-8000-00000000000b"
    fhirpath = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Observation"}, {"name": "name", "valueString": "subject"},
        {"name": "value", "valueReference": {"reference": urn}}]}]}
    out = post(engine, tenant, bundle("transaction",
                                      {"fullUrl": urn, "resource": pat("pr"), "request": {"method": "POST", "url": "Patient"}},
                                      {"resource": fhirpath, "request": {"method": "PATCH", "url": "Observation/o1"}}))
    pid = out["entry"][0]["response"]["location"].split("/")[1]
    assert resource(call(engine, tenant, "GET", "Observation/o1"))["subject"]["reference"] == f"Patient/{pid}"
    urn2 = "urn:uuid:4a1b3c5d-0000-4000-8000-00000000000c"
    json_patch = [{"op": "replace", "path": "/subject", "value": {"reference": urn2}}]
    data = base64.b64encode(json.dumps(json_patch).encode()).decode()
    out = post(engine, tenant, bundle("transaction",
                                      {"fullUrl": urn2, "resource": pat("pr2"), "request": {"method": "POST", "url": "Patient"}},
                                      {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": data},
                                       "request": {"method": "PATCH", "url": "Observation/o1"}}))
    pid2 = out["entry"][0]["response"]["location"].split("/")[1]
    assert resource(call(engine, tenant, "GET", "Observation/o1"))["subject"]["reference"] == f"Patient/{pid2}"


def test_conditional_creates_in_one_bundle_see_each_other(engine: Engine, tenant: str) -> None:
    criteria = f"identifier={MRN}|same"
    out = post(engine, tenant, bundle(
        "transaction",
        {"resource": pat("same"), "request": {"method": "POST", "url": "Patient", "ifNoneExist": criteria}},
        {"resource": pat("same"), "request": {"method": "POST", "url": "Patient", "ifNoneExist": criteria}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": f"Patient?{criteria}"}}, "request": {"method": "POST", "url": "Observation"}},
    ))
    assert [e["response"]["status"][:3] for e in out["entry"]] == ["201", "200", "201"]
    first, second = (e["response"]["location"].split("/_history")[0] for e in out["entry"][:2])
    assert first == second and count(engine, tenant, "Patient") == 1
    obs = resource(call(engine, tenant, "GET", out["entry"][2]["response"]["location"].split("/_history")[0]))
    assert obs["subject"]["reference"] == first


def test_overlapping_identities_fail(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/ov", pat("ov", pid="ov"))
    for other in ({"request": {"method": "DELETE", "url": "Patient/ov"}},
                  {"resource": pat("ov", "Changed", "ov"), "request": {"method": "PUT", "url": "Patient/ov"}}):
        with pytest.raises(FhirError) as info:
            post(engine, tenant, bundle("transaction", other, {
                "resource": pat("ov"), "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MRN}|ov"}}))
        assert info.value.status == 400
    assert resource(call(engine, tenant, "GET", "Patient/ov"))["meta"]["versionId"] == "1"
    with pytest.raises(FhirError) as info:  # bdl-7: one full URL, two entries
        post(engine, tenant, bundle("transaction",
                                    {"fullUrl": "urn:uuid:4a1b3c5d-0000-4000-8000-00000000000d", "resource": pat("d1"), "request": {"method": "POST", "url": "Patient"}},
                                    {"fullUrl": "urn:uuid:4A1B3C5D-0000-4000-8000-00000000000D", "resource": pat("d2"), "request": {"method": "POST", "url": "Patient"}}))
    assert info.value.status == 400 and "Bundle.entry[1]" in info.value.issues[0].diagnostics


def test_conditional_delete_in_a_transaction_follows_the_setting(engine: Engine, tenant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        call(engine, tenant, "POST", "Patient", pat("many"))
    delete_many = bundle("transaction", {"request": {"method": "DELETE", "url": f"Patient?identifier={MRN}|many"}})
    with pytest.raises(FhirError) as info:
        post(engine, tenant, delete_many)
    assert info.value.status == 412
    monkeypatch.setattr(engine, "settings", dataclasses.replace(engine.settings, conditional_delete="multiple"))
    assert post(engine, tenant, delete_many)["entry"][0]["response"]["status"].startswith("204")
    assert count(engine, tenant, "Patient") == 0


def test_nested_bundles_and_head_entries(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/h1", pat("h1", pid="h1"))
    out = post(engine, tenant, bundle("batch",
                                      {"resource": bundle("transaction"), "request": {"method": "POST", "url": "/"}},
                                      {"request": {"method": "HEAD", "url": "Patient/h1"}}))
    assert out["entry"][0]["response"]["status"].startswith("400")
    assert out["entry"][1]["response"]["status"].startswith("200") and "resource" not in out["entry"][1]
    assert out["entry"][1]["response"]["etag"] == 'W/"1"'


def test_crossing_transactions_do_not_deadlock(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/xa", pat("xa", pid="xa"))
    call(engine, tenant, "PUT", "Patient/xb", pat("xb", pid="xb"))

    def cross(i: int) -> int:
        first, second = ("xa", "xb") if i % 2 else ("xb", "xa")
        resp = call(engine, tenant, "POST", "", bundle("transaction",
                                                       {"request": {"method": "DELETE", "url": f"Patient/{first}"}},
                                                       {"resource": pat(second, "T", second), "request": {"method": "PUT", "url": f"Patient/{second}"}},
                                                       {"resource": pat(f"n{i}"), "request": {"method": "POST", "url": "Patient"}}))
        return resp.status

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(cross, range(12))) == {200}
    assert count(engine, tenant, "Patient", (("family", "T"),)) >= 1


def test_the_conditional_entries_of_a_transaction_are_searched_together(engine: Engine, tenant: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Conditional entries are resolved up front, several to a statement (``search.matching_ids_many``): the same
    answers as one by one, across statement boundaries, with the criteria that need the bodies and the criteria in
    error still decided (and named) entry by entry."""
    from fhir_server.engine import search

    monkeypatch.setattr(search, "IDS_PER_STATEMENT", 4)
    before = {str(i): resource(call(engine, tenant, "PUT", "Patient", pat(str(i), f"Was{i}"),
                                    params=(("identifier", f"{MRN}|{i}"),)))["id"]
              for i in range(6)}
    call(engine, tenant, "POST", "Patient", {"resourceType": "Patient", "name": [{"family": "Zyxwvut"}]})
    entries = [{"fullUrl": f"urn:uuid:00000000-0000-0000-0000-{i:012d}", "resource": pat(str(i), f"Now{i}"),
                "request": {"method": "PUT", "url": f"Patient?identifier={MRN}|{i}"}} for i in range(10)]
    entries.append({"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                 "identifier": [{"system": "urn:obs", "value": "1"}],
                                 "subject": {"reference": f"Patient?identifier={MRN}|3"}},
                    "request": {"method": "POST", "url": "Observation", "ifNoneExist": "identifier=urn:obs|1"}})
    entries.append({"resource": {"resourceType": "Patient", "name": [{"family": "Zyxwvut"}], "active": True},
                    "request": {"method": "PUT", "url": "Patient?family:contains=xwvu"}})  # confirmed on the body
    out = post(engine, tenant, bundle("transaction", *entries))
    statuses = [e["response"]["status"] for e in out["entry"]]
    assert statuses == ["200 OK"] * 6 + ["201 Created"] * 4 + ["201 Created", "200 OK"]
    for i in range(6):  # the same resources, updated
        assert out["entry"][i]["response"]["location"].startswith(f"Patient/{before[str(i)]}/_history/2")
    [obs] = [e["resource"] for e in resource(call(engine, tenant, "GET", "Observation", params=(("identifier", "urn:obs|1"),)))["entry"]]
    assert obs["subject"]["reference"] == f"Patient/{before['3']}"
    assert count(engine, tenant, "Patient", (("active", "true"),)) == 1
    again = post(engine, tenant, bundle("transaction", *entries[10:11]))  # the conditional create finds it
    assert again["entry"][0]["response"]["status"] == "200 OK" and count(engine, tenant, "Observation") == 1

    call(engine, tenant, "POST", "Patient", pat("5", "Twin"))  # MRN 5 now names two patients
    failing = [*entries[:3], {"resource": pat("x"), "request": {"method": "PUT", "url": "Patient?nonsense=1"}},
               *entries[4:5]]
    with pytest.raises(FhirError) as bad:  # criteria in error: named in the entry's turn
        post(engine, tenant, bundle("transaction", *failing))
    assert bad.value.status == 400 and "Bundle.entry[3]" in bad.value.issues[0].expression[0]
    with pytest.raises(FhirError) as two:
        post(engine, tenant, bundle("transaction", *entries[:8]))
    assert two.value.status == 412 and "Bundle.entry[5]" in two.value.issues[0].diagnostics
    assert count(engine, tenant, "Patient", (("family", "Now"),)) == 10  # neither failure wrote anything
