"""Batch and transaction Bundles (``POST [base]``).

A batch runs each entry as its own request through ``Engine.handle``: one failing entry does not
stop the others. A transaction checks and validates every entry first, then in ONE database
transaction: takes the locks of every conditional criterion (in one global order), resolves every
entry's identity in the order the specification gives (DELETE, POST, PUT/PATCH) -- conditional
creates, updates, deletes and patches are searched, full URLs are given their targets --, locks the
rows it will change (in key order), rewrites the references to entries and resolves conditional
references, and writes. Any failure rolls everything back and answers with that entry's error,
naming it (``Bundle.entry[n]``). Reads (GET, HEAD) run after the commit, so they see its writes.

References are rewritten as http.html says, with one restriction: ``urn:uuid:``/``urn:oid:`` full
URLs (bundle-local names, meaningless elsewhere) are replaced in ``Reference.reference``, in elements
of type uri, url, oid and uuid, and in narrative ``href``/``src`` attributes; absolute full URLs (and
the ``Type/id`` they end in) only in ``Reference.reference``, because an absolute full URL is often
also a canonical URL (the R4 examples PUT ValueSets under their canonical URLs) that must keep its
meaning. A ``urn:`` reference that names no entry fails the transaction.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from fhir_server.capability.registry import Element, Node
from fhir_server.capability.validation import validate_resource
from fhir_server.clock import instant, now_us, parse_http_date
from fhir_server.engine import auditing, authorization, conditional, custom_params
from fhir_server.engine.request import RETURN_MINIMAL, RETURN_OUTCOME, RETURN_REPRESENTATION, FhirRequest, FhirResponse
from fhir_server.engine.resources import check_id, content, parse_etag, remove, stamp, write_in
from fhir_server.engine.storage_errors import storage_errors
from fhir_server.errors import BadRequest, FhirError, Issue, NotFound, PayloadTooLarge, PreconditionFailed, operation_outcome
from fhir_server.fhirjson import RawJson
from fhir_server.security.access import AccessContext
from fhir_server.storage.repository import (
    AlreadyExists,
    CurrentState,
    ResourceRepository,
    VersionConflict,
    VersionRecord,
    WriteItem,
)

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine

log = logging.getLogger(__name__)

METHODS = ("DELETE", "POST", "PUT", "PATCH", "GET", "HEAD")
ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
REQUEST_STRINGS = ("ifMatch", "ifNoneExist", "ifNoneMatch", "ifModifiedSince")
URI_TYPES = frozenset({"uri", "url", "oid", "uuid"})  # canonical is not among them: it keeps its meaning
LOCAL = ("urn:uuid:", "urn:oid:")
NARRATIVE_LINK = re.compile(r"""(\b(?:href|src)\s*=\s*)(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)


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
    version: int | None = None  # ifMatch, parsed
    # the conditional criteria it searches: (type, query, permission: c, u, d, or s for a conditional reference)
    criteria: list[tuple[str, str, str]] = field(default_factory=list)
    patch: tuple[Any, str] | None = None  # a PATCH entry's document and its media type
    target: str | None = None  # "Type/id" once resolved
    deletes: list[str] = field(default_factory=list)  # a (conditional) DELETE's targets
    existing: bool = False  # a conditional create that matched: nothing is written
    warnings: list[Issue] = field(default_factory=list)
    response: dict[str, Any] = field(default_factory=dict)

    @property
    def rtype(self) -> str:
        return self.path[0]

    @property
    def target_id(self) -> str:
        assert self.target is not None
        return self.target.split("/", 1)[1]

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
    for name in REQUEST_STRINGS:
        if request.get(name) is not None and not isinstance(request[name], str):
            raise BadRequest(f"{where}.request.{name} must be a string", expression=f"{where}.request.{name}")
    full_url = raw.get("fullUrl")
    if full_url is not None and not isinstance(full_url, str):
        raise BadRequest(f"{where}.fullUrl must be a string", expression=f"{where}.fullUrl")
    path, query = _target(engine, req, url)
    if path is None:
        raise BadRequest(f"{where}.request.url {url[:80]!r} names no resource type this server knows", expression=f"{where}.request.url")
    if not path and method != "GET":
        raise BadRequest(f"{where}: a Bundle entry cannot {method} to the base URL (no nested batches or transactions)",
                         expression=f"{where}.request.url")
    if path and method not in ("GET", "HEAD") and not path[0].startswith("$") and not engine.registry.is_resource_type(path[0]):
        raise BadRequest(f"{where}.request.url names an unknown resource type {path[0][:64]!r}", expression=f"{where}.request.url")
    return Entry(
        index=index, method=method, url=url, full_url=full_url, resource=raw.get("resource"), path=path, query=query,
        # ifMatch belongs to PUT, PATCH and DELETE; on a POST it means nothing (as other servers treat it)
        if_match=request.get("ifMatch") if method != "POST" else None, if_none_exist=request.get("ifNoneExist"),
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


def _as_request(engine: Engine, req: FhirRequest, e: Entry) -> FhirRequest:
    content_type, body = None, None
    if e.method == "PATCH":
        body, content_type = conditional.binary_patch(e.resource, engine.settings.max_json_depth)
    elif e.method in ("POST", "PUT"):
        body = e.resource
    return FhirRequest(
        method=e.method, tenant=req.tenant, path=e.path, base_url=req.base_url, access=req.access,
        params=tuple(parse_qsl(e.query, keep_blank_values=True)), body=body,
        if_match=e.if_match, if_none_match=e.if_none_match, if_modified_since=e.if_modified_since,
        if_none_exist=e.if_none_exist,
        # Writes answer with their status, location and ETag unless the client asks for more.
        prefer_return=req.prefer_return or (None if e.method in ("GET", "HEAD") else RETURN_MINIMAL),
        prefer_handling=req.prefer_handling, content_type=content_type,
    )


def _run(engine: Engine, req: FhirRequest, e: Entry) -> dict[str, Any]:
    """One entry as a request of its own: its response entry, whatever happens."""
    try:
        return _from_response(req, engine.handle(_as_request(engine, req, e)), head=e.method == "HEAD")
    except FhirError as exc:
        return _error_entry(exc)
    except Exception as exc:  # noqa: BLE001 - one entry's bug must not take the other entries' answers with it
        log.exception("bundle entry failed", extra={"error_type": type(exc).__name__})
        return _error_entry(FhirError("The server failed to process this entry; the incident has been logged",
                                      status=500, code="exception"))


def _error_entry(exc: FhirError) -> dict[str, Any]:
    return {"response": {"status": _status(exc.status), "outcome": exc.operation_outcome()}}


# --- batch ------------------------------------------------------------------------------------------

def _batch(engine: Engine, req: FhirRequest, raw_entries: list[Any]) -> FhirResponse:
    out = []
    for i, raw in enumerate(raw_entries):
        try:
            e = _entry(engine, req, i, raw)
        except FhirError as exc:
            out.append(_error_entry(exc))
            continue
        out.append(_run(engine, req, e))
    return FhirResponse(200, _response_bundle("batch-response", out))


def _from_response(req: FhirRequest, resp: FhirResponse, *, head: bool = False) -> dict[str, Any]:
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
    elif body is not None and not head:
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
        names: dict[str, int] = {}
        for current in writes:  # before the unit of work: no lock is held while the entries are validated
            _check(engine, current, names)
        current = None
        with storage_errors(req.tenant), engine.storage.session(req.tenant, write=True, exclusive=exclusive) as repo:
            conditional.lock_all_criteria(repo, [(rtype, query) for e in writes for rtype, query, _ in e.criteria])
            # every search up front but conditional deletes' (whose limits are their own)
            searches = [c for e in writes for c in e.criteria if c[2] != "d"]
            mapping = Identities(found=conditional.matches_many(engine, repo, searches, req.access))
            for current in writes:
                _resolve_identity(engine, repo, current, mapping, req.access)
            current = None
            _check_overlaps(writes)
            states = repo.lock_rows(sorted({(t.split("/", 1)[0], t.split("/", 1)[1]) for e in writes for t in _changes(e)}))
            rewriter = _Rewriter(engine, repo, mapping, req.access)
            for current in writes:
                _rewrite_entry(rewriter, current)
            # Plain creates and updates go to storage together; then, one by one, DELETE, and after the
            # batch SearchParameter writes, conditional creates that matched, and PATCH.
            batched = [e for e in writes if e.method in ("POST", "PUT") and e.rtype != "SearchParameter" and not e.existing]
            in_batch = {e.index for e in batched}
            for current in (e for e in writes if e.method == "DELETE"):
                jobs.extend(_delete(engine, repo, current, req.access))
            items, permissions = [], []
            for current in batched:
                permissions.append(_batch_permission(engine, repo, current, states, req.access))
                items.append(_write_item(engine, repo, current))
            current = None
            try:
                records = repo.write_many(items, locked=states) if items else []  # locked above
            except (VersionConflict, AlreadyExists) as exc:  # naming the entry that failed
                current = batched[exc.item] if exc.item is not None else None
                raise
            for current, permission in zip(batched, permissions):  # what was written is within the grant
                authorization.check_writable(engine, repo, req.access, permission, current.rtype, current.target_id)
            current = None
            for e, result in zip(batched, records):
                e.response = _written(req, result.record, 201 if result.created else 200, e.warnings)
                auditing.note_record(engine, result.record, e.resource)
            for current in (e for e in writes if e.method != "DELETE" and e.index not in in_batch):
                job = _execute(engine, repo, req, current)
                if job is not None:
                    jobs.append(job)
            current = None
    except FhirError as exc:
        if current is None:
            raise
        raise _entry_error(current, exc) from None
    if jobs and engine.jobs is not None:
        engine.jobs.kick()
    for e in entries:
        if e.method in ("GET", "HEAD"):
            e.response = _run(engine, req, e)
    return FhirResponse(200, _response_bundle("transaction-response", [e.response for e in entries]))


def _check(engine: Engine, e: Entry, names: dict[str, int]) -> None:
    """What can be checked before anything is written: shapes, types, ids, versions, the resources themselves."""
    where = e.where
    if not e.path:
        raise BadRequest(f"{where}: {e.method} needs a resource type in its url", expression=f"{where}.request.url")
    operation = next((p for p in e.path if p.startswith("$")), None)
    if operation is not None:
        # No operation this server offers changes data, and none can join a transaction's unit of work.
        raise NotFound(f"{where}: {'/'.join(e.path)[:120]!r} invokes an operation ({operation[:64]}) this server does not "
                       "support in a transaction", code="not-supported")
    rtype = e.rtype
    if rtype == auditing.AUDIT_EVENT:
        auditing.refuse_audit_write(e.method)
    if e.method in ("POST", "PUT"):
        if not isinstance(e.resource, dict):
            raise BadRequest(f"{where}: {e.method} needs a resource", expression=f"{where}.resource")
        if e.resource.get("resourceType") != rtype:
            raise BadRequest(f"{where}: the resource is a {str(e.resource.get('resourceType'))[:40]}, the url a {rtype}",
                             expression=f"{where}.resource.resourceType")
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
    if e.if_match is not None:
        e.version = parse_etag(e.if_match, f"{where}.request.ifMatch")
    if e.method == "PATCH":
        if e.resource is None:
            raise BadRequest(f"{where}: PATCH needs a Parameters (FHIRPath Patch) or Binary (JSON Patch) resource",
                             expression=f"{where}.resource")
        e.patch = conditional.binary_patch(e.resource, engine.settings.max_json_depth)
    e.criteria = _criteria_of(e)
    if e.full_url is not None and e.resource is not None:
        key = _name_key(e.full_url)
        if key in names:  # bdl-7
            raise BadRequest(f"{where}: fullUrl {e.full_url[:100]!r} is also Bundle.entry[{names[key]}]'s; each entry "
                             "needs its own", expression=f"{where}.fullUrl")
        names[key] = e.index


def _name_key(url: str) -> str:
    """Full URLs compared as the URIs they are: a UUID's hexadecimal digits in either case."""
    return url.lower() if url[:9].lower() == "urn:uuid:" else url


@dataclass
class Identities:
    """What references to the bundle's entries become.

    ``local``: ``urn:uuid:``/``urn:oid:`` full URLs (keys as ``_name_key`` gives them); ``absolute``:
    absolute full URLs and the ``Type/id`` they end in (references only); ``matched``: conditional
    criteria (type, normalised query) already resolved in this transaction, so an entry's conditional
    create and a conditional reference to what it creates agree.
    """

    local: dict[str, str] = field(default_factory=dict)
    absolute: dict[str, str] = field(default_factory=dict)
    matched: dict[tuple[str, str], str] = field(default_factory=dict)
    # What the conditional criteria of the entries match, searched together up front (``conditional.matches_many``),
    # by (type, normalised query, permission).
    found: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)

    def matches(self, engine: Engine, repo: ResourceRepository, rtype: str, query: str, access: AccessContext,
                permission: str) -> list[str]:
        known = self.found.get((rtype, conditional.normal_criteria(query), permission))
        return known if known is not None else conditional.matches(engine, repo, rtype, query, access, permission)


