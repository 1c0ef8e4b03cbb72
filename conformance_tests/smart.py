"""SMART on FHIR from the client's side, over HTTP only: discovery, PKCE, the authorization code flow
through the server's login forms, client assertions, and token sources for the FhirClient.

The setup the SMART tests need (registered clients, users, a patient with data) is described by a
``SmartSetup``. The fixture builds one for this project's server with its CLI; for another server,
give ``--smart-config FILE`` (JSON with the same fields, see ``SmartSetup.from_json``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html.parser
import http.server
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import pyotp
import requests
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from testsupport.server import client_credentials

REDIRECT_URI = "http://127.0.0.1:9/smart-callback"  # never contacted: the tests read the redirect's Location


@dataclass
class Client:
    client_id: str
    redirect_uri: str = REDIRECT_URI
    client_secret: str | None = None
    private_jwks: dict[str, Any] | None = None  # backend services: the private keys it signs assertions with


@dataclass
class User:
    username: str
    password: str
    totp_secret: str | None = None


@dataclass
class SmartSetup:
    fhir_base: str
    confidential: Client  # client_secret_basic, authorization code; registered for the scopes the tests ask for
    public: Client  # no secret, PKCE only
    backend: Client  # private_key_jwt, registered for system/*.rs
    user: User  # logs in with a password only
    mfa_user: User  # needs TOTP
    patient: str  # a Patient the user may pick, with Observations (laboratory and vital-signs) and an Encounter
    other_patient: str  # another Patient, with an Observation
    encounter: str
    launch: Any = None  # callable (patient, encounter) -> launch id, where the server can make EHR launches
    browser_client: Client | None = None  # a public client redirecting to ``callback`` (for the browser test)
    callback: CallbackServer | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any], fhir_base: str) -> SmartSetup:
        return cls(
            fhir_base=fhir_base,
            confidential=Client(**data["confidential"]),
            public=Client(**data["public"]),
            backend=Client(**data["backend"]),
            user=User(**data["user"]),
            mfa_user=User(**data["mfa_user"]),
            patient=data["patient"],
            other_patient=data["other_patient"],
            encounter=data["encounter"],
        )


class CallbackServer:
    """The app's redirect URI, for a real browser: records the query of each request it gets."""

    def __init__(self) -> None:
        received: list[dict[str, list[str]]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if urlsplit(self.path).path == "/callback":  # not /favicon.ico
                    received.append(parse_qs(urlsplit(self.path).query))
                body = b"<!doctype html><title>Callback</title><p id=done>Back at the app.</p>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/callback"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def discover(fhir_base: str) -> dict[str, Any]:
    resp = requests.get(f"{fhir_base}/.well-known/smart-configuration", timeout=30)
    resp.raise_for_status()
    config: dict[str, Any] = resp.json()
    return config


# --- PKCE and state -----------------------------------------------------------------------------------

def pkce() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge)."""
    verifier = secrets.token_urlsafe(48)
    return verifier, challenge_of(verifier)


def challenge_of(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def authorize_params(setup: SmartSetup, client: Client, scope: str, challenge: str, **extra: str) -> dict[str, str]:
    return {"response_type": "code", "client_id": client.client_id, "redirect_uri": client.redirect_uri, "scope": scope,
            "state": secrets.token_urlsafe(16), "aud": setup.fhir_base, "code_challenge": challenge,
            "code_challenge_method": "S256", **extra}


# --- the login forms --------------------------------------------------------------------------------------

class _Forms(html.parser.HTMLParser):
    """The forms of an HTML page: action, method and the inputs' default values (checked boxes only)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "method": a.get("method", "get").lower(), "fields": [], "boxes": []})
        elif tag in ("input", "textarea") and self.forms:
            kind = a.get("type", "text")
            if kind in ("checkbox", "radio"):
                self.forms[-1]["boxes"].append((a.get("name"), a.get("value"), "checked" in a))
            elif kind != "submit":
                self.forms[-1]["fields"].append((a.get("name"), a.get("value", "")))


