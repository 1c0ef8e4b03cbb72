"""The audit log is tamper-evident: every change to the stored log is found by verification, on both back-ends.

The tampering is done as the database's administrator (past row-level security and the application role's
missing UPDATE and DELETE rights on the chain), as an insider with database access would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine as SqlEngine
from sqlalchemy import create_engine, delete, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from fhir_server.clock import now_us
from fhir_server.engine.engine import Engine
from fhir_server.storage import audit_log, schema, tenants
from fhir_server.storage.store import Storage
from testsupport.backends import DatabaseUrls
from testsupport.cli import admin_or_owner
from testsupport.engine_calls import call, in_threads, patient

L = schema.audit_log
V = schema.resource_versions
R = schema.resources
H = schema.audit_heads
C = schema.audit_checkpoints


@pytest.fixture
def admin(db_urls: DatabaseUrls) -> Iterator[SqlEngine]:
    engine = create_engine(admin_or_owner(db_urls), poolclass=NullPool)
    yield engine
    engine.dispose()


def make_log(engine: Engine, tenant: str, n: int = 6) -> list[str]:
    """``n`` interactions, chained with a checkpoint at the end; the AuditEvent ids in chain order."""
    for i in range(n):
        call(engine, tenant, "PUT", f"Patient/p{i}", patient(f"p{i}"))
    engine.storage.audit_log.chain(tenant, checkpoint=True)
    report = engine.storage.audit_log.verify(tenant)
    assert report.ok and report.records == n and report.checkpoints >= 1, report
    with engine.storage.session(tenant, write=False) as repo:
        return [r.res_id for r in repo.conn.execute(select(L.c.res_id).where(L.c.tenant_id == repo.tenant.id).order_by(L.c.seq))]


def tid_of(storage: Storage, tenant: str) -> int:
    with storage.db.transaction(write=False) as conn:
        return tenants.lookup(conn, tenant).id


def finding(storage: Storage, tenant: str) -> Any:
    report = storage.audit_log.verify(tenant)
    assert not report.ok, "the tampering went unnoticed"
    return report.findings[0]


def test_an_untouched_log_verifies(engine: Engine, tenant: str) -> None:
    ids = make_log(engine, tenant)
    call(engine, tenant, "GET", "Patient/p1")  # a read is recorded too
    engine.storage.audit_log.chain(tenant)
    report = engine.storage.audit_log.verify(tenant)
    assert report.ok and report.records == len(ids) + 1 and report.pending == 0


def test_a_changed_byte_of_a_stored_record_is_found(engine: Engine, tenant: str, admin: SqlEngine) -> None:
    ids = make_log(engine, tenant)
    tid = tid_of(engine.storage, tenant)
    with admin.begin() as conn:
        body = conn.execute(select(V.c.body).where(V.c.tenant_id == tid, V.c.res_type == "AuditEvent", V.c.res_id == ids[2])).scalar_one()
        flipped = bytes(body[:40]) + bytes([body[40] ^ 1]) + bytes(body[41:])
        conn.execute(update(V).where(V.c.tenant_id == tid, V.c.res_type == "AuditEvent", V.c.res_id == ids[2]).values(body=flipped))
    found = finding(engine.storage, tenant)
    assert (found.kind, found.seq, found.res_id) == ("changed", 3, ids[2])


def test_a_changed_chain_entry_is_found(engine: Engine, tenant: str, admin: SqlEngine) -> None:
    ids = make_log(engine, tenant)
    tid = tid_of(engine.storage, tenant)
    with admin.begin() as conn:
        conn.execute(update(L).where(L.c.tenant_id == tid, L.c.seq == 4).values(recorded=L.c.recorded + 1))
    found = finding(engine.storage, tenant)
    assert (found.kind, found.seq, found.res_id) == ("changed", 4, ids[3])


def test_a_deleted_row_is_found(engine: Engine, tenant: str, admin: SqlEngine) -> None:
    make_log(engine, tenant)
    tid = tid_of(engine.storage, tenant)
    with admin.begin() as conn:
        conn.execute(delete(L).where(L.c.tenant_id == tid, L.c.seq == 3))
    found = finding(engine.storage, tenant)
    assert (found.kind, found.seq) == ("removed", 3)
    assert "#3 removed" in found.message


def test_a_deleted_record_resource_is_found(engine: Engine, tenant: str, admin: SqlEngine) -> None:
    ids = make_log(engine, tenant)
    tid = tid_of(engine.storage, tenant)
    with admin.begin() as conn:
        for table in (V, R):
            conn.execute(delete(table).where(table.c.tenant_id == tid, table.c.res_type == "AuditEvent", table.c.res_id == ids[1]))
    found = finding(engine.storage, tenant)
    assert (found.kind, found.seq, found.res_id) == ("removed", 2, ids[1])


def test_two_swapped_rows_are_found(engine: Engine, tenant: str, admin: SqlEngine) -> None:
    ids = make_log(engine, tenant)
    tid = tid_of(engine.storage, tenant)
    cols = (L.c.res_id, L.c.recorded, L.c.digest, L.c.prev_hash, L.c.hash)
    with admin.begin() as conn:
        two = {r.seq: r for r in conn.execute(select(L.c.seq, *cols).where(L.c.tenant_id == tid, L.c.seq.in_((2, 3))))}
        conn.execute(delete(L).where(L.c.tenant_id == tid, L.c.seq.in_((2, 3))))
        for seq, other in ((2, 3), (3, 2)):
            row = two[other]
            conn.execute(insert(L).values(tenant_id=tid, seq=seq, res_id=row.res_id, recorded=row.recorded, digest=row.digest,
                                          prev_hash=row.prev_hash, hash=row.hash))
    found = finding(engine.storage, tenant)
    assert (found.kind, found.seq, found.res_id) == ("reordered", 2, ids[2])
    assert "chained as #3" in found.message


def test_a_dropped_tail_is_found(engine: Engine, tenant: str, admin: SqlEngine) -> None:
    make_log(engine, tenant)
    call(engine, tenant, "GET", "Patient/p0")  # two records after the last checkpoint
    call(engine, tenant, "GET", "Patient/p1")
    engine.storage.audit_log.chain(tenant)
    tid = tid_of(engine.storage, tenant)
    with admin.begin() as conn:
        conn.execute(delete(L).where(L.c.tenant_id == tid, L.c.seq > 6))
    found = finding(engine.storage, tenant)
    assert found.kind == "truncated" and "ends at #6" in found.message and "head says #8" in found.message


def test_a_dropped_tail_with_a_rewound_head_is_caught_by_the_checkpoint(engine: Engine, tenant: str, admin: SqlEngine) -> None:
    make_log(engine, tenant)
    tid = tid_of(engine.storage, tenant)
    with admin.begin() as conn:
        row4 = conn.execute(select(L.c.hash).where(L.c.tenant_id == tid, L.c.seq == 4)).scalar_one()
        conn.execute(delete(L).where(L.c.tenant_id == tid, L.c.seq > 4))
        conn.execute(update(H).where(H.c.tenant_id == tid).values(seq=4, hash=row4))  # a consistent-looking head
    found = finding(engine.storage, tenant)
    assert found.kind == "truncated" and "checkpoint was signed at #6" in found.message


def test_a_forged_checkpoint_is_found(engine: Engine, tenant: str, admin: SqlEngine) -> None:
    make_log(engine, tenant)
    tid = tid_of(engine.storage, tenant)
    with admin.begin() as conn:
        conn.execute(update(C).where(C.c.tenant_id == tid).values(signed_at=C.c.signed_at + 1))
    assert finding(engine.storage, tenant).kind == "checkpoint"


def test_an_inserted_record_is_found(engine: Engine, tenant: str, admin: SqlEngine) -> None:
    ids = make_log(engine, tenant)
    tid = tid_of(engine.storage, tenant)
    with admin.begin() as conn:  # a copy of a stored AuditEvent under a new id, outside the chain
        for table in (R, V):
            row = conn.execute(select(table).where(table.c.tenant_id == tid, table.c.res_type == "AuditEvent",
                                                   table.c.res_id == ids[0])).one()._asdict()
            conn.execute(insert(table).values({**row, "res_id": "forged"}))
    found = finding(engine.storage, tenant)
    assert (found.kind, found.res_id) == ("inserted", "forged")


def test_a_second_version_of_a_record_is_found(engine: Engine, tenant: str, admin: SqlEngine) -> None:
    """A version row added behind the server's back (the record "amended", its version 1 left alone)."""
    ids = make_log(engine, tenant)
    tid = tid_of(engine.storage, tenant)
    with admin.begin() as conn:
        row = conn.execute(select(V).where(V.c.tenant_id == tid, V.c.res_type == "AuditEvent", V.c.res_id == ids[1])).one()._asdict()
        conn.execute(insert(V).values({**row, "version": 2}))
    found = finding(engine.storage, tenant)
    assert (found.kind, found.res_id) == ("changed", ids[1]) and "version 2" in found.message


