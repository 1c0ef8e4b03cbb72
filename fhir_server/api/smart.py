"""SMART on FHIR over HTTP: discovery, the authorization server's endpoints, and its login pages.

- ``GET /fhir/{tenant}/.well-known/smart-configuration``: discovery (no authentication).
- ``/auth/{tenant}/authorize`` (GET or POST): the authorization request; the user then passes the
  login page, the TOTP page where multi-factor authentication is due, the patient picker where the app
  asked for ``launch/patient`` and has no patient yet, and the consent page, where scopes can be
  unticked. Plain HTML forms that work without JavaScript, with labelled inputs.
- ``/auth/{tenant}/token``, ``/introspect``, ``/revoke``, ``/jwks``; ``/launch`` (an EHR makes a
  launch id for a patient, with a bearer token that may read that patient).

The pages keep their state in a server-side session (a random id in an HttpOnly cookie scoped to the
tenant's /auth path, idle timeout ``FHIR_AUTH_SESSION_IDLE_SECONDS``); every form carries the
session's CSRF token. Each request runs in one database transaction of the tenant.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from authlib.oauth2.rfc6749 import OAuth2Error, OAuth2Request
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from flask import Blueprint, Response, current_app, g, redirect, render_template, request

from fhir_server.clock import now_us
from fhir_server.engine.request import FhirRequest
from fhir_server.engine.storage_errors import storage_errors
from fhir_server.errors import BadRequest, FhirError
from fhir_server.fhirjson import dumps, loads_stored
from fhir_server.security import passwords
from fhir_server.security.access import INTERNAL
from fhir_server.security.oauth import app_launch, auth_base_for
from fhir_server.security.oauth import audit as auth_audit
from fhir_server.security.oauth import server as oauth
from fhir_server.security.oauth.bearer import access_for
from fhir_server.security.oauth.store import AuthStore, SessionRecord, UserRecord, new_secret
from fhir_server.security.scopes import Grant, ScopeError, parse_scope, parse_scopes, within

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine
    from fhir_server.settings import Settings
    from fhir_server.storage.store import Storage

bp = Blueprint("smart", __name__, template_folder="templates", static_folder="static", static_url_path="/auth-static")
SERVER = oauth.SmartAuthorizationServer()
COOKIE = "fhir_auth"
EMERGENCY_ROLE = "emergency-access"

CAPABILITIES = [
    "launch-ehr", "launch-standalone", "authorize-post",
    "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
    "sso-openid-connect", "context-ehr-patient", "context-ehr-encounter", "context-standalone-patient",
    "context-banner", "context-style", "permission-offline", "permission-online", "permission-patient",
    "permission-user", "permission-v1", "permission-v2",
]
SCOPES_SUPPORTED = [
    "openid", "fhirUser", "profile", "launch", "launch/patient", "launch/encounter", "offline_access", "online_access",
    "patient/*.cruds", "user/*.cruds", "system/*.cruds", "patient/*.rs", "user/*.rs", "system/*.rs",
    "patient/*.read", "patient/*.write", "user/*.read", "user/*.write", "system/*.read", "system/*.write",
]
THO_OBSERVATION = "http://terminology.hl7.org/CodeSystem/observation-category"
THO_CONDITION = "http://terminology.hl7.org/CodeSystem/condition-category"
US_CORE_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-category"
US_CORE_CONDITION = "http://hl7.org/fhir/us/core/CodeSystem/condition-category"
# On the consent page a user may narrow a requested resource-level scope of these types to categories
# (granular scopes, SMART App Launch 2 and US Core): each choice adds ``?category=system|code``.
GRANULAR_CHOICES: dict[str, list[tuple[str, str]]] = {
    "Observation": [(f"{THO_OBSERVATION}|{code}", label) for code, label in (
        ("laboratory", "laboratory results"), ("vital-signs", "vital signs"), ("social-history", "social history"),
        ("survey", "surveys"), ("imaging", "imaging"), ("exam", "examinations"), ("procedure", "procedures"),
        ("therapy", "therapy"), ("activity", "activity"))] + [(f"{US_CORE_CATEGORY}|sdoh", "social determinants of health")],
    "Condition": [(f"{THO_CONDITION}|encounter-diagnosis", "encounter diagnoses"),
                  (f"{THO_CONDITION}|problem-list-item", "problem list"),
                  (f"{US_CORE_CONDITION}|health-concern", "health concerns")],
}
STYLE = {
    "color_background": "#edeae3", "color_error": "#9e2d2d", "color_highlight": "#69b5ce", "color_modal_backdrop": "",
    "color_success": "#498e49", "color_text": "#303030", "dim_border_radius": "6px", "dim_font_size": "13px",
    "dim_spacing_size": "20px", "font_family_body": "Georgia, Times, 'Times New Roman', serif",
    "font_family_heading": "'HelveticaNeue-Light', Helvetica, Arial, 'Lucida Grande', sans-serif;",
}


def _settings() -> Settings:
    settings: Settings = current_app.extensions["fhir_settings"]
    return settings


def _root() -> str:
    settings = _settings()
    return settings.base_url.rstrip("/") if settings.base_url else request.host_url.rstrip("/") + request.script_root


def fhir_base(tenant: str) -> str:
    return f"{_root()}/fhir/{tenant}"


def auth_base(tenant: str) -> str:
    return auth_base_for(fhir_base(tenant))


@contextmanager
def _oauth(tenant: str) -> Iterator[oauth.OAuthScope]:
    """The tenant's authorization records, in one database transaction, for Authlib's callbacks."""
    storage: Storage = current_app.extensions["fhir_storage"]
    engine: Engine = current_app.extensions["fhir_engine"]
    with storage_errors(tenant), storage.session(tenant, write=True) as repo:
        g.oauth = oauth.OAuthScope(AuthStore(repo), engine, tenant, fhir_base(tenant), auth_base(tenant))
        try:
            yield g.oauth
        finally:
            g.pop("oauth", None)


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(dumps(body), status=status, content_type="application/json",
                    headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


# --- discovery --------------------------------------------------------------------------------------

def _endpoints(tenant: str) -> dict[str, str]:
    """The issuer and endpoints both discovery documents name (404 for an unknown tenant)."""
    storage: Storage = current_app.extensions["fhir_storage"]
    with storage_errors(tenant), storage.session(tenant, write=False):
        pass  # opening it is the check that the tenant exists (a read: discovery writes nothing)
    auth = auth_base(tenant)
    return {"issuer": fhir_base(tenant), "jwks_uri": f"{auth}/jwks", "authorization_endpoint": f"{auth}/authorize",
            "token_endpoint": f"{auth}/token"}


@bp.get("/fhir/<tenant>/.well-known/smart-configuration")
def smart_configuration(tenant: str) -> Response:
    auth = auth_base(tenant)
    return _json({
        **_endpoints(tenant),
        "introspection_endpoint": f"{auth}/introspect",
        "revocation_endpoint": f"{auth}/revoke",
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "response_types_supported": ["code"],
        "scopes_supported": SCOPES_SUPPORTED,
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic", "client_secret_post"],
        "token_endpoint_auth_signing_alg_values_supported": oauth.ASSERTION_ALGORITHMS,
        "capabilities": CAPABILITIES,
    })


@bp.get("/fhir/<tenant>/.well-known/openid-configuration")
def openid_configuration(tenant: str) -> Response:
    """OpenID Connect discovery for the ID tokens this server signs (its issuer is the FHIR base URL)."""
    return _json({
        **_endpoints(tenant),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "fhirUser", "profile"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nonce", "fhirUser"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic", "client_secret_post", "none"],
        "code_challenge_methods_supported": ["S256"],
    })


@bp.get("/auth/<tenant>/jwks")
def jwks(tenant: str) -> Response:
    with _oauth(tenant) as scope:
        return _json(oauth.jwks(scope.store))


@bp.get("/auth/<tenant>/style.json")
def style(tenant: str) -> Response:
    return _json(STYLE)


# --- token, introspection, revocation ----------------------------------------------------------------------

@bp.post("/auth/<tenant>/token")
def token(tenant: str) -> Response:
    with _oauth(tenant) as scope:
        response: Response = SERVER.create_token_response()
        auth_audit.token(scope, request.form.get("grant_type"), response.status_code, _oauth_error(response), _client_hint())
        _purge_now_and_then(scope)
    return response


def _client_hint() -> str | None:
    """The client a token request names (for the record of a refused one): client_id, or the Basic user name."""
    named = request.form.get("client_id")
    if named:
        return named[:64]
    auth = request.authorization
    return auth.username[:64] if auth is not None and auth.username else None


def _oauth_error(response: Response) -> dict[str, Any] | None:
    if response.status_code < 400:
        return None
    try:
        body = response.get_json(silent=True)
    except Exception:  # noqa: BLE001 - whatever the body, the record says only that it failed
        return None
    return body if isinstance(body, dict) else None


PURGE_SECONDS = 600
_last_purge: dict[str, float] = {}  # tenant -> when this worker last purged its expired records


def _purge_now_and_then(scope: oauth.OAuthScope) -> None:
    """Every PURGE_SECONDS per worker and tenant, a token request also drops the tenant's expired codes,
    tokens, assertion ids, launches and idle sessions, inside the token request's transaction."""
    now = time.monotonic()
    if now - _last_purge.get(scope.tenant, -PURGE_SECONDS) >= PURGE_SECONDS:
        _last_purge[scope.tenant] = now
        scope.store.purge_expired(session_idle_s=_settings().auth_session_idle_seconds)


