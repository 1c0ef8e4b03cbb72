"""Engine responses and errors to HTTP responses; the one place an error becomes an OperationOutcome."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from flask import Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from fhir_server import fhirjson
from fhir_server.api.negotiation import FHIR_JSON
from fhir_server.engine.request import FhirResponse
from fhir_server.errors import FhirError, Issue, operation_outcome
from fhir_server.logs import request_id

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not-found", 405: "not-supported", 413: "too-long", 415: "not-supported", 406: "not-supported"}


def _pretty() -> bool:
    return request.args.get("_pretty", "").lower() == "true"


def _content_type(media_type: str) -> str:
    return f"{media_type}; charset=utf-8"


def render(resp: FhirResponse, media_type: str = FHIR_JSON) -> Response:
    headers = dict(resp.headers)
    if resp.body is None:
        return Response(status=resp.status, headers=headers)
    data = fhirjson.dumps(resp.body, pretty=_pretty())
    return Response(data, status=resp.status, headers=headers, content_type=_content_type(media_type))


def render_outcome(status: int, outcome: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    data = fhirjson.dumps(outcome, pretty=_pretty())
    return Response(data, status=status, headers=headers or {}, content_type=_content_type(FHIR_JSON))


def fhir_error(exc: FhirError) -> Response:
    return render_outcome(exc.status, exc.operation_outcome(), exc.headers)


def http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if isinstance(exc, RequestEntityTooLarge):
        message = "The request body is larger than this server accepts (FHIR_MAX_BODY_BYTES)"
    elif status == 404:
        message = "No such endpoint; FHIR endpoints live under /fhir/{tenant}"
    elif status == 405:
        message = f"{request.method} is not allowed on this URL"
    else:
        message = exc.description or exc.name
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    return render_outcome(status, operation_outcome([Issue(message, _HTTP_CODES.get(status, "processing"))]), headers)


def unexpected_error(exc: Exception) -> Response:
    rid = request_id.get()
    # The exception's message may quote data (a database error's DETAIL echoes row values): log its
    # type, SQLSTATE and where it was raised, never its text.
    orig = getattr(exc, "orig", None)
    log.error(
        "unhandled error",
        extra={
            "error_type": type(exc).__name__,
            "cause_type": type(orig).__name__ if orig is not None else None,
            "sqlstate": getattr(orig, "sqlstate", None),
            "where": " <- ".join(
                f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in reversed(traceback.extract_tb(exc.__traceback__)[-8:])
            ),
        },
    )
    message = f"Internal server error; quote request id {rid} when reporting it" if rid else "Internal server error"
    return render_outcome(500, operation_outcome([Issue(message, "exception", "fatal")]))
