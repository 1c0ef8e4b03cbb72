"""The audit log's tables: records waiting to be chained, the chain, its head and signed checkpoints.

An AuditEvent is stored as a resource of its tenant (so it can be read and searched) and, in the same
transaction (on PostgreSQL, in the same statement), as a pending row with its digest. ``AuditLog.chain`` moves
pending rows into the chain in one tenant-wide order: under the lock of the tenant's head row it gives each the
next sequence number and its hash (``security/audit_chain.py``), updates the head and, now and then, signs a
checkpoint. Chaining is asynchronous (a thread per process, kicked after each commit that added records, which
lets them gather for a moment), so that no write or read waits on the tenant-wide lock: a record is durable from
the moment its interaction commits, and chained within a fraction of a second.

Chained records wait in ``audit_unindexed`` for their search index (extracted with the engine's ``indexer``),
which the chainer writes when the server has been idle for a moment (no interaction in any of its worker processes:
``BusyClock``), or at once when too many wait: a record's index rows cost more than the read it records, and are
not needed until someone searches the log; a search of AuditEvents catches up first (``catch_up``), so it finds
every record committed before it.

``verify`` reads the whole log back and checks it; ``events`` streams the AuditEvents of a time range.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors as psycopg_errors
from psycopg import pq
from sqlalchemy import Connection, and_, case, delete, exists, insert, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from fhir_server.clock import now_us
from fhir_server.search.extract import IndexEntries
from fhir_server.security import audit_chain
from fhir_server.security.audit_chain import ChainRow, Checkpoint, ChainVerifier, Finding, Head
from fhir_server.security.crypto import IntegrityError
from fhir_server.storage import indexing, schema, tenants
from fhir_server.storage.repository import ResourceRepository

if TYPE_CHECKING:
    from fhir_server.storage.store import Storage

log = logging.getLogger(__name__)

P = schema.audit_pending
U = schema.audit_unindexed
G = schema.audit_legacy
L = schema.audit_log
H = schema.audit_heads
C = schema.audit_checkpoints
R = schema.resources
V = schema.resource_versions
AUDIT_EVENT = "AuditEvent"
SECOND = 1_000_000
CHAIN_BATCH = 5000
READ_BATCH = 1000
CHAIN_DELAY = 0.2  # seconds the chainer lets records gather after it is kicked
INDEX_BATCH = 200  # records indexed per transaction (small: an idle moment's work ends soon when requests come)
IDLE_SECONDS = 0.25  # a server this long without an interaction in any of its processes is idle: chainers index
MAX_UNINDEXED = 20_000  # records a process lets wait for their index before it indexes them while busy


class BusyClock:
    """When an interaction last began, in a page of memory that the worker processes of one server share (made
    before they are forked: ``share_busy_clock``), or in one process's own. Idle means idle everywhere: with a
    clock per process, a worker that the load balancer happens to leave without connections would call itself idle
    and index the records of the others while they serve, taking the CPU their requests need."""

    _FORMAT = struct.Struct("d")

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE)  # anonymous and shared: a child forked after this sees our writes

    def mark(self) -> None:
        self._FORMAT.pack_into(self._page, 0, time.monotonic())  # CLOCK_MONOTONIC: one clock for every process

    def idle(self) -> bool:
        return time.monotonic() - self._FORMAT.unpack_from(self._page, 0)[0] >= IDLE_SECONDS


_shared_clock: BusyClock | None = None


def share_busy_clock() -> None:
    """Called by a server's master process before it forks its workers: their audit logs share one busy clock."""
    global _shared_clock
    _shared_clock = BusyClock()


@dataclass(frozen=True, slots=True)
class Record:
    """An AuditEvent ready to store: its id, time, sealed body (sealed as version 1 of the AuditEvent, so that it
    moves into resource_versions as it is) and the key version that sealed it, and its digest."""

    res_id: str
    recorded: int
    key_version: int
    sealed: bytes
    digest: bytes


_RECORD_COLUMNS = ("res_id", "recorded", "key_version", "sealed", "digest")
_PG_RECORDS = ("INSERT INTO audit_pending (tenant_id, res_id, recorded, key_version, body, digest) SELECT %(tid)s, * FROM "
               "unnest(%(res_id)b::text[], %(recorded)b::bigint[], %(key_version)b::integer[], %(sealed)b::bytea[], "
               "%(digest)b::bytea[])")
_PG_RECORD = ("INSERT INTO audit_pending (tenant_id, res_id, recorded, digest, key_version, body) "
              "VALUES (%(tid)s, %(res_id)s, %(recorded)s, %(digest)s, %(key_version)s, %(sealed)s)")
# A read's record, a statement of its own: prepared once per connection and run by libpq itself, its parameters as
# text but for the two byte strings. On this hot path that halves the Python cost of psycopg's execute (0.09 to
# 0.05 ms a read, measured in one thread), and libpq waits for the server without holding the GIL. (psycopg deallocates every prepared statement after DDL: a
# statement found missing is prepared again, which outside a transaction harms nothing.)
_PG_LEAN_NAME = b"fhir_audit_record"
_PG_LEAN = (b"INSERT INTO audit_pending (tenant_id, res_id, recorded, digest, key_version, body) "
            b"VALUES ($1::integer, $2::text, $3::bigint, $4::bytea, $5::integer, $6::bytea)")
