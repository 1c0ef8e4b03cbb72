"""The authorization server's AuditEvents: logins, second factors, lockouts, token grants, refreshes, revocations.

Each is queued on the unit of work of the request (``_oauth`` in api/smart.py), so it commits with what it
records (the token saved, the failure counted, the account locked). Who: the client and the user as far as
they are known, and the caller's address. No password, code or token goes in: a grant is named by its id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fhir_server.security import audit_events as ae

if TYPE_CHECKING:
    from fhir_server.security.oauth.server import OAuthScope

LOGIN = (ae.DCM, "110122")  # DICOM: Login
GET_TOKEN = (ae.IHE_EVENT, "ITI-71")  # IHE IUA: Get Access Token
# This server's subtypes: a password checked, a second factor (TOTP) checked, an account locked after repeated
# failures, an access token granted or refreshed, a token revoked, a grant revoked because a spent code or a
# rotated refresh token was presented again.
OURS = ("password", "second-factor", "account-locked", "token-grant", "token-refresh", "token-revoke",
        "grant-revoked-on-reuse")
GRANT_KINDS = {"authorization_code": "token-grant", "client_credentials": "token-grant", "refresh_token": "token-refresh"}


def _record(scope: OAuthScope, subtypes: list[tuple[str, str]], code: str, status: int, description: str | None, *,
            client_id: str | None = None, username: str | None = None, roles: tuple[str, ...] = (),
            purpose: tuple[str, ...] = (), grant_id: str | None = None, alert: bool = False) -> None:
    origin = ae.current_origin()
    actor = ae.Actor(client_id=client_id, username=username, roles=roles, purpose=purpose, grant_id=grant_id,
                     address=origin.address)
    assert code in OURS, code
    codings = [ae.coding(*s) for s in subtypes] + [ae.coding(ae.SUBTYPE, code)]
    event = ae.auth_event(codings, status, description, actor, ae.Place(scope.tenant, scope.fhir_base), grant_id=grant_id,
                          request_id=origin.request_id, alert=alert)
    scope.store.repo.pending_audit.append(event)


def login(scope: OAuthScope, username: str, ok: bool, reason: str | None = None) -> None:
    """A password checked (``reason``: why it failed, for the record)."""
    _record(scope, [LOGIN], "password", 200 if ok else 401, None if ok else f"Login failed: {reason or 'wrong password'}",
            username=username)


def second_factor(scope: OAuthScope, username: str, ok: bool) -> None:
    _record(scope, [LOGIN], "second-factor", 200 if ok else 401, None if ok else "Second factor failed: wrong or reused code",
            username=username)


def locked(scope: OAuthScope, username: str) -> None:
    _record(scope, [], "account-locked", 200, "The account was locked after repeated failed logins", username=username,
            alert=True)


def token(scope: OAuthScope, grant_type: str | None, status: int, error: dict[str, Any] | None, client_id: str | None) -> None:
    """A token request answered with ``status`` (what was issued is in ``scope.issued``; ``error`` the OAuth error)."""
    issued = scope.issued
    code = GRANT_KINDS.get(grant_type or "", "token-grant")
    description = None
    if status >= 400:
        error = error or {}
        description = f"Token request refused ({grant_type or 'no grant_type'}): {error.get('error', 'error')}"
        if error.get("error_description"):
            description += f": {str(error['error_description'])[:300]}"
    _record(scope, [GET_TOKEN], code, status, description, client_id=issued.get("client_id") or client_id,
            username=issued.get("username"), roles=tuple(issued.get("roles") or ()),
            purpose=ae.BREAK_GLASS_PURPOSE if issued.get("break_glass") else (), grant_id=issued.get("grant_id"))


def revoked(scope: OAuthScope, status: int, client_id: str | None) -> None:
    revoked_grant = scope.issued.get("revoked_grant")
    _record(scope, [], "token-revoke", status, None if status < 400 else "Revocation request refused",
            client_id=scope.issued.get("client_id") or client_id, grant_id=revoked_grant)


def reuse(scope: OAuthScope, client_id: str, grant_id: str, what: str) -> None:
    """A spent authorization code or a rotated refresh token presented again: its grant was revoked."""
    _record(scope, [], "grant-revoked-on-reuse", 200, f"A {what} was presented again; every token of its grant was revoked",
            client_id=client_id, grant_id=grant_id, alert=True)
