"""The search interaction: type and system level, paging, totals, includes, subsetting."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import uuid
from dataclasses import dataclass
from functools import cmp_to_key
from urllib.parse import parse_qsl, urlencode
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import func, or_, and_, select

from fhir_server import fhirjson
from fhir_server.clock import instant, now_us
from fhir_server.engine import auditing, authorization
from fhir_server.engine.auditing import AUDIT_EVENT
from fhir_server.engine.paging import CURSOR_PARAM, page_url
from fhir_server.engine.request import FhirRequest, FhirResponse
from fhir_server.engine.subsetting import subset
from fhir_server.errors import BadRequest, FhirError, Issue, operation_outcome
from fhir_server.fhirjson import RawJson
from fhir_server.search.extract import normalize
from fhir_server.search.parameters import ParameterSource
from fhir_server.search.query import Clause, Include, SearchQuery, SortKey
from fhir_server.search.sql import Compiler
from fhir_server.storage import schema
from fhir_server.storage.search_store import Row, SearchStore, SortColumn

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine
    from fhir_server.security.access import AccessContext

R = schema.resources
MAX_INCLUDED = 1000
INCLUDE_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class SearchCursor:
    direction: str  # next | prev
    key: tuple[Any, ...]
    total: int | None

    def encode(self) -> str:
        raw = orjson.dumps({"d": self.direction, "k": list(self.key), "t": self.total})
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def decode(cls, token: str, kinds: list[str]) -> SearchCursor:
        """Parse a cursor whose key holds one value of each kind (int, float, str, or str? for str-or-None)."""
        try:
            data = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            direction, key, total = data["d"], data["k"], data.get("t")
            if direction not in ("next", "prev") or not isinstance(key, list) or len(key) != len(kinds):
                raise ValueError
            if not all(_fits(v, kind) for v, kind in zip(key, kinds)):
                raise ValueError
            if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
                raise ValueError
        except (binascii.Error, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            raise BadRequest(f"Invalid {CURSOR_PARAM}: use the links of a previous page", expression=CURSOR_PARAM) from None
        return cls(direction, tuple(key), total)


def _fits(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "str?" and value is None:
        return True
    return isinstance(value, str) and len(value) <= 4096


def search(
    engine: Engine,
    req: FhirRequest,
    types: tuple[str, ...],
    pairs: list[tuple[str, str]],
    *,
    system: bool,
    extra: dict[str, tuple[Clause, ...]] | None = None,
    path: str | None = None,
) -> FhirResponse:
    """Search ``types`` with the query ``pairs``; ``extra`` adds clauses per type (compartments), and
    ``path`` is the URL path the links repeat (default: the type, or the base for system search)."""
    includes_log = [AUDIT_EVENT] if any(k in ("_include", "_revinclude") and AUDIT_EVENT in v for k, v in pairs) else []
    caught_up = engine.audit.catch_up(req, [*types, *includes_log])  # AuditEvents become searchable as they are chained
    with engine.storage.session(req.tenant, write=False, shared=not caught_up) as repo:
        ctx = engine.contexts.for_repo(repo)  # the tenant's parameters, custom ones included
        if not req.access.internal:  # what the access allows is part of the query (never a filter afterwards)
            extra = dict(extra or {})
            for t in types:
                clause = authorization.constraint(engine, ctx, req.access, "s", t)
                if clause is not None:
                    extra[t] = (*extra.get(t, ()), clause)
        query = ctx.parser.parse(types, pairs, strict=req.prefer_handling == "strict", extra=extra)
        query = authorization.guard_query(engine, ctx, req.access, query)
        memory_sort = any(k.param.type in ("string", "token", "uri") and not k.param.special for k in query.sort)
        sort_columns = [] if memory_sort else [_sort_column(ctx.params, k, types) for k in query.sort]
        kinds = ["str?"] * len(query.sort) if memory_sort else [c.kind for c in sort_columns]
        cursor = SearchCursor.decode(query.cursor, [*kinds, "str", "str"]) if query.cursor else None
        store = SearchStore(repo)
        compiler = Compiler(repo.sealer.keys, ctx.extractor, req.base_url,
                            materialize=lambda t, c, k: _materialize(engine, store, t, c, k),
                            fetch_ids=store.ids_if_few)
        where, confirmations = _where(store, compiler, query, types)
        total: int | None = cursor.total if cursor else None
        if query.summary == "count":
            total = _total(store, where, confirmations, engine)
            matches: list[Row] = []
            more = False
        elif memory_sort:
            matches, more, total = _memory_page(engine, store, where, confirmations, query, cursor)
        else:
            matches, more = _sql_page(store, where, confirmations, sort_columns, query, cursor)
            if query.total == "accurate":
                total = _total(store, where, confirmations, engine)
            elif cursor is None and query.total != "none" and (not confirmations or query.total == "estimate"):
                # The first page counts (exact unless some criterion needs confirmation after decryption,
                # when only an explicit _total=estimate gets this upper bound); later pages carry it.
                total = store.count(where)
        included = _includes(ctx.params, store, query, matches) if query.includes and matches else []
        if included and not req.access.internal:  # included resources are read: only those the access may read
            readable = authorization.filter_keys(engine, repo, req.access, "r", [(r.res_type, r.res_id) for r in included])
            included = [r for r in included if (r.res_type, r.res_id) in readable]
        auditing.note_rows(engine, repo, [*matches, *included])  # whose records the answer holds
    if query.total == "none":
        total = None
    base = f"{req.base_url}/{path}" if path else (req.base_url if system else f"{req.base_url}/{types[0]}")
    return FhirResponse(200, _bundle(engine, req, query, base, system, matches, included, more, cursor, total))


def _where(store: SearchStore, compiler: Compiler, query: SearchQuery, types: tuple[str, ...]) -> tuple[list[Any], list[Any]]:
    where = store.base_conditions(types)
    confirmations = []
    if len(types) == 1:
        compiled = compiler.compile(query.criteria, types[0])
        where.extend(compiled.conditions)
        confirmations.extend(compiled.confirmations)
    elif any(query.by_type.values()):
        per_type = []
        for t in types:
            compiled = compiler.compile(query.by_type[t], t)
            per_type.append(and_(R.c.res_type == t, *compiled.conditions))
            confirmations.extend(compiled.confirmations)
        where.append(or_(*per_type))
    return where, confirmations


def _materialize(engine: Engine, store: SearchStore, rtype: str, conditions: list[Any], confirmations: list[Any]) -> list[str]:
    """Ids of ``rtype`` resources matching ``conditions`` that pass the confirmations (bounded)."""
    limit = engine.settings.max_sort_matches
    rows = store.fetch([*store.base_conditions((rtype,)), *conditions], [], None, limit + 1)
    if len(rows) > limit:
        raise BadRequest(
            f"A criterion inside a chain needs more than {limit} decryptions to confirm; use a shorter or more selective value",
            code="too-costly",
        )
    return [r.res_id for r in rows if _accept(r, confirmations)]


def _sort_column(params: ParameterSource, key: SortKey, types: tuple[str, ...]) -> SortColumn:
    p = key.param
    if p.special == "_id":
        return SortColumn(R.c.res_id, key.descending, "str")
    if p.special == "_lastUpdated":
        return SortColumn(R.c.last_updated, key.descending, "int")
    # A union parameter (combo-value-quantity) sorts by its parts' rows: it has none of its own
    keys = [k.key for t in types if (q := params.get(t, p.code)) is not None for k in (q.union_of or (q,))]
    table = {"date": schema.idx_date, "number": schema.idx_number, "quantity": schema.idx_quantity, "reference": schema.idx_reference}[p.type]
    owner = [table.c.tenant_id == R.c.tenant_id, table.c.res_type == R.c.res_type, table.c.res_id == R.c.res_id, table.c.param_key.in_(keys)]
    if p.type == "reference":
        value = func.coalesce(table.c.target_type + "/" + table.c.target_id, table.c.url)
        agg = func.max(value) if key.descending else func.min(value)
        return SortColumn(select(agg).where(*owner).scalar_subquery(), key.descending, "str")
    if p.type == "quantity":
        owner.append(table.c.canonical.is_(False))
    agg = func.max(table.c.high) if key.descending else func.min(table.c.low)
    return SortColumn(select(agg).where(*owner).scalar_subquery(), key.descending, "int" if p.type == "date" else "float")


def _accept(row: Row, confirmations: list[Any]) -> bool:
    if not confirmations:
        return True
    resource = json.loads(row.body)
    return all(check(resource) for check in confirmations)


def _sql_page(store: SearchStore, where: list[Any], confirmations: list[Any], sort: list[SortColumn], query: SearchQuery,
              cursor: SearchCursor | None) -> tuple[list[Row], bool]:
    backwards = cursor is not None and cursor.direction == "prev"
    want = query.count + 1
    after = cursor.key if cursor else None
    batch = want if not confirmations else max(want * 4, 100)
    accepted: list[Row] = []
    scanned = 0
    while len(accepted) < want:
        rows = store.fetch(where, sort, after, batch, backwards=backwards)
        for row in rows:
            if _accept(row, confirmations):
                accepted.append(row)
                if len(accepted) == want:
                    break
        scanned += len(rows)
        if len(rows) < batch:
            break
        if scanned > 100_000:
            raise BadRequest(
                "This search needs more than 100,000 candidates confirmed after decryption for one page; narrow it",
                code="too-costly",
            )
        last = rows[-1]
        after = (*last.keys, last.res_type, last.res_id)
    more = len(accepted) > query.count
    page = accepted[: query.count]
    if backwards:
        page.reverse()
    return page, more


def _memory_page(engine: Engine, store: SearchStore, where: list[Any], confirmations: list[Any], query: SearchQuery,
                 cursor: SearchCursor | None) -> tuple[list[Row], bool, int]:
    """Sort after decryption (string, token and uri keys cannot be sorted over blind indexes); bounded."""
    limit = engine.settings.max_sort_matches
    rows = store.fetch(where, [], None, limit + 1)
    if len(rows) > limit:
        raise BadRequest(
            f"Sorting by {', '.join(k.param.code for k in query.sort)} happens after decryption and is limited to "
            f"{limit} matches; narrow the search",
            code="too-costly",
        )
    positioned: list[tuple[tuple[Any, ...], Row]] = []
    for row in rows:
        resource = json.loads(row.body)
        if confirmations and not all(check(resource) for check in confirmations):
            continue
        positioned.append(((*_memory_key(query.sort, resource), row.res_type, row.res_id), row))
    order = cmp_to_key(lambda a, b: _compare(a[0], b[0], query.sort))  # type: ignore[index]
    positioned.sort(key=order)
    n = len(positioned)
    if cursor is None:
        start, stop = 0, min(query.count, n)
    else:
        anchor = tuple(cursor.key)
        first_after = next((i for i, (pos, _) in enumerate(positioned) if _compare(pos, anchor, query.sort) > 0), n)
        first_at_or_after = next((i for i, (pos, _) in enumerate(positioned) if _compare(pos, anchor, query.sort) >= 0), n)
        if cursor.direction == "next":
            start, stop = first_after, min(first_after + query.count, n)
        else:
            start, stop = max(0, first_at_or_after - query.count), first_at_or_after
    backwards = cursor is not None and cursor.direction == "prev"
    more = start > 0 if backwards else stop < n
    page = [Row(r.res_type, r.res_id, r.version, r.last_updated, pos[:-2], r.body) for pos, r in positioned[start:stop]]
    return page, more, n


def _compare(a: tuple[Any, ...], b: tuple[Any, ...], sort: tuple[SortKey, ...]) -> int:
    """Order of two positions (sort values..., type, id): missing values last in either direction."""
    for i, key in enumerate(sort):
        x, y = a[i], b[i]
        if x == y:
            continue
        if x is None:
            return 1
        if y is None:
            return -1
        c = int(x > y) - int(x < y)
        return -c if key.descending else c
    tail_a, tail_b = a[len(sort):], b[len(sort):]
    return int(tail_a > tail_b) - int(tail_a < tail_b)


def _memory_key(sort: tuple[SortKey, ...], resource: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for key in sort:
        p = key.param
        values: list[str] = []
        if p.special == "_id":
            values = [resource.get("id", "")]
        elif p.special == "_lastUpdated":
            values = [resource.get("meta", {}).get("lastUpdated", "")]
        else:
            for path in p.paths:
                for t in path.evaluate(resource):
                    values.extend(_sortable_strings(t.value))
        out.append((max(values) if key.descending else min(values)) if values else None)
    return out


def _sortable_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [normalize(value)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, dict):
        if "family" in value or "given" in value:
            return [normalize(" ".join([value.get("family", ""), *value.get("given", [])]).strip())]
        codings = value.get("coding")
        if isinstance(codings, list):
            return [str(c.get("code", "")) for c in codings if isinstance(c, dict)]
        for k in ("code", "value", "text", "display", "reference"):
            if isinstance(value.get(k), str):
                return [normalize(value[k])]
    return []


def _total(store: SearchStore, where: list[Any], confirmations: list[Any], engine: Engine) -> int:
    if not confirmations:
        return store.count(where)
    limit = engine.settings.max_sort_matches
    rows = store.fetch(where, [], None, limit + 1)
    if len(rows) > limit:
        raise BadRequest(f"Counting this search needs more than {limit} decryptions; narrow the search", code="too-costly")
    return sum(1 for r in rows if _accept(r, confirmations))


def _includes(params: ParameterSource, store: SearchStore, query: SearchQuery, matches: list[Row]) -> list[Row]:
    seen = {(r.res_type, r.res_id) for r in matches}
    included: list[Row] = []
    frontier = list(matches)
    for round_ in range(INCLUDE_ROUNDS):
        new_keys: list[tuple[str, str]] = []
        for inc in query.includes:
            if round_ > 0 and not inc.iterate:
                continue
            new_keys.extend(_include_keys(params, store, inc, frontier))
        fresh = []
        for k in new_keys:
            if k not in seen:
                seen.add(k)
                fresh.append(k)
        if not fresh:
            break
        room = MAX_INCLUDED - len(included)
        rows = store.read_many(fresh[:room])
        included.extend(rows)
        frontier = rows
        if len(included) >= MAX_INCLUDED or not any(i.iterate for i in query.includes):
            break
    return included


def _include_keys(params: ParameterSource, store: SearchStore, inc: Include, frontier: list[Row]) -> list[tuple[str, str]]:
    if inc.reverse:
        targets = [(r.res_type, r.res_id) for r in frontier]
        if inc.target_type:
            targets = [t for t in targets if t[0] == inc.target_type]
        # _revinclude=* (param None): whatever references the matches, by any parameter.
        keys = None if inc.param is None else [inc.param.key]
        return store.references_to(targets, keys) if targets else []
    sources = [(r.res_type, r.res_id) for r in frontier if r.res_type == inc.source_type]
    if inc.param is None:
        keys = [p.key for p in params.for_type(inc.source_type).values() if p.type == "reference" and p.supported]
    else:
        keys = [inc.param.key]
    return store.references_from(sources, keys, inc.target_type) if sources and keys else []


def _bundle(engine: Engine, req: FhirRequest, query: SearchQuery, base: str, system: bool, matches: list[Row],
            included: list[Row], more: bool, cursor: SearchCursor | None, total: int | None) -> dict[str, Any]:
    params = list(query.self_params)
    if system and not any(k == "_type" for k, _ in params) and req.param("_type"):
        params.insert(0, ("_type", req.param("_type") or ""))
    links = [{"relation": "self", "url": _with_cursor(base, params, query.cursor) if query.cursor else page_url(base, params)}]
    backwards = cursor is not None and cursor.direction == "prev"
    has_next = more if not backwards else True
    has_prev = (cursor is not None and not backwards) or (backwards and more)
    carried = total if query.total != "accurate" else None
    if matches and has_next:
        last = matches[-1]
        token = SearchCursor("next", (*last.keys, last.res_type, last.res_id), carried).encode()
        links.append({"relation": "next", "url": _with_cursor(base, params, token)})
    if matches and has_prev:
        first = matches[0]
        token = SearchCursor("prev", (*first.keys, first.res_type, first.res_id), carried).encode()
        links.append({"relation": "previous", "url": _with_cursor(base, params, token)})
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": instant(now_us())},
        "type": "searchset",
    }
    if total is not None:
        bundle["total"] = total
    bundle["link"] = links
    entries = [_entry(engine, req, r, query, "match") for r in matches]
    entries.extend(_entry(engine, req, r, query, "include") for r in included)
    if query.ignored:
        outcome = operation_outcome([
            Issue(f"Ignored {text}", code="not-supported", severity="warning") for text in query.ignored
        ])
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    if entries:
        bundle["entry"] = entries
    return bundle


def _with_cursor(base: str, params: list[tuple[str, str]], token: str) -> str:
    query = [(k, v) for k, v in params if k != CURSOR_PARAM]
    return f"{base}?{urlencode([*query, (CURSOR_PARAM, token)])}"


def _entry(engine: Engine, req: FhirRequest, row: Row, query: SearchQuery, mode: str) -> dict[str, Any]:
    resource: Any = RawJson(row.body)
    if query.summary not in (None, "false") or query.elements is not None:
        resource = subset(engine.registry, fhirjson.loads_stored(row.body), summary=query.summary, elements=query.elements)
    return {"fullUrl": f"{req.base_url}/{row.res_type}/{row.res_id}", "resource": resource, "search": {"mode": mode}}


def matching_ids(engine: Engine, repo: Any, rtype: str, query: str, *, limit: int = 2,
                 constraint: Clause | None = None, access: AccessContext | None = None) -> list[str]:
    """Ids of ``rtype`` resources matching a search query string, inside an open unit of work.

    For conditional interactions (If-None-Exist, conditional update, delete and patch, and conditional
    references): unknown parameters are errors here, since ignoring one would match too much.
    ``constraint`` (what the caller's access allows) is AND-ed in.
    """
    pairs = _criteria_pairs(rtype, query)
    return ids_matching(engine, repo, rtype, pairs, () if constraint is None else (constraint,), limit=limit, access=access)


def matching_ids_many(engine: Engine, repo: Any, wanted: list[tuple[str, str, Clause | None, int]], *,
                      access: AccessContext | None = None) -> list[list[str] | None]:
    """``matching_ids`` for many criteria (type, query string, constraint, limit) at once: those that the index
    alone decides in ONE statement (a transaction's conditional entries, which would be a round trip each).

    None for criteria it leaves to ``matching_ids``: those in error (which ``matching_ids`` reports, so that the
    entry they belong to is named in its turn) and those needing a look at the bodies.
    """
    store = SearchStore(repo)
    out: list[list[str] | None] = [None] * len(wanted)
    decided: list[tuple[int, list[Any], int]] = []
    for n, (rtype, query, constraint, limit) in enumerate(wanted):
        try:
            pairs = _criteria_pairs(rtype, query)
            where, confirmations, _ = _compiled(engine, repo, store, rtype, pairs,
                                                () if constraint is None else (constraint,), access)
        except FhirError:
            continue
        if not confirmations:
            decided.append((n, where, limit))
    for start in range(0, len(decided), IDS_PER_STATEMENT):
        chunk = decided[start:start + IDS_PER_STATEMENT]
        for (n, _, _), ids in zip(chunk, store.ids_many([(where, limit) for _, where, limit in chunk])):
            out[n] = ids
    return out


IDS_PER_STATEMENT = 100  # SQLite allows 500 members in a compound SELECT


def _criteria_pairs(rtype: str, query: str) -> list[tuple[str, str]]:
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs:
        raise BadRequest(f"A conditional {rtype} needs search criteria", expression="query")
    if any(k in ("_count", "_sort", "_include", "_revinclude", "_summary", "_elements", "_total") for k, _ in pairs):
        raise BadRequest("A conditional interaction takes search criteria only (no result parameters)", expression="query")
    return pairs


def _compiled(engine: Engine, repo: Any, store: SearchStore, rtype: str, pairs: list[tuple[str, str]],
              clauses: tuple[Clause, ...], access: AccessContext | None) -> tuple[list[Any], list[Any], SearchQuery]:
    """Criteria as SQL conditions, with what the index cannot decide (confirmations on the bodies)."""
    ctx = engine.contexts.for_repo(repo)
    parsed = ctx.parser.parse((rtype,), pairs, strict=True, extra={rtype: clauses} if clauses else None)
    if access is not None:
        parsed = authorization.guard_query(engine, ctx, access, parsed)
    compiler = Compiler(repo.sealer.keys, ctx.extractor, "", materialize=lambda t, c, k: _materialize(engine, store, t, c, k),
                        fetch_ids=store.ids_if_few)
    where, confirmations = _where(store, compiler, parsed, (rtype,))
    return where, confirmations, parsed


def ids_matching(engine: Engine, repo: Any, rtype: str, pairs: list[tuple[str, str]], clauses: tuple[Clause, ...], *,
                 limit: int, access: AccessContext | None = None) -> list[str]:
    """Ids of ``rtype`` resources matching criteria ``pairs`` and ``clauses``, inside an open unit of work
    (chains and ``_has`` held to ``access``, when given)."""
    store = SearchStore(repo)
    where, confirmations, parsed = _compiled(engine, repo, store, rtype, pairs, clauses, access)
    if not confirmations:  # the index alone decides: ids, without reading (and decrypting) the bodies
        return store.ids(where, limit)
    page, _ = _sql_page(store, where, confirmations, [], dataclasses.replace(parsed, count=limit), None)
    return [r.res_id for r in page]