_PG_LEAN_FORMATS = (0, 0, 0, 1, 0, 1)
_PREPARED = "fhir_audit_prepared"  # in a pooled connection's info: by statement name, the libpq connection it was prepared on
_UNDEFINED_STATEMENT = b"26000"
_DUPLICATE_STATEMENT = b"42P05"


def store_records(conn: Connection, tenant_id: int, records: list[Record]) -> None:
    """Store AuditEvents as pending records, in the caller's transaction or, on PostgreSQL, as one statement of its
    own (one row: a read's record is one short round trip on the read's own connection). The chainer makes them
    resources of the tenant as it chains them, and indexes them later."""
    if not records:
        return
    if conn.dialect.name == "postgresql":  # the driver's own execute: a third of SQLAlchemy's cost on this hot path
        driver = conn.connection.driver_connection
        assert driver is not None
        if len(records) == 1 and driver.autocommit and driver.pgconn.transaction_status == pq.TransactionStatus.IDLE:
            _pg_record_alone(conn.connection.info, driver, tenant_id, records[0])
        elif len(records) == 1:
            driver.execute(_PG_RECORD, {"tid": tenant_id, **{k: getattr(records[0], k) for k in _RECORD_COLUMNS}})
        else:
            driver.execute(_PG_RECORDS, {"tid": tenant_id, **{k: [getattr(r, k) for r in records] for k in _RECORD_COLUMNS}})
        return
    conn.execute(insert(P), [{"tenant_id": tenant_id, "res_id": r.res_id, "recorded": r.recorded, "digest": r.digest,
                              "key_version": r.key_version, "body": r.sealed} for r in records])


# A read and its record in one statement (PostgreSQL, autocommit): the record is committed with the read, before
# its answer can leave, and costs no round trip of its own. It is a draft, written before the outcome was known;
# the statement notes the version it found (and whether a deletion) and, from its index, the patients whose record
# it is in (``patient_keys``: the keys of the compartment's parameters), and the chainer completes it (``Finisher``).
# (The sub-statements share one snapshot: the version noted is the one returned.)
_PG_READ_RECORDED_NAME = b"fhir_read_recorded"
_PG_READ_RECORDED = (
    b"WITH r AS (SELECT v.version, v.last_updated, v.deleted, v.method, v.key_version, v.body FROM resources AS c "
    b"  JOIN resource_versions AS v ON v.tenant_id = c.tenant_id AND v.res_type = c.res_type AND v.res_id = c.res_id "
    b"  AND v.version = c.version WHERE c.tenant_id = $1::integer AND c.res_type = $2::text AND c.res_id = $3::text), "
    b"a AS (INSERT INTO audit_pending (tenant_id, res_id, recorded, digest, key_version, body, draft, read_version, read_deleted, "
    b"  read_patients) SELECT $1::integer, $4::text, $5::bigint, $6::bytea, $7::integer, $8::bytea, true, "
    b"  (SELECT version FROM r), (SELECT deleted FROM r), (SELECT string_agg(DISTINCT x.target_id, ' ') FROM idx_reference AS x "
    b"  WHERE x.tenant_id = $1::integer AND x.res_type = $2::text AND x.res_id = $3::text AND x.param_key = ANY($9::bigint[]) "
    b"  AND x.target_type = 'Patient' AND x.target_id IS NOT NULL)) "
    b"SELECT version, last_updated, deleted, method, key_version, body FROM r"
)
_PG_READ_RECORDED_FORMATS = (0, 0, 0, 0, 0, 1, 0, 1, 0)  # the digest and the sealed body in binary, the rest as text


@dataclass(frozen=True, slots=True)
class _ReadRow:
    version: int
    last_updated: int
    deleted: bool
    method: str
    key_version: int
    body: bytes | None


def can_record_with_read(repo: ResourceRepository) -> bool:
    """Whether a read's record can be written by the read's own statement: PostgreSQL, outside a transaction."""
    if repo.conn.dialect.name != "postgresql" or not repo.conn.info.get("fhir_autocommit"):
        return False
    driver = repo.conn.connection.driver_connection
    return driver is not None and driver.autocommit and driver.pgconn.transaction_status == pq.TransactionStatus.IDLE


def read_recorded(repo: ResourceRepository, res_type: str, res_id: str, draft: Record,
                  patient_keys: list[int]) -> _ReadRow | None:
    """The row ``repo.read`` reads (for ``repo.record_of``), read by a statement that also stores ``draft`` (a
    read's record made before its outcome is known), a transaction of its own (``can_record_with_read``). Run
    like a lone record (``_pg_record_alone``): prepared once per connection, through libpq itself, its result in
    binary (a hot path: every read by id)."""
    driver = repo.conn.connection.driver_connection
    assert driver is not None
    params = (str(repo.tenant.id).encode(), res_type.encode(), res_id.encode(), draft.res_id.encode(),
              str(draft.recorded).encode(), draft.digest, str(draft.key_version).encode(), draft.sealed,
              ("{" + ",".join(str(int(k)) for k in patient_keys) + "}").encode())
    result = _exec_prepared(repo.conn.connection.info, driver, _PG_READ_RECORDED_NAME, _PG_READ_RECORDED, params,
                            _PG_READ_RECORDED_FORMATS, binary=True)
    if result.ntuples == 0:
        return None
    version, last_updated, deleted, method, key_version, body = (result.get_value(0, i) for i in range(6))
    return _ReadRow(_int(version), _int(last_updated), deleted == b"\x01", bytes(method).decode(), _int(key_version),
                    None if body is None else bytes(body))


