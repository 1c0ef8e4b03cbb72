"""A minimal FHIR JSON client over HTTP, for the conformance tests."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import requests

FHIR_JSON = "application/fhir+json"


class FhirClient:
    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/")
        self.http = requests.Session()
        self.http.headers.update({"Accept": FHIR_JSON})

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