def forms(page: str) -> list[dict[str, Any]]:
    parser = _Forms()
    parser.feed(page)
    return parser.forms


_totp_lock = threading.Lock()
_totp_used: dict[str, int] = {}


def totp_code(secret: str) -> str:
    """A TOTP code not used before by these tests (a server refuses a code twice): waits for the next step if needed."""
    with _totp_lock:
        totp = pyotp.TOTP(secret)
        step = int(time.time()) // 30
        if _totp_used.get(secret, -1) >= step:
            time.sleep(30 - time.time() % 30 + 0.5)
            step = int(time.time()) // 30
        _totp_used[secret] = step
        return totp.now()


@dataclass
class Choices:
    """What the user does on the pages."""

    untick: tuple[str, ...] = ()  # scopes to untick on the consent page
    tick: tuple[str, ...] = ()  # offered narrower (granular) scopes to tick
    patient: str | None = None  # the patient to pick, when asked
    deny: bool = False
    break_glass_reason: str | None = None


def login(setup: SmartSetup, params: dict[str, str], user: User, choices: Choices | None = None,
          http: requests.Session | None = None, method: str = "GET") -> dict[str, list[str]]:
    """Drive the authorization request through the server's forms; the query of the redirect to the app."""
    authorize = discover(setup.fhir_base)["authorization_endpoint"]
    if method == "POST":
        return login_at(authorize, params["redirect_uri"], user, choices, http, form=params)
    return login_at(with_query(authorize, params), params["redirect_uri"], user, choices, http)


