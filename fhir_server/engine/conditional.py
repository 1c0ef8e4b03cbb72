"""Conditional interactions (create, update, delete, patch by search criteria) and PATCH.

Each runs in one unit of work: the criteria are searched, and the write follows, in the same
transaction. Two requests with the same criteria are serialised on them (a PostgreSQL advisory lock
keyed by tenant, type and the normalised criteria; SQLite has one writer at a time anyway), so two
concurrent conditional creates of one identifier produce exactly one resource.
"""

from __future__ import annotations

import base64
import dataclasses
import binascii
import hashlib
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from sqlalchemy import text

from fhir_server import fhirjson
from fhir_server.capability.validation import validate_resource
from fhir_server.engine import auditing, authorization, custom_params, search
from fhir_server.engine.patching import apply_fhirpath_patch, apply_json_patch
from fhir_server.engine.request import RETURN_MINIMAL, FhirRequest, FhirResponse
from fhir_server.engine.resources import (
    check_id,
    parse_etag,
    remove,
    update_response,
    validated_body,
    version_headers,
    write_in,
    write_response,
)
from fhir_server.errors import BadRequest, FhirError, Gone, Issue, NotFound, PreconditionFailed, operation_outcome
from fhir_server.search.query import Clause
from fhir_server.security.access import AccessContext
from fhir_server.storage.repository import ResourceRepository, VersionRecord, WriteResult

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine

JSON_PATCH = "application/json-patch+json"


def normal_criteria(query: str) -> str:
    """Search criteria in one form (parameters sorted), so equal criteria compare (and lock) equal."""
    return urlencode(sorted(parse_qsl(query, keep_blank_values=True)))


def lock_criteria(repo: ResourceRepository, rtype: str, query: str) -> None:
    """Serialise the transactions that act on the same conditional criteria (until they end)."""
    lock_all_criteria(repo, [(rtype, query)])


def lock_all_criteria(repo: ResourceRepository, criteria: list[tuple[str, str]]) -> None:
    """Take the criteria locks of a unit of work, in one global order (so two of them cannot deadlock).

    PostgreSQL advisory transaction locks, keyed by tenant, type and the normalised criteria, all in one statement
    (``unnest`` yields the sorted keys in order, and each is locked as its row comes); a lock this unit of work
    already holds is not asked for again. SQLite has one writer at a time: nothing to do.
    """
    if repo.conn.dialect.name != "postgresql" or not criteria:
        return
    keys = set()
    for rtype, query in criteria:
        digest = hashlib.sha256(f"{repo.tenant.id}\x00{rtype}\x00{normal_criteria(query)}".encode()).digest()
        keys.add(int.from_bytes(digest[:8], "big", signed=True))
    wanted = sorted(keys - repo.advisory_locks)
    if not wanted:
        return
    repo.conn.execute(_LOCK_MANY, {"keys": wanted})
    repo.advisory_locks.update(wanted)


_LOCK_MANY = text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:keys AS bigint[])) AS k")


def matches(engine: Engine, repo: ResourceRepository, rtype: str, query: str, access: AccessContext, permission: str,
            limit: int = 2) -> list[str]:
    """Ids matching conditional criteria, among the resources ``access`` allows ``permission`` on (so that
    a conditional interaction cannot find, or act on, what the caller may not see)."""
    lock_criteria(repo, rtype, query)
    constraint = authorization.constraint(engine, engine.contexts.for_repo(repo), access, permission, rtype)
    return search.matching_ids(engine, repo, rtype, query, limit=limit, constraint=constraint, access=access)


