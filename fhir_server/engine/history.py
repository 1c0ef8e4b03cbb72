"""History at instance, type and system level, with _since, _at, _count and stable paging."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from fhir_server.clock import instant, now_us
from fhir_server.engine import auditing, authorization
from fhir_server.engine.auditing import AUDIT_EVENT
from fhir_server.engine.paging import CURSOR_PARAM, Cursor, page_url, parse_count
from fhir_server.engine.request import FhirRequest, FhirResponse
from fhir_server.engine.resources import check_id
from fhir_server.errors import BadRequest, Forbidden, NotFound
from fhir_server.fhirjson import RawJson
from fhir_server.search.dates import InvalidDate, period
from fhir_server.storage.repository import HistoryQuery, ResourceRepository, VersionRecord

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine
    from fhir_server.security.access import AccessContext

KNOWN_PARAMS = {"_since", "_at", "_count", CURSOR_PARAM, "_format", "_pretty", "_summary", "_elements"}


def _authorize(engine: Engine, repo: ResourceRepository, req: FhirRequest, rtype: str | None, rid: str | None) -> None:
    """An instance's history: as reading the resource. A type's or the system's: read of every resource of the
    type(s) unrestricted, since past versions carry no index to restrict them by."""
    access = req.access
    if access.internal:
        return
    types = (rtype,) if rtype is not None else _system_types(engine, access)
    for t in types:
        authorization.grants(access, "r", t)
    if rid is not None and rtype is not None:
        state = repo.current_state(rtype, rid)
        if state is not None:  # a deleted one matches no patient or criteria: only an unrestricted grant sees it
            authorization.check_instance(engine, repo, access, "r", rtype, rid)
        return
    ctx = engine.contexts.for_repo(repo)
    for t in types:
        if authorization.constraint(engine, ctx, access, "r", t) is not None:
            raise Forbidden(f"The history of {t if rtype else 'the server'} needs read access to every {t} resource; "
                            "the access token's scopes are narrower (use search, or the history of one resource)")


def _system_types(engine: Engine, access: AccessContext) -> tuple[str, ...]:
    """The types a system-level history shows: all of them, the audit log only to those granted it by name."""
    return authorization.beyond_wildcards(access, engine.registry.resource_types)


def history(engine: Engine, req: FhirRequest, rtype: str | None = None, rid: str | None = None) -> FhirResponse:
    if rid is not None:
        check_id(rid)
    for name, _ in req.params:
        if name not in KNOWN_PARAMS and req.prefer_handling == "strict":
            raise BadRequest(f"Unknown history parameter {name!r}; use _since, _at or _count", expression=name)
    since = _instant_param(req, "_since")
    at = _period_param(req, "_at")
    count = parse_count(req.param("_count"), engine.settings.default_page_size, engine.settings.max_page_size)
    token = req.param(CURSOR_PARAM)
    cursor = Cursor.decode(token) if token else None
    snapshot = cursor.snapshot if cursor else now_us()
    query = HistoryQuery(
        res_type=rtype,
        res_id=rid,
        since=since,
        at=at,
        until=snapshot,
        after=_key(cursor) if cursor and cursor.direction == "next" else None,
        before=_key(cursor) if cursor and cursor.direction == "prev" else None,
        limit=count,
        exclude_types=(AUDIT_EVENT,) if rtype is None and len(_system_types(engine, req.access)) < len(engine.registry.resource_types) else (),
    )
    caught_up = engine.audit.catch_up(req, (rtype,) if rtype else _system_types(engine, req.access))
    with engine.storage.session(req.tenant, write=False, shared=not caught_up) as repo:
        _authorize(engine, repo, req, rtype, rid)
        records: list[VersionRecord] = []
        more = False
        if count > 0:
            records, more = repo.history(query)
        for rec in records:  # whose records the page holds (past versions: read from each body)
            auditing.note_record(engine, rec, resource=False)
        total = None
        if rid is not None:
            state = repo.current_state(rtype or "", rid)
            if state is None:
                raise NotFound(f"{rtype}/{rid} is not known")
            if since is None and at is None:
                total = state.version  # versions are numbered 1..n without gaps
    path = "/".join(p for p in (rtype, rid) if p)
    self_base = f"{req.base_url}/{path}/_history" if path else f"{req.base_url}/_history"
    params = [(k, v) for k, v in req.params if k in KNOWN_PARAMS and k not in ("_format", "_pretty")]
    links = [{"relation": "self", "url": page_url(self_base, params, cursor)}]
    if query.before is not None:  # a page walked backwards: older entries lie behind us, newer ones maybe ahead
        has_older, has_newer = True, more
    else:
        has_older, has_newer = more, cursor is not None
    if records and has_older:
        last = records[-1]
        links.append({"relation": "next", "url": page_url(self_base, params, Cursor(snapshot, "next", _pos(last)))})
    if records and has_newer:
        first = records[0]
        links.append({"relation": "previous", "url": page_url(self_base, params, Cursor(snapshot, "prev", _pos(first)))})
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": instant(now_us())},
        "type": "history",
    }
    if total is not None:
        bundle["total"] = total
    bundle["link"] = links
    bundle["entry"] = [_entry(req, r) for r in records]
    if not bundle["entry"]:
        del bundle["entry"]
    return FhirResponse(200, bundle)


def _entry(req: FhirRequest, rec: VersionRecord) -> dict[str, Any]:
    entry: dict[str, Any] = {"fullUrl": f"{req.base_url}/{rec.res_type}/{rec.res_id}"}
    if rec.body is not None:
        entry["resource"] = RawJson(rec.body)
    if rec.method == "POST":
        request = {"method": "POST", "url": rec.res_type}
    else:
        request = {"method": rec.method, "url": f"{rec.res_type}/{rec.res_id}"}
    entry["request"] = request
    if rec.deleted:
        status = "204 No Content"
    elif rec.version == 1 or rec.method == "POST":
        status = "201 Created"
    else:
        status = "200 OK"
    entry["response"] = {"status": status, "etag": f'W/"{rec.version}"', "lastModified": instant(rec.last_updated)}
    return entry


def _pos(rec: VersionRecord) -> tuple[int, str, str, int]:
    return (rec.last_updated, rec.res_type, rec.res_id, rec.version)


def _key(cursor: Cursor) -> tuple[int, str, str, int]:
    try:
        lu, rtype, rid, version = cursor.key
        if not (isinstance(lu, int) and isinstance(rtype, str) and isinstance(rid, str) and isinstance(version, int)):
            raise ValueError
    except ValueError:
        raise BadRequest(f"Invalid {CURSOR_PARAM}: use the links of a previous page", expression=CURSOR_PARAM) from None
    return (lu, rtype, rid, version)


def _instant_param(req: FhirRequest, name: str) -> int | None:
    values = req.param_values(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"{name} may be given once", expression=name)
    try:
        return period(values[0])[0]
    except InvalidDate:
        raise BadRequest(f"{name} must be a FHIR instant such as 2024-01-31T12:00:00Z, not {values[0][:40]!r}", expression=name) from None


def _period_param(req: FhirRequest, name: str) -> tuple[int, int] | None:
    values = req.param_values(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"{name} may be given once", expression=name)
    try:
        return period(values[0])
    except InvalidDate:
        raise BadRequest(f"{name} must be a FHIR date or dateTime such as 2024-01-31, not {values[0][:40]!r}", expression=name) from None
