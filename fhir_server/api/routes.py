"""HTTP to engine and back: every FHIR URL under /fhir/{tenant} goes through one view."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Blueprint, Response, current_app, request

from fhir_server import fhirjson
from fhir_server.api import negotiation
from fhir_server.api.rendering import render
from fhir_server.engine.request import FhirRequest
from fhir_server.engine.storage_errors import storage_errors
from fhir_server.errors import BadRequest, NotFound, UnsupportedMediaType
from fhir_server.security.access import ANONYMOUS, AccessContext
from fhir_server.security.oauth.bearer import access_for_token, access_in, bearer_token

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine
    from fhir_server.settings import Settings
    from fhir_server.storage.store import Storage

bp = Blueprint("fhir", __name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
_RETURN_VALUES = {"minimal", "representation", "OperationOutcome"}


@bp.route("/fhir/<tenant>", defaults={"rest": ""}, methods=METHODS, strict_slashes=False)
@bp.route("/fhir/<tenant>/<path:rest>", methods=METHODS)
def fhir(tenant: str, rest: str) -> Response:
    engine: Engine = current_app.extensions["fhir_engine"]
    settings: Settings = current_app.extensions["fhir_settings"]
    segments = tuple(rest.split("/")) if rest else ()
    if segments and segments[-1] == "":
        segments = segments[:-1]
    with engine.audit.http(request.method, tenant, segments, tuple(request.args.items(multi=True)), _base_url(settings, tenant)):
        return _fhir(engine, settings, tenant, segments)


def _fhir(engine: Engine, settings: Settings, tenant: str, segments: tuple[str, ...]) -> Response:
    if any(s == "" for s in segments):
        raise NotFound("Empty path segment in the URL")
    media_type = negotiation.response_type(request.args.get("_format"), request.headers.get("Accept"))
    params = [(k, v) for k, v in request.args.items(multi=True)]
    prefer_return, prefer_handling = _prefer(request.headers.get("Prefer"))
    base_url = _base_url(settings, tenant)
    request.environ["fhir.route"] = _route_label(engine, segments)

    def handle(access: AccessContext, body: object = None, content_type: str | None = None) -> Response:
        req = FhirRequest(
            method=request.method,
            tenant=tenant,
            path=segments,
            base_url=base_url,
            access=access,
            params=tuple(params),
            body=body,
            if_match=request.headers.get("If-Match"),
            if_none_match=request.headers.get("If-None-Match"),
            if_modified_since=request.headers.get("If-Modified-Since"),
            if_none_exist=request.headers.get("If-None-Exist"),
            prefer_return=prefer_return,
            prefer_handling=prefer_handling,
            content_type=content_type,
        )
        return render(engine.handle(req), media_type)

    if segments == ("metadata",) and request.method in ("GET", "HEAD"):
        return handle(ANONYMOUS)  # the CapabilityStatement is open: it says how to get a token
    token = bearer_token(base_url, request.headers.get("Authorization"))
    storage: Storage = current_app.extensions["fhir_storage"]
    if request.method in ("GET", "HEAD"):
        # A read: the token check and the interaction share one read session (one connection, one tenant lookup).
        with storage_errors(tenant), storage.shared_reads(tenant) as repo:
            return handle(access_in(repo, base_url, token))
    with storage_errors(tenant):
        access = access_for_token(storage, tenant, base_url, token)
    engine.audit.identify(access)  # who sent it, also when its body is refused below
    if request.method == "POST" and segments and segments[-1] == "_search":
        params.extend(_read_form())
        return handle(access)
    if request.method in ("POST", "PUT", "PATCH"):
        return handle(access, *_read_body(settings))
    return handle(access)


def _read_body(settings: Settings) -> tuple[object, str]:
    """The parsed body and its media type (read once the caller is known: a refusal is recorded as theirs)."""
    data = request.get_data(cache=False)
    if not data:
        if request.method == "PATCH":
            raise BadRequest("The request body is empty; a patch document was expected", code="required")
        raise BadRequest("The request body is empty; a FHIR resource was expected", code="required")
    media = negotiation.check_body_type(request.headers.get("Content-Type"), allow_patch=request.method == "PATCH")
    return fhirjson.parse(data, max_depth=settings.max_json_depth), media


def _read_form() -> list[tuple[str, str]]:
    """POST [type]/_search: the parameters come form-encoded in the body (and may also be in the URL)."""
    content_type = (request.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    if request.content_length and content_type != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType(
            "POST _search takes its parameters as application/x-www-form-urlencoded", expression="Content-Type"
        )
    return [(k, v) for k, v in request.form.items(multi=True)]


def _prefer(header: str | None) -> tuple[str | None, str | None]:
    ret = handling = None
    if header:
        for part in header.split(","):
            for token in part.split(";"):
                name, _, value = token.strip().partition("=")
                value = value.strip().strip('"')
                if name.strip() == "return" and value in _RETURN_VALUES:
                    ret = value
                elif name.strip() == "handling" and value in ("strict", "lenient"):
                    handling = value
    return ret, handling


def _base_url(settings: Settings, tenant: str) -> str:
    root = settings.base_url.rstrip("/") if settings.base_url else request.host_url.rstrip("/") + request.script_root
    return f"{root}/fhir/{tenant}"


def _route_label(engine: Engine, segments: tuple[str, ...]) -> str:
    """The URL's shape for logs: resource types and keywords kept; ids, versions and anything else masked."""
    labels = []
    for i, seg in enumerate(segments):
        if (i == 0 and (engine.registry.is_resource_type(seg) or seg == "metadata")) or (
            seg.startswith(("_", "$")) and seg[1:].replace("-", "").isalnum() and len(seg) <= 40
        ):
            labels.append(seg)
        else:
            labels.append("{vid}" if i == 3 else "{id}" if i == 1 else "{?}")
    return "/" + "/".join(labels)