def _criteria_of(e: Entry) -> list[tuple[str, str, str]]:
    """The conditional criteria an entry searches (its own, and its resource's conditional references), each with
    the permission it searches for."""
    out = []
    if e.method == "POST" and e.if_none_exist:
        out.append((e.rtype, conditional._criteria(e.if_none_exist, e.rtype), "c"))
    elif e.method in ("PUT", "DELETE", "PATCH") and len(e.path) == 1:
        out.append((e.rtype, e.query, "d" if e.method == "DELETE" else "u"))
    source = e.patch[0] if e.patch is not None else e.resource if e.method in ("POST", "PUT") else None
    if source is not None:
        for ref in _conditional_references(source):
            rtype, _, query = ref.partition("?")
            out.append((rtype, query, "s"))
    return out


def _conditional_references(value: Any) -> list[str]:
    found: list[str] = []

    def walk(v: Any, key: str | None) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, k)
        elif isinstance(v, list):
            for x in v:
                walk(x, key)
        elif key == "reference" and isinstance(v, str) and _is_conditional(v):
            found.append(v)

    walk(value, None)
    return found


def _is_conditional(reference: str) -> bool:
    return "?" in reference and not reference.startswith(("#", "http://", "https://", "urn:"))


def _resolve_identity(engine: Engine, repo: ResourceRepository, e: Entry, mapping: Identities, access: AccessContext) -> None:
    """The entry's target (or, for DELETE, targets), and what references to its full URL become."""
    rtype = e.rtype
    if e.method == "POST":
        if e.if_none_exist:
            criteria = (rtype, conditional.normal_criteria(conditional._criteria(e.if_none_exist, rtype)))
            if criteria in mapping.matched:  # the same conditional create earlier in this Bundle
                e.target, e.existing = mapping.matched[criteria], True
            else:
                found = mapping.matches(engine, repo, rtype, criteria[1], access, "c")
                if len(found) > 1:
                    raise PreconditionFailed(f"ifNoneExist matches {len(found)} or more {rtype} resources", expression="request.ifNoneExist")
                if found:
                    e.target, e.existing = f"{rtype}/{found[0]}", True
                else:
                    e.target = f"{rtype}/{uuid.uuid4()}"
                mapping.matched[criteria] = e.target
        else:
            e.target = f"{rtype}/{uuid.uuid4()}"
    elif len(e.path) == 2:
        e.target = f"{rtype}/{e.path[1]}"
        if e.method == "DELETE":
            e.deletes = [e.path[1]]
    elif e.method == "PUT":
        found = mapping.matches(engine, repo, rtype, e.query, access, "u")
        if len(found) > 1:
            raise PreconditionFailed(f"The conditional update matches {len(found)} or more {rtype} resources", expression="request.url")
        body_id = e.resource.get("id")
        if found and body_id is not None and body_id != found[0]:
            raise BadRequest("The resource id is not the id of the resource the criteria match", expression="resource.id")
        e.target = f"{rtype}/{found[0] if found else (check_id(str(body_id)) if body_id else uuid.uuid4())}"
        mapping.matched.setdefault((rtype, conditional.normal_criteria(e.query)), e.target)
    elif e.method == "DELETE":
        e.deletes = conditional.delete_targets(engine, repo, rtype, e.query, access)
    else:  # conditional PATCH
        found = mapping.matches(engine, repo, rtype, e.query, access, "u")
        if len(found) > 1:
            raise PreconditionFailed(f"The conditional patch matches {len(found)} or more {rtype} resources", expression="request.url")
        if not found:
            raise FhirError(f"No {rtype} matches the conditional patch's criteria", status=404, code="not-found")
        e.target = f"{rtype}/{found[0]}"
    if e.full_url and e.target:
        if e.full_url.startswith(LOCAL) or _name_key(e.full_url).startswith(LOCAL):
            mapping.local[_name_key(e.full_url)] = e.target
        elif "://" in e.full_url and "/_history/" not in e.full_url:
            mapping.absolute[e.full_url.rstrip("/")] = e.target
            # A relative "Type/id" means the entry whose full URL ends in it (as other servers read it).
            tail = e.full_url.rstrip("/").rsplit("/", 2)[-2:]
            if len(tail) == 2 and tail[0] == rtype:
                mapping.absolute.setdefault(f"{tail[0]}/{tail[1]}", e.target)


