"""POST /hl7v2/{tenant}: the transport around the intake."""

from __future__ import annotations

from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient

from fhir_server.app import create_app
from fhir_server.hl7v2 import er7
from fhir_server.settings import Settings
from testsupport.auth import mint_token

SAMPLES = Path(__file__).parent.parent / "data" / "hl7v2"
ER7 = "x-application/hl7-v2+er7"


def post(client: FlaskClient, tenant: str, data: bytes, token: str | None, content_type: str = ER7):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post(f"/hl7v2/{tenant}", data=data, headers=headers, content_type=content_type)


def test_a_message_is_answered_with_its_ack(app: Flask, client: FlaskClient, tenant: str) -> None:
    token = mint_token(app.extensions["fhir_storage"], tenant)
    data = (SAMPLES / "ms__ADT-A04-02.hl7").read_bytes()
    resp = post(client, tenant, data, token)
    assert resp.status_code == 200
    assert resp.mimetype == ER7 and resp.mimetype_params["charset"] == "utf-8"
    answer = er7.parse(resp.data)
    assert answer.segment("MSA").value(1) == "AA"  # type: ignore[union-attr]
    assert answer.segment("MSA").field(2) == er7.parse(data).control_id  # type: ignore[union-attr]
    found = client.get(f"/fhir/{tenant}/Patient").get_json()
    assert len(found["entry"]) == 1


def test_text_plain_is_taken_too_and_a_rejection_is_still_http_200(app: Flask, client: FlaskClient, tenant: str) -> None:
    token = mint_token(app.extensions["fhir_storage"], tenant)
    resp = post(client, tenant, b"MSH|^~\\&|A|B|C|D|20240101||VXX^Z99|42|P|2.5\rPID|1", token, "text/plain")
    assert resp.status_code == 200
    answer = er7.parse(resp.data)
    assert answer.segment("MSA").value(1) == "AR" and answer.segment("MSA").field(2) == "42"  # type: ignore[union-attr]
    assert answer.segment("ERR").value(3) == "200"  # type: ignore[union-attr]


def test_no_token_no_message(client: FlaskClient, tenant: str) -> None:
    resp = post(client, tenant, (SAMPLES / "ms__ADT-A04-02.hl7").read_bytes(), None)
    assert resp.status_code == 401 and resp.get_json()["resourceType"] == "OperationOutcome"
    assert "Bearer" in resp.headers["WWW-Authenticate"]
    resp = post(client, tenant, b"MSH|^~\\&|A", "not-a-token")
    assert resp.status_code == 401


def test_other_media_types_are_refused(app: Flask, client: FlaskClient, tenant: str) -> None:
    token = mint_token(app.extensions["fhir_storage"], tenant)
    resp = post(client, tenant, b"{}", token, "application/fhir+json")
    assert resp.status_code == 415 and "hl7-v2" in resp.get_json()["issue"][0]["diagnostics"]


def test_an_unknown_tenant_is_404(client: FlaskClient) -> None:
    resp = post(client, "no-such-tenant", b"MSH|^~\\&|A", "whatever")
    assert resp.status_code in (401, 404) and resp.get_json()["resourceType"] == "OperationOutcome"


def test_a_transmission_over_the_limit_is_413(settings: Settings, tenant: str) -> None:
    small = create_app(settings.with_overrides(hl7_max_message_bytes=1024))
    try:
        token = mint_token(small.extensions["fhir_storage"], tenant)
        resp = post(small.test_client(), tenant, b"MSH|^~\\&|A" + b"x" * 2000, token)
        assert resp.status_code == 413 and resp.get_json()["issue"][0]["code"] == "too-long"
    finally:
        small.extensions["fhir_storage"].audit_log.stop()
        small.extensions["fhir_storage"].db.dispose()
