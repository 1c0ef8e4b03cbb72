"""The authorization server's own rules, through the Flask app: tokens bound to their tenant, lockout,
CSRF, idle sessions, secrets at rest, EHR launches, CORS. (The SMART flows themselves are in
conformance_tests/test_smart*.py, over HTTP.)"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update
from werkzeug.datastructures import MultiDict

from fhir_server.app import create_app
from fhir_server.clock import now_us
from fhir_server.security import passwords
from fhir_server.security.oauth.store import LOCKOUT_FAILURES, SECOND, AuthStore
from fhir_server.settings import Settings
from fhir_server.storage import schema
from fhir_server.storage.store import Storage
from testsupport.auth import mint_token

REDIRECT = "https://app.example/callback"
PASSWORD = "a long enough password"


def _store(storage: Storage, tenant: str) -> Any:
    return storage.session(tenant, write=True)


@pytest.fixture
def raw(app: Flask) -> FlaskClient:
    app.test_client_class = FlaskClient
    return app.test_client()


@pytest.fixture
def registered(storage: Storage, tenant: str) -> dict[str, str]:
    with _store(storage, tenant) as repo:
        store = AuthStore(repo)
        client_id, _ = store.create_client(name="Test app", kind="public", scope="launch/patient patient/*.rs openid fhirUser",
                                           redirect_uris=[REDIRECT], jwks=None, jwks_uri=None)
        store.create_user(username="nurse", password_hash=passwords.hash_password(PASSWORD), fhir_user="Practitioner/n",
                          roles=["clinician"], mfa_required=False)
    return {"client_id": client_id, "tenant": tenant}


def _authorize(raw: FlaskClient, reg: dict[str, str]) -> Any:
    params = {"response_type": "code", "client_id": reg["client_id"], "redirect_uri": REDIRECT, "scope": "patient/*.rs",
              "state": "s1", "aud": f"http://localhost/fhir/{reg['tenant']}", "code_challenge": "x" * 43,
              "code_challenge_method": "S256"}
    resp = raw.get(f"/auth/{reg['tenant']}/authorize?{urlencode(params)}")
    assert resp.status_code == 302, resp.data
    return resp


def _csrf(page: bytes) -> str:
    found = re.search(rb'name="csrf" value="([^"]+)"', page)
    assert found
    return found.group(1).decode()


def test_tokens_are_bound_to_their_tenant(client: FlaskClient, storage: Storage, new_tenant: Any) -> None:
    a, b = new_tenant("a"), new_tenant("b")
    token = mint_token(storage, a)
    assert client.get(f"/fhir/{a}/Patient", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    resp = client.get(f"/fhir/{b}/Patient", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


def test_expired_and_revoked_tokens_are_401(client: FlaskClient, storage: Storage, tenant: str) -> None:
    expired = mint_token(storage, tenant, lifetime_s=-1)
    assert client.get(f"/fhir/{tenant}/Patient", headers={"Authorization": f"Bearer {expired}"}).status_code == 401
    token = mint_token(storage, tenant)
    with _store(storage, tenant) as repo:
        AuthStore(repo).revoke_token(token)
    assert client.get(f"/fhir/{tenant}/Patient", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_a_patient_scope_without_a_patient_allows_nothing(client: FlaskClient, storage: Storage, tenant: str) -> None:
    token = mint_token(storage, tenant, scope="patient/*.rs")
    resp = client.get(f"/fhir/{tenant}/Observation", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 403 and resp.json["resourceType"] == "OperationOutcome"  # type: ignore[index]


def test_login_locks_after_repeated_failures(raw: FlaskClient, registered: dict[str, str], storage: Storage) -> None:
    t = registered["tenant"]
    _authorize(raw, registered)
    csrf = _csrf(raw.get(f"/auth/{t}/login").data)
    for _ in range(LOCKOUT_FAILURES):
        resp = raw.post(f"/auth/{t}/login", data={"csrf": csrf, "username": "nurse", "password": "wrong"})
        assert resp.status_code == 401 and b"Wrong username or password" in resp.data
    resp = raw.post(f"/auth/{t}/login", data={"csrf": csrf, "username": "nurse", "password": PASSWORD})
    assert resp.status_code == 401 and b"locked" in resp.data
    # An unknown user gets the same answer as a wrong password (no account enumeration).
    resp = raw.post(f"/auth/{t}/login", data={"csrf": csrf, "username": "nobody", "password": "x"})
    assert resp.status_code == 401 and b"Wrong username or password" in resp.data
    with _store(storage, t) as repo:  # the lock ends after a while
        repo.conn.execute(update(schema.oauth_users).where(schema.oauth_users.c.username == "nurse").values(locked_until=now_us() - 1))
    resp = raw.post(f"/auth/{t}/login", data={"csrf": csrf, "username": "nurse", "password": PASSWORD})
    assert resp.status_code == 302


def test_forms_need_the_sessions_csrf_token(raw: FlaskClient, registered: dict[str, str]) -> None:
    t = registered["tenant"]
    _authorize(raw, registered)
    resp = raw.post(f"/auth/{t}/login", data={"csrf": "forged", "username": "nurse", "password": PASSWORD})
    assert resp.status_code == 400
    other = raw.application.test_client()  # another browser: no session at all
    assert other.post(f"/auth/{t}/login", data={"csrf": "x", "username": "nurse", "password": PASSWORD}).status_code == 400


def test_login_pages_are_plain_forms_with_labels_and_safe_headers(raw: FlaskClient, registered: dict[str, str]) -> None:
    t = registered["tenant"]
    _authorize(raw, registered)
    resp = raw.get(f"/auth/{t}/login")
    assert resp.status_code == 200 and b"<script" not in resp.data
    for field in (b"username", b"password"):
        assert b'<label for="' + field + b'">' in resp.data and b'id="' + field + b'"' in resp.data
    assert resp.headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Cache-Control"] == "no-store"
    cookie = resp.headers.get("Set-Cookie") or _authorize(raw, registered).headers["Set-Cookie"]
    assert "HttpOnly" in cookie and f"Path=/auth/{t}/" in cookie


def test_sessions_expire_after_inactivity(raw: FlaskClient, registered: dict[str, str], storage: Storage, settings: Settings) -> None:
    t = registered["tenant"]
    _authorize(raw, registered)
    assert raw.get(f"/auth/{t}/login").status_code == 200
    with _store(storage, t) as repo:
        idle = now_us() - (settings.auth_session_idle_seconds + 1) * SECOND
        repo.conn.execute(update(schema.oauth_sessions).values(last_seen=idle))
    resp = raw.get(f"/auth/{t}/login")
    assert resp.status_code == 400 and b"expired" in resp.data


def test_password_reset_by_a_new_login_session_id(raw: FlaskClient, registered: dict[str, str]) -> None:
    """The session id changes once the password is right (no session fixation)."""
    t = registered["tenant"]
    before = _authorize(raw, registered).headers["Set-Cookie"].split(";")[0]
    csrf = _csrf(raw.get(f"/auth/{t}/login").data)
    resp = raw.post(f"/auth/{t}/login", data={"csrf": csrf, "username": "nurse", "password": PASSWORD})
    assert resp.status_code == 302
    after = resp.headers["Set-Cookie"].split(";")[0]
    assert after != before


def test_secrets_at_rest(storage: Storage, registered: dict[str, str]) -> None:
    t = registered["tenant"]
    token = mint_token(storage, t)
    with _store(storage, t) as repo:
        store = AuthStore(repo)
        secret = passwords.new_totp_secret()
        store.set_mfa_secret("nurse", secret)
        row = repo.conn.execute(select(schema.oauth_users).where(schema.oauth_users.c.tenant_id == repo.tenant.id,
                                                            schema.oauth_users.c.username == "nurse")).one()
        assert row.password_hash.startswith("scrypt$") and PASSWORD not in row.password_hash
        assert secret.encode() not in bytes(row.mfa_secret)
        assert store.mfa_secret("nurse") == secret
        assert token.encode() not in b"".join(bytes(r.token_hash) for r in repo.conn.execute(select(schema.oauth_tokens.c.token_hash)))
    # Launch contexts (a break-glass reason among them) are sealed like resources.
    glass = mint_token(storage, t, scope="user/*.rs", break_glass="unconscious patient, Jane Roe")
    with _store(storage, t) as repo:
        stored = " ".join(r.context for r in repo.conn.execute(select(schema.oauth_tokens.c.context)
                                                               .where(schema.oauth_tokens.c.tenant_id == repo.tenant.id)))
        assert "Jane Roe" not in stored and "break_glass" not in stored
        record = AuthStore(repo).token(glass)
        assert record is not None and record.context["break_glass"] == "unconscious patient, Jane Roe"


def test_totp_codes_work_once(storage: Storage, registered: dict[str, str]) -> None:
    secret = passwords.new_totp_secret()
    import pyotp

    step = passwords.totp_step(secret, pyotp.TOTP(secret).now())
    assert step is not None
    assert passwords.totp_step(secret, "000000" if pyotp.TOTP(secret).now() != "000000" else "111111") is None
    with _store(storage, registered["tenant"]) as repo:
        store = AuthStore(repo)
        assert store.use_mfa_step("nurse", step) is True
        assert store.use_mfa_step("nurse", step) is False  # replayed
        assert store.use_mfa_step("nurse", step - 1) is False  # older


def test_ehr_launch_api(client: FlaskClient, storage: Storage, tenant: str) -> None:
    assert client.put(f"/fhir/{tenant}/Patient/p1", json={"resourceType": "Patient", "id": "p1"}).status_code == 201
    assert client.put(f"/fhir/{tenant}/Patient/p2", json={"resourceType": "Patient", "id": "p2"}).status_code == 201
    ehr = mint_token(storage, tenant, scope="user/*.rs")
    resp = client.post(f"/auth/{tenant}/launch", json={"patient": "p1"}, headers={"Authorization": f"Bearer {ehr}"})
    assert resp.status_code == 200 and resp.json["launch"] and resp.json["patient"] == "p1"  # type: ignore[index]
    assert resp.headers["Cache-Control"] == "no-store"
    assert client.post(f"/auth/{tenant}/launch", json={"patient": "p1"}).status_code == 401
    only_p2 = mint_token(storage, tenant, scope="patient/*.rs", patient="p2")
    assert client.post(f"/auth/{tenant}/launch", json={"patient": "p1"},
                       headers={"Authorization": f"Bearer {only_p2}"}).status_code == 403
    assert client.post(f"/auth/{tenant}/launch", json={"patient": "nope"},
                       headers={"Authorization": f"Bearer {ehr}"}).status_code == 404
    assert client.post(f"/auth/{tenant}/launch", json={}, headers={"Authorization": f"Bearer {ehr}"}).status_code == 400


@pytest.fixture
def cors_app(settings: Settings) -> Iterator[Flask]:
    application = create_app(dataclasses.replace(settings, cors_origins="https://app.example"))
    yield application
    application.extensions["fhir_storage"].db.dispose()


def test_cors_for_configured_origins_only(cors_app: Flask, tenant: str) -> None:
    http = cors_app.test_client()
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"}
    resp = http.options(f"/fhir/{tenant}/Patient", headers=preflight)
    assert resp.status_code == 200, resp.data
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()
    resp = http.post(f"/auth/{tenant}/token", headers={"Origin": "https://app.example"}, data={"grant_type": "x"})
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    resp = http.options(f"/fhir/{tenant}/Patient", headers={**preflight, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert "Access-Control-Allow-Origin" not in http.get(f"/auth/{tenant}/login", headers={"Origin": "https://app.example"}).headers


def test_authorize_errors_before_the_client_is_known_stay_on_the_server(raw: FlaskClient, registered: dict[str, str]) -> None:
    t = registered["tenant"]
    resp = raw.get(f"/auth/{t}/authorize?response_type=code&client_id=unknown&redirect_uri=https://evil.example/")
    assert resp.status_code == 400 and "Location" not in resp.headers
    resp = raw.get(f"/auth/{t}/authorize?response_type=token&client_id={registered['client_id']}&redirect_uri={REDIRECT}&state=s")
    assert resp.status_code == 302
    query = parse_qs(urlsplit(resp.headers["Location"]).query)
    assert query["error"] == ["unsupported_response_type"] and resp.headers["Location"].startswith(REDIRECT)


def _login_to_picker(raw: FlaskClient, reg: dict[str, str], username: str) -> dict[str, str]:
    """Through /authorize and the login page; the picker's hidden fields (csrf, request)."""
    t = reg["tenant"]
    params = {"response_type": "code", "client_id": reg["client_id"], "redirect_uri": REDIRECT, "scope": "launch/patient patient/*.rs",
              "state": "s1", "aud": f"http://localhost/fhir/{t}", "code_challenge": "x" * 43, "code_challenge_method": "S256"}
    assert raw.get(f"/auth/{t}/authorize?{urlencode(params)}").status_code == 302
    csrf = _csrf(raw.get(f"/auth/{t}/login").data)
    resp = raw.post(f"/auth/{t}/login", data={"csrf": csrf, "username": username, "password": PASSWORD})
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/patient")
    hidden = _hidden(raw.get(f"/auth/{t}/patient").data)
    assert hidden.keys() == {"csrf", "request"}
    return hidden


