"""Over HTTP (the Flask app): refusals before the engine, and the authorization server's events, are recorded."""

from __future__ import annotations

import base64
import json
import re
from typing import Any
from urllib.parse import urlencode

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_server.security import audit_events as ae
from fhir_server.security import passwords
from fhir_server.security.oauth.store import LOCKOUT_FAILURES, AuthStore
from fhir_server.storage.store import Storage
from testsupport.auth import mint_token

PASSWORD = "a long enough password"
REDIRECT = "https://app.example/callback"


@pytest.fixture
def raw(app: Flask) -> FlaskClient:
    app.test_client_class = FlaskClient
    return app.test_client()


def events(storage: Storage, tenant: str) -> list[dict[str, Any]]:
    return [json.loads(b) for b in storage.audit_log.events(tenant)]


def by_request(storage: Storage, tenant: str, request_id: str) -> list[dict[str, Any]]:
    return [e for e in events(storage, tenant)
            if any(x.get("what", {}).get("identifier", {}).get("value") == request_id for x in e.get("entity", []))]


def subtype_codes(event: dict[str, Any]) -> list[str]:
    return [c["code"] for c in event["subtype"]]


def test_refusals_before_the_engine_are_recorded_with_the_callers_address(raw: FlaskClient, storage: Storage,
                                                                          tenant: str) -> None:
    resp = raw.get(f"/fhir/{tenant}/Patient/x", headers={"X-Request-Id": "no-token-1"})
    assert resp.status_code == 401
    [event] = by_request(storage, tenant, "no-token-1")
    assert subtype_codes(event) == ["read"] and event["outcome"] == "4" and event["outcomeDesc"].startswith("HTTP 401")
    client = event["agent"][0]
    assert client["who"] == {"display": "anonymous (no valid access token)"} and client["requestor"] is True
    assert client["network"] == {"address": "127.0.0.1", "type": "2"}
    token = mint_token(storage, tenant)
    resp = raw.post(f"/fhir/{tenant}/Patient", data=b"{not json", headers={"X-Request-Id": "bad-body-1",
                    "Content-Type": "application/fhir+json", "Authorization": f"Bearer {token}"})
    assert resp.status_code == 400
    [event] = by_request(storage, tenant, "bad-body-1")
    assert subtype_codes(event) == ["create"] and event["outcome"] == "4"
    # The token was checked before the body was read: the refusal is the client's, not an anonymous one's.
    assert event["agent"][0]["who"]["identifier"]["value"] == "test-suite"
    resp = raw.get(f"/fhir/{tenant}/metadata", headers={"X-Request-Id": "metadata-1"})
    assert resp.status_code == 200
    assert subtype_codes(by_request(storage, tenant, "metadata-1")[0]) == ["capabilities"]


def test_an_unknown_tenant_has_no_log_to_write_to(raw: FlaskClient) -> None:
    assert raw.get("/fhir/no-such-tenant/Patient/x").status_code == 401  # answered; nothing to record it in
    assert raw.get("/fhir/no-such-tenant/Patient/x", headers={"Authorization": "Bearer x"}).status_code == 404


def test_the_audit_log_over_http(client: FlaskClient, storage: Storage, tenant: str) -> None:
    client.put(f"/fhir/{tenant}/Patient/h1", json={"resourceType": "Patient", "id": "h1"},
               headers={"Content-Type": "application/fhir+json"})
    full = {"Authorization": f"Bearer {mint_token(storage, tenant, 'system/*.cruds')}"}
    assert client.get(f"/fhir/{tenant}/AuditEvent", headers=full).status_code == 403
    auditor = {"Authorization": f"Bearer {mint_token(storage, tenant, 'system/AuditEvent.rs', client_id='siem')}",
               "X-Request-Id": "audit-read-1"}
    found = client.get(f"/fhir/{tenant}/AuditEvent?patient=h1&subtype=update", headers=auditor)
    assert found.status_code == 200 and found.json["total"] == 1  # type: ignore[index]
    one = found.json["entry"][0]["resource"]  # type: ignore[index]
    assert client.get(f"/fhir/{tenant}/AuditEvent/{one['id']}", headers=auditor).status_code == 200
    for method, body, media in (("PUT", one, "application/fhir+json"), ("DELETE", None, None),
                                ("PATCH", [{"op": "remove", "path": "/agent"}], "application/json-patch+json")):
        resp = client.open(f"/fhir/{tenant}/AuditEvent/{one['id']}", method=method, headers={**auditor, **full},
                           data=json.dumps(body) if body else None, content_type=media)
        assert resp.status_code == 405 and resp.json["resourceType"] == "OperationOutcome"  # type: ignore[index]
    # reading the log is recorded in it, with the query that was asked
    [reading] = by_request(storage, tenant, "audit-read-1")[:1]
    query = next(base64.b64decode(e["query"]).decode() for e in reading["entity"] if "query" in e)
    assert query.endswith("/AuditEvent?patient=h1&subtype=update")