@bp.post("/auth/<tenant>/introspect")
def introspect(tenant: str) -> Response:
    with _oauth(tenant):
        response: Response = SERVER.create_endpoint_response("introspection")
    return response


@bp.post("/auth/<tenant>/revoke")
def revoke(tenant: str) -> Response:
    with _oauth(tenant) as scope:
        response: Response = SERVER.create_endpoint_response("revocation")
        auth_audit.revoked(scope, response.status_code, _client_hint())
    return response


@bp.post("/auth/<tenant>/launch")
def launch(tenant: str) -> Response:
    """An EHR's launch: ``patient`` (and ``encounter``) in, an opaque launch id out. The bearer token must
    allow reading that patient (a user/ or system/ grant)."""
    storage: Storage = current_app.extensions["fhir_storage"]
    engine: Engine = current_app.extensions["fhir_engine"]
    with storage_errors(tenant):
        access = access_for(storage, tenant, fhir_base(tenant), request.headers.get("Authorization"))
    data = request.get_json(silent=True) if request.is_json else request.form
    if not isinstance(data, dict) or not isinstance(data.get("patient"), str):
        raise BadRequest("A launch needs the patient's id (patient) and optionally an encounter id (encounter)", expression="patient")
    context: dict[str, Any] = {"patient": data["patient"]}
    engine.handle(FhirRequest("GET", tenant, ("Patient", data["patient"]), fhir_base(tenant), access))
    if isinstance(data.get("encounter"), str):
        context["encounter"] = data["encounter"]
        engine.handle(FhirRequest("GET", tenant, ("Encounter", data["encounter"]), fhir_base(tenant), access))
    with _oauth(tenant) as scope:
        launch_id = scope.store.create_launch(context, created_by=access.subject or "unknown")
    out: dict[str, Any] = {"launch": launch_id, **context}
    app_url = data.get("app_launch_url")
    if isinstance(app_url, str) and app_url.startswith(("https://", "http://")) and len(app_url) <= 2000:
        out["app_launch_url"] = app_launch(app_url, fhir_base(tenant), launch_id)  # what the EHR opens
    return _json(out)


