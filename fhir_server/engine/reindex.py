"""Reindex jobs: extract the index of stored resources again (after a custom SearchParameter, or on demand).

A job covers resource types of one tenant and walks their current resources in id order, a batch
per transaction; the job row records the position and the count in the same transaction, so a job
killed at any point resumes where it stopped. A worker claims a job with a lease that it renews every
batch; an expired lease lets another worker (or `fhir-server reindex`) take the job over. When a job
finishes, the custom parameters it was indexing for become usable.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import select, update

from fhir_server.clock import now_us
from fhir_server.search.custom import INDEXING, READY
from fhir_server.storage import schema

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine

log = logging.getLogger(__name__)
J = schema.reindex_jobs
S = schema.search_param_state
LEASE_US = 60_000_000
BATCH = 200


def owner_id() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{threading.get_ident() % 100000}"


def claim(engine: Engine, job_id: int, owner: str) -> bool:
    """Take a job whose lease is free (pending, or abandoned by a dead worker)."""
    now = now_us()
    with engine.storage.db.transaction(write=True) as conn:
        claimed = conn.execute(
            update(J)
            .where(J.c.id == job_id, J.c.status.in_(("pending", "running")), J.c.lease_until < now)
            .values(status="running", lease_owner=owner, lease_until=now + LEASE_US, updated_at=now)
        ).rowcount
    return bool(claimed)


def runnable(engine: Engine) -> list[int]:
    now = now_us()
    with engine.storage.db.transaction(write=False) as conn:
        return [r.id for r in conn.execute(
            select(J.c.id).where(J.c.status.in_(("pending", "running")), J.c.lease_until < now).order_by(J.c.id).limit(10)
        )]


def run(engine: Engine, job_id: int, owner: str, progress: Callable[[int], None] | None = None) -> str:
    """Run a claimed job to its end; returns its final status ("done", or "lost" if the lease was taken)."""
    with engine.storage.db.transaction(write=False) as conn:
        job = conn.execute(select(J).where(J.c.id == job_id)).one()
        tenant = conn.execute(select(schema.tenants.c.name).where(schema.tenants.c.id == job.tenant_id)).scalar_one_or_none()
    if tenant is None:
        _finish(engine, job_id, owner, "failed", "the tenant no longer exists")
        return "failed"
    types: list[str] = json.loads(job.types)
    while True:
        with engine.storage.session(tenant, write=True) as repo:
            row = repo.conn.execute(select(J).where(J.c.id == job_id).with_for_update()).one()
            if row.lease_owner != owner or row.status != "running":
                return "lost"
            ctx = engine.contexts.for_repo(repo)
            rtype = row.cursor_type or types[0]
            if rtype not in types:
                rtype = types[0]
            batch = repo.current_of_type(rtype, after=row.cursor_id, limit=BATCH)
            for record, mask in batch:
                resource = json.loads(record.body or b"{}")
                repo.reindex(rtype, record.res_id, ctx.extractor.extract(resource, local_path=f"/fhir/{tenant}/"), mask)
            now = now_us()
            finished = False
            if len(batch) == BATCH:
                values: dict[str, object] = {"cursor_type": rtype, "cursor_id": batch[-1][0].res_id}
            elif types.index(rtype) + 1 < len(types):
                values = {"cursor_type": types[types.index(rtype) + 1], "cursor_id": None}
            else:
                values, finished = {"cursor_type": rtype, "cursor_id": batch[-1][0].res_id if batch else row.cursor_id}, True
            repo.conn.execute(update(J).where(J.c.id == job_id).values(
                processed=row.processed + len(batch), lease_until=now + LEASE_US, updated_at=now, **values))
        if progress and batch:
            progress(len(batch))
        if finished:
            return _complete(engine, tenant, job_id, owner)


def _complete(engine: Engine, tenant: str, job_id: int, owner: str) -> str:
    """Mark the job done and its parameters usable (an exclusive tenant session: the epoch moves on)."""
    with engine.storage.session(tenant, write=True, exclusive=True) as repo:
        row = repo.conn.execute(select(J).where(J.c.id == job_id).with_for_update()).one()
        if row.lease_owner != owner or row.status != "running":
            return "lost"
        now = now_us()
        repo.conn.execute(update(J).where(J.c.id == job_id).values(status="done", lease_until=0, updated_at=now))
        repo.conn.execute(update(S).where(S.c.tenant_id == repo.tenant.id, S.c.job_id == job_id, S.c.state == INDEXING)
                          .values(state=READY, updated_at=now))
        repo.conn.execute(update(schema.tenants).where(schema.tenants.c.id == repo.tenant.id)
                          .values(search_epoch=schema.tenants.c.search_epoch + 1))
    return "done"


def _finish(engine: Engine, job_id: int, owner: str, status: str, error: str | None) -> None:
    with engine.storage.db.transaction(write=True) as conn:
        conn.execute(update(J).where(J.c.id == job_id, J.c.lease_owner == owner).values(
            status=status, error=error, lease_until=0, updated_at=now_us()))


class JobRunner:
    """A daemon thread per worker that runs reindex jobs: when kicked, and every ``poll_seconds``."""

    def __init__(self, engine: Engine, poll_seconds: float) -> None:
        self.engine = engine
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def kick(self) -> None:
        self._ensure_started()
        self._wake.set()

    def _ensure_started(self) -> None:
        if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._loop, name="fhir-reindex", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            try:
                self.run_pending()
            except Exception:  # noqa: BLE001 - the runner must survive a failed job; the lease lets it be retried
                log.error("reindex job failed", extra={"error_type": "see database state"})

    def run_pending(self) -> int:
        done = 0
        owner = owner_id()
        for job_id in runnable(self.engine):
            if claim(self.engine, job_id, owner):
                if run(self.engine, job_id, owner) == "done":
                    done += 1
        return done
