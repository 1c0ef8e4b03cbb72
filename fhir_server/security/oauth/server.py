"""The SMART on FHIR authorization server, built on Authlib's OAuth 2.0 framework.

One ``SmartAuthorizationServer`` serves every tenant: each request first sets ``flask.g.oauth`` (an
``OAuthScope``: the tenant's store, inside one database transaction, and its URLs), and Authlib's
callbacks read it. Where Authlib's defaults are weaker than SMART asks, they are overridden:

- PKCE is required of every client (confidential ones too) and only ``S256`` is accepted; a missing,
  blank or wrong verifier, or a verifier equal to the challenge, fails.
- An authorization code works once: a second use fails and revokes every token the first one issued.
  A failed exchange (a wrong PKCE verifier, a wrong redirect_uri) does not use it up.
- Refresh tokens rotate: each refresh issues a new one and revokes the old; presenting a revoked
  refresh token again revokes its whole grant (it was stolen, or the client is confused).
- ``private_key_jwt`` client assertions: RS384 or ES384 only, ``exp`` at most five minutes ahead,
  ``jti`` never twice, the key chosen by ``kid`` from the client's JWKS (given at registration or
  fetched from its ``jwks_uri``).
- Access tokens live at most an hour (five minutes for backend services); they are opaque random
  strings, stored as digests, so revoking one takes effect at once for every worker.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.integrations.flask_oauth2.requests import FlaskOAuth2Request
from authlib.oauth2.rfc6749 import (
    AuthorizationCodeMixin,
    ClientMixin,
    InvalidClientError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Request,
    TokenMixin,
    grants,
)
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7636 import CodeChallenge, create_s256_code_challenge
from authlib.oauth2.rfc7636.challenge import CODE_CHALLENGE_PATTERN, CODE_VERIFIER_PATTERN
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from flask import g
from flask import request as flask_request
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey

from fhir_server.clock import now_us
from fhir_server.security.oauth import audit as auth_audit
from fhir_server.security.oauth.store import SECOND, AuthStore, ClientRecord, CodeRecord, TokenRecord, UserRecord, digest, new_secret
from fhir_server.security.scopes import ScopeError, parse_scopes, within

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine

log = logging.getLogger(__name__)

ACCESS_TOKEN_SECONDS = 3600
BACKEND_TOKEN_SECONDS = 300
BREAK_GLASS_SECONDS = 900
BREAK_GLASS_SCOPE = "user/*.rs"  # what an emergency access adds to the grant: read everything, for a short while
CODE_SECONDS = 120
ONLINE_REFRESH_SECONDS = 12 * 3600
OFFLINE_REFRESH_SECONDS = 90 * 86400
ASSERTION_MAX_AHEAD_SECONDS = 300
ASSERTION_ALGORITHMS = ["RS384", "ES384"]
JWKS_CACHE_SECONDS = 300

# Client kind -> the authentication methods it may use (at the token, revocation and introspection endpoints).
AUTH_METHODS = {
    "public": ("none",),
    "confidential-symmetric": ("client_secret_basic", "client_secret_post"),
    "confidential-asymmetric": ("private_key_jwt",),
}
ALL_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]


@dataclass
class OAuthScope:
    """What Authlib's callbacks need for the current request (set in ``flask.g.oauth``)."""

    store: AuthStore
    engine: Engine
    tenant: str
    fhir_base: str  # the tenant's FHIR base URL: the issuer, and the audience of its tokens
    auth_base: str  # the tenant's authorization server URL (…/auth/{tenant})
    issued: dict[str, Any] = field(default_factory=dict)  # what save_token did, for the caller

    @property
    def token_url(self) -> str:
        return f"{self.auth_base}/token"


def current() -> OAuthScope:
    scope: OAuthScope = g.oauth
    return scope


# --- models -------------------------------------------------------------------------------------