def matches_many(engine: Engine, repo: ResourceRepository, wanted: list[tuple[str, str, str]],
                 access: AccessContext) -> dict[tuple[str, str, str], list[str]]:
    """``matches`` (limit 2) for many criteria (type, query, permission) at once: what the index alone decides, in
    one statement, keyed by (type, normalised query, permission). Criteria missing from the answer (in error, or
    needing the bodies) are for ``matches`` to decide, one by one."""
    keyed = list(dict.fromkeys((rtype, normal_criteria(query), permission) for rtype, query, permission in wanted
                               if engine.registry.is_resource_type(rtype)))
    if not keyed:
        return {}
    lock_all_criteria(repo, [(rtype, query) for rtype, query, _ in keyed])
    ctx = engine.contexts.for_repo(repo)
    constraints: dict[tuple[str, str], Clause | None] = {}
    searchable = []
    for key in keyed:
        rtype, _, permission = key
        if (rtype, permission) not in constraints:
            try:
                constraints[(rtype, permission)] = authorization.constraint(engine, ctx, access, permission, rtype)
            except FhirError:  # refused: ``matches`` says so, in the entry's turn
                continue
        searchable.append(key)
    found = search.matching_ids_many(engine, repo, [(rtype, query, constraints[(rtype, permission)], 2)
                                                    for rtype, query, permission in searchable], access=access)
    return {key: ids for key, ids in zip(searchable, found) if ids is not None}


# --- conditional create ----------------------------------------------------------------------------

def create_in(engine: Engine, repo: ResourceRepository, rtype: str, body: dict[str, Any], if_none_exist: str | None,
              access: AccessContext) -> tuple[WriteResult | VersionRecord, bool, int | None]:
    """Create (or, with If-None-Exist matching one resource, find). Returns (what, created?, reindex job)."""
    if if_none_exist is not None:
        found = matches(engine, repo, rtype, _criteria(if_none_exist, rtype), access, "c")
        if len(found) > 1:
            raise PreconditionFailed(
                f"If-None-Exist matches {len(found)} or more {rtype} resources; make the criteria select one",
                expression="If-None-Exist",
            )
        if found:
            existing = repo.read(rtype, found[0])
            assert existing is not None
            auditing.note_record(engine, existing)
            return existing, False, None
    definition = custom_params.check_definition(engine, body) if rtype == "SearchParameter" else None
    result, job = write_in(engine, repo, rtype, str(uuid.uuid4()), body, access=access, method="POST", create_only=True,
                           definition=definition)
    return result, True, job


def create(engine: Engine, req: FhirRequest, rtype: str) -> FhirResponse:
    body, warnings = validated_body(engine, req, rtype)
    with engine.storage.session(req.tenant, write=True, exclusive=rtype == "SearchParameter") as repo:
        outcome, created, job = create_in(engine, repo, rtype, body, req.if_none_exist, req.access)
        if isinstance(outcome, VersionRecord) and not authorization.may_read(engine, repo, req.access, rtype, outcome.res_id):
            req = dataclasses.replace(req, prefer_return=RETURN_MINIMAL)  # found, but not readable with this grant
    _kick(engine, job)
    if created:
        assert isinstance(outcome, WriteResult)
        rec = outcome.record
        headers = version_headers(engine, req, rec)
        headers["Location"] = headers.pop("Content-Location")
        return write_response(req, rec, 201, headers, warnings, f"Created {rtype}/{rec.res_id}")
    assert isinstance(outcome, VersionRecord)
    headers = version_headers(engine, req, outcome)
    return write_response(req, outcome, 200, headers, [], f"{rtype}/{outcome.res_id} already matches If-None-Exist; nothing created")


# --- conditional update --------------------------------------------------------------------------

def update_in(engine: Engine, repo: ResourceRepository, rtype: str, query: str, body: dict[str, Any],
              if_match: int | None, access: AccessContext) -> tuple[WriteResult, int | None]:
    found = matches(engine, repo, rtype, query, access, "u")
    if len(found) > 1:
        raise PreconditionFailed(f"The conditional update matches {len(found)} or more {rtype} resources", expression="query")
    body_id = body.get("id")
    if found:
        if body_id is not None and body_id != found[0]:
            raise BadRequest(f"The resource id {str(body_id)[:64]!r} is not the id of the resource the criteria match", expression=f"{rtype}.id")
        rid, method = found[0], "PUT"
    elif body_id is not None:
        rid, method = check_id(str(body_id)), "PUT"  # no match, id given: update as create
    else:
        rid, method = str(uuid.uuid4()), "POST"
    definition = custom_params.check_definition(engine, body) if rtype == "SearchParameter" else None
    return write_in(engine, repo, rtype, rid, body, access=access, method=method, if_match=if_match, definition=definition)