# --- the authorization request and its pages ---------------------------------------------------------------

class PendingRequest(OAuth2Request):  # type: ignore[misc]
    """The authorization request as it was received, answered once the user has logged in and consented."""

    def __init__(self, params: dict[str, str], uri: str) -> None:
        super().__init__("GET", uri)
        self.payload = BasicOAuth2Payload(params)
        self._params = params
        self.smart_context: dict[str, Any] = {}

    @property
    def args(self) -> dict[str, str]:
        return self._params

    @property
    def form(self) -> dict[str, str]:
        return {}


@bp.route("/auth/<tenant>/authorize", methods=["GET", "POST"])
def authorize(tenant: str) -> Response:
    with _oauth(tenant) as scope:
        try:
            grant = SERVER.get_consent_grant(end_user=None)
        except OAuth2Error as error:
            return _authorize_error(error)
        params = {k: v for k, v in request.values.items()}
        redirect_uri = grant.redirect_uri
        if params.get("aud", "").rstrip("/") != scope.fhir_base:
            return _redirect_error(redirect_uri, "invalid_request", "aud must be this server's FHIR base URL", params.get("state"))
        if not params.get("state"):
            return _redirect_error(redirect_uri, "invalid_request", "state is required", None)
        context: dict[str, Any] = {}
        if params.get("launch"):
            launched = scope.store.take_launch(params["launch"])
            if launched is None:
                return _redirect_error(redirect_uri, "invalid_request", "the launch is unknown or expired", params["state"])
            context.update(launched, launch=True)
        if params.get("nonce"):
            context["nonce"] = params["nonce"][:256]
        sid, session = _session(scope.store)
        session.pending = {"id": new_secret(12), "params": params, "context": context, "client": grant.client.record.name,
                           "scope": grant.request.scope or "", "redirect_uri": redirect_uri}
        scope.store.save_session(sid, session)
        return _with_cookie(redirect(_next_page(tenant, scope.store, session)), tenant, sid)