class Client(ClientMixin):  # type: ignore[misc]
    def __init__(self, record: ClientRecord) -> None:
        self.record = record
        self.client_id = record.client_id

    def get_client_id(self) -> str:
        return self.record.client_id

    def get_default_redirect_uri(self) -> str | None:
        uris = self.record.redirect_uris
        return uris[0] if len(uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str:
        """The requested scopes the client is registered for (those this server does not know dropped)."""
        try:
            requested = parse_scopes(scope or "", lenient=True)
        except ScopeError as error:
            raise InvalidScopeError(str(error)) from None
        return str(within(requested, parse_scopes(self.record.scope, lenient=True)))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.record.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        stored = self.record.secret_hash
        return stored is not None and hmac.compare_digest(digest(client_secret), stored)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in AUTH_METHODS.get(self.record.kind, ())

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and bool(self.record.redirect_uris)

    def check_grant_type(self, grant_type: str) -> bool:
        if grant_type in ("authorization_code", "refresh_token"):
            return bool(self.record.redirect_uris)
        if grant_type == "client_credentials":
            return self.record.kind != "public"
        return False


@dataclass
class User:
    record: UserRecord

    def get_user_id(self) -> str:
        return self.record.username


class AuthorizationCode(AuthorizationCodeMixin):  # type: ignore[misc]
    def __init__(self, record: CodeRecord, code: str) -> None:
        self.record = record
        self.code = code
        self.code_challenge = record.code_challenge
        self.code_challenge_method = "S256"

    def get_redirect_uri(self) -> str:
        return self.record.redirect_uri

    def get_scope(self) -> str:
        return self.record.scope


class Credential(TokenMixin):  # type: ignore[misc]
    """A stored token (refresh, for the refresh grant; any, for revocation and introspection)."""

    def __init__(self, record: TokenRecord, token: str) -> None:
        self.record = record
        self.token = token

    def check_client(self, client: Client) -> bool:
        return bool(self.record.client_id == client.get_client_id())

    def get_scope(self) -> str:
        return self.record.scope

    def get_expires_in(self) -> int:
        return max(0, (self.record.expires_at - now_us()) // SECOND)

    def is_expired(self) -> bool:
        return self.record.expires_at <= now_us()

    def is_revoked(self) -> bool:
        return self.record.revoked_at is not None

    def get_user(self) -> str | None:
        return self.record.username

    def get_client(self) -> None:
        return None


# --- PKCE: required of everyone, S256 only ----------------------------------------------------------

class RequiredS256(CodeChallenge):  # type: ignore[misc]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        challenge, method = data.get("code_challenge"), data.get("code_challenge_method")
        if not challenge:
            raise InvalidRequestError("PKCE is required: send code_challenge and code_challenge_method=S256",
                                      redirect_uri=redirect_uri)
        if method != "S256":
            raise InvalidRequestError("code_challenge_method must be S256", redirect_uri=redirect_uri)
        if not CODE_CHALLENGE_PATTERN.match(challenge):
            raise InvalidRequestError("Invalid code_challenge", redirect_uri=redirect_uri)
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant: Any, result: Any) -> None:
        verifier = grant.request.form.get("code_verifier")
        code = grant.request.authorization_code
        if not verifier or not CODE_VERIFIER_PATTERN.match(verifier):
            raise InvalidRequestError("A valid code_verifier is required (PKCE)")
        if verifier == code.code_challenge or create_s256_code_challenge(verifier) != code.code_challenge:
            raise InvalidGrantError("The code_verifier does not match the code_challenge")


# --- private_key_jwt ------------------------------------------------------------------------------

_jwks_cache: dict[str, tuple[float, dict[str, Any]]] = {}
JWKS_REFETCH_SECONDS = 30  # an unknown kid refetches the client's JWKS, at most this often


def fetch_jwks(uri: str, *, kid: str | None = None) -> dict[str, Any]:
    """A client's JWKS from its jwks_uri (cached a few minutes; https only, except on loopback). A ``kid`` the
    cached set lacks fetches it again (the client rotated its keys), at most every JWKS_REFETCH_SECONDS."""
    cached = _jwks_cache.get(uri)
    if cached and cached[0] > time.monotonic():
        kids = {k.get("kid") for k in cached[1]["keys"] if isinstance(k, dict)}
        fetched_at = cached[0] - JWKS_CACHE_SECONDS
        if kid is None or kid in kids or time.monotonic() - fetched_at < JWKS_REFETCH_SECONDS:
            return cached[1]
    parts = urlsplit(uri)
    if parts.scheme != "https" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        raise InvalidClientError(description="The client's jwks_uri must use https")
    try:
        resp = requests.get(uri, timeout=5, headers={"Accept": "application/json"}, stream=True)
        body = resp.raw.read(256 * 1024 + 1, decode_content=True)
        if resp.status_code != 200 or len(body) > 256 * 1024:
            raise InvalidClientError(description="The client's JWKS could not be fetched")
        jwks = json.loads(body)
    except (requests.RequestException, ValueError):
        raise InvalidClientError(description="The client's JWKS could not be fetched") from None
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise InvalidClientError(description="The client's jwks_uri does not serve a JWK Set")
    _jwks_cache[uri] = (time.monotonic() + JWKS_CACHE_SECONDS, jwks)
    return jwks


class PrivateKeyJwt(JWTBearerClientAssertion):  # type: ignore[misc]
    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self) -> None:
        super().__init__(validate_jti=True, leeway=30)

    def get_audiences(self) -> list[str]:
        return [current().token_url]

    def extract_assertion(self, assertion: str) -> Any:
        headers, claims = super().extract_assertion(assertion)
        kid = headers.get("kid") if isinstance(headers, dict) else None
        g.assertion_kid = kid if isinstance(kid, str) else None  # per request: this object serves every thread
        return headers, claims

    def resolve_client_public_key(self, client: Client) -> KeySet:
        record = client.record
        kid = g.get("assertion_kid")
        jwks = record.jwks if record.jwks is not None else fetch_jwks(record.jwks_uri, kid=kid) if record.jwks_uri else None
        if not jwks:
            raise InvalidClientError(description="The client has no public keys registered")
        try:
            return KeySet.import_key_set(jwks)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError):
            raise InvalidClientError(description="The client's JWKS is not usable") from None

    def process_assertion_claims(self, assertion: str, resolve_key: Any) -> Any:
        try:
            token = jwt.decode(assertion, resolve_key, algorithms=ASSERTION_ALGORITHMS)
        except (JoseError, ValueError) as exc:
            raise InvalidClientError(description=f"Invalid client assertion: {getattr(exc, 'description', None) or exc}") from None
        claims = token.claims
        self.verify_claims(claims)
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or exp > time.time() + ASSERTION_MAX_AHEAD_SECONDS + self.leeway:
            raise InvalidClientError(description="The client assertion's exp must be at most five minutes ahead")
        return claims

    def validate_jti(self, claims: dict[str, Any], jti: Any) -> bool:
        exp = claims.get("exp")
        if not isinstance(jti, str) or not jti or not isinstance(exp, (int, float)):
            return False
        if exp > time.time() + ASSERTION_MAX_AHEAD_SECONDS + self.leeway:  # checked again, with a clearer message, below
            raise InvalidClientError(description="The client assertion's exp must be at most five minutes ahead")
        return current().store.remember_jti(str(claims["sub"]), jti, int(exp) * SECOND + 60 * SECOND)


