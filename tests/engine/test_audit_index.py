"""AuditEvents indexed element by element (with the recurring elements cached) get exactly the index entries of
extracting each whole event."""

from __future__ import annotations

import json
from typing import Any

from fhir_server.engine.audit_index import AuditIndexer
from fhir_server.engine.engine import Engine
from fhir_server.search.extract import IndexEntries
from fhir_server.security.access import AccessContext
from fhir_server.security.scopes import parse_scopes
from testsupport.engine_calls import call, patient


def as_sets(entries: IndexEntries) -> dict[str, set[Any]]:
    return {name: set(getattr(entries, name)) for name in ("hashes", "dates", "numbers", "quantities", "references", "composites")}


def test_by_parts_equals_whole(engine: Engine, tenant: str, engine_with: Any) -> None:
    from fhir_server.security import audit_events as ae

    user = AccessContext(parse_scopes("user/*.cruds"), client_id="app", username="dr", subject="dr", fhir_user="Practitioner/x",
                         roles=("clinician", "auditor"), token_id="0" * 32, break_glass="emergency")
    call(engine, tenant, "PUT", "Patient/i1", patient("i1"), access=user)
    call(engine, tenant, "GET", "Patient/i1", access=user)
    call(engine, tenant, "GET", "Patient", params=(("name", "Doe"),), access=user)
    call(engine, tenant, "POST", "", {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/i1"}}, {"request": {"method": "DELETE", "url": "Patient/i1"}}]})
    engine.audit.append(tenant, [
        ae.auth_event([ae.coding(ae.DCM, "110122")], 401, "Login failed", ae.Actor(username="u", address="10.0.0.1"), ae.Place(tenant)),
        ae.log_use_event("export", "3 records", ae.Actor(internal=True, os_user="ops"), ae.Place(tenant), export=True, query="q"),
        ae.security_event("tenant-created", "made", ae.Actor(internal=True, os_user="ops"), ae.Place(tenant))])
    indexer = AuditIndexer(engine)
    extractor = engine.extractor
    local = f"/fhir/{tenant}/"
    bodies = [json.loads(b) for b in engine.storage.audit_log.events(tenant)]
    assert len(bodies) >= 10
    for round_ in range(2):  # the second time, from the cache
        for event in bodies:
            assert as_sets(indexer.by_parts(extractor, event, local)) == as_sets(extractor.extract(event, local_path=local)), event
