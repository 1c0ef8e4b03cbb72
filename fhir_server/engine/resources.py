"""Instance interactions: read, vread, create, update, delete."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from fhir_server import fhirjson
from fhir_server.capability.validation import ID_PATTERN, validate_resource
from fhir_server.clock import http_date, instant, parse_http_date
from fhir_server.engine.request import RETURN_MINIMAL, RETURN_OUTCOME, FhirRequest, FhirResponse
from fhir_server.engine.subsetting import subset
from fhir_server.errors import BadRequest, Gone, Issue, NotFound, operation_outcome
from fhir_server.fhirjson import RawJson
from fhir_server.engine import auditing, authorization, compartments, custom_params
from fhir_server.search.extract import IndexEntries
from fhir_server.security.access import AccessContext
from fhir_server.storage.repository import ResourceRepository, VersionRecord, WriteResult

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine


def is_ascii_digits(text: str) -> bool:
    """0-9 only (str.isdigit also accepts superscripts and other scripts' digits, which int() refuses)."""
    return text.isascii() and text.isdigit()


def check_id(rid: str, where: str = "id") -> str:
    if not ID_PATTERN.fullmatch(rid):
        raise BadRequest(
            f"Invalid resource id {rid[:80]!r}: 1 to 64 characters of A-Z, a-z, 0-9, '-' and '.'", expression=where
        )
    return rid


def parse_etag(value: str, header: str) -> int:
    """The version in an ETag (W/"3", "3" or 3)."""
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not is_ascii_digits(text) or len(text) > 9:
        raise BadRequest(f"{header} must be a version ETag such as W/\"3\", not {value[:40]!r}", expression=header)
    return int(text)


def version_headers(engine: Engine, req: FhirRequest, rec: VersionRecord) -> dict[str, str]:
    return {
        "ETag": f'W/"{rec.version}"',
        "Last-Modified": http_date(rec.last_updated),
        "Content-Location": f"{req.base_url}/{rec.res_type}/{rec.res_id}/_history/{rec.version}",
    }


def stamp(resource: dict[str, Any], rid: str, version: int, last_updated: int) -> bytes:
    """The stored form: the server's id, versionId and lastUpdated; the client's meta otherwise kept."""
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = instant(last_updated)
    out: dict[str, Any] = {"resourceType": resource["resourceType"], "id": rid, "meta": meta}
    for key, value in resource.items():
        if key not in out:
            out[key] = value
    return fhirjson.dumps(out)


def content(resource: dict[str, Any]) -> bytes:
    """What an update compares to tell that it changes nothing: the resource without its id, meta.versionId and
    meta.lastUpdated (the server's), canonically serialised."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    out = {k: v for k, v in resource.items() if k not in ("id", "meta")}
    if meta:
        out["meta"] = meta
    return fhirjson.canonical(out)


def validated_body(engine: Engine, req: FhirRequest, rtype: str) -> tuple[dict[str, Any], list[Issue]]:
    body = req.body
    if body is None:
        raise BadRequest(f"The request has no body; a {rtype} resource was expected", code="required")
    if not isinstance(body, dict):
        raise BadRequest(f"The body must be a JSON object (a {rtype} resource)", code="structure")
    declared = body.get("resourceType")
    if declared != rtype:
        if declared is None:
            raise BadRequest(f"The body has no resourceType; expected {rtype!r}", expression="resourceType", code="required")
        raise BadRequest(
            f"The body's resourceType {str(declared)[:64]!r} does not match the URL's {rtype!r}",
            expression="resourceType",
        )
    warnings = validate_resource(engine.registry, body, missing_required=engine.settings.validate_required)
    return body, warnings


def write_response(
    req: FhirRequest, rec: VersionRecord, status: int, headers: dict[str, str], warnings: list[Issue], message: str
) -> FhirResponse:
    if req.prefer_return == RETURN_MINIMAL:
        return FhirResponse(status, None, headers)
    if req.prefer_return == RETURN_OUTCOME:
        issues = [Issue(message, code="informational", severity="information"), *warnings]
        return FhirResponse(status, operation_outcome(issues), headers)
    return FhirResponse(status, RawJson(rec.body or b""), headers)


def read(engine: Engine, req: FhirRequest, rtype: str, rid: str) -> FhirResponse:
    check_id(rid)
    own = authorization.reads_own_record(req.access, rtype, rid)
    if not own:
        authorization.grants_unless_internal(req.access, "r", rtype)
    caught_up = engine.audit.catch_up(req, (rtype,))  # an AuditEvent is a resource once it is chained
    with engine.storage.session(req.tenant, write=False, shared=not caught_up) as repo:
        recorded, rec = engine.audit.read_recorded(
            repo, req, rtype, rid, lambda: own or authorization.instance_unrestricted(engine, repo, req.access, "r", rtype))
        if not recorded:
            rec = repo.read(rtype, rid)
            if rec is not None and not rec.deleted:
                auditing.note_record(engine, rec)  # whose record it is, also when the access is refused below
                if not own:
                    authorization.check_instance(engine, repo, req.access, "r", rtype, rid)
    if rec is None:
        raise not_known(rtype, rid)
    if rec.deleted:
        raise was_deleted(rtype, rid, rec.version)
    headers = version_headers(engine, req, rec)
    if not_modified(req, rec):
        return FhirResponse(304, None, headers)
    return FhirResponse(200, _maybe_subset(engine, req, rec), headers)


def not_known(rtype: str, rid: str) -> NotFound:
    """A read's answer when the resource never existed (its AuditEvent says the same: audit_trail.py)."""
    return NotFound(f"{rtype}/{rid} is not known", expression="id")


def was_deleted(rtype: str, rid: str, version: int) -> Gone:
    return Gone(f"{rtype}/{rid} was deleted", headers={"ETag": f'W/"{version}"'})


def _maybe_subset(engine: Engine, req: FhirRequest, rec: VersionRecord) -> dict[str, Any] | RawJson:
    """The body, reduced when the read asks for _summary or _elements."""
    summary, elements = req.param("_summary"), req.param("_elements")
    if summary is None and elements is None:
        return RawJson(rec.body or b"")
    if summary is not None and summary not in ("true", "text", "data", "false"):
        raise BadRequest("_summary on a read must be true, text, data or false", expression="_summary")
    fields = tuple(e.strip() for e in elements.split(",") if e.strip()) if elements is not None else None
    return subset(engine.registry, fhirjson.loads_stored(rec.body or b"{}"), summary=summary, elements=fields)


def not_modified(req: FhirRequest, rec: VersionRecord) -> bool:
    if req.if_none_match is not None:
        wanted = {tag.strip() for tag in req.if_none_match.split(",")}
        return "*" in wanted or any(_etag_version(tag) == rec.version for tag in wanted)
    if req.if_modified_since is not None:
        since = parse_http_date(req.if_modified_since)
        if since is not None:
            # HTTP dates have whole seconds: compare at that precision.
            return rec.last_updated // 1_000_000 <= since // 1_000_000
    return False


def _etag_version(tag: str) -> int | None:
    text = tag[2:] if tag.startswith("W/") else tag
    text = text.strip('"')
    return int(text) if is_ascii_digits(text) and len(text) <= 9 else None


def vread(engine: Engine, req: FhirRequest, rtype: str, rid: str, vid: str) -> FhirResponse:
    check_id(rid)
    if not is_ascii_digits(vid) or len(vid) > 9:
        raise NotFound(f"{rtype}/{rid} has no version {vid[:40]!r}; versions are whole numbers", expression="vid")
    authorization.grants_unless_internal(req.access, "r", rtype)
    caught_up = engine.audit.catch_up(req, (rtype,))
    with engine.storage.session(req.tenant, write=False, shared=not caught_up) as repo:
        rec = repo.vread(rtype, rid, int(vid))
        if rec is not None:
            auditing.note_record(engine, rec)
            authorization.check_instance(engine, repo, req.access, "r", rtype, rid)  # as the resource stands now
    if rec is None:
        raise NotFound(f"{rtype}/{rid} has no version {vid}")
    if rec.deleted:
        raise Gone(f"Version {vid} of {rtype}/{rid} is a deletion", headers={"ETag": f'W/"{rec.version}"'})
    headers = version_headers(engine, req, rec)
    if not_modified(req, rec):
        return FhirResponse(304, None, headers)
    return FhirResponse(200, _maybe_subset(engine, req, rec), headers)


def create(engine: Engine, req: FhirRequest, rtype: str) -> FhirResponse:
    body, warnings = validated_body(engine, req, rtype)
    rid = str(uuid.uuid4())  # the client's id, if any, is ignored (FHIR R4 create)
    result = store(engine, req.tenant, rtype, rid, body, access=req.access, method="POST", create_only=True)
    rec = result.record
    headers = version_headers(engine, req, rec)
    headers["Location"] = headers.pop("Content-Location")
    return write_response(req, rec, 201, headers, warnings, f"Created {rtype}/{rid}")


def update(engine: Engine, req: FhirRequest, rtype: str, rid: str) -> FhirResponse:
    check_id(rid)
    body, warnings = validated_body(engine, req, rtype)
    body_id = body.get("id")
    if body_id is None:
        raise BadRequest(f"The resource has no id; an update of {rtype}/{rid} needs \"id\": \"{rid}\"", expression=f"{rtype}.id", code="required")
    if body_id != rid:
        raise BadRequest(
            f"The resource id {str(body_id)[:64]!r} does not match the id in the URL {rid!r}", expression=f"{rtype}.id"
        )
    if_match = parse_etag(req.if_match, "If-Match") if req.if_match is not None else None
    result = store(engine, req.tenant, rtype, rid, body, access=req.access, method="PUT", if_match=if_match)
    return update_response(engine, req, result, warnings)


def update_response(engine: Engine, req: FhirRequest, result: WriteResult, warnings: list[Issue]) -> FhirResponse:
    """The answer to an update: 201 with Location when it created the resource, else 200."""
    rec = result.record
    headers = version_headers(engine, req, rec)
    name = f"{rec.res_type}/{rec.res_id}"
    if result.created:
        headers["Location"] = headers["Content-Location"]
        return write_response(req, rec, 201, headers, warnings, f"Created {name}")
    if not result.changed:
        return write_response(req, rec, 200, headers, warnings, f"{name} is unchanged: the content is its version {rec.version}'s")
    return write_response(req, rec, 200, headers, warnings, f"Updated {name} to version {rec.version}")


def delete(engine: Engine, req: FhirRequest, rtype: str, rid: str) -> FhirResponse:
    check_id(rid)
    if_match = parse_etag(req.if_match, "If-Match") if req.if_match is not None else None
    job = None
    with engine.storage.session(req.tenant, write=True, exclusive=rtype == "SearchParameter") as repo:
        rec, job = remove(engine, repo, rtype, rid, access=req.access, if_match=if_match)
    if job is not None and engine.jobs is not None:
        engine.jobs.kick()
    headers = {} if rec is None else {"ETag": f'W/"{rec.version}"'}
    if req.prefer_return == RETURN_OUTCOME:
        message = f"Deleted {rtype}/{rid}" if rec else f"{rtype}/{rid} did not exist or was already deleted"
        return FhirResponse(200, operation_outcome([Issue(message, "informational", "information")]), headers)
    return FhirResponse(204, None, headers)


# --- the write path every door shares (REST, Bundle entries, reindex-aware) -------------------------


def store(engine: Engine, tenant: str, rtype: str, rid: str, body: dict[str, Any], *, access: AccessContext, method: str,
          if_match: int | None = None, create_only: bool = False) -> WriteResult:
    """Validate-free core of create and update: index, write, and react to SearchParameter writes."""
    definition = custom_params.check_definition(engine, body) if rtype == "SearchParameter" else None
    # Extract before the transaction with the tenant's last-seen parameters; redone inside if they moved on.
    _, guessed = engine.contexts.guess(tenant)
    early = (guessed, guessed.extractor.extract(body, local_path=f"/fhir/{tenant}/"))
    with engine.storage.session(tenant, write=True, exclusive=rtype == "SearchParameter") as repo:
        result, job = write_in(engine, repo, rtype, rid, body, access=access, method=method, if_match=if_match,
                               create_only=create_only, definition=definition, early=early)
    if job is not None and engine.jobs is not None:
        engine.jobs.kick()
    return result


def write_in(engine: Engine, repo: ResourceRepository, rtype: str, rid: str, body: dict[str, Any], *, access: AccessContext,
             method: str, if_match: int | None = None, create_only: bool = False, definition: Any = None,
             early: tuple[Any, IndexEntries] | None = None) -> tuple[WriteResult, int | None]:
    """Write one resource inside an open unit of work. Returns the result and a reindex job, if one was made.

    The access must allow it: create, or update of a resource within the grant; and what is written must
    be within the grant too (checked once written, in the same unit of work: outside, it rolls back).
    """
    permission = authorization.write_permission(engine, repo, access, rtype, rid, create_only=create_only)
    ctx = engine.contexts.for_repo(repo)
    if early is not None and early[0] is ctx:
        index = early[1]
    else:
        index = ctx.extractor.extract(body, local_path=f"/fhir/{repo.tenant.name}/")
    old = None
    if rtype == "SearchParameter" and not create_only:
        previous = repo.read(rtype, rid)
        if previous is not None and previous.body is not None:
            old = json.loads(previous.body)
    result = repo.write(rtype, rid, lambda v, lu: stamp(body, rid, v, lu), method=method, index=index,
                        if_match=if_match, create_only=create_only, content=content(body))
    auditing.note_record(engine, result.record, body)
    authorization.check_writable(engine, repo, access, permission, rtype, rid)
    job = custom_params.after_write(engine, repo, rid, old, definition) if rtype == "SearchParameter" else None
    return result, job


def remove(engine: Engine, repo: ResourceRepository, rtype: str, rid: str, *, access: AccessContext,
           if_match: int | None = None) -> tuple[VersionRecord | None, int | None]:
    """Delete one resource inside an open unit of work (and forget a SearchParameter's parameter)."""
    authorization.grants_unless_internal(access, "d", rtype)
    state = repo.current_state(rtype, rid) if not access.internal else None
    if state is not None and not state.deleted:
        authorization.check_writable(engine, repo, access, "d", rtype, rid)
    if engine.audit.enabled:  # whose record it was: its index rows go with it
        auditing.note_patients(engine, compartments.patients_referenced(engine, repo, rtype, rid))
    old = None
    if rtype == "SearchParameter":
        previous = repo.read(rtype, rid)
        if previous is not None and previous.body is not None:
            old = json.loads(previous.body)
    rec = repo.delete(rtype, rid, if_match=if_match)
    if rec is not None:
        auditing.note_resource(engine, rtype, rid, rec.version)
    job = custom_params.after_write(engine, repo, rid, old, None) if rtype == "SearchParameter" and rec is not None else None
    return rec, job
