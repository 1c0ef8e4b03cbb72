"""The audit log's tables: records waiting to be chained, the chain, its head and signed checkpoints.

An AuditEvent is stored as a resource of its tenant (so it can be read and searched) and, in the same
transaction, as a pending row with its digest. ``AuditLog.chain`` moves pending rows into the chain in one
tenant-wide order: under the lock of the tenant's head row it gives each the next sequence number and its
hash (``security/audit_chain.py``), updates the head and, now and then, signs a checkpoint. Chaining is
asynchronous (a thread per process, kicked after each commit that added records), so that no write or read
waits on the tenant-wide lock; a record is durable from the moment its interaction commits, and chained
within milliseconds.

``verify`` reads the whole log back and checks it; ``events`` streams the AuditEvents of a time range.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Connection, and_, delete, exists, insert, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from fhir_server.clock import now_us
from fhir_server.security import audit_chain
from fhir_server.security.audit_chain import ChainRow, Checkpoint, ChainVerifier, Finding, Head
from fhir_server.security.crypto import IntegrityError
from fhir_server.storage import schema, tenants
from fhir_server.storage.repository import ResourceRepository

if TYPE_CHECKING:
    from fhir_server.storage.store import Storage

log = logging.getLogger(__name__)

P = schema.audit_pending
L = schema.audit_log
H = schema.audit_heads
C = schema.audit_checkpoints
R = schema.resources
V = schema.resource_versions
AUDIT_EVENT = "AuditEvent"
SECOND = 1_000_000
CHAIN_BATCH = 5000
READ_BATCH = 1000


def add_pending(conn: Connection, tenant_id: int, rows: list[tuple[str, int, bytes]]) -> None:
    """Records to chain: (AuditEvent id, recorded, digest), in the caller's transaction."""
    if rows:
        values = [{"tenant_id": tenant_id, "res_id": r, "recorded": t, "digest": d} for r, t, d in rows]
        conn.execute(insert(P), values if len(values) > 1 else values[0])


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
        self._chainer = _Chainer(self)

    def kick(self, tenant_name: str) -> None:
        """Chain the tenant's pending records soon, in this process's chainer thread."""
        self._chainer.kick(tenant_name)

    def stop(self) -> None:
        self._chainer.stop()

    # --- chaining --------------------------------------------------------------------------------------------

    def chain(self, tenant_name: str, *, checkpoint: bool = False) -> int:
        """Chain every pending record of the tenant now; with ``checkpoint``, sign one at the end if records were
        chained since the last. Returns how many were chained."""
        total = 0
        while True:
            with self.storage.session(tenant_name, write=True, audited=False) as repo:
                n = self._chain_batch(repo, force_checkpoint=checkpoint)
            total += n
            if n < CHAIN_BATCH:
                return total

    def _chain_batch(self, repo: ResourceRepository, *, force_checkpoint: bool) -> int:
        conn, tid = repo.conn, repo.tenant.id
        head = self._lock_head(conn, tid)
        pending = conn.execute(
            select(P.c.res_id, P.c.recorded, P.c.digest).where(P.c.tenant_id == tid)
            .order_by(P.c.recorded, P.c.res_id).limit(CHAIN_BATCH)
        ).all()
        seq, prev = head.seq, head.hash
        if pending:
            key = audit_chain.chain_key(repo.sealer.keys.index_key)
            rows = []
            for p in pending:
                seq += 1
                digest = bytes(p.digest)
                h = audit_chain.link(key, tid, seq, prev, digest, p.res_id, p.recorded)
                rows.append({"tenant_id": tid, "seq": seq, "res_id": p.res_id, "recorded": p.recorded, "digest": digest,
                             "prev_hash": prev, "hash": h})
                prev = h
            conn.execute(insert(L), rows if len(rows) > 1 else rows[0])
            ids = [p.res_id for p in pending]
            for start in range(0, len(ids), 500):
                conn.execute(delete(P).where(P.c.tenant_id == tid, P.c.res_id.in_(ids[start:start + 500])))
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
            conn.execute(update(H).where(H.c.tenant_id == tid).values(
                seq=seq, hash=prev, checkpoint_seq=checkpoint_seq, checkpoint_at=checkpoint_at))
        return len(pending)

    @staticmethod
    def _lock_head(conn: Connection, tid: int) -> _HeadRow:
        """The tenant's head row, locked until the transaction ends (created on first use)."""
        stmt = select(H.c.seq, H.c.hash, H.c.checkpoint_seq, H.c.checkpoint_at).where(H.c.tenant_id == tid)
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            stmt = stmt.with_for_update()
        row = conn.execute(stmt).first()
        if row is None:
            values = {"tenant_id": tid, "seq": 0, "hash": audit_chain.GENESIS, "checkpoint_seq": 0, "checkpoint_at": now_us()}
            dialect_insert = postgresql.insert if postgres else sqlite.insert
            conn.execute(dialect_insert(H).values(**values).on_conflict_do_nothing())
            row = conn.execute(stmt).one()
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
                       V.c.deleted)
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
        waiting = exists().where(P.c.tenant_id == tid, P.c.res_id == R.c.res_id)
        stray = conn.execute(select(R.c.res_id).where(R.c.tenant_id == tid, R.c.res_type == AUDIT_EVENT, ~in_log, ~waiting)
                             .limit(1)).first()
        if stray is not None:
            return Finding("inserted", None, stray.res_id, f"AuditEvent/{stray.res_id} is stored but was never recorded "
                           "in the log: it was inserted")
        changed = conn.execute(select(R.c.res_id, R.c.version, R.c.deleted).where(
            R.c.tenant_id == tid, R.c.res_type == AUDIT_EVENT, (R.c.version != 1) | R.c.deleted).limit(1)).first()
        if changed is not None:
            what = "deleted" if changed.deleted else f"given a version {changed.version}"
            return Finding("changed", None, changed.res_id, f"AuditEvent/{changed.res_id} was {what} after it was recorded")
        return None

    def events(self, tenant_name: str, *, since: int | None = None, until: int | None = None) -> Iterator[bytes]:
        """The tenant's AuditEvents recorded in [since, until), oldest first, as their stored JSON."""
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
    """A thread per process that chains the tenants it is told about, soon after their records commit, and signs
    a checkpoint for each of them when one is due and nothing else happens."""

    def __init__(self, log_: AuditLog) -> None:
        self.log = log_
        self._dirty: set[str] = set()
        self._known: set[str] = set()
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
        idle_for = max(1, self.log.policy.checkpoint_seconds)
        while True:
            with self._cond:
                if not self._dirty and not self._stopping:
                    self._cond.wait(timeout=idle_for)
                if self._stopping and not self._dirty:
                    return
                todo, self._dirty = self._dirty, set()
                timed_out = not todo
                if timed_out:
                    todo = set(self._known)
            for name in sorted(todo):
                try:
                    self.log.chain(name, checkpoint=timed_out)
                    self._known.add(name)
                except tenants.TenantNotFound:
                    self._known.discard(name)
                except Exception as exc:  # noqa: BLE001 - retried (backing off); the records are safe meanwhile
                    self._failures += 1
                    log.error("audit chaining failed", extra={"tenant": name, "error_type": type(exc).__name__,
                                                              "failures": self._failures})
                    with self._cond:
                        self._dirty.add(name)
                        self._cond.wait(timeout=min(30, 2 ** min(self._failures, 5)))
                else:
                    self._failures = 0
