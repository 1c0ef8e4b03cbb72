"""A minimal FHIR JSON client over HTTP, for the conformance tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import requests

FHIR_JSON = "application/fhir+json"

# A source of access tokens: called with renew=False for the current token, renew=True after a 401.
TokenSource = Callable[[bool], "str | None"]


class FhirClient:
    """``token`` supplies the Bearer token every request carries (none: requests go without one)."""

    def __init__(self, base_url: str, token: TokenSource | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.http = requests.Session()
        self.http.headers.update({"Accept": FHIR_JSON})
        self.token = token

    def without_token(self) -> FhirClient:
        return FhirClient(self.base)

    def with_token(self, token: str) -> FhirClient:
        return FhirClient(self.base, lambda renew: token)

    def url(self, path: str) -> str:
        if path.startswith("http"):
            return path
        return f"{self.base}/{path.lstrip('/')}" if path else self.base

    def request(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
                params: Any = None, data: bytes | None = None) -> requests.Response:
        h = dict(headers or {})
        if body is not None:
            data = json.dumps(body, default=_decimal).encode()
        if data is not None:
            h.setdefault("Content-Type", FHIR_JSON)
        token = self.token(False) if self.token else None
        if token and not any(k.lower() == "authorization" for k in h):
            h["Authorization"] = f"Bearer {token}"
            resp = self.http.request(method, self.url(path), data=data, headers=h, params=params, timeout=60)
            if resp.status_code != 401:
                return resp
            renewed = self.token(True) if self.token else None  # expired: one more try with a new token
            if not renewed or renewed == token:
                return resp
            h["Authorization"] = f"Bearer {renewed}"
        return self.http.request(method, self.url(path), data=data, headers=h, params=params, timeout=60)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def put(self, path: str, body: Any, **kw: Any) -> requests.Response:
        return self.request("PUT", path, body, **kw)

    def post(self, path: str, body: Any, **kw: Any) -> requests.Response:
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return self.request("DELETE", path, **kw)


def parse(resp: requests.Response) -> Any:
    """The JSON body with decimals kept exact."""
    return json.loads(resp.content, parse_float=Decimal)


def _decimal(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(type(value).__name__)