def test_the_patient_picker_of_a_patient_user_offers_only_their_record(raw: FlaskClient, client: FlaskClient, storage: Storage,
                                                                        registered: dict[str, str]) -> None:
    t = registered["tenant"]
    for pid, family in (("me", "Myself"), ("other", "Otherperson")):
        assert client.put(f"/fhir/{t}/Patient/{pid}", json={"resourceType": "Patient", "id": pid,
                                                           "name": [{"family": family}]}).status_code == 201
    with _store(storage, t) as repo:
        AuthStore(repo).create_user(username="pat", password_hash=passwords.hash_password(PASSWORD), fhir_user="Patient/me",
                                    roles=["patient"], mfa_required=False)
    hidden = _login_to_picker(raw, registered, "pat")
    page = raw.get(f"/auth/{t}/patient?name=Other").data
    assert b"Myself" in page and b"Otherperson" not in page
    resp = raw.post(f"/auth/{t}/patient", data={**hidden, "patient": "other"})
    assert resp.status_code == 200  # the picker again: not an allowed choice
    assert raw.post(f"/auth/{t}/patient", data={"csrf": hidden["csrf"], "patient": "me"}).status_code == 400  # no request id
    resp = raw.post(f"/auth/{t}/patient", data={**hidden, "patient": "me"})
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/consent")
    # Staff search the tenant's patients.
    staff = raw.application.test_client()
    _login_to_picker(staff, registered, "nurse")
    assert b"Otherperson" in staff.get(f"/auth/{t}/patient?name=Other").data