def _int(value: bytes | None) -> int:
    """An integer column of a binary result (int4 or int8, big-endian)."""
    assert value is not None
    return int.from_bytes(value, "big", signed=True)


def discard_draft(repo: ResourceRepository, res_id: str) -> None:
    """Remove a read's draft record (the read failed after its statement: its failure is recorded instead)."""
    repo.conn.execute(delete(P).where(P.c.tenant_id == repo.tenant.id, P.c.res_id == res_id, P.c.draft.is_(True)))


def _pg_record_alone(info: dict[str, Any], driver: psycopg.Connection[Any], tenant_id: int, r: Record) -> None:
    """One record in a transaction of its own (the connection is outside one: autocommit)."""
    params = (str(tenant_id).encode(), r.res_id.encode(), str(r.recorded).encode(), r.digest, str(r.key_version).encode(),
              r.sealed)
    _exec_prepared(info, driver, _PG_LEAN_NAME, _PG_LEAN, params, _PG_LEAN_FORMATS)


def _exec_prepared(info: dict[str, Any], driver: psycopg.Connection[Any], name: bytes, sql: bytes,
                   params: tuple[bytes, ...], formats: tuple[int, ...], *, binary: bool = False) -> pq.abc.PGresult:
    """Run ``sql``, prepared as ``name`` on the pooled connection (``info``: its records) the first time, by libpq
    itself (``formats``: which parameters are binary; ``binary``: the result too); raises what psycopg would."""
    pgconn = driver.pgconn
    prepared = info.setdefault(_PREPARED, {})
    if prepared.get(name) is not pgconn:
        _prepare(driver, name, sql)
        prepared[name] = pgconn
    result_format = 1 if binary else 0
    result = pgconn.exec_prepared(name, params, formats, result_format=result_format)
    if _sqlstate(result) == _UNDEFINED_STATEMENT:
        _prepare(driver, name, sql)
        result = pgconn.exec_prepared(name, params, formats, result_format=result_format)
    if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        raise psycopg_errors.error_from_result(result, encoding=driver.info.encoding)
    return result


def _prepare(driver: psycopg.Connection[Any], name: bytes, sql: bytes) -> None:
    result = driver.pgconn.prepare(name, sql)
    if _sqlstate(result) != _DUPLICATE_STATEMENT and result.status != pq.ExecStatus.COMMAND_OK:
        raise psycopg_errors.error_from_result(result, encoding=driver.info.encoding)


def _sqlstate(result: pq.abc.PGresult) -> bytes | None:
    if result.status != pq.ExecStatus.FATAL_ERROR:
        return None
    return result.error_field(pq.DiagnosticField.SQLSTATE)


_CHAIN_COLUMNS = ("seq", "res_id", "recorded", "digest", "prev_hash", "hash")
_CHAIN_BODIES = ("key_version", "body")  # of completed drafts (NULL for the others: their pending row's)
# The chained records: resources of the tenant (current row and version 1, the sealed body as it was pending),
# rows of the log, waiting for their index; out of the pending rows; and the new head. One statement, its
# arrays in binary; the bodies go from the pending rows to resource_versions inside the server (every
# sub-statement sees the same snapshot: the pending rows the DELETE removes are still there for the others).
_PG_CHAIN = (
    "WITH x AS (SELECT x.*, p.key_version, p.body FROM unnest(%(seq)b::bigint[], %(res_id)b::text[], %(recorded)b::bigint[], "
    "  %(digest)b::bytea[], %(prev_hash)b::bytea[], %(hash)b::bytea[]) AS x(seq, res_id, recorded, digest, prev_hash, hash) "
    "  JOIN audit_pending p ON p.tenant_id = %(tid)s AND p.res_id = x.res_id), "
    "r AS (INSERT INTO resources (tenant_id, res_type, res_id, version, last_updated, deleted, index_mask) "
    "  SELECT %(tid)s, 'AuditEvent', res_id, 1, recorded, false, 0 FROM x), "
    "v AS (INSERT INTO resource_versions (tenant_id, res_type, res_id, version, last_updated, method, deleted, key_version, body) "
    "  SELECT %(tid)s, 'AuditEvent', res_id, 1, recorded, 'POST', false, key_version, body FROM x), "
    "l AS (INSERT INTO audit_log (tenant_id, seq, res_id, recorded, digest, prev_hash, hash) "
    "  SELECT %(tid)s, seq, res_id, recorded, digest, prev_hash, hash FROM x), "
    "u AS (INSERT INTO audit_unindexed (tenant_id, res_id) SELECT %(tid)s, res_id FROM x), "
    "p AS (DELETE FROM audit_pending WHERE tenant_id = %(tid)s AND res_id = ANY(%(res_id)b::text[])) "
    "UPDATE audit_heads SET seq = %(head_seq)s, hash = %(head_hash)s, checkpoint_seq = %(cp_seq)s, checkpoint_at = %(cp_at)s "
    "WHERE tenant_id = %(tid)s AND (SELECT count(*) FROM x) = %(n)s"  # no pending row vanished meanwhile
)
# The same when drafts were completed in this batch: their final bodies are given (the others' are their rows').
_PG_CHAIN_COMPLETED = _PG_CHAIN.replace(
    "WITH x AS (SELECT x.*, p.key_version, p.body FROM unnest(",
    "WITH x AS (SELECT x.seq, x.res_id, x.recorded, x.digest, x.prev_hash, x.hash, "
    "  coalesce(x.key_version, p.key_version) AS key_version, coalesce(x.body, p.body) AS body FROM unnest(", 1).replace(
    "%(hash)b::bytea[]) AS x(seq, res_id, recorded, digest, prev_hash, hash) ",
    "%(hash)b::bytea[], %(key_version)b::integer[], %(body)b::bytea[]) "
    "AS x(seq, res_id, recorded, digest, prev_hash, hash, key_version, body) ", 1)
