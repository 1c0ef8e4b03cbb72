"""16 threads doing mixed interactions for 30 seconds (PostgreSQL; a shorter run on SQLite): afterwards the chain
verifies and holds exactly one AuditEvent per interaction.

Each thread also does at least ``MIN_PER_THREAD`` interactions, however long that takes: on a machine whose disk
is slow to sync (SQLite commits with a full fsync each), a time limit alone may leave too few to mean anything."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from fhir_server.storage import schema
from fhir_server.storage.store import Storage
from testsupport.auth import mint_token

THREADS = 16
MIN_PER_THREAD = 12
FHIR = "application/fhir+json"


def test_a_busy_log_stays_whole(app: Flask, storage: Storage, tenant: str, backend: str) -> None:
    seconds = 30 if backend == "postgresql" else 5
    full = {"Authorization": f"Bearer {mint_token(storage, tenant)}"}
    narrow = {"Authorization": f"Bearer {mint_token(storage, tenant, 'system/Observation.rs')}"}
    counts = [0] * THREADS
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def worker(n: int) -> None:
        app.test_client_class = FlaskClient
        client = app.test_client()
        rng = random.Random(n)
        made: list[str] = []

        def send(method: str, url: str, expect: int, body: Any = None, headers: dict[str, str] | None = None,
                 events: int = 1) -> Any:
            resp = client.open(url, method=method, json=body, headers={**(headers or full), **({"Content-Type": FHIR} if body else {})})
            counts[n] += events
            if resp.status_code != expect:
                errors.append(f"{method} {url}: {resp.status_code} {resp.data[:200]!r}")
            return resp

        while (time.monotonic() < deadline or counts[n] < MIN_PER_THREAD) and not errors:
            choice = rng.random()
            base = f"/fhir/{tenant}"
            if choice < 0.25 or not made:
                resp = send("POST", f"{base}/Patient", 201, {"resourceType": "Patient", "name": [{"family": f"T{n}"}]})
                made.append(resp.json["id"])
            elif choice < 0.45:
                send("GET", f"{base}/Patient/{rng.choice(made)}", 200)
            elif choice < 0.55:
                pid = rng.choice(made)
                send("PUT", f"{base}/Patient/{pid}", 200, {"resourceType": "Patient", "id": pid, "active": True})
            elif choice < 0.65:
                send("GET", f"{base}/Patient?family=T{n}&_count=5", 200)
            elif choice < 0.70:
                send("GET", f"{base}/Patient/{rng.choice(made)}/_history", 200)
            elif choice < 0.75:
                send("DELETE", f"{base}/Patient/{made.pop()}", 204)
            elif choice < 0.80:
                send("GET", f"{base}/Patient/missing-{n}", 404)
            elif choice < 0.85:
                send("GET", f"{base}/Patient/{rng.choice(made)}", 403, headers=narrow)
            elif choice < 0.90:
                send("GET", f"{base}/Patient", 401, headers={"Authorization": "Bearer not-a-token"})
            else:  # a batch: the batch and each of its two entries
                bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
                    {"request": {"method": "GET", "url": f"Patient/{rng.choice(made)}"}},
                    {"request": {"method": "GET", "url": "Patient/missing"}}]}
                send("POST", base, 200, bundle, events=3)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    interactions = sum(counts)
    assert interactions >= THREADS * MIN_PER_THREAD
    storage.audit_log.chain(tenant, checkpoint=True)
    report = storage.audit_log.verify(tenant)
    assert report.ok, report.findings
    assert report.records == interactions and report.pending == 0
    with storage.session(tenant, write=False) as repo:
        stored = repo.conn.execute(select(func.count()).select_from(schema.resources).where(
            schema.resources.c.tenant_id == repo.tenant.id, schema.resources.c.res_type == "AuditEvent")).scalar_one()
    assert stored == interactions
    print(f"\n{backend}: {interactions} interactions in {seconds} s by {THREADS} threads, all recorded and chained")
