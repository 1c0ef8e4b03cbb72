"""Versioned reads and writes of resources for one tenant, inside one transaction.

Writes take the current row's lock (``SELECT ... FOR UPDATE`` on PostgreSQL; the
whole database on SQLite, whose write transactions begin IMMEDIATE), so version
numbers are gapless and an If-Match check cannot race. Bodies are sealed before
they reach the database and opened after they leave it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, exists, insert, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from fhir_server.clock import now_us
from fhir_server.search.extract import IndexEntries
from fhir_server.security.crypto import Sealer
from fhir_server.storage import indexing, schema
from fhir_server.storage.tenants import Tenant

R = schema.resources
V = schema.resource_versions


class VersionConflict(Exception):
    """If-Match named a version that is not the current one (``current`` is None when nothing exists).

    ``item``: in a ``write_many``, the position of the item that failed.
    """

    def __init__(self, current: int | None, item: int | None = None) -> None:
        super().__init__(current)
        self.current = current
        self.item = item


class AlreadyExists(Exception):
    def __init__(self, res_id: str, item: int | None = None) -> None:
        super().__init__(res_id)
        self.item = item


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
    changed: bool = True  # False: an update with the current version's content, which wrote nothing


@dataclass(frozen=True, slots=True)
class CurrentState:
    version: int
    last_updated: int
    deleted: bool
    index_mask: int = 0
    digest: bytes | None = None  # of the current content (``content_digest``); None when not known


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
    exclude_types: tuple[str, ...] = ()  # left out of a system-level history (the audit log, for most callers)


BodyBuilder = Callable[[int, int], bytes]  # (version, last_updated) -> resource JSON


@dataclass(frozen=True, slots=True)
class WriteItem:
    """One resource to write in a ``write_many``."""

    res_type: str
    res_id: str
    build: BodyBuilder
    method: str
    index: IndexEntries | None = None
    if_match: int | None = None
    create_only: bool = False
    content: bytes | None = None  # what makes two versions the same (engine/resources.py ``content``); None: unknown

# The hot statements, built once (bound parameters; SQLAlchemy caches their compiled form).
_OWNER = and_(R.c.tenant_id == bindparam("tid"), R.c.res_type == bindparam("rt"), R.c.res_id == bindparam("rid"))
_CURRENT = select(R.c.version, R.c.last_updated, R.c.deleted, R.c.index_mask, R.c.content_digest).where(_OWNER)
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
    .values(version=bindparam("v"), last_updated=bindparam("lu"), deleted=bindparam("del"), index_mask=bindparam("mask"),
            content_digest=bindparam("dg"))
)
_INSERT_VERSION = insert(V)
_PG_LOCK_MANY = text(
    "SELECT r.res_type, r.res_id, r.version, r.last_updated, r.deleted, r.index_mask, r.content_digest FROM resources AS r "
    "JOIN unnest(CAST(:rts AS text[]), CAST(:rids AS text[])) AS k(rt, rid) ON r.res_type = k.rt AND r.res_id = k.rid "
    "WHERE r.tenant_id = :tid ORDER BY r.res_type, r.res_id FOR UPDATE OF r"
)


def _state(row: Any) -> CurrentState:
    return CurrentState(row.version, row.last_updated, row.deleted, row.index_mask, row.content_digest)


class ResourceRepository:
    """Every FHIR interaction's storage step, for the tenant this transaction is bound to."""

    def __init__(self, conn: Connection, tenant: Tenant, sealer: Sealer) -> None:
        self.conn = conn
        self.tenant = tenant
        self.sealer = sealer
        self._tid = tenant.id
        self._postgres = conn.dialect.name == "postgresql"
        # AuditEvents (JSON objects) to append in this unit of work before it commits (the audit trail's).
        self.pending_audit: list[dict[str, Any]] = []
        # The advisory locks (engine/conditional.py) this unit of work holds: taken once, held until it ends.
        self.advisory_locks: set[int] = set()

    # --- reads -------------------------------------------------------------------------

    def current_state(self, res_type: str, res_id: str, *, lock: bool = False) -> CurrentState | None:
        stmt = _CURRENT_FOR_UPDATE if lock else _CURRENT
        row = self.conn.execute(stmt, {"tid": self._tid, "rt": res_type, "rid": res_id}).first()
        return None if row is None else _state(row)

    def read(self, res_type: str, res_id: str) -> VersionRecord | None:
        """The current version (a deletion record if deleted), or None if it never existed."""
        row = self.conn.execute(_READ, {"tid": self._tid, "rt": res_type, "rid": res_id}).first()
        return None if row is None else self.record_of(res_type, res_id, row)

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
        return [(self.record_of(res_type, r.res_id, r), r.index_mask) for r in self.conn.execute(stmt)]

    def reindex(self, res_type: str, res_id: str, index: IndexEntries, old_mask: int) -> None:
        """Replace a resource's index rows (its version and body are unchanged)."""
        indexing.write(self.conn, self.sealer.keys, res_type, res_id, index, old_mask=old_mask)
        self.conn.execute(
            update(R).where(R.c.tenant_id == self._tid, R.c.res_type == res_type, R.c.res_id == res_id)
            .values(index_mask=index.mask())
        )

    def vread(self, res_type: str, res_id: str, version: int) -> VersionRecord | None:
        row = self.conn.execute(_VREAD, {"tid": self._tid, "rt": res_type, "rid": res_id, "v": version}).first()
        return None if row is None else self.record_of(res_type, res_id, row)

    def record_of(self, res_type: str, res_id: str, row: object) -> VersionRecord:
        """A version as read (version, last_updated, deleted, method, key_version, body), its body opened."""
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
        content: bytes | None = None,
    ) -> WriteResult:
        """Store a new version of a resource (creating it if needed), with its index rows, and return it."""
        return self.write_many([WriteItem(res_type, res_id, build, method, index, if_match, create_only, content)])[0]

    def write_many(self, items: list[WriteItem], *,
                   locked: dict[tuple[str, str], CurrentState] | None = None) -> list[WriteResult]:
        """Store a new version of each resource (none named twice), with their index rows.

        A few statements for all of them (a transaction Bundle's writes), not a few per resource.
        Every check is made before anything is written: If-Match (VersionConflict) and create-only
        (AlreadyExists), raised with ``item`` set to the failing item's position. ``locked``: what
        ``lock_rows`` gave this unit of work for (at least) every key of ``items``, so they are not locked again.

        An update whose content is the current version's (all but meta.versionId and meta.lastUpdated, compared
        by keyed digest) writes nothing: its result is the current version, ``changed`` False. A repeated
        message or a client re-sending what it sent makes no new version, no new index rows, no history.
        """
        keys = [(i.res_type, i.res_id) for i in items]
        if locked is not None:
            states = {k: locked[k] for k, i in zip(keys, items) if not i.create_only and k in locked}
        else:
            # Lock the rows that exist (in key order, so concurrent writers of overlapping sets cannot deadlock).
            # A create-only item of a fresh id is not looked for: inserting it tells.
            states = self.lock_rows(sorted(k for k, i in zip(keys, items) if not i.create_only))
        for n, (key, item) in enumerate(zip(keys, items)):
            if item.if_match is not None:
                state = states.get(key)
                if state is None or state.version != item.if_match:
                    raise VersionConflict(state.version if state else None, item=n)
        masks = [i.index.mask() if i.index is not None else 0 for i in items]
        blind = self.sealer.keys
        digests = [None if i.content is None else blind.content_digest(i.res_type, i.res_id, i.content) for i in items]
        now = now_us()
        pending = [n for n, key in enumerate(keys) if key not in states]
        for _ in range(5):
            if not pending:
                break
            inserted = self._insert_current_many([(keys[n], masks[n], digests[n]) for n in pending], now)
            lost = [n for n in pending if keys[n] not in inserted]
            for n in lost:
                if items[n].create_only:
                    raise AlreadyExists(keys[n][1], item=n)
            # Created by a concurrent writer since we looked (it has committed): lock them, they are updates.
            states.update(self.lock_rows(sorted(keys[n] for n in lost)))
            pending = [n for n in lost if keys[n] not in states]
        else:
            if pending:
                raise RuntimeError("could not obtain the resource rows after repeated concurrent creation")

        results: list[WriteResult] = []
        updates: list[dict[str, object]] = []
        versions: list[tuple[str, str, int, int, str, bytes | None]] = []
        index_items: list[tuple[str, str, IndexEntries, int]] = []
        unindexed: list[tuple[str, str, int]] = []
        for n, ((res_type, res_id), item) in enumerate(zip(keys, items)):
            state = states.get((res_type, res_id))
            if state is None:  # inserted just now
                version, last_updated, created, old_mask = 1, now, True, 0
            elif not state.deleted and digests[n] is not None and state.digest == digests[n]:  # the same content
                body = item.build(state.version, state.last_updated)
                record = VersionRecord(res_type, res_id, state.version, state.last_updated, False, item.method, body)
                results.append(WriteResult(record, False, changed=False))
                continue
            else:
                version = state.version + 1
                last_updated = max(now, state.last_updated + 1)  # never earlier than the version before
                created, old_mask = state.deleted, state.index_mask
                updates.append({"tid": self._tid, "rt": res_type, "rid": res_id, "v": version, "lu": last_updated,
                                 "del": False, "mask": masks[n], "dg": digests[n]})
            body = item.build(version, last_updated)
            versions.append((res_type, res_id, version, last_updated, item.method, body))
            if item.index is not None:
                index_items.append((res_type, res_id, item.index, old_mask))
            elif old_mask:
                unindexed.append((res_type, res_id, old_mask))
            results.append(WriteResult(VersionRecord(res_type, res_id, version, last_updated, False, item.method, body), created))
        if updates:
            self.conn.execute(_UPDATE_CURRENT, updates if len(updates) > 1 else updates[0])
        if versions:
            self._insert_versions(versions)
        if index_items:
            indexing.write_many(self.conn, self.sealer.keys, index_items)
        if unindexed:
            indexing.remove_many(self.conn, self._tid, unindexed)
        return results

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
            {"tid": self._tid, "rt": res_type, "rid": res_id, "v": version, "lu": last_updated, "del": True, "mask": 0,
             "dg": None},
        )
        self._insert_versions([(res_type, res_id, version, last_updated, "DELETE", None)])
        indexing.remove(self.conn, self._tid, res_type, res_id, state.index_mask)
        return VersionRecord(res_type, res_id, version, last_updated, True, "DELETE", None)

    def lock_rows(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], CurrentState]:
        """The current state of those of ``keys`` that exist, their rows locked until the transaction ends."""
        if not keys:
            return {}
        if len(keys) == 1:
            state = self.current_state(keys[0][0], keys[0][1], lock=True)
            return {} if state is None else {keys[0]: state}
        rows: Iterable[Any]
        if self._postgres:
            rows = self.conn.execute(_PG_LOCK_MANY, {"tid": self._tid, "rts": [k[0] for k in keys], "rids": [k[1] for k in keys]})
        else:  # one writer at a time already: nothing to lock
            rows = (
                row
                for chunk in range(0, len(keys), 400)
                for row in self.conn.execute(
                    select(R.c.res_type, R.c.res_id, R.c.version, R.c.last_updated, R.c.deleted, R.c.index_mask,
                           R.c.content_digest).where(
                        R.c.tenant_id == self._tid, tuple_(R.c.res_type, R.c.res_id).in_(keys[chunk : chunk + 400])
                    )
                )
            )
        return {(r.res_type, r.res_id): _state(r) for r in rows}

    def _insert_current_many(self, rows: list[tuple[tuple[str, str], int, bytes | None]], now: int) -> set[tuple[str, str]]:
        """Insert the rows of new resources ((type, id), index mask, content digest); the keys that were inserted
        (not already there)."""
        dialect_insert = postgresql.insert if self._postgres else sqlite.insert
        values = [
            dict(tenant_id=self._tid, res_type=rt, res_id=rid, version=1, last_updated=now, deleted=False, index_mask=mask,
                 content_digest=digest)
            for (rt, rid), mask, digest in sorted(rows)
        ]
        stmt = dialect_insert(R).on_conflict_do_nothing().returning(R.c.res_type, R.c.res_id)
        if len(values) == 1:
            return {(r.res_type, r.res_id) for r in self.conn.execute(stmt.values(**values[0]))}
        return {(r.res_type, r.res_id) for r in self.conn.execute(stmt, values)}

    def _insert_versions(self, versions: list[tuple[str, str, int, int, str, bytes | None]]) -> None:
        """Insert version rows (type, id, version, last_updated, method, body or None for a deletion), sealed."""
        rows = []
        for res_type, res_id, version, last_updated, method, body in versions:
            if body is None:
                key_version, sealed = self.sealer.keys.write_version, None
            else:
                key_version, sealed = self.sealer.seal_resource(res_type, res_id, version, body)
            rows.append({
                "tenant_id": self._tid, "res_type": res_type, "res_id": res_id, "version": version,
                "last_updated": last_updated, "method": method, "deleted": body is None, "key_version": key_version,
                "body": sealed,
            })
        self.conn.execute(_INSERT_VERSION, rows if len(rows) > 1 else rows[0])

    # --- history -----------------------------------------------------------------------

    def history(self, q: HistoryQuery) -> tuple[list[VersionRecord], bool]:
        """Versions matching ``q``, newest first, and whether more lie beyond the page in its direction."""
        cols = [V.c.res_type, V.c.res_id, V.c.version, V.c.last_updated, V.c.deleted, V.c.method, V.c.key_version, V.c.body]
        stmt = select(*cols).where(V.c.tenant_id == self._tid)
        if q.res_type is not None:
            stmt = stmt.where(V.c.res_type == q.res_type)
        if q.res_id is not None:
            stmt = stmt.where(V.c.res_id == q.res_id)
        if q.exclude_types:
            stmt = stmt.where(V.c.res_type.not_in(q.exclude_types))
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
        records = [self.record_of(r.res_type, r.res_id, r) for r in rows[: q.limit]]
        if q.before is not None:
            records.reverse()
        return records, more