def test_a_shifted_stored_time_is_found(engine: Engine, tenant: str, admin: SqlEngine) -> None:
    """The record's stored time (what `_lastUpdated` and exports go by) moved: it no longer matches the chain."""
    ids = make_log(engine, tenant)
    tid = tid_of(engine.storage, tenant)
    with admin.begin() as conn:
        conn.execute(update(V).where(V.c.tenant_id == tid, V.c.res_type == "AuditEvent", V.c.res_id == ids[3])
                     .values(last_updated=V.c.last_updated - 86_400_000_000))
    found = finding(engine.storage, tenant)
    assert (found.kind, found.seq, found.res_id) == ("changed", 4, ids[3])


def test_audit_events_stored_before_the_log_existed_are_not_reported(engine: Engine, tenant: str, admin: SqlEngine) -> None:
    """AuditEvents a client stored before auditing landed (migration 0006 lists them in `audit_legacy`) are
    outside the chain, and verification leaves them alone; any other AuditEvent outside it is reported."""
    ids = make_log(engine, tenant)
    tid = tid_of(engine.storage, tenant)
    with admin.begin() as conn:  # a client's AuditEvent of those days, created and then updated (version 2)
        where = (V.c.tenant_id == tid, V.c.res_type == "AuditEvent", V.c.res_id == ids[0])
        version = conn.execute(select(V).where(*where)).one()._asdict()
        current = conn.execute(select(R).where(R.c.tenant_id == tid, R.c.res_type == "AuditEvent", R.c.res_id == ids[0])).one()._asdict()
        conn.execute(insert(V).values([{**version, "res_id": "old-client-event", "version": v} for v in (1, 2)]))
        conn.execute(insert(R).values({**current, "res_id": "old-client-event", "version": 2}))
        conn.execute(insert(schema.audit_legacy).values(tenant_id=tid, res_id="old-client-event"))
    report = engine.storage.audit_log.verify(tenant)
    assert report.ok, report
    with admin.begin() as conn:
        conn.execute(delete(schema.audit_legacy).where(schema.audit_legacy.c.tenant_id == tid))
    assert finding(engine.storage, tenant).res_id == "old-client-event"