# --- grants ---------------------------------------------------------------------------------------

class SmartAuthorizationCodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ALL_AUTH_METHODS

    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        # A user's launch grants patient/ and user/ scopes; system/ ones belong to backend services.
        self.request.scope = " ".join(s for s in (self.request.scope or "").split() if not s.startswith("system/"))
        context = getattr(self.request, "smart_context", None) or {}
        if context.get("break_glass") and BREAK_GLASS_SCOPE not in (self.request.scope or "").split():
            self.request.scope = f"{self.request.scope or ''} {BREAK_GLASS_SCOPE}".strip()
        return redirect_uri

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        context = dict(getattr(request, "smart_context", {}) or {})
        current().store.save_code(
            code, grant_id=uuid.uuid4().hex, client_id=request.client.get_client_id(), username=request.user.get_user_id(),
            redirect_uri=request.payload.redirect_uri or "",  # as sent: the token request repeats it only if it was
            scope=request.scope or "", context=context, code_challenge=request.payload.data.get("code_challenge") or "",
            lifetime_s=CODE_SECONDS,
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        store = current().store
        record = store.code(code)
        if record is None or record.client_id != client.get_client_id():
            return None
        if record.used_at is not None:  # used before: revoke what its first use issued
            revoked = store.revoke_grant(record.grant_id)
            log.warning("authorization code reused; its grant is revoked", extra={"client_id": record.client_id, "revoked": revoked})
            auth_audit.reuse(current(), record.client_id, record.grant_id, "spent authorization code")
            return None
        if record.expires_at <= now_us():
            return None
        return AuthorizationCode(record, code)

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        pass  # marked used when the exchange succeeds (create_token_response), in the same transaction

    def authenticate_user(self, authorization_code: AuthorizationCode) -> User | None:
        record = current().store.user(authorization_code.record.username)
        return User(record) if record is not None and record.active else None

    def create_token_response(self) -> Any:
        code: AuthorizationCode = self.request.authorization_code
        current().store.use_code(code.code)  # every check passed: the code is spent
        if code.record.context.get("break_glass"):
            user = self.authenticate_user(code)
            if not user:
                raise InvalidRequestError("There is no user for this code")
            self.request.user = user
            token = self.generate_token(user=user, scope=code.get_scope(), expires_in=BREAK_GLASS_SECONDS,
                                        include_refresh_token=False)
            self.save_token(token)
            return 200, token, self.TOKEN_RESPONSE_HEADER
        return super().create_token_response()


class SmartRefreshTokenGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ALL_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotation

    def authenticate_refresh_token(self, refresh_token: str) -> Credential | None:
        store = current().store
        record = store.token(refresh_token, lock=True)  # two refreshes with one token: the second waits, then fails
        if record is None or record.kind != "refresh":
            return None
        if record.revoked_at is not None:  # a rotated (or revoked) refresh token presented again
            store.revoke_grant(record.grant_id)
            auth_audit.reuse(current(), record.client_id, record.grant_id, "rotated or revoked refresh token")
            return None
        if record.expires_at <= now_us():
            return None
        return Credential(record, refresh_token)

    def authenticate_user(self, refresh_token: Credential) -> User | None:
        username = refresh_token.record.username
        record = current().store.user(username) if username else None
        return User(record) if record is not None and record.active else None

    def revoke_old_credential(self, refresh_token: Credential) -> None:
        current().store.revoke_token(refresh_token.token)


class SmartClientCredentialsGrant(grants.ClientCredentialsGrant):  # type: ignore[misc]
    """SMART Backend Services: system/ scopes only, within the client's registration."""

    TOKEN_ENDPOINT_AUTH_METHODS = ["private_key_jwt", "client_secret_basic", "client_secret_post"]

    def validate_token_request(self) -> None:
        super().validate_token_request()
        client: Client = self.request.client
        try:
            requested = parse_scopes(self.request.payload.scope or "", lenient=True)
        except ValueError:
            raise InvalidScopeError("The scope is not a list of SMART scopes") from None
        granted = within(requested, parse_scopes(client.record.scope, lenient=True))
        system = [s for s in granted.text if s.startswith("system/")]
        if not system:
            raise InvalidScopeError("None of the requested scopes is a system/ scope this client is registered for")
        self.request.smart_scope = " ".join(system)

    def create_token_response(self) -> Any:
        token = self.generate_token(scope=self.request.smart_scope, include_refresh_token=False)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


# --- revocation and introspection ---------------------------------------------------------------------

def _query(token_string: str) -> Credential | None:
    record = current().store.token(token_string)
    return Credential(record, token_string) if record is not None else None


class SmartRevocationEndpoint(RevocationEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = ALL_AUTH_METHODS

    def query_token(self, token_string: str, token_type_hint: str | None) -> Credential | None:
        return _query(token_string)

    def revoke_token(self, token: Credential, request: OAuth2Request) -> None:
        current().issued = {"revoked_grant": token.record.grant_id, "client_id": token.record.client_id}
        store = current().store
        if token.record.kind == "refresh":
            store.revoke_grant(token.record.grant_id)  # RFC 7009: a refresh token takes its access tokens along
        else:
            store.revoke_token(token.token)


class SmartIntrospectionEndpoint(IntrospectionEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]

    def query_token(self, token_string: str, token_type_hint: str | None) -> Credential | None:
        return _query(token_string)

    def check_permission(self, token: Credential, client: Client, request: OAuth2Request) -> bool:
        # A confidential client may introspect its own tokens; one registered for system/ scopes (a resource
        # server, a backend service) may introspect any token of the tenant.
        return token.record.client_id == client.get_client_id() or any(
            s.startswith("system/") for s in client.record.scope.split())

    def introspect_token(self, token: Credential) -> dict[str, Any]:
        record, scope = token.record, current()
        payload: dict[str, Any] = {
            "active": True, "scope": record.scope, "client_id": record.client_id, "token_type": "Bearer" if record.kind == "access" else "refresh_token",
            "exp": record.expires_at // SECOND, "iat": record.issued_at // SECOND, "iss": scope.fhir_base, "aud": scope.fhir_base,
        }
        if record.username:
            payload["sub"] = payload["username"] = record.username
        for key in ("patient", "encounter", "fhirUser"):
            if record.context.get(key):
                payload[key] = record.context[key] if key != "fhirUser" else f"{scope.fhir_base}/{record.context[key]}"
        return payload


# --- the server ---------------------------------------------------------------------------------------

def _expires_in(client: Client, grant_type: str) -> int:
    return BACKEND_TOKEN_SECONDS if grant_type == "client_credentials" else ACCESS_TOKEN_SECONDS


class SmartAuthorizationServer(AuthorizationServer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.register_token_generator("default", BearerTokenGenerator(
            lambda **_: new_secret(32), lambda **_: new_secret(32), _expires_in))
        self.register_client_auth_method("private_key_jwt", PrivateKeyJwt())
        self.register_grant(SmartAuthorizationCodeGrant, [RequiredS256(required=True)])
        self.register_grant(SmartRefreshTokenGrant)
        self.register_grant(SmartClientCredentialsGrant)
        self.register_endpoint(SmartRevocationEndpoint)
        self.register_endpoint(SmartIntrospectionEndpoint)

    def authenticate_client(self, request: OAuth2Request, methods: list[str], endpoint: str = "token") -> Client:
        """Authlib answers every failed client authentication with 401 once client_secret_basic is allowed;
        RFC 6749 section 5.2 keeps 401 (with WWW-Authenticate) for a client that tried the Authorization
        header, and 400 for the rest (a bad or missing client assertion, an unknown client_id)."""
        try:
            client: Client = super().authenticate_client(request, methods, endpoint)
        except InvalidClientError as error:
            if not request.headers.get("Authorization"):
                error.status_code = 400
            raise
        return client

    def query_client(self, client_id: str) -> Client | None:
        if not isinstance(client_id, str):
            return None
        record = current().store.client(client_id)
        return Client(record) if record is not None and record.active else None

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        if isinstance(request, OAuth2Request):
            return request
        return FlaskOAuth2Request(flask_request)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        """Store the access (and refresh) token, and add the SMART launch context to the response."""
        scope = current()
        store = scope.store
        client: Client = request.client
        user: User | None = request.user if isinstance(request.user, User) else None
        if getattr(request, "authorization_code", None) is not None:
            code: CodeRecord = request.authorization_code.record
            grant_id, context = code.grant_id, dict(code.context)
        elif getattr(request, "refresh_token", None) is not None:
            previous: TokenRecord = request.refresh_token.record
            grant_id, context = previous.grant_id, dict(previous.context)
        else:
            grant_id, context = uuid.uuid4().hex, {}
        if user is not None and user.record.fhir_user:
            context["fhirUser"] = user.record.fhir_user
        if user is not None:
            context["roles"] = list(user.record.roles)  # for the audit log, and the auditor's access to it
        granted = parse_scopes(token.get("scope") or "", lenient=True)
        token["scope"] = str(granted)
        store.save_token(token["access_token"], kind="access", grant_id=grant_id, client_id=client.get_client_id(),
                         username=user.get_user_id() if user else None, scope=token["scope"], context=context,
                         lifetime_s=int(token["expires_in"]))
        if "refresh_token" in token:
            if granted.has("offline_access") or granted.has("online_access"):
                lifetime = OFFLINE_REFRESH_SECONDS if granted.has("offline_access") else ONLINE_REFRESH_SECONDS
                store.save_token(token["refresh_token"], kind="refresh", grant_id=grant_id, client_id=client.get_client_id(),
                                 username=user.get_user_id() if user else None, scope=token["scope"], context=context,
                                 lifetime_s=lifetime)
            else:
                del token["refresh_token"]  # no offline_access or online_access: no refresh token
        for key in ("patient", "encounter"):
            if context.get(key):
                token[key] = context[key]
        if context.get("patient") or context.get("launch"):
            token["need_patient_banner"] = bool(context.get("need_patient_banner", True))
        if context.get("smart_style_url"):
            token["smart_style_url"] = context["smart_style_url"]
        if user is not None and granted.has("openid") and (granted.has("fhirUser") or granted.has("profile")):
            token["id_token"] = id_token(store, scope.fhir_base, client.get_client_id(), user, context.get("nonce"))
        scope.issued = {"grant_id": grant_id, "client_id": client.get_client_id(), "scope": token["scope"],
                        "username": user.get_user_id() if user else None, "roles": context.get("roles") or [],
                        "break_glass": bool(context.get("break_glass"))}


def id_token(store: AuthStore, issuer: str, client_id: str, user: User, nonce: str | None) -> str:
    """An OpenID Connect ID token (RS256) naming the user and, as fhirUser, their FHIR resource."""
    kid, key = signing_key(store)
    now = int(time.time())
    claims: dict[str, Any] = {"iss": issuer, "sub": user.get_user_id(), "aud": client_id, "iat": now, "exp": now + ACCESS_TOKEN_SECONDS}
    if user.record.fhir_user:
        claims["fhirUser"] = f"{issuer}/{user.record.fhir_user}"
    if nonce:
        claims["nonce"] = nonce
    return jwt.encode({"alg": "RS256", "kid": kid, "typ": "JWT"}, claims, key)


def signing_key(store: AuthStore) -> tuple[str, RSAKey]:
    """The tenant's current RS256 signing key (made on first use, kept sealed)."""
    keys = store.signing_keys()
    if keys:
        kid, pem, _ = keys[0]
        return kid, RSAKey.import_key(pem)
    key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, private=True)
    kid = key.thumbprint()
    public = key.as_dict(private=False) | {"kid": kid, "use": "sig", "alg": "RS256"}
    store.add_signing_key(kid, key.as_pem(private=True), public)
    return kid, key


def jwks(store: AuthStore) -> dict[str, Any]:
    signing_key(store)  # there is always one to publish
    return {"keys": [public for _, _, public in store.signing_keys()]}