def _authorize_error(error: OAuth2Error) -> Response:
    """An invalid authorization request: back to the client when its redirect_uri is known good, else a page."""
    if getattr(error, "redirect_uri", None):
        response: Response = SERVER.handle_error_response(None, error)
        return response
    return _page("error.html", status=400, message=error.get_error_description() or error.error)


def _redirect_error(redirect_uri: str, error: str, description: str, state: str | None) -> Response:
    query = {"error": error, "error_description": description, **({"state": state} if state else {})}
    separator = "&" if urlsplit(redirect_uri).query else "?"
    return redirect(f"{redirect_uri}{separator}{urlencode(query)}")  # type: ignore[return-value]


def _session(store: AuthStore) -> tuple[str, SessionRecord]:
    """The browser's login session, or a new one."""
    sid = request.cookies.get(COOKIE, "")
    record = store.session(sid, idle_s=_settings().auth_session_idle_seconds) if sid else None
    if record is None:
        sid, record = store.create_session()
    return sid, record


def _with_cookie(response: Any, tenant: str, sid: str) -> Response:
    response.set_cookie(COOKIE, sid, httponly=True, secure=request.is_secure, samesite="Lax", path=f"/auth/{tenant}/")
    return response  # type: ignore[no-any-return]


def _next_page(tenant: str, store: AuthStore, session: SessionRecord) -> str:
    base = f"{request.script_root}/auth/{tenant}"
    if session.pending is None:
        return f"{base}/login"
    if session.stage != "done":
        return f"{base}/mfa" if session.stage == "password" else f"{base}/login"
    if _needs_patient(session):
        return f"{base}/patient"
    return f"{base}/consent"


def _needs_patient(session: SessionRecord) -> bool:
    pending = session.pending or {}
    wants = "launch/patient" in str(pending.get("scope", "")).split()
    return wants and not pending.get("context", {}).get("patient")