def test_a_record_never_chained_is_reported_after_the_grace_period(engine: Engine, tenant: str) -> None:
    make_log(engine, tenant)
    engine.storage.audit_log.stop()  # (as if its server was killed: no chainer comes by)
    with engine.storage.session(tenant, write=True, audited=False) as repo:
        audit_log.store_records(repo.conn, repo.tenant.id, [audit_log.Record("stuck", now_us() - 3600 * 1_000_000, 1, b"x", bytes(32))])
    found = finding(engine.storage, tenant)
    assert (found.kind, found.res_id) == ("unchained", "stuck")
    assert engine.storage.audit_log.verify(tenant, grace_seconds=7200).ok  # still within a longer grace


def test_the_server_cannot_rewrite_its_own_log(engine: Engine, tenant: str, backend: str) -> None:
    """On PostgreSQL the application role may read and append the chain, not update or delete it."""
    if backend != "postgresql":
        pytest.skip("roles and grants are PostgreSQL's")
    make_log(engine, tenant, n=2)
    for statement in ("UPDATE audit_log SET recorded = recorded + 1", "DELETE FROM audit_log",
                      "DELETE FROM audit_checkpoints"):
        with pytest.raises(DBAPIError, match="permission denied"):
            with engine.storage.session(tenant, write=True, audited=False) as repo:
                repo.conn.execute(text(statement))


def test_chaining_is_serial_across_writers(engine: Engine, tenant: str) -> None:
    """Many records chained by several chainers at once still make one gapless chain."""
    for i in range(40):
        call(engine, tenant, "PUT", f"Basic/b{i}", {"resourceType": "Basic", "id": f"b{i}", "code": {"text": "x"}})
    in_threads(lambda: engine.storage.audit_log.chain(tenant), 4)
    report = engine.storage.audit_log.verify(tenant)
    assert report.ok and report.records == 40 and report.pending == 0
    with engine.storage.session(tenant, write=False) as repo:
        seqs = [r for (r,) in repo.conn.execute(select(L.c.seq).where(L.c.tenant_id == repo.tenant.id).order_by(L.c.seq))]
        assert seqs == list(range(1, 41))
        assert repo.conn.execute(select(func.count()).select_from(R).where(
            R.c.tenant_id == repo.tenant.id, R.c.res_type == "AuditEvent")).scalar_one() == 40


