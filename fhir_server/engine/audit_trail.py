"""Writing the audit log: every interaction's AuditEvent, committed before anyone sees its result.

- A write interaction's AuditEvent is appended in the transaction of its data (``Storage.before_commit``):
  both commit, or neither.
- A read's is committed before its answer leaves: on PostgreSQL by one statement on the read's own connection
  (PostgreSQL's commits of concurrent readers share their WAL flushes); otherwise, and for failures, by a group
  commit (the threads of a process that finish at the same time share one transaction per tenant), after a
  request's read session has given its connection back. If it cannot be written, the interaction fails (503):
  nothing leaves unaudited.
- Events of the authorization server and the command line are queued on the unit of work they concern
  (``repo.pending_audit``) and go into its transaction the same way.

Each AuditEvent is stored as a resource of its tenant with a pending row for the chain (``storage/audit_log.py``);
after the commit the process's chainer is kicked, the monitoring rules' alerts are logged, and each record is
mirrored to the sink, if one is set. The chainer chains records within moments, and writes their search index
(``index``) when the server is idle, or falls too far behind; a search of AuditEvents catches up first, so it
finds every record committed before it (``catch_up``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import select, tuple_

from fhir_server.clock import now_us
from fhir_server.engine import auditing, compartments
from fhir_server.engine.audit_index import AuditIndexer
from fhir_server.engine.auditing import COMMITTING, DEFERRED, LOST, OPEN, RECORDED, Interaction
from fhir_server.engine.resources import not_known, stamp, was_deleted
from fhir_server.errors import ServiceUnavailable
from fhir_server.search.extract import IndexEntries, parse_reference
from fhir_server.security import audit_chain, audit_events
from fhir_server.security.audit_events import current_origin
from fhir_server.security.audit_monitor import Monitor
from fhir_server.storage import audit_log, schema
from fhir_server.storage.repository import ResourceRepository, VersionRecord
from fhir_server.storage.tenants import TenantNotFound

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine
    from fhir_server.engine.request import FhirRequest, FhirResponse
    from fhir_server.security.access import AccessContext

log = logging.getLogger(__name__)
AUDIT_EVENT = "AuditEvent"


class AuditUnavailable(ServiceUnavailable):
    """The audit record of an interaction could not be written, so its result is withheld."""


class AuditTrail:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.storage = engine.storage
        self.enabled = engine.settings.audit
        self.monitor = Monitor(engine.settings)
        self.sink = Sink(engine.settings.audit_sink) if engine.settings.audit_sink else None
        self._group = GroupCommit(self._commit)
        self._chain_keys: dict[int, tuple[bytes, bytes]] = {}
        self.storage.before_commit = self._before_commit
        self.storage.audit_log.indexer = AuditIndexer(engine)
        self.storage.audit_log.finisher = self._complete_reads

    # --- the engine's side ---------------------------------------------------------------------------------

    def begin(self, req: FhirRequest) -> tuple[Interaction | None, object | None]:
        """The interaction of an engine request: the one the HTTP layer opened for it, or a new one (nested in a
        Bundle, or from another door)."""
        if not self.enabled:
            return None, None
        self.storage.audit_log.busy()  # the chainer indexes when nothing else is going on
        act = auditing.current()
        if act is not None and not act.attached and act.tenant == req.tenant:
            act.attach(req)
            return act, None
        act = Interaction.of(req, current_origin())
        return act, auditing.enter(act)

    @contextmanager
    def http(self, method: str, tenant: str, path: tuple[str, ...], params: tuple[tuple[str, str], ...],
             base_url: str) -> Iterator[None]:
        """The interaction of an HTTP request, opened before the request is read: what fails before the engine
        takes it over (no valid token, a body that does not parse) is recorded too."""
        if not self.enabled:
            yield
            return
        act = Interaction(method, tenant, path, params, base_url, None, current_origin())
        token = auditing.enter(act)
        try:
            yield
        except Exception as exc:
            self.failed(act, exc)
            raise
        finally:
            auditing.leave(token)

    def identify(self, access: AccessContext) -> None:
        """Who is calling, known before the engine takes the request over (a refusal of its body names them)."""
        act = auditing.current()
        if act is not None and not act.attached:
            act.access = access

    def end(self, token: object | None) -> None:
        if token is not None:
            auditing.leave(token)

    def succeeded(self, act: Interaction | None, resp: FhirResponse) -> None:
        """Record a successful interaction unless its write transaction did; raises AuditUnavailable if it cannot."""
        if act is None or act.state in (RECORDED, DEFERRED):
            return
        self._record(act, act.event(resp.status), strict=True)

    def failed(self, act: Interaction | None, exc: BaseException) -> None:
        """Record a failed interaction (the caller re-raises its error; when this one cannot be recorded either,
        that is logged, and the error stands)."""
        if act is None or act.state in (RECORDED, LOST, DEFERRED):
            return
        status, description = auditing.failure(exc)
        self._record(act, act.event(status, description), strict=False)

    def _record(self, act: Interaction, event: dict[str, Any], *, strict: bool) -> None:
        outer = self.storage.open_write(act.tenant)
        if outer is not None:  # inside a write unit of work of the tenant (a login page's search): commit with it
            outer.pending_audit.append(event)
            act.state = RECORDED
            return
        shared = self.storage.shared_read(act.tenant)
        if shared is not None and shared.conn.info.get("fhir_autocommit") and not self.monitor.writes([event]):
            # PostgreSQL: one statement on the read's own connection, a transaction of its own (unless the
            # monitoring rules have marks to write with it: then a transaction, below).
            self._commit_record(act, event, strict=strict, repo=shared)
            return
        if self.storage.after_shared_reads(act.tenant, lambda: self._commit_record(act, event, strict=strict)):
            act.state = DEFERRED  # committed when the request's read session ends, before its answer leaves
            return
        self._commit_record(act, event, strict=strict)

    def _commit_record(self, act: Interaction, event: dict[str, Any], *, strict: bool,
                       repo: ResourceRepository | None = None) -> None:
        """Commit an interaction's record now (on ``repo``'s autocommit connection, or by a group commit); when it
        cannot be, AuditUnavailable (``strict``: the record of a success, whose answer must then not leave), or a
        log line (the record of a failure: the failure stands)."""
        try:
            if repo is not None:
                written, alerts = self.append_in(repo, [event])
                self._after_commit(act.tenant, written, alerts)
            else:
                self.append(act.tenant, [event])
        except TenantNotFound:
            act.state = LOST  # no such tenant: no log to write to (the answer says so)
            return
        except Exception as exc:
            act.state = LOST
            log.error("audit record not written", extra={"tenant": act.tenant, "error_type": type(exc).__name__,
                                                         "cause_type": type(exc.__cause__).__name__ if exc.__cause__ else None})
            if strict:
                raise AuditUnavailable("The audit log could not be written, so the request was not completed; retry later",
                                       headers={"Retry-After": "5"}) from None
            return
        act.state = RECORDED

    # --- appending ---------------------------------------------------------------------------------------

    def append(self, tenant: str, events: list[dict[str, Any]]) -> None:
        """Commit AuditEvents of ``tenant`` now (with those of other threads of this process: a group commit)."""
        if self.enabled and events:
            self._group.submit(tenant, events)

    def _commit(self, tenant: str, events: list[dict[str, Any]]) -> None:
        with self.storage.session(tenant, write=True, audited=False) as repo:
            written, alerts = self.append_in(repo, events)
        self._after_commit(tenant, written, alerts)

    def _before_commit(self, repo: ResourceRepository) -> Callable[[], None] | None:
        events, repo.pending_audit = repo.pending_audit, []
        if not self.enabled:
            return None
        act = auditing.current()
        in_transaction = act is not None and act.state == OPEN and act.attached and act.tenant == repo.tenant.name
        if in_transaction:
            assert act is not None
            events.append(act.event(200))
            act.state = COMMITTING
        if not events:
            return None
        try:
            written, alerts = self.append_in(repo, events)
        except Exception as exc:  # the unit of work rolls back with it: nothing is written unaudited
            log.error("audit record not written", extra={"tenant": repo.tenant.name, "error_type": type(exc).__name__})
            raise AuditUnavailable("The audit log could not be written, so nothing was changed; retry later",
                                   headers={"Retry-After": "5"}) from None

        def after() -> None:
            if in_transaction:
                assert act is not None
                act.state = RECORDED
            self._after_commit(repo.tenant.name, written, alerts)

        return after

    def append_in(self, repo: ResourceRepository, events: list[dict[str, Any]]) -> tuple[list[tuple[str, bytes]], list[dict[str, Any]]]:
        """Store AuditEvents (sealed) with their pending chain rows in an open unit of work, with the alerts the
        monitoring rules raise on them. Returns (id, stored bytes) of each, and the alerts."""
        alerts = self.monitor.evaluate(repo, events)
        key = self._chain_key(repo)
        now = now_us()
        written, records = [], []
        for event in [*events, *alerts]:
            body = stamp(event, event["id"], 1, now)
            key_version, sealed = repo.sealer.seal_resource(AUDIT_EVENT, event["id"], 1, body)
            records.append(audit_log.Record(event["id"], now, key_version, sealed, audit_chain.record_digest(key, body)))
            written.append((event["id"], body))
        audit_log.store_records(repo.conn, repo.tenant.id, records)
        return written, alerts

    # --- a read recorded by its own statement ------------------------------------------------------------

    def read_recorded(self, repo: ResourceRepository, req: FhirRequest, rtype: str, rid: str,
                      instance_free: Callable[[], bool]) -> tuple[bool, VersionRecord | None]:
        """Read a resource and write the read's record in one statement, when that can be (PostgreSQL, the
        request's read outside a transaction, nothing decided after the read but what the statement sees:
        ``instance_free`` says no instance check follows; no monitoring marks, no mirror): (True, what
        ``repo.read`` returns), the interaction recorded. Otherwise (False, None): read and record as usual.

        The record is a draft, made before the outcome is known (a success, the resource unversioned, no
        patients); the statement notes the version it found and the patients of the resource's index, and the
        chainer completes the record (``_complete_reads``) before it chains it. A read whose record was written saves the round trip that
        writing it after the read costs (docs/audit.md, Cost)."""
        act = auditing.current()
        if (not self.enabled or act is None or act.state != OPEN or not act.attached or act.kind != "read"
                or act.tenant != repo.tenant.name or self.sink is not None or self.storage.shared_read(act.tenant) is not repo
                or req.param("_summary") is not None or req.param("_elements") is not None
                or not audit_log.can_record_with_read(repo)):
            return False, None
        event = act.event(200)
        # A monitoring rule that would count this read, had it found a patient's record, writes marks with the
        # record (a transaction after the read); so does an instance check.
        if self.monitor.counts_patient_reads(event) or not instance_free():
            return False, None
        key, now = self._chain_key(repo), now_us()
        body = stamp(event, event["id"], 1, now)
        key_version, sealed = repo.sealer.seal_resource(AUDIT_EVENT, event["id"], 1, body)
        draft = audit_log.Record(event["id"], now, key_version, sealed, audit_chain.record_digest(key, body))
        keys = [p.key for p in compartments.patient_params(self.engine, rtype)]
        row = audit_log.read_recorded(repo, rtype, rid, draft, keys)  # raises if the record was not written
        act.state = RECORDED
        self.storage.audit_log.kick(act.tenant)
        try:
            return True, None if row is None else repo.record_of(rtype, rid, row)
        except Exception:  # a stored version that does not open: the failure is recorded instead of the draft
            try:
                audit_log.discard_draft(repo, draft.res_id)
            except Exception as exc:  # noqa: BLE001 - the draft stays (its record says what the read found)
                log.error("audit draft not discarded", extra={"tenant": act.tenant, "error_type": type(exc).__name__})
            act.state = OPEN
            raise

    def _complete_reads(self, repo: ResourceRepository, drafts: list[audit_log.Draft]) -> list[bytes]:
        """The AuditEvents of reads recorded by their own statements, completed with what each found: the version
        read and the patients whose record it is in (as indexed, as for search results), or the failure the read
        answered (404, 410)."""
        out = []
        for d in drafts:
            event = orjson.loads(d.event)
            rtype, rid = event["entity"][0]["what"]["reference"].split("/", 1)
            patients, status, description = sorted({*d.read_patients, *([rid] if rtype == "Patient" else [])}), 200, None
            if d.read_version is None:
                status, description = auditing.failure(not_known(rtype, rid))
            elif d.read_deleted:
                status, description = auditing.failure(was_deleted(rtype, rid, d.read_version))
            out.append(stamp(audit_events.complete_read(event, status=status, description=description,
                                                        version=d.read_version, patients=patients), d.res_id, 1, d.recorded))
        return out

    def catch_up(self, req: FhirRequest, types: tuple[str, ...] | list[str]) -> bool:
        """Before AuditEvents are read or searched (``types`` names them) by a caller who may: make every record
        committed so far a chained, indexed resource. True when it did: read with a session that sees it (not the
        request's shared one, whose snapshot may be older on SQLite)."""
        if not self.enabled or AUDIT_EVENT not in types or not (req.access.internal or req.access.grants_for("r", AUDIT_EVENT)):
            return False
        self.storage.audit_log.catch_up(req.tenant)
        return True

    def _after_commit(self, tenant: str, written: list[tuple[str, bytes]], alerts: list[dict[str, Any]]) -> None:
        self.storage.audit_log.kick(tenant)
        for alert in alerts:
            self.monitor.log_alert(tenant, alert)
        if self.sink is not None:
            self.sink.write(tenant, [body for _, body in written])

    def _chain_key(self, repo: ResourceRepository) -> bytes:
        index_key = repo.sealer.keys.index_key
        cached = self._chain_keys.get(repo.tenant.id)
        if cached is None or cached[0] != index_key:
            cached = (index_key, audit_chain.chain_key(index_key))
            self._chain_keys[repo.tenant.id] = cached
        return cached[1]

    # --- whose record ---------------------------------------------------------------------------------------

    def patients_in(self, rtype: str, rid: str, body: dict[str, Any], base_url: str | None = None) -> set[str]:
        """The Patients in whose compartment a resource (its JSON) is, by the Patient CompartmentDefinition's
        reference parameters (relative references, or absolute ones to this server's base URL)."""
        found = {rid} if rtype == "Patient" else set()
        for param in compartments.patient_params(self.engine, rtype):
            for path in param.paths:
                for typed in path.evaluate(body):
                    value = typed.value
                    ref = value.get("reference") if isinstance(value, dict) else None
                    if not isinstance(ref, str):
                        continue
                    if base_url and ref.startswith(base_url + "/"):
                        ref = ref[len(base_url) + 1:]
                    target_type, target_id, _, _ = parse_reference(ref)
                    if target_type == "Patient" and target_id:
                        found.add(target_id)
        return found

    def patients_of_rows(self, repo: ResourceRepository, keys: list[tuple[str, str]]) -> set[str]:
        """The Patients in whose compartments the current versions of these resources are (as indexed)."""
        found = {rid for rtype, rid in keys if rtype == "Patient"}
        param_keys = {p.key for rtype in {t for t, _ in keys} for p in compartments.patient_params(self.engine, rtype)}
        if not param_keys:
            return found
        ref = schema.idx_reference
        for start in range(0, len(keys), 500):
            rows = repo.conn.execute(select(ref.c.target_id).distinct().where(
                ref.c.tenant_id == repo.tenant.id, ref.c.param_key.in_(param_keys), ref.c.target_type == "Patient",
                ref.c.target_id.is_not(None), tuple_(ref.c.res_type, ref.c.res_id).in_(keys[start:start + 500])))
            found.update(r.target_id for r in rows)
        return found


@dataclass
class _Batch:
    events: list[dict[str, Any]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class GroupCommit:
    """Threads that commit AuditEvents of one tenant at the same time share a transaction: while one commits,
    the next ones gather behind it, and the first of them commits them all."""

    def __init__(self, commit: Callable[[str, list[dict[str, Any]]], None]) -> None:
        self._commit = commit
        self._lock = threading.Lock()
        self._gathering: dict[str, _Batch] = {}
        self._gates: dict[str, threading.Lock] = {}

    def submit(self, tenant: str, events: list[dict[str, Any]]) -> None:
        with self._lock:
            batch = self._gathering.get(tenant)
            leader = batch is None
            if batch is None:
                batch = self._gathering[tenant] = _Batch()
            batch.events.extend(events)
            gate = self._gates.setdefault(tenant, threading.Lock())
        if not leader:
            batch.done.wait()
        else:
            with gate:  # one commit per tenant at a time in this process; later events gather meanwhile
                with self._lock:
                    if self._gathering.get(tenant) is batch:
                        del self._gathering[tenant]
                try:
                    self._commit(tenant, batch.events)
                except BaseException as exc:  # noqa: BLE001 - handed to every thread of the batch
                    batch.error = exc
                finally:
                    batch.done.set()
        if batch.error is not None:
            if isinstance(batch.error, TenantNotFound):
                raise TenantNotFound(tenant)
            raise RuntimeError("the audit batch failed") from batch.error


class Sink:
    """A copy of every record as a JSON line in a file (for a SIEM): ``{"tenant": ..., "auditEvent": {...}}``.
    The file holds what the records hold (search queries among it): protect it like the database."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    def write(self, tenant: str, bodies: list[bytes]) -> None:
        lines = b"".join(b'{"tenant":"' + tenant.encode() + b'","auditEvent":' + body + b"}\n" for body in bodies)
        try:
            with self._lock:
                if self._fd is None or self._pid != os.getpid():
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    self._pid = os.getpid()
                os.write(self._fd, lines)
        except OSError as exc:  # the database holds the record: the mirror is a copy
            log.error("audit sink not written", extra={"error_type": type(exc).__name__, "errno": exc.errno})
