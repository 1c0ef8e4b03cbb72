"""Batch and transaction Bundles (``POST [base]``).

A batch runs each entry as its own request through ``Engine.handle``: one failing entry does not
stop the others. A transaction runs every write in ONE database transaction, in the order the
specification gives (DELETE, POST, PUT/PATCH), after resolving every identity first: conditional
creates, updates, deletes and patches are searched, ``urn:uuid:``/``urn:oid:`` full URLs are given
server ids, conditional references (``Patient?identifier=...``) are resolved, and every reference to
an entry is rewritten (in references, any other value equal to a full URL, and narrative links).
Any failure rolls the whole transaction back and answers with that entry's error. Reads (GET, HEAD)
run after the commit, so they see the transaction's writes.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from fhir_server.capability.validation import validate_resource
from fhir_server.clock import instant, now_us, parse_http_date
from fhir_server.engine import conditional, custom_params
from fhir_server.engine.request import RETURN_MINIMAL, RETURN_OUTCOME, RETURN_REPRESENTATION, FhirRequest, FhirResponse
from fhir_server.engine.storage_errors import storage_errors
from fhir_server.engine.resources import check_id, parse_etag, remove, write_in, write_many_in
from fhir_server.errors import BadRequest, FhirError, Issue, NotFound, PayloadTooLarge, PreconditionFailed, operation_outcome
from fhir_server.fhirjson import RawJson
from fhir_server.storage.repository import AlreadyExists, ResourceRepository, VersionConflict, VersionRecord

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine

METHODS = ("DELETE", "POST", "PUT", "PATCH", "GET", "HEAD")
URN = re.compile(r"urn:(?:uuid|oid):[A-Za-z0-9.\-]+")
ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


@dataclass
class Entry:
    index: int
    method: str
    url: str
    full_url: str | None
    resource: Any
    path: tuple[str, ...]
    query: str
    if_match: str | None
    if_none_exist: str | None
    if_none_match: str | None
    if_modified_since: str | None
    target: str | None = None  # "Type/id" once resolved
    warnings: list[Issue] = field(default_factory=list)
    response: dict[str, Any] = field(default_factory=dict)

    @property
    def rtype(self) -> str:
        return self.path[0]

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"


def process(engine: Engine, req: FhirRequest) -> FhirResponse:
    bundle = req.body
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise BadRequest("POST to the base URL takes a Bundle of type batch or transaction", expression="resourceType")
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        raise BadRequest(f"Bundle.type must be batch or transaction, not {str(kind)[:30]!r}", expression="Bundle.type")
    raw_entries = bundle.get("entry") or []
    if not isinstance(raw_entries, list):
        raise BadRequest("Bundle.entry must be an array", expression="Bundle.entry")
    if len(raw_entries) > engine.settings.max_bundle_entries:
        raise PayloadTooLarge(
            f"The Bundle has {len(raw_entries)} entries; this server takes at most {engine.settings.max_bundle_entries} "
            "(FHIR_MAX_BUNDLE_ENTRIES)",
            expression="Bundle.entry",
        )
    if kind == "batch":
        return _batch(engine, req, raw_entries)
    entries = [_entry(engine, req, i, raw) for i, raw in enumerate(raw_entries)]
    return _transaction(engine, req, entries)


# --- parsing ----------------------------------------------------------------------------------------

def _entry(engine: Engine, req: FhirRequest, index: int, raw: Any) -> Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be an object", expression=where)
    request = raw.get("request")
    if not isinstance(request, dict):
        raise BadRequest(f"{where} has no request (method and url)", expression=f"{where}.request")
    method = request.get("method")
    url = request.get("url")
    if method not in METHODS:
        raise BadRequest(f"{where}.request.method must be one of {', '.join(METHODS)}", expression=f"{where}.request.method")
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}.request.url is required", expression=f"{where}.request.url")
    path, query = _target(engine, req, url)
    if path is None:
        raise BadRequest(f"{where}.request.url {url[:80]!r} names no resource type this server knows", expression=f"{where}.request.url")
    if path and method not in ("GET", "HEAD") and not path[0].startswith("$") and not engine.registry.is_resource_type(path[0]):
        raise BadRequest(f"{where}.request.url names an unknown resource type {path[0][:64]!r}", expression=f"{where}.request.url")
    full_url = raw.get("fullUrl") if isinstance(raw.get("fullUrl"), str) else None
    return Entry(
        index=index, method=method, url=url, full_url=full_url, resource=raw.get("resource"), path=path, query=query,
        if_match=request.get("ifMatch"), if_none_exist=request.get("ifNoneExist"),
        if_none_match=request.get("ifNoneMatch"), if_modified_since=request.get("ifModifiedSince"),
    )


def _target(engine: Engine, req: FhirRequest, url: str) -> tuple[tuple[str, ...] | None, str]:
    """The path segments and query of a request url: relative to this server's base, or absolute.

    An absolute url on another base (the R4 examples use ``http://hl7.org/fhir/us/sdc/Questionnaire/x``)
    is read from its last resource type on, as other servers do: the entry acts on this server.
    """
    relative = url
    if relative.startswith(req.base_url + "/"):
        relative = relative[len(req.base_url) + 1 :]
    path_part, _, query = relative.partition("?")
    if "://" in path_part:
        segments = [p for p in path_part.split("://", 1)[1].split("/")[1:] if p]
        starts = [i for i, p in enumerate(segments) if engine.registry.is_resource_type(p) and len(segments) - i <= 4]
        if not starts:
            return None, query
        return tuple(segments[starts[0]:]), query
    return tuple(p for p in path_part.split("/") if p), query


def _as_request(req: FhirRequest, e: Entry, body: Any = None) -> FhirRequest:
    content_type = None
    if e.method == "PATCH":
        body, content_type = conditional.binary_patch(e.resource)
    elif e.method in ("POST", "PUT"):
        body = e.resource
    return FhirRequest(
        method=e.method, tenant=req.tenant, path=e.path, base_url=req.base_url,
        params=tuple(parse_qsl(e.query, keep_blank_values=True)), body=body,
        if_match=e.if_match, if_none_match=e.if_none_match, if_modified_since=e.if_modified_since,
        if_none_exist=e.if_none_exist,
        # Writes answer with their status, location and ETag unless the client asks for more.
        prefer_return=req.prefer_return or (None if e.method in ("GET", "HEAD") else RETURN_MINIMAL),
        prefer_handling=req.prefer_handling, content_type=content_type,
    )


# --- batch ------------------------------------------------------------------------------------------

def _batch(engine: Engine, req: FhirRequest, raw_entries: list[Any]) -> FhirResponse:
    out = []
    for i, raw in enumerate(raw_entries):
        try:
            e = _entry(engine, req, i, raw)
            resp = engine.handle(_as_request(req, e))
            out.append(_from_response(req, resp))
        except FhirError as exc:
            out.append({"response": {"status": _status(exc.status), "outcome": exc.operation_outcome()}})
    return FhirResponse(200, _response_bundle("batch-response", out))


def _from_response(req: FhirRequest, resp: FhirResponse) -> dict[str, Any]:
    response: dict[str, Any] = {"status": _status(resp.status)}
    location = resp.headers.get("Location") or (resp.headers.get("Content-Location") if resp.status == 201 else None)
    if location:
        response["location"] = location[len(req.base_url) + 1 :] if location.startswith(req.base_url + "/") else location
    if "ETag" in resp.headers:
        response["etag"] = resp.headers["ETag"]
    if "Last-Modified" in resp.headers:
        modified = parse_http_date(resp.headers["Last-Modified"])
        if modified is not None:
            response["lastModified"] = instant(modified)
    entry: dict[str, Any] = {}
    body = resp.body
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        response["outcome"] = body
    elif body is not None:
        entry["resource"] = body
    entry["response"] = response
    return entry


# --- transaction --------------------------------------------------------------------------------------

def _transaction(engine: Engine, req: FhirRequest, entries: list[Entry]) -> FhirResponse:
    writes = sorted((e for e in entries if e.method not in ("GET", "HEAD")), key=lambda e: (ORDER[e.method], e.index))
    exclusive = any(e.path and e.path[0] == "SearchParameter" for e in writes)
    jobs: list[int] = []
    current: Entry | None = None
    try:
        for current in writes:  # before the unit of work: no lock is held while the entries are validated
            _check(engine, current)
        with storage_errors(req.tenant), engine.storage.session(req.tenant, write=True, exclusive=exclusive) as repo:
            mapping, seen = Identities(), dict[str, int]()
            for current in writes:
                _resolve_identity(engine, repo, current, mapping, seen)
            for current in writes:
                if isinstance(current.resource, dict) and current.method in ("POST", "PUT"):
                    current.resource = _rewrite(engine, repo, current.resource, mapping)
            # Plain creates and updates go to storage together; the rest one by one, in the order DELETE,
            # then (after the batch) SearchParameter writes, existing matches and PATCH.
            batched = [e for e in writes if e.method in ("POST", "PUT") and e.rtype != "SearchParameter"
                       and not e.response.get("existing")]
            in_batch = {e.index for e in batched}
            for current in (e for e in writes if e.method == "DELETE"):
                _collect(jobs, _execute(engine, repo, req, current))
            current = None
            try:
                _execute_many(engine, repo, req, batched)
            except (VersionConflict, AlreadyExists) as exc:  # naming the entry that failed
                current = batched[exc.item] if exc.item is not None else None
                raise
            for current in (e for e in writes if e.method != "DELETE" and e.index not in in_batch):
                _collect(jobs, _execute(engine, repo, req, current))
            current = None
    except FhirError as exc:
        if current is None:
            raise
        raise _entry_error(current, exc) from None
    if jobs and engine.jobs is not None:
        engine.jobs.kick()
    for e in entries:
        if e.method in ("GET", "HEAD"):
            try:
                e.response = _from_response(req, engine.handle(_as_request(req, e)))
            except FhirError as exc:
                e.response = {"response": {"status": _status(exc.status), "outcome": exc.operation_outcome()}}
    return FhirResponse(200, _response_bundle("transaction-response", [e.response for e in entries]))


def _check(engine: Engine, e: Entry) -> None:
    """What can be checked before anything is written: shapes, types, ids, the resources themselves."""
    where = e.where
    if not e.path:
        raise BadRequest(f"{where}: {e.method} needs a resource type in its url", expression=f"{where}.request.url")
    operation = next((p for p in e.path if p.startswith("$")), None)
    if operation is not None:
        # No operation this server offers changes data, and none can join a transaction's unit of work.
        raise NotFound(f"{where}: {'/'.join(e.path)[:120]!r} invokes an operation ({operation[:64]}) this server does not "
                       "support in a transaction", code="not-supported")
    rtype = e.rtype
    if e.method in ("POST", "PUT"):
        if not isinstance(e.resource, dict):
            raise BadRequest(f"{where}: {e.method} needs a resource", expression=f"{where}.resource")
        if e.resource.get("resourceType") != rtype:
            raise BadRequest(f"{where}: the resource is a {str(e.resource.get('resourceType'))[:40]}, the url a {rtype}",
                             expression=f"{where}.resource.resourceType")
    if e.method in ("POST", "PUT"):
        e.warnings = validate_resource(engine.registry, e.resource, where=f"{where}.resource",
                                       missing_required=engine.settings.validate_required)
    if e.method == "POST" and len(e.path) != 1:
        raise BadRequest(f"{where}: POST goes to [type]", expression=f"{where}.request.url")
    if e.method in ("PUT", "DELETE", "PATCH"):
        if len(e.path) == 2:
            check_id(e.path[1])
            if e.method == "PUT" and e.resource.get("id") != e.path[1]:
                raise BadRequest(f"{where}: the resource id does not match the url {e.url[:80]!r}", expression=f"{where}.resource.id")
        elif len(e.path) != 1 or not e.query:
            raise BadRequest(f"{where}: {e.method} goes to [type]/[id] or [type]?[criteria]", expression=f"{where}.request.url")
    if e.method == "PATCH" and e.resource is None:
        raise BadRequest(f"{where}: PATCH needs a Parameters (FHIRPath Patch) or Binary (JSON Patch) resource", expression=f"{where}.resource")


@dataclass
class Identities:
    """What references to the bundle's entries become.

    ``anywhere``: ``urn:uuid:``/``urn:oid:`` full URLs, which mean nothing outside the bundle, are
    replaced wherever a value equals one (references, attachment urls, extensions) and in narrative
    links. ``references``: absolute full URLs, and the ``Type/id`` they end in, are replaced only in
    ``reference`` elements; elsewhere (canonical URLs above all) they keep their meaning.
    """

    anywhere: dict[str, str] = field(default_factory=dict)
    references: dict[str, str] = field(default_factory=dict)


def _resolve_identity(engine: Engine, repo: ResourceRepository, e: Entry, mapping: Identities, seen: dict[str, int]) -> None:
    """The entry's target, and what references to its full URL become; ``seen``: the targets so far, by entry."""
    rtype = e.rtype
    if e.method == "POST":
        if e.if_none_exist:
            found = conditional.matches(engine, repo, rtype, conditional._criteria(e.if_none_exist, rtype))
            if len(found) > 1:
                raise PreconditionFailed(f"ifNoneExist matches {len(found)} or more {rtype} resources", expression="ifNoneExist")
            if found:
                e.target = f"{rtype}/{found[0]}"
                e.response = {"existing": True}
        if e.target is None:
            e.target = f"{rtype}/{uuid.uuid4()}"
    elif len(e.path) == 2:
        e.target = f"{rtype}/{e.path[1]}"
    elif e.method == "PUT":
        found = conditional.matches(engine, repo, rtype, e.query)
        if len(found) > 1:
            raise PreconditionFailed(f"The conditional update matches {len(found)} or more {rtype} resources", expression="request.url")
        body_id = e.resource.get("id")
        if found and body_id is not None and body_id != found[0]:
            raise BadRequest("The resource id is not the id of the resource the criteria match", expression="resource.id")
        e.target = f"{rtype}/{found[0] if found else (check_id(str(body_id)) if body_id else uuid.uuid4())}"
    elif e.method in ("DELETE", "PATCH"):
        found = conditional.matches(engine, repo, rtype, e.query)
        if len(found) > 1:
            raise PreconditionFailed(f"The conditional {e.method.lower()} matches {len(found)} or more {rtype} resources",
                                     expression="request.url")
        if not found and e.method == "PATCH":
            raise FhirError(f"No {rtype} matches the conditional patch's criteria", status=404, code="not-found")
        e.target = f"{rtype}/{found[0]}" if found else None
    if e.target is not None and not e.response.get("existing"):
        if e.target in seen:
            raise BadRequest(
                f"{e.target} is written by two entries (Bundle.entry[{seen[e.target]}] and this one); a transaction "
                "changes each resource once", code="business-rule")
        seen[e.target] = e.index
    if e.full_url and e.target:
        if e.full_url.startswith("urn:"):
            mapping.anywhere[e.full_url] = e.target
        elif "://" in e.full_url and "/_history/" not in e.full_url:
            mapping.references[e.full_url.rstrip("/")] = e.target
            # A relative "Type/id" means the entry whose full URL ends in it (Bundle references rules).
            tail = e.full_url.rstrip("/").rsplit("/", 2)[-2:]
            if len(tail) == 2 and tail[0] == rtype:
                mapping.references.setdefault(f"{tail[0]}/{tail[1]}", e.target)


def _rewrite(engine: Engine, repo: ResourceRepository, resource: dict[str, Any], mapping: Identities) -> dict[str, Any]:
    """References to other entries become "Type/id"; conditional references are searched (exactly one match)."""
    def walk(value: Any, key: str | None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if isinstance(value, str):
            if value in mapping.anywhere:
                return mapping.anywhere[value]
            if key == "reference":
                if value in mapping.references:
                    return mapping.references[value]
                if "?" in value and not value.startswith(("#", "http://", "https://", "urn:")):
                    return _conditional_reference(engine, repo, value)
            if key == "div" and mapping.anywhere and "urn:" in value:
                return URN.sub(lambda m: mapping.anywhere.get(m.group(0), m.group(0)), value)
            return value
        return value

    rewritten: dict[str, Any] = walk(resource, None)
    return rewritten


def _conditional_reference(engine: Engine, repo: ResourceRepository, reference: str) -> str:
    rtype, _, query = reference.partition("?")
    if not engine.registry.is_resource_type(rtype):
        raise BadRequest(f"The conditional reference {reference[:80]!r} names an unknown resource type", expression="reference")
    found = conditional.matches(engine, repo, rtype, query)
    if len(found) != 1:
        raise PreconditionFailed(
            f"The conditional reference {reference[:120]!r} matches {'no' if not found else 'more than one'} {rtype}; it must match one",
            expression="reference",
        )
    return f"{rtype}/{found[0]}"


def _execute(engine: Engine, repo: ResourceRepository, req: FhirRequest, e: Entry) -> int | None:
    rtype = e.rtype
    if_match = parse_etag(e.if_match, "ifMatch") if e.if_match else None
    if e.method == "DELETE":
        if e.target is None:
            e.response = {"response": {"status": _status(204)}}
            return None
        rec, job = remove(engine, repo, rtype, e.target.split("/", 1)[1], if_match=if_match)
        e.response = {"response": {"status": _status(204), **({"etag": f'W/"{rec.version}"'} if rec else {})}}
        return job
    assert e.target is not None
    rid = e.target.split("/", 1)[1]
    if e.method == "PATCH":
        document, content_type = conditional.binary_patch(e.resource)
        result, _, job = conditional.patch_in(engine, repo, rtype, rid, document, content_type, if_match)
        e.response = _written(req, result.record, 200)
        return job
    if e.method == "POST" and e.response.get("existing"):
        existing = repo.read(rtype, rid)
        assert existing is not None
        e.response = _written(req, existing, 200)
        return None
    body = dict(e.resource)
    if e.method == "PUT":
        body["id"] = rid
    definition = custom_params.check_definition(engine, body) if rtype == "SearchParameter" else None
    result, job = write_in(engine, repo, rtype, rid, body, method=e.method, if_match=if_match,
                           create_only=e.method == "POST", definition=definition)
    e.response = _written(req, result.record, 201 if result.created else 200, e.warnings)
    return job


def _execute_many(engine: Engine, repo: ResourceRepository, req: FhirRequest, batch: list[Entry]) -> None:
    """The plain creates and updates (no SearchParameter), written together."""
    if not batch:
        return
    writes = []
    for e in batch:
        assert e.target is not None
        rid = e.target.split("/", 1)[1]
        body = dict(e.resource)
        if e.method == "PUT":
            body["id"] = rid
        writes.append((e.rtype, rid, body, e.method, parse_etag(e.if_match, "ifMatch") if e.if_match else None))
    for e, result in zip(batch, write_many_in(engine, repo, writes)):
        e.response = _written(req, result.record, 201 if result.created else 200, e.warnings)


def _collect(jobs: list[int], job: int | None) -> None:
    if job is not None:
        jobs.append(job)


def _written(req: FhirRequest, rec: VersionRecord, status: int, warnings: list[Issue] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "status": _status(status),
        "location": f"{rec.res_type}/{rec.res_id}/_history/{rec.version}",
        "etag": f'W/"{rec.version}"',
        "lastModified": instant(rec.last_updated),
    }
    entry: dict[str, Any] = {}
    if req.prefer_return == RETURN_REPRESENTATION and rec.body is not None:
        entry["resource"] = RawJson(rec.body)
    if req.prefer_return == RETURN_OUTCOME or warnings:
        issues = [Issue(f"{status} {rec.res_type}/{rec.res_id}", "informational", "information"), *(warnings or [])]
        response["outcome"] = operation_outcome(issues)
    entry["response"] = response
    return entry


def _entry_error(e: Entry, exc: FhirError) -> FhirError:
    """The failing entry's error, saying which entry it was."""
    issues = [
        Issue(f"{e.where} ({e.method} {e.url[:120]}): {i.diagnostics}", i.code, i.severity,
              tuple(x if x.startswith("Bundle.") else f"{e.where}.{x}" for x in i.expression) or (e.where,))
        for i in exc.issues
    ]
    return FhirError(issues=issues, status=exc.status, code=exc.code, headers=exc.headers)


def _response_bundle(kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"lastUpdated": instant(now_us())}, "type": kind, "entry": entries}


def _status(code: int) -> str:
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)