# --- the authorization server ---------------------------------------------------------------------------

def _login_page(raw: FlaskClient, tenant: str, client_id: str) -> str:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "scope": "patient/*.rs",
              "state": "s", "aud": f"http://localhost/fhir/{tenant}", "code_challenge": "x" * 43, "code_challenge_method": "S256"}
    assert raw.get(f"/auth/{tenant}/authorize?{urlencode(params)}").status_code == 302
    found = re.search(rb'name="csrf" value="([^"]+)"', raw.get(f"/auth/{tenant}/login").data)
    assert found
    return found.group(1).decode()


def test_logins_lockouts_and_tokens_are_recorded(raw: FlaskClient, storage: Storage, tenant: str) -> None:
    with storage.session(tenant, write=True) as repo:
        store = AuthStore(repo)
        public, _ = store.create_client(name="app", kind="public", scope="patient/*.rs", redirect_uris=[REDIRECT],
                                        jwks=None, jwks_uri=None)
        service, secret = store.create_client(name="svc", kind="confidential-symmetric", scope="system/*.rs",
                                              redirect_uris=[], jwks=None, jwks_uri=None)
        store.create_user(username="nurse", password_hash=passwords.hash_password(PASSWORD), fhir_user=None,
                          roles=["clinician"], mfa_required=False)
    csrf = _login_page(raw, tenant, public)
    for _ in range(LOCKOUT_FAILURES):
        raw.post(f"/auth/{tenant}/login", data={"csrf": csrf, "username": "nurse", "password": "wrong"},
                 headers={"X-Request-Id": "login-fail"})
    logins = [e for e in events(storage, tenant) if "password" in subtype_codes(e)]
    assert len(logins) == LOCKOUT_FAILURES and all(e["outcome"] == "4" for e in logins)
    assert logins[0]["type"]["code"] == "110114" and logins[0]["outcomeDesc"] == "Login failed: wrong password"
    user = next(a for a in logins[0]["agent"] if a.get("name") == "nurse")
    assert user["who"]["identifier"] == {"system": ae.USERNAME, "value": "nurse"}
    assert PASSWORD not in json.dumps(events(storage, tenant)) and "wrong" not in json.dumps(user)
    locked = [e for e in events(storage, tenant) if "account-locked" in subtype_codes(e)]
    assert len(locked) == 1 and locked[0]["type"]["code"] == "110113"
    alerts = [e for e in events(storage, tenant) if "failed-logins" in subtype_codes(e)]
    assert len(alerts) == 2  # five failures for the user, and from one address (the test client's)

    ok = raw.post(f"/auth/{tenant}/token", data={"grant_type": "client_credentials", "scope": "system/*.rs"},
                  auth=(service, secret))
    assert ok.status_code == 200
    bad = raw.post(f"/auth/{tenant}/token", data={"grant_type": "client_credentials", "scope": "system/*.rs"},
                   auth=(service, "not the secret"))
    assert bad.status_code == 401
    grants = [e for e in events(storage, tenant) if "token-grant" in subtype_codes(e)]
    assert [(g["outcome"], subtype_codes(g)[0]) for g in grants] == [("0", "ITI-71"), ("4", "ITI-71")]
    assert "invalid_client" in grants[1]["outcomeDesc"]
    client_agent = grants[0]["agent"][0]
    assert client_agent["who"]["identifier"] == {"system": ae.CLIENT_ID, "value": service}
    token = ok.json["access_token"]  # type: ignore[index]
    assert token not in json.dumps(events(storage, tenant))
    grant_entity = next(e for e in grants[0]["entity"] if e["what"].get("identifier", {}).get("system") == ae.GRANT)
    revoked = raw.post(f"/auth/{tenant}/revoke", data={"token": token}, auth=(service, secret))
    assert revoked.status_code == 200
    [revocation] = [e for e in events(storage, tenant) if "token-revoke" in subtype_codes(e)]
    assert revocation["outcome"] == "0"
    assert revocation["entity"][0]["what"]["identifier"] == grant_entity["what"]["identifier"]