assert _PG_CHAIN_COMPLETED != _PG_CHAIN


@dataclass(frozen=True, slots=True)
class _Pending:
    """A pending row as ``_chain_batch`` reads it (a draft's, once completed)."""

    res_id: str
    recorded: int
    digest: bytes
    draft: bool | None
    key_version: int = 0
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Draft:
    """A read's pending record as the read's statement wrote it: its id and time, its AuditEvent (opened), the
    version the read found (None: none), whether that is a deletion, and the patients of its index."""

    res_id: str
    recorded: int
    event: bytes
    read_version: int | None
    read_deleted: bool | None
    read_patients: list[str]


# Given drafts, their completed AuditEvents (JSON, in the same order): set by the engine's audit trail.
Finisher = Callable[[ResourceRepository, list[Draft]], list[bytes]]

# Given stored AuditEvents (id, JSON), the index entries of each (the engine's extractor, with the tenant's
# search parameters): set by the engine's audit trail.
Indexer = Callable[[ResourceRepository, list[tuple[str, bytes]]], list[IndexEntries]]


@dataclass(frozen=True, slots=True)
class ChainPolicy:
    checkpoint_records: int = 1000  # sign a checkpoint after this many records...
    checkpoint_seconds: int = 60  # ...or when this long has passed since the last one and records were added


@dataclass
class VerifyReport:
    tenant: str
    records: int = 0
    checkpoints: int = 0
    pending: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