def _changes(e: Entry) -> list[str]:
    """The resources ("Type/id") an entry changes."""
    if e.method == "DELETE":
        return [f"{e.rtype}/{rid}" for rid in e.deletes]
    if e.existing or e.target is None:
        return []
    return [e.target]


def _check_overlaps(writes: list[Entry]) -> None:
    """Each resource is changed by one entry, and nothing else in the Bundle names one it deletes (http.html)."""
    changed: dict[str, Entry] = {}
    for e in writes:
        for target in _changes(e):
            if target in changed:
                first = changed[target]
                raise FhirError(
                    f"{e.where}: {target} is also changed by {first.where}; a transaction changes each resource once",
                    status=400, code="business-rule", expression=e.where)
            changed[target] = e
    for e in writes:
        # A conditional create that matched names a resource; another entry may not change it, unless it is
        # the same conditional create earlier in the Bundle (which created it).
        if e.existing and e.target in changed and changed[e.target].method != "POST":
            raise FhirError(
                f"{e.where}: its ifNoneExist matches {e.target}, which {changed[e.target].where} changes",
                status=400, code="business-rule", expression=e.where)


class _Rewriter:
    """Rewrites the references of one resource, walking it with the R4 definitions (see the module doc)."""

    def __init__(self, engine: Engine, repo: ResourceRepository, mapping: Identities, access: AccessContext) -> None:
        self.engine = engine
        self.access = access
        self.registry = engine.registry
        self.repo = repo
        self.mapping = mapping
        self.reference_node = self.registry.types["Reference"].root
        self.element_node = self.registry.types["Element"].root

    def resource(self, value: Any, path: str) -> Any:
        rtype = value.get("resourceType") if isinstance(value, dict) else None
        if not isinstance(rtype, str) or not self.registry.is_resource_type(rtype):
            return value
        return self.obj(value, self.registry.types[rtype].root, path)

    def obj(self, value: dict[str, Any], node: Node, path: str) -> dict[str, Any]:
        out = {}
        for key, v in value.items():
            element = node.keys.get(key)
            if element is None:
                out[key] = v
            elif key.startswith("_") and element.primitive is not None:  # a primitive's id and extensions
                out[key] = self.each(v, path + "." + key, lambda x, p: self.obj(x, self.element_node, p) if isinstance(x, dict) else x)
            else:
                out[key] = self.each(v, path + "." + key, lambda x, p, el=element: self.value(x, el, p))  # type: ignore[misc]
        return out

    @staticmethod
    def each(v: Any, path: str, fn: Callable[[Any, str], Any]) -> Any:
        if isinstance(v, list):
            return [fn(x, f"{path}[{i}]") for i, x in enumerate(v)]
        return fn(v, path)

    def value(self, v: Any, element: Element, path: str) -> Any:
        if element.is_resource:
            return self.resource(v, path)
        if element.primitive is not None:
            if element.type_code in URI_TYPES and isinstance(v, str):
                return self.mapping.local.get(_name_key(v), v)
            return v
        if not isinstance(v, dict):
            return v
        if element.type_code == "Reference":
            out = self.obj(v, self.reference_node, path)
            if isinstance(out.get("reference"), str):
                out["reference"] = self.reference(out["reference"], path + ".reference")
            return out
        if element.type_code == "Narrative" and isinstance(v.get("div"), str) and self.mapping.local:
            return {**v, "div": NARRATIVE_LINK.sub(self._link, v["div"])}
        if element.target is not None:
            return self.obj(v, self.registry.node(*element.target), path)
        return v

    def _link(self, m: re.Match[str]) -> str:
        target = self.mapping.local.get(_name_key(m.group(3)))
        return m.group(0) if target is None else f"{m.group(1)}{m.group(2)}{target}{m.group(2)}"

    def reference(self, ref: str, path: str) -> str:
        key = _name_key(ref)
        if key in self.mapping.local:
            return self.mapping.local[key]
        if ref in self.mapping.absolute:
            return self.mapping.absolute[ref]
        if key.startswith(LOCAL):
            raise BadRequest(f"The reference {ref[:100]!r} names no entry of this Bundle", expression=path)
        if _is_conditional(ref):
            return self.conditional(ref, path)
        return ref

    def conditional(self, reference: str, path: str) -> str:
        rtype, _, query = reference.partition("?")
        if not self.registry.is_resource_type(rtype):
            raise BadRequest(f"The conditional reference {reference[:80]!r} names an unknown resource type", expression=path)
        known = self.mapping.matched.get((rtype, conditional.normal_criteria(query)))
        if known is not None:
            return known
        found = self.mapping.matches(self.engine, self.repo, rtype, query, self.access, "s")
        if len(found) != 1:
            raise PreconditionFailed(
                f"The conditional reference {reference[:120]!r} matches {'no' if not found else 'more than one'} {rtype}; "
                "it must match one", expression=path,
            )
        return f"{rtype}/{found[0]}"

    def untyped(self, value: Any, path: str) -> Any:
        """A JSON Patch document's values: no definitions to walk by, so "reference" keys and local names."""
        if isinstance(value, dict):
            return {k: (self.reference(v, f"{path}.{k}") if k == "reference" and isinstance(v, str) else self.untyped(v, f"{path}.{k}"))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [self.untyped(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str) and _name_key(value).startswith(LOCAL):
            return self.mapping.local.get(_name_key(value), value)
        return value


def _rewrite_entry(rewriter: _Rewriter, e: Entry) -> None:
    if e.method in ("POST", "PUT") and not e.existing:
        e.resource = rewriter.resource(e.resource, f"{e.where}.resource")
    elif e.method == "PATCH" and e.patch is not None:
        document, media = e.patch
        if media == conditional.JSON_PATCH:
            e.patch = (rewriter.untyped(document, f"{e.where}.resource.data"), media)
        else:
            e.patch = (rewriter.resource(document, f"{e.where}.resource"), media)


def _batch_permission(engine: Engine, repo: ResourceRepository, e: Entry, states: dict[tuple[str, str], CurrentState],
                      access: AccessContext) -> str:
    """Before a batched write: "c" or "u" (of a resource the access may update); Forbidden otherwise."""
    state = states.get((e.rtype, e.target_id)) if e.method == "PUT" else None
    return authorization.write_permission(engine, repo, access, e.rtype, e.target_id, create_only=False, state=state)


def _write_item(engine: Engine, repo: ResourceRepository, e: Entry) -> WriteItem:
    """A plain create or update, ready for ``write_many`` (its index extracted)."""
    assert e.target is not None
    rid = e.target.split("/", 1)[1]
    body = dict(e.resource)
    if e.method == "PUT":
        body["id"] = rid
    index = engine.contexts.for_repo(repo).extractor.extract(body, local_path=f"/fhir/{repo.tenant.name}/")
    return WriteItem(e.rtype, rid, lambda version, last_updated: stamp(body, rid, version, last_updated), e.method,
                     index, e.version, create_only=e.method == "POST", content=content(body))


def _delete(engine: Engine, repo: ResourceRepository, e: Entry, access: AccessContext) -> list[int]:
    jobs, etag = [], None
    for rid in e.deletes:
        rec, job = remove(engine, repo, e.rtype, rid, access=access, if_match=e.version)
        if rec is not None:
            etag = f'W/"{rec.version}"'
        if job is not None:
            jobs.append(job)
    e.response = {"response": {"status": _status(204), **({"etag": etag} if etag and len(e.deletes) == 1 else {})}}
    return jobs


def _execute(engine: Engine, repo: ResourceRepository, req: FhirRequest, e: Entry) -> int | None:
    """One write that does not go with the batch: PATCH, a matched conditional create, a SearchParameter."""
    rtype = e.rtype
    assert e.target is not None
    rid = e.target.split("/", 1)[1]
    if e.method == "PATCH":
        assert e.patch is not None
        result, _, job = conditional.patch_in(engine, repo, rtype, rid, e.patch[0], e.patch[1], e.version, req.access)
        e.response = _written(req, result.record, 200)
        return job
    if e.existing:
        authorization.check_instance(engine, repo, req.access, "c", rtype, rid)  # what the create found: within the grant
        existing = repo.read(rtype, rid)
        assert existing is not None
        readable = authorization.may_read(engine, repo, req.access, rtype, rid)
        e.response = _written(req if readable else dataclasses.replace(req, prefer_return=RETURN_MINIMAL), existing, 200)
        return None
    body = dict(e.resource)
    if e.method == "PUT":
        body["id"] = rid
    definition = custom_params.check_definition(engine, body) if rtype == "SearchParameter" else None
    result, job = write_in(engine, repo, rtype, rid, body, access=req.access, method=e.method, if_match=e.version,
                           create_only=e.method == "POST", definition=definition)
    e.response = _written(req, result.record, 201 if result.created else 200, e.warnings)
    return job


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
    """The failing entry's error, saying which entry it was (and without headers meant for single requests)."""
    issues = [
        Issue(i.diagnostics if i.diagnostics.startswith(e.where) else f"{e.where} ({e.method} {e.url[:120]}): {i.diagnostics}",
              i.code, i.severity,
              tuple(x if x.startswith("Bundle.") else f"{e.where}.{x}" for x in i.expression) or (e.where,))
        for i in exc.issues
    ]
    return FhirError(issues=issues, status=exc.status, code=exc.code)


def _response_bundle(kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"lastUpdated": instant(now_us())}, "type": kind, "entry": entries}


def _status(code: int) -> str:
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)
