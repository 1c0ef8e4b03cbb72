"""Access tokens for tests: minted straight into the tenant's records (no login, no token endpoint)."""

from __future__ import annotations

import uuid
from typing import Any

from flask.testing import FlaskClient

from fhir_server.security.oauth.store import AuthStore, new_secret
from fhir_server.storage.store import Storage
from fhir_server.storage.tenants import TenantNotFound

FULL_ACCESS = "system/*.cruds"


def mint_token(storage: Storage, tenant: str, scope: str = FULL_ACCESS, *, lifetime_s: int = 3600, username: str | None = None,
               client_id: str = "test-suite", **context: Any) -> str:
    """A valid access token of ``tenant`` with ``scope`` and launch ``context`` (patient=..., fhirUser=...)."""
    token = new_secret(32)
    with storage.session(tenant, write=True) as repo:
        AuthStore(repo).save_token(token, kind="access", grant_id=uuid.uuid4().hex, client_id=client_id, username=username,
                                   scope=scope, context=context, lifetime_s=lifetime_s)
    return token


class AuthorizedClient(FlaskClient):
    """A Flask test client that sends a full-access token of the tenant each /fhir/{tenant}/ URL names,
    unless the request carries its own Authorization header."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tokens: dict[str, str | None] = {}

    def open(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        path = args[0] if args and isinstance(args[0], str) else kwargs.get("path")
        headers = kwargs.get("headers")
        has_auth = headers is not None and any(str(k).lower() == "authorization" for k in (dict(headers) if headers else {}))
        if isinstance(path, str) and path.startswith("/fhir/") and not has_auth:
            tenant = path.split("/")[2].split("?")[0]
            token = self._token(tenant)
            if token:
                merged = dict(headers or {})
                merged["Authorization"] = f"Bearer {token}"
                kwargs["headers"] = merged
        return super().open(*args, **kwargs)

    def _token(self, tenant: str) -> str | None:
        if tenant not in self._tokens:
            storage: Storage = self.application.extensions["fhir_storage"]
            try:
                self._tokens[tenant] = mint_token(storage, tenant)
            except TenantNotFound:
                self._tokens[tenant] = None
            except Exception:  # noqa: BLE001 - an invalid tenant name: the request will say so
                self._tokens[tenant] = None
        return self._tokens[tenant]