def _page(template: str, status: int = 200, **values: Any) -> Response:
    response = Response(render_template(template, **values), status=status, content_type="text/html; charset=utf-8")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _form_ok(session: SessionRecord, *, for_request: bool = False) -> bool:
    """The form carries the session's CSRF token and, ``for_request``, the id of the authorization request it
    was shown for: a page left open while another /authorize replaced the request cannot answer the new one."""
    if not hmac.compare_digest(request.form.get("csrf", ""), session.csrf):
        return False
    if for_request:
        expected = str((session.pending or {}).get("id", ""))
        return bool(expected) and hmac.compare_digest(request.form.get("request", ""), expected)
    return True


def _current(scope: oauth.OAuthScope) -> tuple[str, SessionRecord] | None:
    sid = request.cookies.get(COOKIE, "")
    record = scope.store.session(sid, idle_s=_settings().auth_session_idle_seconds) if sid else None
    return (sid, record) if record is not None else None


def _expired(tenant: str) -> Response:
    return _page("error.html", status=400, message="Your session has expired or was not found. Go back to the app and start again.")


@bp.route("/auth/<tenant>/login", methods=["GET", "POST"])
def login(tenant: str) -> Response:
    with _oauth(tenant) as scope:
        found = _current(scope)
        if found is None or found[1].pending is None:
            return _expired(tenant)
        sid, session = found
        pending: dict[str, Any] = session.pending or {}
        if request.method == "GET":
            return _page("login.html", tenant=tenant, csrf=session.csrf, client=pending["client"])
        if not _form_ok(session):
            return _page("error.html", status=400, message="The form has expired; go back to the app and start again.")
        username = request.form.get("username", "")[:128]
        password = request.form.get("password", "")
        user = scope.store.user(username)
        error = _check_password(scope, user, username, password)
        if error:
            return _page("login.html", status=401, tenant=tenant, csrf=session.csrf, client=pending["client"],
                         error=error, username=username)
        assert user is not None
        auth_audit.login(scope, username, True)
        needs_mfa = user.mfa_required or scope.store.tenant_requires_mfa()
        if not needs_mfa:
            scope.store.login_succeeded(username)  # with a second factor due, failures count on until it passes
        if needs_mfa and not user.has_mfa:
            return _page("login.html", status=403, tenant=tenant, csrf=session.csrf, client=pending["client"],
                         error="This account needs a second factor but has none enrolled; ask an administrator.")
        # A new session id once the password is right (no fixation), carrying the request along.
        scope.store.end_session(sid)
        sid, fresh = scope.store.create_session()
        fresh.username, fresh.pending = username, session.pending
        fresh.stage = "password" if needs_mfa else "done"
        scope.store.save_session(sid, fresh)
        return _with_cookie(redirect(_next_page(tenant, scope.store, fresh)), tenant, sid)


def _check_password(scope: oauth.OAuthScope, user: UserRecord | None, username: str, password: str) -> str | None:
    """None when the password is right; else what to tell the user (never whether the account exists). Failures
    are recorded in the audit log."""
    if user is None or not user.active:
        passwords.verify_password(password, passwords.DUMMY_HASH)  # the same time either way
        auth_audit.login(scope, username, False, "no such active user")
        return "Wrong username or password."
    if user.locked_until > now_us():
        passwords.verify_password(password, passwords.DUMMY_HASH)
        auth_audit.login(scope, username, False, "the account is locked")
        return "Too many failed attempts: the account is locked for a while."
    if not passwords.verify_password(password, user.password_hash):
        auth_audit.login(scope, username, False, "wrong password")
        if scope.store.login_failed(username):
            auth_audit.locked(scope, username)
        return "Wrong username or password."
    return None


