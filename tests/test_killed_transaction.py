"""A server killed (SIGKILL) in the middle of a 1,000-entry transaction leaves none of it behind.

The server runs as a user runs it (``fhir-server serve``: gunicorn master and workers in a process
group of their own); the whole group is killed while the transaction is writing: on PostgreSQL the
test waits until the transaction holds a transaction id (it has written rows), on SQLite until it
holds the write lock, so the kill lands in the middle of the writes. Then: no resource, version or index row exists, and the same
transaction, posted to a restarted server, succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from fhir_server.storage import schema
from testsupport.backends import DatabaseUrls
from testsupport.cli import admin_or_owner, cli_environment
from testsupport.server import backend_client, client_credentials_token, free_port, start_server, stop_server

ENTRIES = 1000
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def transaction() -> dict[str, Any]:
    """100 patients (urn:uuid full URLs) and 900 observations that refer to them."""
    patients = [f"urn:uuid:{uuid.UUID(int=i + 1)}" for i in range(100)]
    entries: list[dict[str, Any]] = [
        {"fullUrl": url, "request": {"method": "POST", "url": "Patient"},
         "resource": {"resourceType": "Patient", "identifier": [{"system": "http://kill.example/mrn", "value": str(i)}],
                      "name": [{"family": f"Killed{i}", "given": ["Transaction"]}], "birthDate": "1970-01-01"}}
        for i, url in enumerate(patients)
    ]
    for i in range(ENTRIES - len(patients)):
        entries.append({"request": {"method": "POST", "url": "Observation"}, "resource": {
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": patients[i % len(patients)]},
            "effectiveDateTime": "2024-01-01T10:00:00Z",
            "valueQuantity": {"value": 60 + i % 40, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def row_counts(url: str) -> dict[str, int]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            # The audit records of the token request and the like are there; nothing of the transaction (its own
            # record would have committed with it).
            return {t.name: conn.execute(select(func.count()).select_from(t).where(t.c.res_type != "AuditEvent")).scalar_one()
                    for t in (schema.resources, schema.resource_versions, schema.idx_hash, schema.idx_reference, schema.idx_quantity)}
    finally:
        engine.dispose()


def writing(url: str, urls: DatabaseUrls) -> bool:
    """A transaction is writing to the database.

    PostgreSQL: a session of the database holds a transaction id (it has written rows). SQLite: the
    write lock is taken (the unit of work begins once the entries are validated, with the writes).
    """
    engine = create_engine(url, poolclass=NullPool, connect_args={} if urls.backend == "postgresql" else {"timeout": 0})
    try:
        with engine.connect() as conn:
            if urls.backend == "postgresql":
                database = make_url(urls.owner_url).database
                return bool(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d AND backend_xid IS NOT NULL"),
                                         {"d": database}).scalar_one())
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except OperationalError:  # database is locked
                return True
            conn.exec_driver_sql("ROLLBACK")
            return False
    finally:
        engine.dispose()


def test_sigkill_mid_transaction_leaves_nothing_and_the_retry_succeeds(fresh_db: DatabaseUrls, tmp_path: Path) -> None:
    env = cli_environment(fresh_db, tmp_path)
    env.update(FHIR_PORT=str(free_port()), FHIR_WORKERS="1", FHIR_THREADS="2", FHIR_LOG_LEVEL="WARNING")
    admin = admin_or_owner(fresh_db)
    body = json.dumps(transaction())
    client = backend_client(env)
    proc, root = start_server(env, tmp_path / "server.log", new_session=True)
    base = f"{root}/fhir/default"
    headers = {**FHIR_JSON, "Authorization": f"Bearer {client_credentials_token(root, client)}"}
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            outcome["status"] = requests.post(base, data=body, headers=headers, timeout=300).status_code
        except requests.RequestException as exc:
            outcome["error"] = exc

    sender = threading.Thread(target=send)
    killed_while_writing = False
    try:
        sender.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "status" not in outcome:
            if writing(admin, fresh_db):
                killed_while_writing = True
                time.sleep(0.05)  # well into the writes
                break
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        sender.join(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "status" not in outcome, f"the transaction finished ({outcome}) before the kill; make it bigger"
    assert killed_while_writing, "the transaction never started writing"
    deadline = time.monotonic() + 30
    while writing(admin, fresh_db) and time.monotonic() < deadline:  # the server's session ends
        time.sleep(0.05)
    assert row_counts(admin) == {name: 0 for name in row_counts(admin)}

    proc, root = start_server(env, tmp_path / "server.log", new_session=True)
    try:
        resp = requests.post(base, data=body, headers=headers, timeout=300)
        assert resp.status_code == 200, resp.text[:1000]
        statuses = {e["response"]["status"][:3] for e in resp.json()["entry"]}
        assert statuses == {"201"}
        counts = row_counts(admin)
        assert counts["resources"] == counts["resource_versions"] == ENTRIES
        found = requests.get(f"{base}/Observation", params={"subject:Patient.identifier": "http://kill.example/mrn|7",
                                                             "_total": "accurate"}, headers=headers, timeout=60).json()
        assert found["total"] == 9
    finally:
        stop_server(proc)