def login_at(url: str, redirect_uri: str, user: User, choices: Choices | None = None, http: requests.Session | None = None,
             form: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Open an authorization URL (an app made it), log in and consent; the query of the redirect to ``redirect_uri``."""
    choices = choices or Choices()
    http = http or requests.Session()
    if form is not None:
        resp = http.post(url, data=form, allow_redirects=False, timeout=30)
    else:
        resp = http.get(url, allow_redirects=False, timeout=30)
    for _ in range(10):
        if resp.status_code in (301, 302, 303, 307):
            location = urljoin(resp.url, resp.headers["Location"])
            if location.startswith(redirect_uri):
                return parse_qs(urlsplit(location).query)
            resp = http.get(location, allow_redirects=False, timeout=30)
            continue
        if resp.status_code != 200:
            raise AssertionError(f"the authorization pages answered {resp.status_code}: {resp.text[:500]}")
        page = forms(resp.text)
        form = page[-1]
        data: list[tuple[str, str]] = [(n, v) for n, v in form["fields"] if n]
        names = {n for n, _ in data}
        if "password" in names:
            data = [(n, user.username if n == "username" else user.password if n == "password" else v) for n, v in data]
        elif "code" in names:
            assert user.totp_secret, "the server asks for a TOTP code but the user has no secret"
            data = [(n, totp_code(user.totp_secret) if n == "code" else v) for n, v in data]
        elif any(n == "patient" for n, _, _ in form["boxes"]):
            data.append(("patient", choices.patient or next(v for n, v, _ in form["boxes"] if n == "patient")))
        else:  # consent
            for n, v, checked in form["boxes"]:
                if n == "scope" and ((checked and v not in choices.untick) or v in choices.tick):
                    data.append((n, v))
            if choices.break_glass_reason:
                data = [(n, v) for n, v in data if n != "break_glass_reason"]
                data += [("break_glass", "yes"), ("break_glass_reason", choices.break_glass_reason)]
            data.append(("decision", "deny" if choices.deny else "approve"))
        resp = http.post(urljoin(resp.url, form["action"]), data=data, allow_redirects=False, timeout=30)
    raise AssertionError("the authorization pages never redirected back to the app")


def token_request(setup: SmartSetup, client: Client, data: dict[str, str]) -> requests.Response:
    token_url = discover(setup.fhir_base)["token_endpoint"]
    auth = (client.client_id, client.client_secret) if client.client_secret else None
    body = dict(data)
    if not client.client_secret:
        body.setdefault("client_id", client.client_id)
    return requests.post(token_url, data=body, auth=auth, timeout=30)


def launch_token(setup: SmartSetup, scope: str, *, client: Client | None = None, user: User | None = None,
                 choices: Choices | None = None, **extra: str) -> dict[str, Any]:
    """A full standalone (or, with launch=..., EHR) launch: the token response."""
    client = client or setup.confidential
    verifier, challenge = pkce()
    params = authorize_params(setup, client, scope, challenge, **extra)
    redirect = login(setup, params, user or setup.user, choices)
    assert redirect.get("state") == [params["state"]], redirect
    assert "code" in redirect, redirect
    resp = token_request(setup, client, {"grant_type": "authorization_code", "code": redirect["code"][0],
                                         "redirect_uri": client.redirect_uri, "code_verifier": verifier})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


# --- client assertions (SMART Backend Services) ---------------------------------------------------------------

def backend_keys() -> tuple[dict[str, Any], dict[str, Any]]:
    """(private JWKS, public JWKS): one RS384 and one ES384 key."""
    rsa = RSAKey.generate_key(2048, private=True)
    ec = ECKey.generate_key("P-384", private=True)
    private = {"keys": [rsa.as_dict(private=True) | {"kid": "rs-" + rsa.thumbprint()[:16], "alg": "RS384"},
                        ec.as_dict(private=True) | {"kid": "ec-" + ec.thumbprint()[:16], "alg": "ES384"}]}
    public = {"keys": [{k: v for k, v in key.items() if k not in ("d", "p", "q", "dp", "dq", "qi")} for key in private["keys"]]}
    return private, public


def signing_key(client: Client, alg: str = "RS384") -> tuple[str, Any]:
    assert client.private_jwks
    for key in client.private_jwks["keys"]:
        if key.get("alg") == alg:
            material = {k: v for k, v in key.items() if k != "alg"}  # usable for other algorithms too (negative tests)
            return key["kid"], (RSAKey if key["kty"] == "RSA" else ECKey).import_key(material)
    raise LookupError(alg)


def client_assertion(client: Client, token_url: str, *, alg: str = "RS384", lifetime: int = 240, claims: dict[str, Any] | None = None,
                     header: dict[str, Any] | None = None, key: Any = None) -> str:
    kid, private = signing_key(client, alg)
    now = int(time.time())
    body = {"iss": client.client_id, "sub": client.client_id, "aud": token_url, "exp": now + lifetime, "iat": now,
            "jti": uuid.uuid4().hex, **(claims or {})}
    head = {"alg": alg, "kid": kid, "typ": "JWT", **(header or {})}
    return jwt.encode(head, body, key or private, algorithms=[head["alg"]])


def backend_token_request(setup: SmartSetup, scope: str, assertion: str | None = None, **extra: str) -> requests.Response:
    token_url = discover(setup.fhir_base)["token_endpoint"]
    data = {"grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion if assertion is not None else client_assertion(setup.backend, token_url), **extra}
    return requests.post(token_url, data=data, timeout=30)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any], header: dict[str, Any]) -> str:
    """A JWT with whatever header and no signature (alg none)."""
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


def hs256(claims: dict[str, Any], header: dict[str, Any], secret: bytes) -> str:
    """A JWT signed HS256 with ``secret`` (the classic attack: the server's or client's public key as the secret)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


class ClientCredentialsToken:
    """A token source for the FhirClient: client_credentials with a client secret, renewed on demand."""

    def __init__(self, token_url: str, client_id: str, client_secret: str, scope: str) -> None:
        self.token_url, self.client_id, self.client_secret, self.scope = token_url, client_id, client_secret, scope
        self._token: str | None = None
        self._lock = threading.Lock()

    def __call__(self, renew: bool) -> str | None:
        with self._lock:
            if self._token is None or renew:
                self._token = client_credentials(self.token_url, self.client_id, self.client_secret, self.scope)
            return self._token


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def with_query(url: str, params: dict[str, str]) -> str:
    return f"{url}{'&' if urlsplit(url).query else '?'}{urlencode(params)}"
