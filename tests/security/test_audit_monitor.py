"""The monitoring rules raise an alert (an AuditEvent and a log line) once per subject and window."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from fhir_server.engine.engine import Engine
from fhir_server.security import audit_events as ae
from fhir_server.security.access import AccessContext
from fhir_server.security.scopes import parse_scopes
from testsupport.engine_calls import call, patient


def alerts(engine: Engine, tenant: str) -> list[dict[str, Any]]:
    out = []
    for body in engine.storage.audit_log.events(tenant):
        event = json.loads(body)
        rule = [c["code"] for c in event.get("subtype", []) if c["system"] == ae.SUBTYPE and c["code"] in
                ("failed-logins", "many-patients", "export", "break-glass")]
        if rule and event["type"]["code"] == "110113":
            out.append({"rule": rule[0], **event})
    return out


def failed_login(tenant: str, username: str, address: str) -> dict[str, Any]:
    return ae.auth_event([ae.coding(ae.DCM, "110122")], 401, "Login failed: wrong password",
                         ae.Actor(username=username, address=address), ae.Place(tenant))


def test_repeated_failed_logins_of_a_user_or_from_an_address_raise_one_alert(engine_with: Any, tenant: str,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    engine = engine_with(audit_alert_failed_logins=3)
    with caplog.at_level(logging.WARNING, logger="fhir_server.audit.alert"):
        for i in range(2):
            engine.audit.append(tenant, [failed_login(tenant, "mallory", f"10.0.0.{i}")])
        assert alerts(engine, tenant) == []
        engine.audit.append(tenant, [failed_login(tenant, "mallory", "10.0.0.9")])  # the third for the user
        found = alerts(engine, tenant)
        assert [a["rule"] for a in found] == ["failed-logins"] and "for one user" in found[0]["outcomeDesc"]
        for name in ("eve", "trudy", "oscar"):  # three users from one address
            engine.audit.append(tenant, [failed_login(tenant, name, "10.6.6.6")])
        engine.audit.append(tenant, [failed_login(tenant, "mallory", "10.0.0.7")])  # no second alert for mallory
    found = alerts(engine, tenant)
    assert [a["outcomeDesc"] for a in found] == ["3 or more failed logins for one user within 900 s",
                                                 "3 or more failed logins from one address within 900 s"]
    lines = [r for r in caplog.records if r.getMessage() == "audit alert"]
    assert [getattr(r, "rule") for r in lines] == ["failed-logins", "failed-logins"]
    assert all("mallory" not in str(r.__dict__) and "10.6.6.6" not in str(r.__dict__) for r in lines)  # no names in logs
    trigger = found[0]["entity"][0]["what"]["reference"]
    assert trigger.startswith("AuditEvent/")


def test_a_user_reading_many_patients_raises_an_alert(engine_with: Any, tenant: str) -> None:
    engine = engine_with(audit_alert_patients=3)
    for i in range(6):
        call(engine, tenant, "PUT", f"Patient/m{i}", patient(f"m{i}"))
    user = AccessContext(parse_scopes("user/*.rs"), client_id="app", username="snoop", subject="snoop")
    service = AccessContext(parse_scopes("system/*.rs"), client_id="batch-job", subject="batch-job")
    for i in range(6):
        call(engine, tenant, "GET", f"Patient/m{i}", access=service)  # a backend service is not a user
    assert alerts(engine, tenant) == []
    for i in range(3):
        call(engine, tenant, "GET", f"Patient/m{i}", access=user)
    call(engine, tenant, "GET", "Patient/m0", access=user)  # the same patients again: still three
    assert alerts(engine, tenant) == []
    call(engine, tenant, "GET", "Patient", params=(("_id", "m3,m4"),), access=user)  # a search reaching two more
    found = alerts(engine, tenant)
    assert [a["rule"] for a in found] == ["many-patients"]
    user_agent = next(a for a in found[0]["agent"] if a["who"].get("identifier", {}).get("system") == ae.USERNAME)
    assert user_agent["name"] == "snoop"
    call(engine, tenant, "GET", "Patient/m5", access=user)
    assert len(alerts(engine, tenant)) == 1  # once per window


def test_break_glass_grants_and_exports_always_raise_an_alert(engine_with: Any, tenant: str) -> None:
    engine = engine_with()
    grant = ae.auth_event([ae.coding(ae.SUBTYPE, "token-grant")], 200, None,
                          ae.Actor(client_id="app", username="er-doc", purpose=ae.BREAK_GLASS_PURPOSE), ae.Place(tenant))
    engine.audit.append(tenant, [grant])
    export = ae.log_use_event("export", "12 records", ae.Actor(internal=True, os_user="ops"),
                              ae.Place(tenant), export=True, query="audit export")
    engine.audit.append(tenant, [export])
    found = alerts(engine, tenant)
    assert [a["rule"] for a in found] == ["break-glass", "export"]
    assert {"system": ae.DCM, "code": "110127"} in found[0]["subtype"]  # DICOM: Emergency Override Started


def test_alerts_are_valid_audit_events_in_the_chain(engine_with: Any, tenant: str) -> None:
    from fhir_server.capability.validation import validate_resource

    engine: Engine = engine_with(audit_alert_failed_logins=1)
    engine.audit.append(tenant, [failed_login(tenant, "x", "10.1.1.1")])
    found = alerts(engine, tenant)
    assert len(found) == 2  # one for the user, one for the address
    for alert in found:
        alert.pop("rule")
        assert validate_resource(engine.registry, alert) == []
    engine.storage.audit_log.chain(tenant)
    report = engine.storage.audit_log.verify(tenant)
    assert report.ok and report.records == 3


@pytest.mark.parametrize("actor", [ae.Actor(client_id="app"), ae.Actor(client_id="app", username="alice"),
                                   ae.Actor(internal=True), ae.Actor(internal=True, os_user="root"), ae.Actor()],
                         ids=["backend service", "user", "server", "command line", "anonymous"])
def test_a_read_decided_before_its_outcome_is_counted_exactly_when_its_completed_record_would_be(actor: ae.Actor) -> None:
    """A read whose record is written by its own statement is decided before it is known what it finds: the
    monitor's answer for its draft must be the one it gives for the completed record of a patient's data."""
    from fhir_server.security.audit_monitor import Monitor

    draft = ae.rest_event("read", 200, None, actor, ae.Place("t"), resources=["Observation/o1"], patients=[],
                          request_line="GET /Observation/o1", request_id=None)
    found = ae.complete_read(draft, status=200, description=None, version=2, patients=["p1"])
    assert Monitor.counts_patient_reads(draft) is Monitor.writes([found])
    assert Monitor.writes([ae.complete_read(draft, status=200, description=None, version=2, patients=[])]) is False
