"""Bearer tokens on FHIR requests: who is calling, or 401.

Every FHIR interaction but the open ones (``metadata``) needs an access token issued by this
tenant's authorization server, unexpired and unrevoked. The token is looked up on every request, so
a revocation takes effect at once for every worker.
"""

from __future__ import annotations

from fhir_server.errors import Unauthorized
from fhir_server.security.access import AccessContext
from fhir_server.security.oauth.store import AuthStore
from fhir_server.security.scopes import parse_scopes
from fhir_server.storage.repository import ResourceRepository
from fhir_server.storage.store import Storage

MAX_TOKEN_LENGTH = 512


def challenge(base_url: str, error: str | None = None, description: str | None = None) -> dict[str, str]:
    """The WWW-Authenticate header of a 401 (RFC 6750)."""
    value = f'Bearer realm="{base_url}"'
    if error:
        value += f', error="{error}"'
    if description:
        value += f', error_description="{description}"'
    return {"WWW-Authenticate": value}


def access_for(storage: Storage, tenant: str, base_url: str, authorization: str | None) -> AccessContext:
    """The AccessContext of a request's Authorization header (Unauthorized when there is no usable token)."""
    return access_for_token(storage, tenant, base_url, bearer_token(base_url, authorization))


def access_for_token(storage: Storage, tenant: str, base_url: str, token: str) -> AccessContext:
    with storage.session(tenant, write=False) as repo:
        return access_in(repo, base_url, token)


def bearer_token(base_url: str, authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header (Unauthorized when there is none, or it is malformed)."""
    if not authorization:
        raise Unauthorized("This server needs an access token (Authorization: Bearer ...); get one from the "
                           "authorization server in .well-known/smart-configuration", headers=challenge(base_url))
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LENGTH or " " in token:
        raise Unauthorized("The Authorization header must be 'Bearer <access token>'",
                           headers=challenge(base_url, "invalid_request", "malformed Authorization header"))
    return token


def access_in(repo: ResourceRepository, base_url: str, token: str) -> AccessContext:
    """The AccessContext of a bearer token, looked up in ``repo``'s tenant (Unauthorized unless it is a live access token)."""
    record = AuthStore(repo).token(token)
    if record is None or record.kind != "access" or not record.active():
        raise Unauthorized("The access token is not valid here: unknown, expired or revoked",
                           headers=challenge(base_url, "invalid_token", "the access token is unknown, expired or revoked"))
    context = record.context
    return AccessContext(
        parse_scopes(record.scope, lenient=True),
        patient=context.get("patient"),
        encounter=context.get("encounter"),
        client_id=record.client_id,
        subject=record.username or record.client_id,
        username=record.username,
        roles=tuple(r for r in context.get("roles") or () if isinstance(r, str)),
        fhir_user=context.get("fhirUser"),
        user_patient=context.get("user_patient"),
        token_id=record.grant_id,
        break_glass=context.get("break_glass"),
    )