# --- a read recorded by its own statement ------------------------------------------------------------------

def _entities(event: dict[str, Any], role: str) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if e.get("role", {}).get("code") == role]


def test_a_read_is_recorded_by_its_own_statement_and_completed_when_chained(
        client: FlaskClient, app: Flask, backend: str, tenant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL a read's record is written by the statement that reads (a draft, with the version it found);
    the chainer completes it. The records are the ones the other path writes, on both back-ends."""
    from sqlalchemy import select

    from fhir_server.capability.validation import validate_resource
    from fhir_server.storage import schema

    storage: Storage = app.extensions["fhir_storage"]
    base, as_json = f"/fhir/{tenant}", {"Content-Type": "application/fhir+json"}
    client.put(f"{base}/Patient/r1", json={"resourceType": "Patient", "id": "r1"}, headers=as_json)
    for oid in ("r2", "r3"):
        client.put(f"{base}/Observation/{oid}", json={"resourceType": "Observation", "id": oid, "status": "final",
                   "code": {"text": "weight"}, "subject": {"reference": f"http://localhost{base}/Patient/r1"}}, headers=as_json)
    assert client.delete(f"{base}/Observation/r3").status_code in (200, 204)
    storage.audit_log.chain(tenant)
    storage.audit_log.stop()  # (a chainer the writes above woke would chain the reads' records under this test's feet)
    monkeypatch.setattr(storage.audit_log, "kick", lambda name: None)  # the records stay pending until chained below
    patient_token = {"Authorization": f"Bearer {mint_token(storage, tenant, 'patient/*.rs', patient='r1')}"}
    reads = [("Observation/r2", {}, 200), ("Patient/r1", {}, 200), ("Observation/r2", {"If-None-Match": 'W/"1"'}, 304),
             ("Observation/nope", {}, 404), ("Observation/r3", {}, 410), ("Observation/r2", patient_token, 200)]
    for n, (path, headers, status) in enumerate(reads):
        assert client.get(f"{base}/{path}", headers={"X-Request-Id": f"fold-{n}", **headers}).status_code == status
    p = schema.audit_pending
    with storage.session(tenant, write=False, shared=False) as repo:
        pending = [tuple(r) for r in repo.conn.execute(select(p.c.draft, p.c.read_version, p.c.read_deleted)
                                                       .where(p.c.tenant_id == repo.tenant.id).order_by(p.c.recorded))]
    if backend == "postgresql":  # the patient-limited read is checked after it reads: recorded after, as before
        assert pending == [(True, 1, False), (True, 1, False), (True, 1, False), (True, None, None), (True, 2, True),
                           (None, None, None)]
    else:
        assert pending == [(None, None, None)] * 6
    storage.audit_log.chain(tenant)  # (by the app's chainer: it can complete drafts)
    found = {n: by_request(storage, tenant, f"fold-{n}") for n in range(len(reads))}
    assert all(len(v) == 1 for v in found.values()), found
    ev = {n: v[0] for n, v in found.items()}
    for n in (0, 2, 5):
        assert ev[n]["outcome"] == "0" and _entities(ev[n], "4") == ["Observation/r2/_history/1"]
        assert _entities(ev[n], "1") == ["Patient/r1"] and ev[n]["meta"]["profile"] == [f"{ae.BALP_PROFILE}PatientRead"]
    assert _entities(ev[1], "4") == ["Patient/r1/_history/1"] and _entities(ev[1], "1") == ["Patient/r1"]
    assert ev[3]["outcome"] == "4" and ev[3]["outcomeDesc"] == "HTTP 404: Observation/nope is not known"
    assert ev[4]["outcome"] == "4" and ev[4]["outcomeDesc"] == "HTTP 410: Observation/r3 was deleted"
    for n in (3, 4):
        assert _entities(ev[n], "4") == [f"Observation/{'nope' if n == 3 else 'r3'}"] and not _entities(ev[n], "1")
        assert "profile" not in ev[n]["meta"]
    for event in ev.values():
        assert "_draft" not in event and subtype_codes(event) == ["read"] and event["action"] == "R"
        assert validate_resource(app.extensions["fhir_engine"].registry, event) == []
    # the completed records are what the chain holds: the log verifies
    report = storage.audit_log.verify(tenant)
    assert report.ok and report.pending == 0, report.findings
