"""Inputs an independent review found to give 500s or wrong answers, kept as regressions."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient

FHIR = "application/fhir+json"


def post(client: FlaskClient, tenant: str, body: dict[str, Any]) -> Any:
    return client.post(f"/fhir/{tenant}/{body['resourceType']}", data=json.dumps(body), content_type=FHIR)


@pytest.mark.parametrize("code", ["mg/0", "10*99999999", "10*-99999", "(mg"])
def test_odd_ucum_units_are_stored_and_searchable(client: FlaskClient, tenant: str, code: str) -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "valueQuantity": {"value": 1, "system": "http://unitsofmeasure.org", "code": code}}
    assert post(client, tenant, obs).status_code == 201
    r = client.get(f"/fhir/{tenant}/Observation", query_string={"value-quantity": f"1|http://unitsofmeasure.org|{code}"})
    assert r.status_code == 200 and r.get_json()["total"] == 1


@pytest.mark.parametrize(
    "reference",
    ["Patient/" + "a" * 65, "http://x/" + "A" * 70 + "/1", "Patient/1/_history/" + "9" * 70, "http://x/" + "y" * 5000],
)
def test_unusual_references_are_stored(client: FlaskClient, tenant: str, reference: str) -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": reference}}
    assert post(client, tenant, obs).status_code == 201


def test_control_characters_are_refused(client: FlaskClient, tenant: str) -> None:
    r = post(client, tenant, {"resourceType": "Patient", "name": [{"family": "a\u0000b"}]})
    assert r.status_code == 400 and "control character" in r.get_json()["issue"][0]["diagnostics"]
    for query in ({"_id": "a\u0000"}, {"subject": "Patient/a\u0000b"}, {"code": "x\u0001"}):
        assert client.get(f"/fhir/{tenant}/Observation", query_string=query).status_code == 400


def _cursor(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"d": "next", "k": key, "t": None})).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("query", "key"),
    [
        ({"_sort": "_lastUpdated"}, ["abc", "Patient", "a"]),
        ({}, [1, 2]),
        ({}, [{"x": 1}, "a"]),
        ({"_sort": "birthdate"}, [2**63, "Patient", "a"]),
        ({"_sort": "name"}, [5, "Patient", "a"]),
        ({"_sort": "birthdate"}, [None, "Patient", "a"]),
    ],
)
def test_tampered_cursors_are_400(client: FlaskClient, tenant: str, query: dict[str, str], key: list[Any]) -> None:
    r = client.get(f"/fhir/{tenant}/Patient", query_string={**query, "_cursor": _cursor(key)})
    assert r.status_code == 400


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("/fhir/{t}/Patient?_count=²", {}),
        ("/fhir/{t}/_history?_count=٣", {}),
        ("/fhir/{t}/Patient/a/_history/²", {}),
    ],
)
def test_non_ascii_digits_are_not_numbers(client: FlaskClient, tenant: str, url: str, headers: dict[str, str]) -> None:
    assert client.get(url.replace("{t}", tenant), headers=headers).status_code in (400, 404)


def test_non_ascii_digit_etags(client: FlaskClient, tenant: str) -> None:
    client.put(f"/fhir/{tenant}/Patient/e", data=json.dumps({"resourceType": "Patient", "id": "e"}), content_type=FHIR)
    r = client.put(f"/fhir/{tenant}/Patient/e", data=json.dumps({"resourceType": "Patient", "id": "e"}), content_type=FHIR,
                   headers={"If-Match": 'W/"²"'})
    assert r.status_code == 400
    assert client.get(f"/fhir/{tenant}/Patient/e", headers={"If-None-Match": 'W/"²"'}).status_code == 200


def test_absolute_reference_to_this_server_is_local(client: FlaskClient, tenant: str) -> None:
    client.put(f"/fhir/{tenant}/Patient/p1", data=json.dumps({"resourceType": "Patient", "id": "p1"}), content_type=FHIR)
    absolute = f"http://elsewhere.example/fhir/{tenant}/Patient/p1"
    post(client, tenant, {"resourceType": "Observation", "status": "final", "code": {"text": "a"}, "subject": {"reference": absolute}})
    post(client, tenant, {"resourceType": "Observation", "status": "final", "code": {"text": "b"}, "subject": {"reference": "Patient/p1"}})
    for value in ("Patient/p1", f"http://localhost/fhir/{tenant}/Patient/p1", absolute):
        assert client.get(f"/fhir/{tenant}/Observation", query_string={"subject": value}).get_json()["total"] == 2
    b = client.get(f"/fhir/{tenant}/Observation", query_string={"_include": "Observation:subject", "_count": "1"}).get_json()
    assert [e["resource"]["id"] for e in b["entry"] if e["search"]["mode"] == "include"] == ["p1"]


def test_revinclude_wildcard(client: FlaskClient, tenant: str) -> None:
    client.put(f"/fhir/{tenant}/Patient/w", data=json.dumps({"resourceType": "Patient", "id": "w"}), content_type=FHIR)
    post(client, tenant, {"resourceType": "Observation", "status": "final", "code": {"text": "a"}, "subject": {"reference": "Patient/w"}})
    post(client, tenant, {"resourceType": "Condition", "subject": {"reference": "Patient/w"}})
    b = client.get(f"/fhir/{tenant}/Patient", query_string={"_id": "w", "_revinclude": "*"}).get_json()
    assert sorted(e["resource"]["resourceType"] for e in b["entry"] if e["search"]["mode"] == "include") == ["Condition", "Observation"]


def test_string_values_that_start_like_prefixes(client: FlaskClient, tenant: str) -> None:
    post(client, tenant, {"resourceType": "Patient", "address": [{"postalCode": "SA1 1AA"}]})
    assert client.get(f"/fhir/{tenant}/Patient", query_string={"address-postalcode": "sa1"}).get_json()["total"] == 1
    assert client.get(f"/fhir/{tenant}/Patient", query_string={"name": "ge2020"}).status_code == 400


def test_long_string_inside_a_chain(client: FlaskClient, tenant: str) -> None:
    for i in range(30):
        client.put(f"/fhir/{tenant}/Patient/c{i}", data=json.dumps({"resourceType": "Patient", "id": f"c{i}", "name": [{"family": f"Abcdefghijklmnopqrstu{i}"}]}),
                   content_type=FHIR)
        post(client, tenant, {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": f"Patient/c{i}"}})
    r = client.get(f"/fhir/{tenant}/Observation", query_string={"subject:Patient.name": "Abcdefghijklmnopqrstu7"})
    assert r.status_code == 200 and r.get_json()["total"] == 1


def test_unexpected_errors_log_no_message(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    from fhir_server.api.rendering import unexpected_error

    with app.test_request_context("/"), caplog.at_level(logging.ERROR):
        try:
            raise ValueError("Patient Quixote MRN-1234")
        except ValueError as exc:
            response = unexpected_error(exc)
    assert response.status_code == 500
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "unhandled error" in logged and "Quixote" not in logged and "MRN-1234" not in logged
    assert app.extensions["fhir_storage"].db.engine.hide_parameters


def test_unknown_type_in_system_search_is_400(client: FlaskClient, tenant: str) -> None:
    assert client.get(f"/fhir/{tenant}", query_string={"_type": "Patient,Nope"}).status_code == 400