def test_a_read_is_recorded_after_its_connection_lost_its_prepared_statements(engine: Engine, tenant: str, backend: str) -> None:
    """On PostgreSQL a read's record goes through a statement prepared on its connection; psycopg deallocates every
    prepared statement after DDL (and a pooler may reset the session): the record is still written."""
    if backend != "postgresql":
        pytest.skip("prepared statements of the read path are PostgreSQL's")
    call(engine, tenant, "PUT", "Patient/p0", patient("p0"))
    engine.storage.audit_log.chain(tenant)
    before = engine.storage.audit_log.verify(tenant).records
    with engine.storage.shared_reads(tenant) as repo:
        assert repo.conn.info["fhir_autocommit"]
        assert call(engine, tenant, "GET", "Patient/p0").status == 200
        repo.conn.connection.driver_connection.execute("DEALLOCATE ALL")
        assert call(engine, tenant, "GET", "Patient/p0").status == 200
        assert call(engine, tenant, "GET", "Patient/p0").status == 200
    engine.storage.audit_log.chain(tenant)
    report = engine.storage.audit_log.verify(tenant)
    assert report.ok and report.records == before + 3 and report.pending == 0, report


def test_chaining_writes_nothing_when_a_pending_record_is_gone(engine: Engine, tenant: str, admin: SqlEngine, backend: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL the chaining statement takes the bodies from the pending rows: one that disappears between being
    read and being chained (an insider deleting it) leaves the chain, the head and the other pending records as they
    were, instead of a sequence number without a record. (SQLite's chainer carries the bodies itself and holds the
    database's write lock meanwhile.)"""
    if backend != "postgresql":
        pytest.skip("the chaining statement that moves bodies inside the server is PostgreSQL's")
    make_log(engine, tenant, n=2)
    log_ = engine.storage.audit_log
    log_.stop()  # no background chainer: this test's own chain() is the only one that meets the tampering
    monkeypatch.setattr(log_, "kick", lambda name: None)
    for i in range(3):
        call(engine, tenant, "PUT", f"Patient/q{i}", patient(f"q{i}"))
    tid = tid_of(engine.storage, tenant)
    original = audit_log.AuditLog._write_chain

    def tampered(conn: Any, tid_: int, rows: list[dict[str, Any]], head: Any) -> None:
        with admin.begin() as c:  # deleted after the chainer read it, before its write
            c.execute(delete(schema.audit_pending).where(schema.audit_pending.c.tenant_id == tid,
                                                         schema.audit_pending.c.res_id == rows[1]["res_id"]))
        original(conn, tid_, rows, head)

    monkeypatch.setattr(audit_log.AuditLog, "_write_chain", staticmethod(tampered))
    with pytest.raises(RuntimeError, match="pending records changed"):
        engine.storage.audit_log.chain(tenant)
    monkeypatch.undo()
    with engine.storage.session(tenant, write=False) as repo:
        assert repo.conn.execute(select(func.max(L.c.seq)).where(L.c.tenant_id == tid)).scalar_one() == 2
        assert repo.conn.execute(select(H.c.seq).where(H.c.tenant_id == tid)).scalar_one() == 2
        assert repo.conn.execute(select(func.count()).select_from(schema.audit_pending)
                                 .where(schema.audit_pending.c.tenant_id == tid)).scalar_one() == 2


def test_the_busy_clock_is_one_for_the_workers_forked_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers of one server are idle only when all of them are: a worker that serves no request must not index
    (taking the CPU) while another serves."""
    import os
    import time

    monkeypatch.setattr(audit_log, "_shared_clock", None)
    audit_log.share_busy_clock()
    clock = audit_log._shared_clock
    assert clock is not None and clock.idle()
    pid = os.fork()
    if pid == 0:  # a worker that serves a request
        clock.mark()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert not clock.idle()  # seen by this process, which served nothing
    time.sleep(audit_log.IDLE_SECONDS + 0.05)
    assert clock.idle()
    own = audit_log.BusyClock()  # a process's own clock (no server forked it) is not the shared one
    own.mark()
    assert not own.idle() and clock.idle()