@bp.route("/auth/<tenant>/mfa", methods=["GET", "POST"])
def mfa(tenant: str) -> Response:
    with _oauth(tenant) as scope:
        found = _current(scope)
        if found is None or found[1].stage != "password" or not found[1].username:
            return _expired(tenant)
        sid, session = found
        if request.method == "GET":
            return _page("mfa.html", tenant=tenant, csrf=session.csrf)
        if not _form_ok(session):
            return _page("error.html", status=400, message="The form has expired; go back to the app and start again.")
        username = session.username
        assert username is not None
        user = scope.store.user(username)
        secret = scope.store.mfa_secret(username)
        if user is None or secret is None or user.locked_until > now_us():
            auth_audit.second_factor(scope, username, False)
            return _page("mfa.html", status=401, tenant=tenant, csrf=session.csrf, error="The code could not be checked.")
        step = passwords.totp_step(secret, request.form.get("code", ""))
        if step is None or not scope.store.use_mfa_step(username, step):
            auth_audit.second_factor(scope, username, False)
            if scope.store.login_failed(username):
                auth_audit.locked(scope, username)
            return _page("mfa.html", status=401, tenant=tenant, csrf=session.csrf, error="Wrong or already used code.")
        auth_audit.second_factor(scope, username, True)
        session.stage = "done"
        scope.store.login_succeeded(username)
        scope.store.save_session(sid, session)
        return redirect(_next_page(tenant, scope.store, session))  # type: ignore[return-value]


@bp.route("/auth/<tenant>/patient", methods=["GET", "POST"])
def patient(tenant: str) -> Response:
    with _oauth(tenant) as scope:
        found = _current(scope)
        if found is None or found[1].stage != "done" or found[1].pending is None:
            return _expired(tenant)
        sid, session = found
        pending: dict[str, Any] = session.pending or {}
        user = scope.store.user(session.username or "")
        # A patient, or a related person, picks only the record that is theirs; staff search the tenant's.
        own = _own_patient(scope, tenant, user.fhir_user if user is not None else None)
        if request.method == "POST":
            if not _form_ok(session, for_request=True):
                return _page("error.html", status=400, message="The form has expired; go back to the app and start again.")
            chosen = request.form.get("patient", "")
            if (own is None or chosen == own) and _patients(scope, tenant, {"_id": chosen}):
                pending["context"]["patient"] = chosen
                scope.store.save_session(sid, session)
                return redirect(_next_page(tenant, scope.store, session))  # type: ignore[return-value]
        query = request.args.get("name", "")[:100]
        criteria = {"_id": own} if own is not None else {"name": query} if query else {}
        listed = _patients(scope, tenant, criteria)
        return _page("patient.html", tenant=tenant, csrf=session.csrf, patients=listed, name=query, request_id=pending["id"])


def _own_patient(scope: oauth.OAuthScope, tenant: str, fhir_user: str | None) -> str | None:
    """The one patient record a user may act on: their own (fhirUser Patient/x), or, for a related person
    (fhirUser RelatedPerson/y), the patient that RelatedPerson is about ("" when it names none: no record).
    None for staff, who are not limited to one patient."""
    if not fhir_user:
        return None
    rtype, _, rid = fhir_user.partition("/")
    if rtype == "Patient":
        return rid
    if rtype != "RelatedPerson":
        return None
    try:
        found = scope.engine.handle(FhirRequest("GET", tenant, ("RelatedPerson", rid), scope.fhir_base, INTERNAL))
        reference = str(loads_stored(dumps(found.body)).get("patient", {}).get("reference", ""))
    except FhirError:
        return ""
    rtype, _, pid = reference.rpartition("/")
    return pid if rtype.endswith("Patient") and pid else ""


def _patients(scope: oauth.OAuthScope, tenant: str, criteria: dict[str, str]) -> list[dict[str, str]]:
    """Patients to pick from (an authenticated user picks among the tenant's patients)."""
    params = (*criteria.items(), ("_count", "20"), ("_sort", "family"), ("_elements", "name,birthDate,gender"))
    try:
        bundle = scope.engine.handle(FhirRequest("GET", tenant, ("Patient",), scope.fhir_base, INTERNAL, params=tuple(params)))
    except FhirError:
        return []
    out = []
    for entry in loads_stored(dumps(bundle.body)).get("entry", []):
        resource = entry["resource"]
        name: dict[str, Any] = next(iter(resource.get("name") or []), {})
        display = name.get("text") or " ".join([*name.get("given", []), name.get("family", "")]).strip() or "(no name)"
        out.append({"id": resource["id"], "name": display, "birthDate": resource.get("birthDate", ""),
                    "gender": resource.get("gender", "")})
    return out


