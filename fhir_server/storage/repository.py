"""Versioned reads and writes of resources for one tenant, inside one transaction.

Writes take the current row's lock (``SELECT ... FOR UPDATE`` on PostgreSQL; the
whole database on SQLite, whose write transactions begin IMMEDIATE), so version
numbers are gapless and an If-Match check cannot race. Bodies are sealed before
they reach the database and opened after they leave it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, and_, bindparam, exists, insert, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from fhir_server.clock import now_us
from fhir_server.search.extract import IndexEntries
from fhir_server.security.crypto import Sealer
from fhir_server.storage import indexing, schema
from fhir_server.storage.tenants import Tenant

R = schema.resources
V = schema.resource_versions


class VersionConflict(Exception):
    """If-Match named a version that is not the current one (``current`` is None when nothing exists)."""

    def __init__(self, current: int | None) -> None:
        super().__init__(current)
        self.current = current


class AlreadyExists(Exception):
    pass


@dataclass(frozen=True, slots=True)
class VersionRecord:
    res_type: str
    res_id: str
    version: int
    last_updated: int
    deleted: bool
    method: str
    body: bytes | None  # the resource JSON (opened); None for a deletion


@dataclass(frozen=True, slots=True)
class WriteResult:
    record: VersionRecord
    created: bool  # the resource did not exist (or was deleted) before this write


@dataclass(frozen=True, slots=True)
class CurrentState:
    version: int
    last_updated: int
    deleted: bool
    index_mask: int = 0


# Position of a history entry in its descending order: (last_updated, type, id, version).
HistoryKey = tuple[int, str, str, int]


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    res_type: str | None = None
    res_id: str | None = None
    since: int | None = None  # versions written at or after this instant
    at: tuple[int, int] | None = None  # versions current at some moment of [low, high]
    until: int | None = None  # snapshot bound: versions written at or before this instant
    after: HistoryKey | None = None  # the page after this entry (descending order)
    before: HistoryKey | None = None  # the page before this entry
    limit: int = 20


BodyBuilder = Callable[[int, int], bytes]  # (version, last_updated) -> resource JSON

# The hot statements, built once (bound parameters; SQLAlchemy caches their compiled form).
_OWNER = and_(R.c.tenant_id == bindparam("tid"), R.c.res_type == bindparam("rt"), R.c.res_id == bindparam("rid"))
_CURRENT = select(R.c.version, R.c.last_updated, R.c.deleted, R.c.index_mask).where(_OWNER)
_CURRENT_FOR_UPDATE = _CURRENT.with_for_update()
_READ = (
    select(V.c.version, V.c.last_updated, V.c.deleted, V.c.method, V.c.key_version, V.c.body)
    .select_from(R.join(V, and_(
        V.c.tenant_id == R.c.tenant_id, V.c.res_type == R.c.res_type, V.c.res_id == R.c.res_id, V.c.version == R.c.version
    )))
    .where(_OWNER)
)
_VREAD = select(V.c.version, V.c.last_updated, V.c.deleted, V.c.method, V.c.key_version, V.c.body).where(
    V.c.tenant_id == bindparam("tid"), V.c.res_type == bindparam("rt"), V.c.res_id == bindparam("rid"),
    V.c.version == bindparam("v"),
)
_UPDATE_CURRENT = (
    update(R)
    .where(_OWNER)
    .values(version=bindparam("v"), last_updated=bindparam("lu"), deleted=bindparam("del"), index_mask=bindparam("mask"))
)
_INSERT_VERSION = insert(V)


class ResourceRepository:
    """Every FHIR interaction's storage step, for the tenant this transaction is bound to."""

    def __init__(self, conn: Connection, tenant: Tenant, sealer: Sealer) -> None:
        self.conn = conn
        self.tenant = tenant
        self.sealer = sealer
        self._tid = tenant.id
        self._postgres = conn.dialect.name == "postgresql"

    # --- reads -------------------------------------------------------------------------

    def current_state(self, res_type: str, res_id: str, *, lock: bool = False) -> CurrentState | None:
        stmt = _CURRENT_FOR_UPDATE if lock else _CURRENT
        row = self.conn.execute(stmt, {"tid": self._tid, "rt": res_type, "rid": res_id}).first()
        return None if row is None else CurrentState(row.version, row.last_updated, row.deleted, row.index_mask)

    def read(self, res_type: str, res_id: str) -> VersionRecord | None:
        """The current version (a deletion record if deleted), or None if it never existed."""
        row = self.conn.execute(_READ, {"tid": self._tid, "rt": res_type, "rid": res_id}).first()
        return None if row is None else self._record(res_type, res_id, row)

    def current_of_type(self, res_type: str, *, after: str | None, limit: int) -> list[tuple[VersionRecord, int]]:
        """Current, undeleted resources of a type in id order after ``after``, with their index masks."""
        stmt = (
            select(R.c.res_id, R.c.index_mask, V.c.version, V.c.last_updated, V.c.deleted, V.c.method, V.c.key_version, V.c.body)
            .select_from(R.join(V, and_(
                V.c.tenant_id == R.c.tenant_id, V.c.res_type == R.c.res_type, V.c.res_id == R.c.res_id, V.c.version == R.c.version
            )))
            .where(R.c.tenant_id == self._tid, R.c.res_type == res_type, R.c.deleted.is_(False))
            .order_by(R.c.res_id)
            .limit(limit)
        )
        if after is not None:
            stmt = stmt.where(R.c.res_id > after)
        return [(self._record(res_type, r.res_id, r), r.index_mask) for r in self.conn.execute(stmt)]

    def reindex(self, res_type: str, res_id: str, index: IndexEntries, old_mask: int) -> None:
        """Replace a resource's index rows (its version and body are unchanged)."""
        indexing.write(self.conn, self.sealer.keys, res_type, res_id, index, old_mask=old_mask)
        self.conn.execute(
            update(R).where(R.c.tenant_id == self._tid, R.c.res_type == res_type, R.c.res_id == res_id)
            .values(index_mask=index.mask())
        )

    def vread(self, res_type: str, res_id: str, version: int) -> VersionRecord | None:
        row = self.conn.execute(_VREAD, {"tid": self._tid, "rt": res_type, "rid": res_id, "v": version}).first()
        return None if row is None else self._record(res_type, res_id, row)

    def _record(self, res_type: str, res_id: str, row: object) -> VersionRecord:
        body = None
        if not row.deleted and row.body is not None:  # type: ignore[attr-defined]
            body = self.sealer.open_resource(
                res_type, res_id, row.version, row.key_version, row.body  # type: ignore[attr-defined]
            )
        return VersionRecord(
            res_type,
            res_id,
            row.version,  # type: ignore[attr-defined]
            row.last_updated,  # type: ignore[attr-defined]
            row.deleted,  # type: ignore[attr-defined]
            row.method,  # type: ignore[attr-defined]
            body,
        )

    # --- writes ------------------------------------------------------------------------

    def write(
        self,
        res_type: str,
        res_id: str,
        build: BodyBuilder,
        *,
        method: str,
        index: IndexEntries | None = None,
        if_match: int | None = None,
        create_only: bool = False,
    ) -> WriteResult:
        """Store a new version of a resource (creating it if needed), with its index rows, and return it."""
        mask = index.mask() if index is not None else 0
        for _ in range(5):
            state = None if create_only else self.current_state(res_type, res_id, lock=True)
            now = now_us()
            if state is None:
                if if_match is not None:
                    raise VersionConflict(None)
                if not self._insert_current(res_type, res_id, now, mask):
                    if create_only:
                        raise AlreadyExists(res_id)
                    continue  # a concurrent writer created it first: lock its row and update
                version, last_updated, created = 1, now, True
            else:
                if if_match is not None and state.version != if_match:
                    raise VersionConflict(state.version)
                version = state.version + 1
                last_updated = max(now, state.last_updated + 1)  # never earlier than the version before
                self.conn.execute(
                    _UPDATE_CURRENT,
                    {"tid": self._tid, "rt": res_type, "rid": res_id, "v": version, "lu": last_updated, "del": False, "mask": mask},
                )
                created = state.deleted
            body = build(version, last_updated)
            self._insert_version(res_type, res_id, version, last_updated, method, body)
            if index is not None:
                indexing.write(self.conn, self.sealer.keys, res_type, res_id, index, old_mask=state.index_mask if state else 0)
            elif state is not None:
                indexing.remove(self.conn, self._tid, res_type, res_id, state.index_mask)
            record = VersionRecord(res_type, res_id, version, last_updated, False, method, body)
            return WriteResult(record, created)
        raise RuntimeError("could not obtain the resource row after repeated concurrent creation")

    def delete(self, res_type: str, res_id: str, *, if_match: int | None = None) -> VersionRecord | None:
        """Delete the resource; None when there was nothing to delete (already deleted or never existed)."""
        state = self.current_state(res_type, res_id, lock=True)
        if state is None or state.deleted:
            if if_match is not None and (state is None or state.version != if_match):
                raise VersionConflict(state.version if state else None)
            return None
        if if_match is not None and state.version != if_match:
            raise VersionConflict(state.version)
        version = state.version + 1
        last_updated = max(now_us(), state.last_updated + 1)
        self.conn.execute(
            _UPDATE_CURRENT,
            {"tid": self._tid, "rt": res_type, "rid": res_id, "v": version, "lu": last_updated, "del": True, "mask": 0},
        )
        self._insert_version(res_type, res_id, version, last_updated, "DELETE", None)
        indexing.remove(self.conn, self._tid, res_type, res_id, state.index_mask)
        return VersionRecord(res_type, res_id, version, last_updated, True, "DELETE", None)

    def _insert_current(self, res_type: str, res_id: str, now: int, mask: int) -> bool:
        values = dict(
            tenant_id=self._tid, res_type=res_type, res_id=res_id, version=1, last_updated=now, deleted=False, index_mask=mask
        )
        dialect_insert = postgresql.insert if self._postgres else sqlite.insert
        stmt = dialect_insert(R).values(**values).on_conflict_do_nothing().returning(R.c.version)
        return self.conn.execute(stmt).first() is not None

    def _insert_version(
        self, res_type: str, res_id: str, version: int, last_updated: int, method: str, body: bytes | None
    ) -> None:
        if body is None:
            key_version, sealed = self.sealer.keys.write_version, None
        else:
            key_version, sealed = self.sealer.seal_resource(res_type, res_id, version, body)
        self.conn.execute(
            _INSERT_VERSION,
            {
                "tenant_id": self._tid,
                "res_type": res_type,
                "res_id": res_id,
                "version": version,
                "last_updated": last_updated,
                "method": method,
                "deleted": body is None,
                "key_version": key_version,
                "body": sealed,
            },
        )

    # --- history -----------------------------------------------------------------------

    def history(self, q: HistoryQuery) -> tuple[list[VersionRecord], bool]:
        """Versions matching ``q``, newest first, and whether more lie beyond the page in its direction."""
        cols = [V.c.res_type, V.c.res_id, V.c.version, V.c.last_updated, V.c.deleted, V.c.method, V.c.key_version, V.c.body]
        stmt = select(*cols).where(V.c.tenant_id == self._tid)
        if q.res_type is not None:
            stmt = stmt.where(V.c.res_type == q.res_type)
        if q.res_id is not None:
            stmt = stmt.where(V.c.res_id == q.res_id)
        if q.since is not None:
            stmt = stmt.where(V.c.last_updated >= q.since)
        if q.until is not None:
            stmt = stmt.where(V.c.last_updated <= q.until)
        if q.at is not None:
            low, high = q.at
            later = V.alias("later")
            superseded_before_low = exists().where(
                later.c.tenant_id == V.c.tenant_id,
                later.c.res_type == V.c.res_type,
                later.c.res_id == V.c.res_id,
                later.c.version > V.c.version,
                later.c.last_updated <= low,
            )
            stmt = stmt.where(V.c.last_updated <= high, ~superseded_before_low)
        key = tuple_(V.c.last_updated, V.c.res_type, V.c.res_id, V.c.version)
        if q.before is not None:
            stmt = stmt.where(key > tuple_(*q.before)).order_by(
                V.c.last_updated.asc(), V.c.res_type.asc(), V.c.res_id.asc(), V.c.version.asc()
            )
        else:
            if q.after is not None:
                stmt = stmt.where(key < tuple_(*q.after))
            stmt = stmt.order_by(V.c.last_updated.desc(), V.c.res_type.desc(), V.c.res_id.desc(), V.c.version.desc())
        rows = self.conn.execute(stmt.limit(q.limit + 1)).all()
        more = len(rows) > q.limit
        records = [self._record(r.res_type, r.res_id, r) for r in rows[: q.limit]]
        if q.before is not None:
            records.reverse()
        return records, more