class AuditLog:
    def __init__(self, storage: Storage, policy: ChainPolicy) -> None:
        self.storage = storage
        self.policy = policy
        self.indexer: Indexer | None = None
        self.finisher: Finisher | None = None  # completes drafts; without one (no engine), they wait
        self.inline = False  # chain at once in the caller's thread (the command line: it exits before a chainer would)
        self._clock = _shared_clock or BusyClock()
        self._chainer = _Chainer(self)

    def busy(self) -> None:
        """An interaction is under way in this server (the chainers leave indexing for later)."""
        self._clock.mark()

    def idle(self) -> bool:
        return self._clock.idle()

    def kick(self, tenant_name: str) -> None:
        """Chain the tenant's pending records soon, in this process's chainer thread (or now, ``inline``)."""
        if self.inline:
            self.chain(tenant_name)
            return
        self._chainer.kick(tenant_name)

    def stop(self) -> None:
        self._chainer.stop()

    # --- chaining --------------------------------------------------------------------------------------------

    def chain(self, tenant_name: str, *, checkpoint: bool = False, wait: bool = True,
              chained: list[str] | None = None) -> int | None:
        """Chain every pending record of the tenant now; with ``checkpoint``, sign one at the end if records were
        chained since the last. Returns how many were chained (their ids added to ``chained``); without ``wait``,
        None when another process's chainer holds the tenant's head (it will chain them)."""
        total = 0
        while True:
            with self.storage.session(tenant_name, write=True, audited=False, tenant_lock=False) as repo:
                n = self._chain_batch(repo, force_checkpoint=checkpoint, wait=wait, chained=chained)
            if n is None:
                return None if not total else total
            total += n
            if n < CHAIN_BATCH:
                return total

    def catch_up(self, tenant_name: str) -> None:
        """Chain and index every record committed so far (before a search of the tenant's AuditEvents)."""
        if self.has_waiting(tenant_name):
            self.chain(tenant_name)
            while self.index(tenant_name, wait=True) == INDEX_BATCH:
                pass

    def has_waiting(self, tenant_name: str) -> bool:
        """Records wait to be chained or indexed (as committed now: not in a request's older snapshot)."""
        with self.storage.session(tenant_name, write=False, shared=False) as repo:
            tid = repo.tenant.id
            return any(repo.conn.execute(select(t.c.res_id).where(t.c.tenant_id == tid).limit(1)).first() is not None
                       for t in (P, U))

    def _chain_batch(self, repo: ResourceRepository, *, force_checkpoint: bool, wait: bool,
                     chained: list[str] | None) -> int | None:
        conn, tid = repo.conn, repo.tenant.id
        head = self._lock_head(conn, tid, wait=wait)
        if head is None:
            return None
        # PostgreSQL moves the sealed bodies from the pending rows to the resources itself (_PG_CHAIN), so only the
        # drafts' are read here (to complete them, with what their reads found); elsewhere they are carried over.
        postgres = conn.dialect.name == "postgresql"
        body = case((P.c.draft.is_(True), P.c.body)).label("body") if postgres else P.c.body
        waiting = select(P.c.res_id, P.c.recorded, P.c.digest, P.c.draft, P.c.key_version, body, P.c.read_version,
                         P.c.read_deleted, P.c.read_patients).where(P.c.tenant_id == tid)
        if self.finisher is None:
            waiting = waiting.where(P.c.draft.is_not(True))  # (drafts wait for a process that can complete them)
        pending: list[Any] = list(conn.execute(waiting.order_by(P.c.recorded, P.c.res_id).limit(CHAIN_BATCH)))
        if any(p.draft for p in pending):
            pending = self._complete_drafts(repo, pending)
        seq, prev = head.seq, head.hash
        rows = []
        if pending:
            key = audit_chain.chain_key(repo.sealer.keys.index_key)
            for p in pending:
                seq += 1
                digest = bytes(p.digest)
                h = audit_chain.link(key, tid, seq, prev, digest, p.res_id, p.recorded)
                row = {"tenant_id": tid, "seq": seq, "res_id": p.res_id, "recorded": p.recorded, "digest": digest,
                       "prev_hash": prev, "hash": h}
                if not postgres or isinstance(p, _Pending):  # (a completed draft: its final body, not its row's)
                    row.update(key_version=p.key_version, body=bytes(p.body))
                rows.append(row)
                prev = h
            if chained is not None:
                chained.extend(p.res_id for p in pending)
        now = now_us()
        checkpoint_seq, checkpoint_at = head.checkpoint_seq, head.checkpoint_at
        due = seq > checkpoint_seq and (
            force_checkpoint or seq - checkpoint_seq >= self.policy.checkpoint_records
            or now - checkpoint_at >= self.policy.checkpoint_seconds * SECOND)
        if due:
            version, seed = max(tenants.audit_signing_keys(conn, tid, self.storage.provider, create=True).items())
            signature = audit_chain.sign_checkpoint(seed, tid, seq, prev, now)
            conn.execute(insert(C).values(tenant_id=tid, seq=seq, hash=prev, signed_at=now, key_version=version,
                                          signature=signature))
            checkpoint_seq, checkpoint_at = seq, now
        if pending or due:
            self._write_chain(conn, tid, rows, _HeadRow(seq, prev, checkpoint_seq, checkpoint_at))
        return len(pending)

    def _complete_drafts(self, repo: ResourceRepository, pending: list[Any]) -> list[Any]:
        """``pending`` with its drafts completed (their final records sealed, with their digests: they are chained
        as that, and their pending rows go)."""
        assert self.finisher is not None
        drafts = []
        for r in pending:
            if not r.draft:
                continue
            try:
                event = repo.sealer.open_resource(AUDIT_EVENT, r.res_id, 1, r.key_version, bytes(r.body))
            except IntegrityError:  # altered while pending: chained as it is, for verify to report
                continue
            drafts.append(Draft(r.res_id, r.recorded, event, r.read_version, r.read_deleted, (r.read_patients or "").split()))
        key = audit_chain.chain_key(repo.sealer.keys.index_key)
        done: dict[str, _Pending] = {}
        for draft, body in zip(drafts, self.finisher(repo, drafts), strict=True):
            key_version, sealed = repo.sealer.seal_resource(AUDIT_EVENT, draft.res_id, 1, body)
            done[draft.res_id] = _Pending(draft.res_id, draft.recorded, audit_chain.record_digest(key, body), True,
                                          key_version, sealed)
        return [done.get(p.res_id, p) for p in pending]

    @staticmethod
    def _write_chain(conn: Connection, tid: int, rows: list[dict[str, Any]], head: _HeadRow) -> None:
        """The chained records into the log and the index queue, out of the pending rows, and the new head."""
        if conn.dialect.name == "postgresql":  # one statement, its arrays in binary (see storage/indexing.py)
            driver = conn.connection.driver_connection
            assert driver is not None
            params = {"tid": tid, **{k: [r[k] for r in rows] for k in _CHAIN_COLUMNS}, "n": len(rows),
                      "head_seq": head.seq, "head_hash": head.hash, "cp_seq": head.checkpoint_seq, "cp_at": head.checkpoint_at}
            statement = _PG_CHAIN
            if any("body" in r for r in rows):
                statement = _PG_CHAIN_COMPLETED
                params.update({k: [r.get(k) for r in rows] for k in _CHAIN_BODIES})
            cur = driver.execute(statement, params)
            if cur.rowcount != 1:  # the transaction rolls back: nothing is chained
                raise RuntimeError("audit chain: pending records changed while they were chained")
            return
        if rows:
            conn.execute(insert(R), [{"tenant_id": tid, "res_type": AUDIT_EVENT, "res_id": r["res_id"], "version": 1,
                                      "last_updated": r["recorded"], "deleted": False, "index_mask": 0} for r in rows])
            conn.execute(insert(V), [{"tenant_id": tid, "res_type": AUDIT_EVENT, "res_id": r["res_id"], "version": 1,
                                      "last_updated": r["recorded"], "method": "POST", "deleted": False,
                                      "key_version": r["key_version"], "body": r["body"]} for r in rows])
            conn.execute(insert(L), [{k: r[k] for k in ("tenant_id", "seq", "res_id", "recorded", "digest", "prev_hash", "hash")}
                                     for r in rows])
            conn.execute(insert(U), [{"tenant_id": tid, "res_id": r["res_id"]} for r in rows])
            ids = [r["res_id"] for r in rows]
            for start in range(0, len(ids), 500):
                conn.execute(delete(P).where(P.c.tenant_id == tid, P.c.res_id.in_(ids[start:start + 500])))
        conn.execute(update(H).where(H.c.tenant_id == tid).values(
            seq=head.seq, hash=head.hash, checkpoint_seq=head.checkpoint_seq, checkpoint_at=head.checkpoint_at))

    def index(self, tenant_name: str, limit: int = INDEX_BATCH, *, among: list[str] | None = None, wait: bool = False) -> int:
        """Write the search index of up to ``limit`` chained records that wait for it (of those ``among``, if given);
        how many were indexed. Records another process is indexing are skipped, unless ``wait``: then this waits
        for that process to finish them (a search that catches up must see them)."""
        if self.indexer is None:
            raise RuntimeError("the audit log has no indexer: an Engine must be made over this storage")
        with self.storage.session(tenant_name, write=True, audited=False) as repo:
            conn, tid = repo.conn, repo.tenant.id
            stmt = select(U.c.res_id).where(U.c.tenant_id == tid).order_by(U.c.res_id).limit(limit)  # (one lock order)
            if among is not None:
                stmt = stmt.where(U.c.res_id.in_(among))
            if conn.dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=not wait)  # several processes index side by side
            ids = [r.res_id for r in conn.execute(stmt)]
            if not ids:
                return 0
            stored: list[tuple[str, bytes]] = []
            masks: dict[str, int] = {}
            rows = conn.execute(
                select(V.c.res_id, V.c.key_version, V.c.body, R.c.index_mask)
                .select_from(V.join(R, and_(R.c.tenant_id == V.c.tenant_id, R.c.res_type == V.c.res_type, R.c.res_id == V.c.res_id)))
                .where(V.c.tenant_id == tid, V.c.res_type == AUDIT_EVENT, V.c.version == 1, V.c.res_id.in_(ids))
            ).all()
            for r in rows:  # an AuditEvent whose body is gone or altered is left for verify to report
                try:
                    stored.append((r.res_id, repo.sealer.open_resource(AUDIT_EVENT, r.res_id, 1, r.key_version, bytes(r.body))))
                except IntegrityError:
                    continue
                masks[r.res_id] = r.index_mask
            entries = self.indexer(repo, stored) if stored else []
            indexing.write_many(conn, repo.sealer.keys, [(AUDIT_EVENT, rid, e, masks[rid]) for (rid, _), e in zip(stored, entries)])
            by_mask: dict[int, list[str]] = {}
            for (rid, _), e in zip(stored, entries):
                by_mask.setdefault(e.mask(), []).append(rid)
            for mask, rids in by_mask.items():
                conn.execute(update(R).where(R.c.tenant_id == tid, R.c.res_type == AUDIT_EVENT, R.c.res_id.in_(rids))
                             .values(index_mask=mask))
            conn.execute(delete(U).where(U.c.tenant_id == tid, U.c.res_id.in_(ids)))
            return len(ids)

    @staticmethod
    def _lock_head(conn: Connection, tid: int, *, wait: bool = True) -> _HeadRow | None:
        """The tenant's head row, locked until the transaction ends (created on first use); without ``wait``, None
        when another transaction holds it."""
        stmt = select(H.c.seq, H.c.hash, H.c.checkpoint_seq, H.c.checkpoint_at).where(H.c.tenant_id == tid)
        postgres = conn.dialect.name == "postgresql"
        locking = stmt.with_for_update(skip_locked=not wait) if postgres else stmt
        row = conn.execute(locking).first()
        if row is None:
            values = {"tenant_id": tid, "seq": 0, "hash": audit_chain.GENESIS, "checkpoint_seq": 0, "checkpoint_at": now_us()}
            dialect_insert = postgresql.insert if postgres else sqlite.insert
            created = conn.execute(dialect_insert(H).values(**values).on_conflict_do_nothing().returning(H.c.tenant_id)).first()
            if created is None and not wait:
                return None  # it exists: another chainer holds it
            row = conn.execute(stmt.with_for_update() if postgres else stmt).one()
        return _HeadRow(row.seq, bytes(row.hash), row.checkpoint_seq, row.checkpoint_at)

    # --- reading back ----------------------------------------------------------------------------------------

    def verify(self, tenant_name: str, *, grace_seconds: int = 300) -> VerifyReport:
        """Recompute the tenant's chain and check its checkpoints, head and stored AuditEvents.

        The first problem found is reported: a record changed, removed, inserted or moved, a log cut short, a
        forged checkpoint, an AuditEvent that is not in the log, or one left unchained for longer than
        ``grace_seconds`` (the chainer runs within moments of every commit).
        """
        report = VerifyReport(tenant_name)
        with self.storage.session(tenant_name, write=False) as repo:
            conn, tid = repo.conn, repo.tenant.id
            # Checkpoints first, then the head (a chainer commits both together, so the head read second is at or
            # past every checkpoint read first), then the chain up to that head (records chained meanwhile wait).
            checkpoints = [Checkpoint(r.seq, bytes(r.hash), r.signed_at, r.key_version, bytes(r.signature)) for r in conn.execute(
                select(C).where(C.c.tenant_id == tid).order_by(C.c.seq))]
            head_row = conn.execute(select(H.c.seq, H.c.hash).where(H.c.tenant_id == tid)).first()
            head = Head(head_row.seq, bytes(head_row.hash)) if head_row is not None else None
            limit_seq = head.seq if head is not None else 0
            report.checkpoints = len(checkpoints)
            seeds = tenants.audit_signing_keys(conn, tid, self.storage.provider, create=False)
            verifier = ChainVerifier(audit_chain.chain_key(repo.sealer.keys.index_key), tid, checkpoints, seeds)
            finding = verifier.check_signatures() or self._walk(repo, verifier, limit_seq) or verifier.finish(head)
            report.records = verifier.verified
            if finding is None:
                finding = self._stray_events(conn, tid)
            pending = conn.execute(select(P.c.res_id, P.c.recorded).where(P.c.tenant_id == tid).order_by(P.c.recorded)).all()
            report.pending = len(pending)
            if finding is None and pending and pending[0].recorded < now_us() - grace_seconds * SECOND:
                finding = Finding("unchained", None, pending[0].res_id, f"AuditEvent/{pending[0].res_id} was recorded more "
                                  f"than {grace_seconds} s ago and never chained ({len(pending)} records wait)")
        if finding is not None:
            report.findings.append(finding)
        return report

    @staticmethod
    def _walk(repo: ResourceRepository, verifier: ChainVerifier, limit_seq: int) -> Finding | None:
        conn, tid = repo.conn, repo.tenant.id
        after = 0
        while after < limit_seq:
            rows = conn.execute(
                select(L.c.seq, L.c.res_id, L.c.recorded, L.c.digest, L.c.prev_hash, L.c.hash, V.c.key_version, V.c.body,
                       V.c.deleted, V.c.last_updated)
                .select_from(L.outerjoin(V, and_(V.c.tenant_id == L.c.tenant_id, V.c.res_type == AUDIT_EVENT,
                                                 V.c.res_id == L.c.res_id, V.c.version == 1)))
                .where(L.c.tenant_id == tid, L.c.seq > after, L.c.seq <= limit_seq).order_by(L.c.seq).limit(READ_BATCH)
            ).all()
            if not rows:
                break
            for r in rows:
                row = ChainRow(r.seq, r.res_id, r.recorded, bytes(r.digest), bytes(r.prev_hash), bytes(r.hash))
                body, problem = None, None
                if r.body is not None and not r.deleted:
                    try:
                        body = repo.sealer.open_resource(AUDIT_EVENT, r.res_id, 1, r.key_version, bytes(r.body))
                    except IntegrityError as exc:
                        body, problem = b"", f"it does not decrypt: {exc}"
                    if r.last_updated != r.recorded and problem is None:
                        problem = "its stored time is not the time it was chained with"
                finding = verifier.row(row, body, problem)
                if finding is not None:
                    return finding
            after = rows[-1].seq
        return None

    @staticmethod
    def _stray_events(conn: Connection, tid: int) -> Finding | None:
        """AuditEvents that are stored but in neither the chain nor the pending records (inserted behind the
        server's back), or that were changed after they were written (a second version, a deletion)."""
        in_log = exists().where(L.c.tenant_id == tid, L.c.res_id == R.c.res_id)
        legacy = exists().where(G.c.tenant_id == tid, G.c.res_id == R.c.res_id)
        stray = conn.execute(select(R.c.res_id).where(R.c.tenant_id == tid, R.c.res_type == AUDIT_EVENT, ~in_log, ~legacy)
                             .limit(1)).first()
        if stray is not None:
            return Finding("inserted", None, stray.res_id, f"AuditEvent/{stray.res_id} is stored but was never recorded "
                           "in the log: it was inserted")
        not_legacy = ~exists().where(G.c.tenant_id == tid, G.c.res_id == R.c.res_id)
        changed = conn.execute(select(R.c.res_id, R.c.version, R.c.deleted).where(
            R.c.tenant_id == tid, R.c.res_type == AUDIT_EVENT, (R.c.version != 1) | R.c.deleted, not_legacy).limit(1)).first()
        if changed is not None:
            what = "deleted" if changed.deleted else f"given a version {changed.version}"
            return Finding("changed", None, changed.res_id, f"AuditEvent/{changed.res_id} was {what} after it was recorded")
        versions = conn.execute(select(V.c.res_id, V.c.version).where(
            V.c.tenant_id == tid, V.c.res_type == AUDIT_EVENT, V.c.version != 1,
            ~exists().where(G.c.tenant_id == tid, G.c.res_id == V.c.res_id)).limit(1)).first()
        if versions is not None:
            return Finding("changed", None, versions.res_id, f"AuditEvent/{versions.res_id} was given a version "
                           f"{versions.version} after it was recorded")
        return None

    def events(self, tenant_name: str, *, since: int | None = None, until: int | None = None) -> Iterator[bytes]:
        """The tenant's AuditEvents recorded in [since, until), oldest first, as their stored JSON (the records
        waiting to be chained are chained first)."""
        self.chain(tenant_name)
        after: tuple[int, str] | None = None
        while True:
            with self.storage.session(tenant_name, write=False) as repo:
                stmt = select(V.c.res_id, V.c.last_updated, V.c.key_version, V.c.body).where(
                    V.c.tenant_id == repo.tenant.id, V.c.res_type == AUDIT_EVENT, V.c.version == 1, V.c.deleted.is_(False))
                if since is not None:
                    stmt = stmt.where(V.c.last_updated >= since)
                if until is not None:
                    stmt = stmt.where(V.c.last_updated < until)
                if after is not None:
                    stmt = stmt.where(tuple_(V.c.last_updated, V.c.res_id) > tuple_(*after))
                rows = repo.conn.execute(stmt.order_by(V.c.last_updated, V.c.res_id).limit(READ_BATCH)).all()
                bodies = [repo.sealer.open_resource(AUDIT_EVENT, r.res_id, 1, r.key_version, bytes(r.body)) for r in rows]
            yield from bodies
            if len(rows) < READ_BATCH:
                return
            after = (rows[-1].last_updated, rows[-1].res_id)