def test_consent_accepts_requested_scopes_and_narrowings_only(raw: FlaskClient, client: FlaskClient, storage: Storage,
                                                               registered: dict[str, str]) -> None:
    t = registered["tenant"]
    assert client.put(f"/fhir/{t}/Patient/me", json={"resourceType": "Patient", "id": "me"}).status_code == 201
    hidden = _login_to_picker(raw, registered, "nurse")
    assert raw.post(f"/auth/{t}/patient", data={**hidden, "patient": "me"}).status_code == 302
    page = raw.get(f"/auth/{t}/consent").data
    assert b'value="patient/*.rs" checked' in page
    form = MultiDict([("csrf", hidden["csrf"]), ("request", hidden["request"]), ("decision", "approve"), ("scope", "launch/patient"),
                      ("scope", "patient/Observation.rs?category=x|y"), ("scope", "user/*.cruds"), ("scope", "patient/*.cruds")])
    resp = raw.post(f"/auth/{t}/consent", data=form)
    assert resp.status_code == 302
    code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
    with _store(storage, t) as repo:
        granted = AuthStore(repo).code(code)
        assert granted is not None
        assert granted.scope.split() == ["launch/patient", "patient/Observation.rs?category=x|y"]  # no escalation


def test_app_launch_url_for_ehr_launches(client: FlaskClient, storage: Storage, tenant: str) -> None:
    assert client.put(f"/fhir/{tenant}/Patient/p1", json={"resourceType": "Patient", "id": "p1"}).status_code == 201
    ehr = mint_token(storage, tenant, scope="user/*.rs")
    resp = client.post(f"/auth/{tenant}/launch", json={"patient": "p1", "app_launch_url": "https://app.example/launch?x=1"},
                       headers={"Authorization": f"Bearer {ehr}"})
    url = resp.json["app_launch_url"]  # type: ignore[index]
    query = parse_qs(urlsplit(url).query)
    assert url.startswith("https://app.example/launch?x=1&")
    assert query["iss"] == [f"http://localhost/fhir/{tenant}"] and query["launch"] == [resp.json["launch"]]  # type: ignore[index]