def update(engine: Engine, req: FhirRequest, rtype: str) -> FhirResponse:
    body, warnings = validated_body(engine, req, rtype)
    query = _query_of(req)
    if_match = parse_etag(req.if_match, "If-Match") if req.if_match is not None else None
    with engine.storage.session(req.tenant, write=True, exclusive=rtype == "SearchParameter") as repo:
        result, job = update_in(engine, repo, rtype, query, body, if_match, req.access)
    _kick(engine, job)
    return update_response(engine, req, result, warnings)


# --- conditional delete --------------------------------------------------------------------------

def delete_targets(engine: Engine, repo: ResourceRepository, rtype: str, query: str, access: AccessContext) -> list[str]:
    """The ids a conditional delete removes (412 when it matches more than the settings allow)."""
    multiple = engine.settings.conditional_delete == "multiple"
    limit = engine.settings.max_conditional_delete if multiple else 1
    found = matches(engine, repo, rtype, query, access, "d", limit=limit + 1)
    if len(found) > limit:
        if multiple:
            raise PreconditionFailed(
                f"The conditional delete matches more than {limit} {rtype} resources (FHIR_MAX_CONDITIONAL_DELETE)", expression="query"
            )
        raise PreconditionFailed(
            f"The conditional delete matches {len(found)} or more {rtype} resources; this server deletes one at a time "
            "(FHIR_CONDITIONAL_DELETE=single)",
            expression="query",
        )
    return found


def delete_in(engine: Engine, repo: ResourceRepository, rtype: str, query: str,
              access: AccessContext) -> tuple[list[VersionRecord], int | None]:
    deleted, job = [], None
    for rid in delete_targets(engine, repo, rtype, query, access):
        rec, j = remove(engine, repo, rtype, rid, access=access)
        job = job or j
        if rec is not None:
            deleted.append(rec)
    return deleted, job


def delete(engine: Engine, req: FhirRequest, rtype: str) -> FhirResponse:
    query = _query_of(req)
    with engine.storage.session(req.tenant, write=True, exclusive=rtype == "SearchParameter") as repo:
        deleted, job = delete_in(engine, repo, rtype, query, req.access)
    _kick(engine, job)
    headers = {"ETag": f'W/"{deleted[0].version}"'} if len(deleted) == 1 else {}
    if req.prefer_return == "OperationOutcome":
        message = f"Deleted {len(deleted)} {rtype} resource(s)"
        return FhirResponse(200, operation_outcome([Issue(message, "informational", "information")]), headers)
    return FhirResponse(204, None, headers)


# --- patch ----------------------------------------------------------------------------------------

def patch_in(engine: Engine, repo: ResourceRepository, rtype: str, rid: str, document: Any, content_type: str | None,
             if_match: int | None, access: AccessContext) -> tuple[WriteResult, list[Issue], int | None]:
    state = repo.current_state(rtype, rid, lock=True)  # held until commit: nothing changes under the patch
    if state is None:
        raise NotFound(f"{rtype}/{rid} is not known")
    if state.deleted:
        raise Gone(f"{rtype}/{rid} was deleted")
    if if_match is not None and state.version != if_match:
        raise PreconditionFailed(
            f"If-Match does not match the current version (W/\"{state.version}\")", expression="If-Match",
            headers={"ETag": f'W/"{state.version}"'},
        )
    current = repo.read(rtype, rid)
    assert current is not None and current.body is not None
    resource = fhirjson.loads_stored(current.body)
    if content_type == JSON_PATCH:
        patched = apply_json_patch(resource, document)
    else:
        patched = apply_fhirpath_patch(engine.registry, resource, document)
    if patched.get("resourceType") != rtype or patched.get("id") != rid:
        raise BadRequest("A patch may not change the resource's type or id", expression=f"{rtype}.id")
    meta = patched.get("meta")
    if isinstance(meta, dict):  # the server's own meta values are not the client's to patch
        meta.pop("versionId", None)
        meta.pop("lastUpdated", None)
        if not meta:
            patched.pop("meta")
    warnings = validate_resource(engine.registry, patched, missing_required=engine.settings.validate_required)
    definition = custom_params.check_definition(engine, patched) if rtype == "SearchParameter" else None
    result, job = write_in(engine, repo, rtype, rid, patched, access=access, method="PATCH", if_match=state.version,
                           definition=definition)
    return result, warnings, job