@dataclass(frozen=True, slots=True)
class _HeadRow:
    seq: int
    hash: bytes
    checkpoint_seq: int
    checkpoint_at: int


class _Chainer:
    """A thread per process: it chains the tenants it is told about, a moment after their records commit (letting
    them gather), indexes the records it chained when its server is idle (or everything waiting, when too much
    waits), and signs a checkpoint for each tenant when one is due and nothing else happens."""

    def __init__(self, log_: AuditLog) -> None:
        self.log = log_
        self._dirty: set[str] = set()
        self._chained: dict[str, list[str]] = {}  # what this process chained and has not indexed yet, by tenant
        self._sweep: set[str] = set()  # tenants where too much waits: index whatever waits, busy or not
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopping = False
        self._failures = 0

    def kick(self, tenant_name: str) -> None:
        with self._cond:
            self._dirty.add(tenant_name)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()  # a forked worker starts its own thread
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="audit-chainer", daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        tick = max(1, self.log.policy.checkpoint_seconds)
        while True:
            with self._cond:
                if not self._dirty and not self._stopping:
                    backlog = any(self._chained.values()) or bool(self._sweep)
                    self._cond.wait(timeout=IDLE_SECONDS if backlog else tick)
                if self._stopping and not self._dirty:
                    return
                gather = bool(self._dirty) and not self._stopping
            if gather:
                time.sleep(CHAIN_DELAY)  # kicks keep coming while records gather: one transaction chains them all
            with self._cond:
                todo, self._dirty = self._dirty, set()
            timed_out = not todo
            if timed_out:  # nothing happened for a while: every tenant with records waiting (a killed process's, the
                todo = set(self._chained) | self._waiting_elsewhere()  # command line's), checkpoints due here
            for name in sorted(todo):
                self._guarded(name, functools.partial(self._chain, name, checkpoint=timed_out))
            for name in sorted(set(self._chained) | self._sweep):
                if self._sweep or self.log.idle():
                    self._guarded(name, functools.partial(self._index, name))

    def _waiting_elsewhere(self) -> set[str]:
        try:
            with self.log.storage.db.transaction(write=False) as conn:
                names = [t.name for t in tenants.list_tenants(conn) if t.status == "active"]
            return {n for n in names if self.log.has_waiting(n)}
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            log.error("audit sweep failed", extra={"error_type": type(exc).__name__})
            return set()

    def _chain(self, name: str, *, checkpoint: bool) -> None:
        chained = self._chained.setdefault(name, [])
        if self.log.chain(name, checkpoint=checkpoint, wait=False, chained=chained) is None:
            with self._cond:  # another process's chainer holds the head: try again in a moment
                self._dirty.add(name)
            time.sleep(CHAIN_DELAY)
        if len(chained) > MAX_UNINDEXED:
            self._sweep.add(name)
            chained.clear()

    def _index(self, name: str) -> None:
        """Index batch by batch while the server stays idle (or, in a sweep, until nothing waits)."""
        while not self._stopping and not self._dirty:
            if name in self._sweep:
                if self.log.index(name) < INDEX_BATCH:
                    self._sweep.discard(name)
                    self._chained.get(name, []).clear()
                    return
                continue
            mine = self._chained.get(name)
            if not mine or not self.log.idle():
                return
            batch = mine[:INDEX_BATCH]
            self.log.index(name, among=batch)
            del mine[:len(batch)]

    def _guarded(self, name: str, work: Callable[[], None]) -> None:
        try:
            work()
        except tenants.TenantNotFound:
            self._chained.pop(name, None)
            self._sweep.discard(name)
        except Exception as exc:  # noqa: BLE001 - retried (backing off); the records are safe meanwhile
            self._failures += 1
            log.error("audit chaining failed", extra={"tenant": name, "error_type": type(exc).__name__,
                                                      "failures": self._failures})
            with self._cond:
                self._dirty.add(name)
                self._cond.wait(timeout=min(30, 2 ** min(self._failures, 5)))
        else:
            self._failures = 0
