"""The engine's request and response: plain data, no HTTP.

``api/`` builds a ``FhirRequest`` from an HTTP request; a Bundle entry becomes the
same ``FhirRequest``; the engine answers both with a ``FhirResponse``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fhir_server.fhirjson import RawJson
from fhir_server.security.access import AccessContext

# Prefer: return=...
RETURN_MINIMAL = "minimal"
RETURN_REPRESENTATION = "representation"
RETURN_OUTCOME = "OperationOutcome"


@dataclass(frozen=True, slots=True)
class FhirRequest:
    method: str  # GET, HEAD, POST, PUT, PATCH, DELETE
    tenant: str
    path: tuple[str, ...]  # the segments after /fhir/{tenant}
    base_url: str  # this tenant's base URL, e.g. http://127.0.0.1:8080/fhir/default
    access: AccessContext  # who is calling, with what grant (no default: every caller says)
    params: tuple[tuple[str, str], ...] = ()
    body: Any = None  # parsed JSON
    if_match: str | None = None
    if_none_match: str | None = None
    if_modified_since: str | None = None
    if_none_exist: str | None = None
    prefer_return: str | None = None
    prefer_handling: str | None = None
    content_type: str | None = None  # of the body: application/fhir+json, or application/json-patch+json

    def param(self, name: str) -> str | None:
        for k, v in self.params:
            if k == name:
                return v
        return None

    def param_values(self, name: str) -> list[str]:
        return [v for k, v in self.params if k == name]


@dataclass(slots=True)
class FhirResponse:
    status: int
    body: dict[str, Any] | RawJson | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def etag(self) -> str | None:
        return self.headers.get("ETag")