@bp.route("/auth/<tenant>/consent", methods=["GET", "POST"])
def consent(tenant: str) -> Response:
    with _oauth(tenant) as scope:
        found = _current(scope)
        if found is None or found[1].stage != "done" or found[1].pending is None or not found[1].username:
            return _expired(tenant)
        sid, session = found
        pending: dict[str, Any] = session.pending or {}
        user = scope.store.user(session.username or "")
        if user is None or not user.active or _needs_patient(session):
            return _expired(tenant)
        requested_scopes = parse_scopes(pending["scope"], lenient=True)
        requested = requested_scopes.text
        emergency = EMERGENCY_ROLE in user.roles
        if request.method == "GET":
            return _page("consent.html", tenant=tenant, csrf=session.csrf, request_id=pending["id"], client=pending["client"],
                         scopes=[(s, _narrowings(s)) for s in requested],
                         user=user.username, patient=pending["context"].get("patient"), emergency=emergency)
        if not _form_ok(session, for_request=True):
            return _page("error.html", status=400, message="The form has expired; go back to the app and start again.")
        req = PendingRequest(dict(pending["params"]), request.url)
        session.pending = None
        scope.store.save_session(sid, session)
        if request.form.get("decision") != "approve":
            return _finish(req, None)
        try:  # what the user left ticked: requested scopes, or narrowings of them (granular scopes)
            chosen = parse_scopes(" ".join(request.form.getlist("scope")[:200]), lenient=True)
        except ScopeError:
            return _page("error.html", status=400, message="Too many scopes were chosen.")
        granted = list(within(chosen, requested_scopes).text)
        context = dict(pending["context"])
        own = _own_patient(scope, tenant, user.fhir_user)
        if own == "":
            return _redirect_error(pending["redirect_uri"], "access_denied", "this account is linked to no patient record",
                                   pending["params"].get("state"))
        if own is not None and context.get("patient", own) != own:
            return _redirect_error(pending["redirect_uri"], "access_denied", "this launch is for another patient's record",
                                   pending["params"].get("state"))
        if own is not None and user.fhir_user and not user.fhir_user.startswith("Patient/"):
            context["user_patient"] = own  # a related person's user/ scopes reach that patient's record only
        reason = request.form.get("break_glass_reason", "").strip()
        if emergency and request.form.get("break_glass") and reason:
            context["break_glass"] = reason[:500]
            if oauth.BREAK_GLASS_SCOPE not in granted:
                granted.append(oauth.BREAK_GLASS_SCOPE)
        context.setdefault("smart_style_url", f"{scope.auth_base}/style.json")
        req.payload = BasicOAuth2Payload({**req._params, "scope": " ".join(granted)})
        req.smart_context = context
        return _finish(req, oauth.User(user))


def _narrowings(scope: str) -> list[tuple[str, str]]:
    """(scope, label) of the granular scopes a requested resource-level scope can be narrowed to."""
    grant = parse_scope(scope)
    if not isinstance(grant, Grant) or grant.query or grant.context == "system" or grant.resource_type not in GRANULAR_CHOICES:
        return []
    return [(f"{scope}?category={token}", label) for token, label in GRANULAR_CHOICES[grant.resource_type]]


def _finish(req: PendingRequest, user: oauth.User | None) -> Response:
    try:
        grant = SERVER.get_authorization_grant(req)
    except OAuth2Error as error:
        return _authorize_error(error)
    response: Response = SERVER.create_authorization_response(request=req, grant_user=user, grant=grant)
    return response