def patch(engine: Engine, req: FhirRequest, rtype: str, rid: str | None) -> FhirResponse:
    if req.body is None:
        raise BadRequest("The request body is empty; a patch document was expected", code="required")
    if_match = parse_etag(req.if_match, "If-Match") if req.if_match is not None else None
    with engine.storage.session(req.tenant, write=True, exclusive=rtype == "SearchParameter") as repo:
        if rid is None:
            found = matches(engine, repo, rtype, _query_of(req), req.access, "u")
            if not found:
                raise NotFound(f"No {rtype} matches the conditional patch's criteria")
            if len(found) > 1:
                raise PreconditionFailed(f"The conditional patch matches {len(found)} or more {rtype} resources", expression="query")
            rid = found[0]
        else:
            check_id(rid)
        result, warnings, job = patch_in(engine, repo, rtype, rid, req.body, req.content_type, if_match, req.access)
    _kick(engine, job)
    rec = result.record
    return write_response(req, rec, 200, version_headers(engine, req, rec), warnings, f"Patched {rtype}/{rid} to version {rec.version}")


def binary_patch(resource: Any, max_depth: int) -> tuple[Any, str]:
    """A PATCH entry in a Bundle: a Parameters resource (FHIRPath Patch) or a Binary holding a JSON Patch."""
    if isinstance(resource, dict) and resource.get("resourceType") == "Binary":
        content_type = resource.get("contentType")
        if not isinstance(content_type, str) or content_type.split(";")[0].strip().lower() != JSON_PATCH:
            raise BadRequest("A Binary patch must have contentType application/json-patch+json", expression="resource.contentType")
        data = resource.get("data")
        if not isinstance(data, str):
            raise BadRequest("A Binary patch needs its JSON Patch document, base64-encoded, in data", expression="resource.data")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("The Binary patch's data is not base64", expression="resource.data") from None
        try:
            return fhirjson.parse(raw, max_depth=max_depth), JSON_PATCH
        except BadRequest as exc:
            raise BadRequest(f"The Binary patch's data is not a JSON document: {exc.issues[0].diagnostics}",
                             expression="resource.data") from None
    if not isinstance(resource, dict) or resource.get("resourceType") != "Parameters":
        raise BadRequest("A PATCH entry's resource is a Parameters (FHIRPath Patch) or a Binary (JSON Patch)",
                         expression="resource.resourceType")
    return resource, "application/fhir+json"


def _query_of(req: FhirRequest) -> str:
    pairs = [(k, v) for k, v in req.params if k not in ("_format", "_pretty")]
    if not pairs:
        raise BadRequest("A conditional interaction needs search criteria in the URL", expression="query")
    return urlencode(pairs)


def _criteria(if_none_exist: str, rtype: str) -> str:
    """If-None-Exist holds the query part of a search URL ('identifier=x', or the whole 'Type?identifier=x')."""
    value = if_none_exist.strip()
    if "?" in value:
        head, _, value = value.partition("?")
        if head.rsplit("/", 1)[-1] not in ("", rtype):
            raise BadRequest(f"If-None-Exist searches {rtype}, not {head[:40]!r}", expression="If-None-Exist")
    return value


def _kick(engine: Engine, job: int | None) -> None:
    if job is not None and engine.jobs is not None:
        engine.jobs.kick()