def test_failed_client_authentication_is_401_only_with_an_authorization_header(raw: FlaskClient, storage: Storage, tenant: str) -> None:
    with _store(storage, tenant) as repo:
        client_id, _ = AuthStore(repo).create_client(name="svc", kind="confidential-symmetric", scope="system/*.rs", redirect_uris=[],
                                                     jwks=None, jwks_uri=None)
    data = {"grant_type": "client_credentials", "scope": "system/*.rs"}
    resp = raw.post(f"/auth/{tenant}/token", data=data, headers={"Authorization": "Basic " + "eDp5"})  # x:y
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
    resp = raw.post(f"/auth/{tenant}/token", data={**data, "client_id": client_id, "client_secret": "wrong"})
    assert resp.status_code == 400 and resp.json["error"] == "invalid_client"  # type: ignore[index]
    resp = raw.post(f"/auth/{tenant}/token", data={**data, "client_assertion_type": "not_an_assertion_type", "client_assertion": "x"})
    assert resp.status_code == 400 and resp.json["error"] == "invalid_client"  # type: ignore[index]


def test_private_key_jwt_with_keys_from_a_jwks_uri(raw: FlaskClient, storage: Storage, tenant: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server
    import threading
    import time
    import uuid

    from joserfc import jwt
    from joserfc.jwk import ECKey

    key = ECKey.generate_key("P-384", private=True)
    served = {"jwks": json.dumps({"keys": [key.as_dict(private=False) | {"kid": "ec1", "alg": "ES384"}]}).encode()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(served["jwks"])

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{httpd.server_address[1]}/jwks.json"
        with _store(storage, tenant) as repo:
            client_id, _ = AuthStore(repo).create_client(name="bulk", kind="confidential-asymmetric", scope="system/*.rs",
                                                         redirect_uris=[], jwks=None, jwks_uri=uri)
        token_url = f"http://localhost/auth/{tenant}/token"

        def assertion(kid: str) -> str:
            now = int(time.time())
            return jwt.encode({"alg": "ES384", "kid": kid, "typ": "JWT"},
                              {"iss": client_id, "sub": client_id, "aud": token_url, "exp": now + 120, "jti": uuid.uuid4().hex},
                              key, algorithms=["ES384"])

        data = {"grant_type": "client_credentials", "scope": "system/Patient.rs",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}
        resp = raw.post(f"/auth/{tenant}/token", data={**data, "client_assertion": assertion("ec1")})
        assert resp.status_code == 200, resp.json
        assert resp.json["scope"] == "system/Patient.rs" and resp.json["expires_in"] <= 300  # type: ignore[index]
        resp = raw.post(f"/auth/{tenant}/token", data={**data, "client_assertion": assertion("other-kid")})
        assert resp.status_code == 400 and resp.json["error"] == "invalid_client"  # type: ignore[index]
        # The client rotates its keys: an assertion with the new kid makes the server fetch the set again.
        from fhir_server.security.oauth import server as oauth_server

        monkeypatch.setattr(oauth_server, "JWKS_REFETCH_SECONDS", 0)
        key = ECKey.generate_key("P-384", private=True)
        served["jwks"] = json.dumps({"keys": [key.as_dict(private=False) | {"kid": "ec2", "alg": "ES384"}]}).encode()
        resp = raw.post(f"/auth/{tenant}/token", data={**data, "client_assertion": assertion("ec2")})
        assert resp.status_code == 200, resp.json
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- regressions from an independent review ------------------------------------------------------------------

def _hidden(page: bytes) -> dict[str, str]:
    return {m.group(1).decode(): m.group(2).decode() for m in re.finditer(rb'type="hidden" name="([^"]+)" value="([^"]*)"', page)}


def _authorize_to_code(raw: FlaskClient, reg: dict[str, str], username: str, *, patient: str | None = None,
                       scope: str = "launch/patient patient/*.rs", **extra: str) -> Any:
    """/authorize, login, picker, consent (approve all): the final response (a redirect to the app)."""
    t = reg["tenant"]
    params = {"response_type": "code", "client_id": reg["client_id"], "redirect_uri": REDIRECT, "scope": scope, "state": "s1",
              "aud": f"http://localhost/fhir/{t}", "code_challenge": smart_challenge(), "code_challenge_method": "S256", **extra}
    params = {k: v for k, v in params.items() if v}
    resp = raw.get(f"/auth/{t}/authorize?{urlencode(params)}")
    while resp.status_code == 302 and resp.headers["Location"].startswith("/auth/"):
        location = resp.headers["Location"]
        page = raw.get(location).data
        if location.endswith("/login"):
            resp = raw.post(location, data={**_hidden(page), "username": username, "password": PASSWORD})
        elif location.endswith("/patient"):
            resp = raw.post(location, data={**_hidden(page), "patient": patient or ""})
        elif location.endswith("/consent"):
            scopes = re.findall(rb'name="scope" value="([^"]+)" checked', page)
            resp = raw.post(location, data=MultiDict([*_hidden(page).items(), ("decision", "approve"),
                                                      *(("scope", s.decode()) for s in scopes)]))
        else:
            raise AssertionError(location)
    return resp


VERIFIER = "v" * 50


def smart_challenge() -> str:
    import base64
    import hashlib

    return base64.urlsafe_b64encode(hashlib.sha256(VERIFIER.encode()).digest()).rstrip(b"=").decode()


def test_launches_work_once_and_a_patient_user_cannot_use_anothers(raw: FlaskClient, client: FlaskClient, storage: Storage,
                                                                   registered: dict[str, str]) -> None:
    t = registered["tenant"]
    for pid in ("me", "other"):
        assert client.put(f"/fhir/{t}/Patient/{pid}", json={"resourceType": "Patient", "id": pid}).status_code == 201
    with _store(storage, t) as repo:
        store = AuthStore(repo)
        store.create_user(username="pat", password_hash=passwords.hash_password(PASSWORD), fhir_user="Patient/me",
                          roles=["patient"], mfa_required=False)
        for_other = store.create_launch({"patient": "other"}, created_by="ehr")
        for_me = store.create_launch({"patient": "me"}, created_by="ehr")
    resp = _authorize_to_code(raw, registered, "pat", scope="launch patient/*.rs", launch=for_other)
    assert parse_qs(urlsplit(resp.headers["Location"]).query)["error"] == ["access_denied"]
    resp = _authorize_to_code(raw.application.test_client(), registered, "pat", scope="launch patient/*.rs", launch=for_me)
    assert "code" in parse_qs(urlsplit(resp.headers["Location"]).query)
    again = raw.application.test_client().get(f"/auth/{t}/authorize?" + urlencode({
        "response_type": "code", "client_id": registered["client_id"], "redirect_uri": REDIRECT, "scope": "launch patient/*.rs",
        "state": "s", "aud": f"http://localhost/fhir/{t}", "code_challenge": smart_challenge(), "code_challenge_method": "S256",
        "launch": for_me}))
    assert parse_qs(urlsplit(again.headers["Location"]).query)["error"] == ["invalid_request"]  # used up


def test_a_consent_page_cannot_answer_a_request_that_replaced_it(raw: FlaskClient, client: FlaskClient,
                                                                 registered: dict[str, str]) -> None:
    t = registered["tenant"]
    assert client.put(f"/fhir/{t}/Patient/me", json={"resourceType": "Patient", "id": "me"}).status_code == 201
    hidden = _login_to_picker(raw, registered, "nurse")
    assert raw.post(f"/auth/{t}/patient", data={**hidden, "patient": "me"}).status_code == 302
    old_page = _hidden(raw.get(f"/auth/{t}/consent").data)
    _authorize(raw, registered)  # another /authorize in the same browser replaces the pending request
    resp = raw.post(f"/auth/{t}/consent", data={**old_page, "decision": "approve", "scope": "patient/*.rs"})
    assert resp.status_code == 400 and "Location" not in resp.headers


def test_second_factor_failures_lock_the_account(raw: FlaskClient, storage: Storage, registered: dict[str, str]) -> None:
    t = registered["tenant"]
    with _store(storage, t) as repo:
        AuthStore(repo).set_mfa_secret("nurse", passwords.new_totp_secret())
    for _ in range(3):  # the right password each time, then wrong codes: failures add up across logins
        _authorize(raw, registered)
        csrf = _csrf(raw.get(f"/auth/{t}/login").data)
        resp = raw.post(f"/auth/{t}/login", data={"csrf": csrf, "username": "nurse", "password": PASSWORD})
        if resp.status_code != 302:
            break
        mfa_csrf = _csrf(raw.get(f"/auth/{t}/mfa").data)  # the session was renewed with the password
        for _ in range(2):
            assert raw.post(f"/auth/{t}/mfa", data={"csrf": mfa_csrf, "code": "000000"}).status_code == 401
    with _store(storage, t) as repo:
        user = AuthStore(repo).user("nurse")
    assert user is not None and user.locked_until > now_us()


def test_control_characters_and_absurd_claims_are_4xx(raw: FlaskClient, storage: Storage, registered: dict[str, str]) -> None:
    t = registered["tenant"]
    _authorize(raw, registered)
    csrf = _csrf(raw.get(f"/auth/{t}/login").data)
    assert raw.post(f"/auth/{t}/login", data={"csrf": csrf, "username": "nu\x00rse", "password": "x"}).status_code == 401
    resp = raw.post(f"/auth/{t}/token", data={"grant_type": "client_credentials", "client_id": "a\x00b", "client_secret": "x"})
    assert resp.status_code == 400


def test_redirect_uri_left_out_of_authorize_may_be_left_out_of_the_token_request(raw: FlaskClient, client: FlaskClient,
                                                                                 registered: dict[str, str]) -> None:
    t = registered["tenant"]
    assert client.put(f"/fhir/{t}/Patient/me", json={"resourceType": "Patient", "id": "me"}).status_code == 201
    resp = _authorize_to_code(raw, registered, "nurse", patient="me", redirect_uri="")
    code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
    token = raw.post(f"/auth/{t}/token", data={"grant_type": "authorization_code", "code": code, "client_id": registered["client_id"],
                                               "code_verifier": VERIFIER})
    assert token.status_code == 200, token.json


def test_concurrent_refreshes_of_one_token_rotate_once(app: Flask, raw: FlaskClient, client: FlaskClient,
                                                        registered: dict[str, str], storage: Storage) -> None:
    import threading

    t = registered["tenant"]
    assert client.put(f"/fhir/{t}/Patient/me", json={"resourceType": "Patient", "id": "me"}).status_code == 201
    with _store(storage, t) as repo:  # the client may ask for offline access
        repo.conn.execute(update(schema.oauth_clients).where(schema.oauth_clients.c.client_id == registered["client_id"])
                          .values(scope="launch/patient patient/*.rs offline_access"))
    resp = _authorize_to_code(raw, registered, "nurse", patient="me", scope="launch/patient patient/*.rs offline_access")
    code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
    first = raw.post(f"/auth/{t}/token", data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
                                               "client_id": registered["client_id"], "code_verifier": VERIFIER}).json
    statuses: list[int] = []

    def refresh() -> None:
        r = app.test_client().post(f"/auth/{t}/token", data={"grant_type": "refresh_token", "client_id": registered["client_id"],
                                                              "refresh_token": first["refresh_token"]})  # type: ignore[index]
        statuses.append(r.status_code)

    threads = [threading.Thread(target=refresh) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(statuses).count(200) <= 1, statuses


def test_a_related_person_acts_for_their_patient_only(raw: FlaskClient, client: FlaskClient, storage: Storage,
                                                      registered: dict[str, str]) -> None:
    t = registered["tenant"]
    for pid, family in (("kid", "Child"), ("other", "Otherperson")):
        assert client.put(f"/fhir/{t}/Patient/{pid}", json={"resourceType": "Patient", "id": pid,
                                                           "name": [{"family": family}]}).status_code == 201
        assert client.put(f"/fhir/{t}/Observation/o-{pid}", json={"resourceType": "Observation", "id": f"o-{pid}", "status": "final",
                                                                  "code": {"text": "x"}, "subject": {"reference": f"Patient/{pid}"}}
                          ).status_code == 201
    assert client.put(f"/fhir/{t}/RelatedPerson/mum", json={"resourceType": "RelatedPerson", "id": "mum",
                                                            "patient": {"reference": "Patient/kid"}}).status_code == 201
    with _store(storage, t) as repo:
        store = AuthStore(repo)
        store.create_user(username="mum", password_hash=passwords.hash_password(PASSWORD), fhir_user="RelatedPerson/mum",
                          roles=["related-person"], mfa_required=False)
        repo.conn.execute(update(schema.oauth_clients).where(schema.oauth_clients.c.client_id == registered["client_id"])
                          .values(scope="launch/patient patient/*.rs user/*.rs"))
    hidden = _login_to_picker(raw, registered, "mum")
    page = raw.get(f"/auth/{t}/patient?name=Other").data
    assert b"Child" in page and b"Otherperson" not in page
    assert raw.post(f"/auth/{t}/patient", data={**hidden, "patient": "other"}).status_code == 200  # not offered
    resp = _authorize_to_code(raw.application.test_client(), registered, "mum", patient="kid", scope="launch/patient user/*.rs")
    code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
    token = raw.post(f"/auth/{t}/token", data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
                                               "client_id": registered["client_id"], "code_verifier": VERIFIER}).json
    bearer = {"Authorization": f"Bearer {token['access_token']}"}  # type: ignore[index]
    assert client.get(f"/fhir/{t}/Observation/o-kid", headers=bearer).status_code == 200
    assert client.get(f"/fhir/{t}/Observation/o-other", headers=bearer).status_code == 403  # user/*.rs, but not theirs


def test_expired_records_are_purged(raw: FlaskClient, storage: Storage, tenant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fhir_server.api import smart

    day = 86400 * SECOND
    with _store(storage, tenant) as repo:
        store = AuthStore(repo)
        store.save_token("old", kind="access", grant_id="g", client_id="c", username=None, scope="", context={}, lifetime_s=-2 * 86400)
        store.save_token("live", kind="access", grant_id="g", client_id="c", username=None, scope="", context={}, lifetime_s=60)
        store.save_code("old-code", grant_id="g", client_id="c", username="u", redirect_uri="", scope="", context={},
                        code_challenge="x", lifetime_s=-7200)
        store.remember_jti("c", "old-jti", now_us() - day)
        old_launch = store.create_launch({"patient": "p"}, created_by="t", lifetime_s=-1)
        old_session, _ = store.create_session()
        repo.conn.execute(update(schema.oauth_sessions).where(schema.oauth_sessions.c.tenant_id == repo.tenant.id)
                          .values(last_seen=now_us() - day))
        live_session, _ = store.create_session()
    monkeypatch.setattr(smart, "_last_purge", {})
    raw.post(f"/auth/{tenant}/token", data={"grant_type": "client_credentials"})  # any token request may purge
    with _store(storage, tenant) as repo:
        store = AuthStore(repo)
        assert store.token("old") is None and store.token("live") is not None
        assert store.code("old-code") is None and store.take_launch(old_launch) is None
        assert store.remember_jti("c", "old-jti", now_us() + day)  # forgotten, so new again
        assert store.session(old_session, idle_s=10 * 86400) is None and store.session(live_session, idle_s=60) is not None
