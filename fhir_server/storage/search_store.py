"""Running compiled searches: matching rows with their bodies, counts, and reference lookups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, func, literal, or_, select, text, tuple_, union_all

from fhir_server.storage import schema
from fhir_server.storage.repository import ResourceRepository

R = schema.resources
V = schema.resource_versions
REF = schema.idx_reference

# The setting as it was, then forced for the rest of the transaction (a target list is evaluated in order)
_FORCE_GENERIC = text("SELECT current_setting('plan_cache_mode'), set_config('plan_cache_mode', 'force_generic_plan', true)")
_PLAN_CACHE_MODE = text("SELECT set_config('plan_cache_mode', :mode, true)")
ASC_SENTINEL = {"int": 2**62, "float": 1e300, "str": "\U0010ffff"}
DESC_SENTINEL = {"int": -(2**62), "float": -1e300, "str": ""}


@dataclass(frozen=True, slots=True)
class SortColumn:
    """An SQL sort key: an expression, its direction, and the kind of its values (for sentinels)."""

    expr: Any
    descending: bool
    kind: str  # int | float | str

    def keyed(self) -> Any:
        sentinel = (DESC_SENTINEL if self.descending else ASC_SENTINEL)[self.kind]
        return func.coalesce(self.expr, sentinel)


@dataclass(frozen=True, slots=True)
class Row:
    res_type: str
    res_id: str
    version: int
    last_updated: int
    keys: tuple[Any, ...]  # sort key values, as the keyset compares them
    body: bytes


class SearchStore:
    def __init__(self, repo: ResourceRepository) -> None:
        self.repo = repo
        self.conn = repo.conn
        self.tid = repo.tenant.id

    def base_conditions(self, types: tuple[str, ...]) -> list[ColumnElement[bool]]:
        conds: list[ColumnElement[bool]] = [R.c.tenant_id == self.tid, R.c.deleted.is_(False)]
        conds.append(R.c.res_type == types[0] if len(types) == 1 else R.c.res_type.in_(types))
        return conds

    def fetch(
        self,
        where: list[ColumnElement[bool]],
        sort: list[SortColumn],
        after: tuple[Any, ...] | None,
        limit: int,
        *,
        backwards: bool = False,
    ) -> list[Row]:
        keyed = [s.keyed() for s in sort]
        directions = [s.descending != backwards for s in sort] + [backwards, backwards]
        columns = [*keyed, R.c.res_type, R.c.res_id]
        # The page is chosen on `resources` and the index tables alone; only its rows then fetch their
        # bodies from `resource_versions` (joining the versions first makes PostgreSQL read every match).
        page = select(
            R.c.tenant_id, R.c.res_type, R.c.res_id, R.c.version, R.c.last_updated,
            *[k.label(f"k{i}") for i, k in enumerate(keyed)],
        ).where(*where)
        if after is not None:
            page = page.where(_keyset_after(columns, directions, after))
        page = page.order_by(*[c.desc() if d else c.asc() for c, d in zip(columns, directions)]).limit(limit)
        p = page.subquery("page")
        page_keys = [p.c[f"k{i}"] for i in range(len(keyed))]
        page_order = [*page_keys, p.c.res_type, p.c.res_id]
        stmt = (
            select(p.c.res_type, p.c.res_id, p.c.version, p.c.last_updated, *page_keys, V.c.key_version, V.c.body)
            .select_from(p.join(V, and_(
                V.c.tenant_id == p.c.tenant_id, V.c.res_type == p.c.res_type,
                V.c.res_id == p.c.res_id, V.c.version == p.c.version,
            )))
            .order_by(*[c.desc() if d else c.asc() for c, d in zip(page_order, directions)])
        )
        rows = []
        n = len(keyed)
        for r in self.conn.execute(stmt):
            body = self.repo.sealer.open_resource(r.res_type, r.res_id, r.version, r.key_version, r.body)
            rows.append(Row(r.res_type, r.res_id, r.version, r.last_updated, tuple(r[4 : 4 + n]), body))
        return rows

    def ids(self, where: list[ColumnElement[bool]], limit: int) -> list[str]:
        """The first ``limit`` ids matching ``where`` (in the order ``fetch`` pages them), from the index alone."""
        stmt = select(R.c.res_id).where(*where).order_by(R.c.res_type, R.c.res_id).limit(limit)
        return [r[0] for r in self.conn.execute(stmt)]

    def ids_many(self, queries: list[tuple[list[ColumnElement[bool]], int]]) -> list[list[str]]:
        """``ids`` of each (where, limit), in one statement (a UNION ALL of the queries)."""
        if len(queries) <= 1:
            return [self.ids(where, limit) for where, limit in queries]
        members = []
        for n, (where, limit) in enumerate(queries):
            q = select(R.c.res_type, R.c.res_id).where(*where).order_by(R.c.res_type, R.c.res_id).limit(limit).subquery(f"q{n}")
            members.append(select(literal(n).label("q"), q.c.res_type, q.c.res_id))
        found: list[list[tuple[str, str]]] = [[] for _ in queries]
        for r in self._generic(union_all(*members)):
            found[r.q].append((r.res_type, r.res_id))
        return [[rid for _, rid in sorted(keys)] for keys in found]

    def _generic(self, stmt: Any) -> list[Any]:
        """Rows of a statement run with its cached generic plan, in a PostgreSQL transaction (the setting is put
        back as it was for the rest of it).

        A UNION ALL of a transaction's conditional criteria costs PostgreSQL far more to plan than to run (14
        criteria: about 3 ms against 0.2 ms), and with its custom plans it is planned again every time. Its
        generic plan, made once per connection, prunes the tenant's partitions when it starts.

        Put back only when the statement succeeded: a failure aborts the transaction, which takes the local
        setting with it, and a statement sent after it would hide the failure (a deadlock, which answers 409)
        behind "current transaction is aborted".
        """
        if self.conn.dialect.name != "postgresql" or self.conn.info.get("fhir_autocommit"):
            return list(self.conn.execute(stmt))  # (a read outside a transaction: a local setting would not hold)
        before = self.conn.execute(_FORCE_GENERIC).scalar_one()  # (the first column)
        rows = list(self.conn.execute(stmt))
        self.conn.execute(_PLAN_CACHE_MODE, {"mode": before})
        return rows

    def ids_if_few(self, ids: Any, limit: int) -> list[str] | None:
        """The ids a subquery selects, if there are at most ``limit`` of them (else None)."""
        found = [r[0] for r in self.conn.execute(select(ids.subquery().c[0]).distinct().limit(limit + 1))]
        return found if len(found) <= limit else None

    def count(self, where: list[ColumnElement[bool]]) -> int:
        return int(self.conn.execute(select(func.count()).select_from(R).where(*where)).scalar_one())

    def read_many(self, keys: list[tuple[str, str]]) -> list[Row]:
        """Current, undeleted versions of the given (type, id) pairs."""
        out: list[Row] = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            stmt = (
                select(R.c.res_type, R.c.res_id, R.c.version, R.c.last_updated, V.c.key_version, V.c.body)
                .select_from(R.join(V, and_(
                    V.c.tenant_id == R.c.tenant_id, V.c.res_type == R.c.res_type,
                    V.c.res_id == R.c.res_id, V.c.version == R.c.version,
                )))
                .where(R.c.tenant_id == self.tid, R.c.deleted.is_(False), tuple_(R.c.res_type, R.c.res_id).in_(chunk))
            )
            for r in self.conn.execute(stmt):
                body = self.repo.sealer.open_resource(r.res_type, r.res_id, r.version, r.key_version, r.body)
                out.append(Row(r.res_type, r.res_id, r.version, r.last_updated, (), body))
        return out

    def references_from(self, sources: list[tuple[str, str]], param_keys: list[int], target_type: str | None) -> list[tuple[str, str]]:
        """(type, id) targets of the given reference parameters of the given resources."""
        out: list[tuple[str, str]] = []
        for i in range(0, len(sources), 500):
            stmt = select(REF.c.target_type, REF.c.target_id).where(
                REF.c.tenant_id == self.tid,
                tuple_(REF.c.res_type, REF.c.res_id).in_(sources[i : i + 500]),
                REF.c.param_key.in_(param_keys),
                REF.c.target_id.is_not(None),
            )
            if target_type:
                stmt = stmt.where(REF.c.target_type == target_type)
            out.extend((r.target_type, r.target_id) for r in self.conn.execute(stmt.distinct()))
        return out

    def references_to(self, targets: list[tuple[str, str]], param_keys: list[int] | None) -> list[tuple[str, str]]:
        """(type, id) of resources whose given reference parameters (any, for None) point at the targets."""
        out: list[tuple[str, str]] = []
        for i in range(0, len(targets), 500):
            stmt = select(REF.c.res_type, REF.c.res_id).where(
                REF.c.tenant_id == self.tid,
                tuple_(REF.c.target_type, REF.c.target_id).in_(targets[i : i + 500]),
            ).distinct()
            if param_keys is not None:
                stmt = stmt.where(REF.c.param_key.in_(param_keys))
            out.extend((r.res_type, r.res_id) for r in self.conn.execute(stmt))
        return out


def _keyset_after(columns: list[Any], descending: list[bool], values: tuple[Any, ...]) -> ColumnElement[bool]:
    """Rows strictly after ``values`` in the order (columns, directions): an expanded row comparison."""
    ors = []
    for i, (col, desc) in enumerate(zip(columns, descending)):
        equal_prefix = [columns[j] == values[j] for j in range(i)]
        step = col < values[i] if desc else col > values[i]
        ors.append(and_(*equal_prefix, step))
    return or_(*ors)
