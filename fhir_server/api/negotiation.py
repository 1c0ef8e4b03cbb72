"""Content negotiation: which format the client wants, and whether the body it sent is one we read.

JSON only, for now: ``application/fhir+json`` and ``application/json`` (and the
``_format`` values json, application/json, application/fhir+json). A request
for XML gets 406, an XML body 415, each with an OperationOutcome.
"""

from __future__ import annotations

from fhir_server.errors import NotAcceptable, UnsupportedMediaType

FHIR_JSON = "application/fhir+json"
JSON = "application/json"
JSON_PATCH = "application/json-patch+json"

_FORMAT_ALIASES = {
    "json": FHIR_JSON,
    "application/json": JSON,
    "application/fhir+json": FHIR_JSON,
    "application/json+fhir": FHIR_JSON,
    "text/json": JSON,
}
_XML = {"xml", "text/xml", "application/xml", "application/fhir+xml", "application/xml+fhir"}
_JSON_BODY_TYPES = {FHIR_JSON, JSON, "application/json+fhir", "text/json"}
_SUPPORTED_FHIR_VERSIONS = {"4.0", "4.0.1"}


def response_type(format_param: str | None, accept_header: str | None) -> str:
    """The media type of the response, or NotAcceptable."""
    if format_param is not None:
        fmt = format_param.strip().split(";", 1)[0].strip().lower()
        if fmt in _FORMAT_ALIASES:
            return _FORMAT_ALIASES[fmt]
        if fmt in _XML:
            raise NotAcceptable("XML is not supported by this server; use _format=json", expression="_format")
        raise NotAcceptable(f"Unsupported _format {format_param[:60]!r}; use json", expression="_format")
    if not accept_header or not accept_header.strip():
        return FHIR_JSON
    _check_fhir_version(accept_header)
    best = _best_json_match(accept_header)
    if best is None:
        if any(x in accept_header.lower() for x in ("xml",)):
            raise NotAcceptable("XML is not supported by this server; ask for application/fhir+json", expression="Accept")
        raise NotAcceptable(
            f"Cannot produce {accept_header[:80]!r}; this server answers application/fhir+json", expression="Accept"
        )
    return JSON if best == JSON else FHIR_JSON


def _best_json_match(header: str) -> str | None:
    """The JSON type the Accept header prefers, or None if it accepts neither (q=0 excludes)."""
    best: tuple[tuple[float, int, int], str] | None = None
    for position, item in enumerate(header.split(",")):
        mime, *params = (p.strip() for p in item.split(";"))
        mime = mime.lower()
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        if mime in (FHIR_JSON, "application/json+fhir"):
            candidate = FHIR_JSON
        elif mime in (JSON, "text/json"):
            candidate = JSON
        elif mime in ("*/*", "application/*"):
            candidate = FHIR_JSON
        else:
            continue
        # Prefer higher q, then an exact type over a wildcard, then the earlier entry.
        rank = (q, 0 if "*" in mime else 1, -position)
        if best is None or rank > best[0]:
            best = (rank, candidate)
    return best[1] if best else None


def check_body_type(content_type: str | None, *, allow_patch: bool = False) -> str:
    """The media type of a request body, if it is one we read; UnsupportedMediaType otherwise."""
    if not content_type:
        raise UnsupportedMediaType(
            "The request has a body but no Content-Type; send application/fhir+json", expression="Content-Type"
        )
    mime, _, params = content_type.partition(";")
    mime = mime.strip().lower()
    if mime in _JSON_BODY_TYPES:
        _check_fhir_version(params)
        return FHIR_JSON
    if allow_patch and mime == JSON_PATCH:
        return JSON_PATCH
    if "xml" in mime:
        raise UnsupportedMediaType("XML bodies are not supported by this server; send application/fhir+json", expression="Content-Type")
    raise UnsupportedMediaType(
        f"Unsupported Content-Type {mime[:60]!r}; send application/fhir+json", expression="Content-Type"
    )


def _check_fhir_version(text: str) -> None:
    lowered = text.lower()
    at = lowered.find("fhirversion=")
    if at < 0:
        return
    value = lowered[at + len("fhirversion=") :].split(";", 1)[0].split(",", 1)[0].strip().strip('"')
    if value not in _SUPPORTED_FHIR_VERSIONS:
        raise NotAcceptable(f"This server speaks FHIR 4.0 (R4), not fhirVersion={value[:20]}", code="not-supported")
