"""Monitoring the audit log as it is written: rules that raise an alert (an AuditEvent, and a log line).

- failed logins: FHIR_AUDIT_ALERT_FAILED_LOGINS failures for one user, or from one address, within
  FHIR_AUDIT_ALERT_LOGIN_WINDOW_SECONDS;
- many patients: one user (a person logged in through an app, not a backend service) reading the records
  of more than FHIR_AUDIT_ALERT_PATIENTS patients within FHIR_AUDIT_ALERT_PATIENT_WINDOW_SECONDS;
- exports: FHIR_AUDIT_ALERT_EXPORTS exports by one operator or client within that window (1: every export);
- break-glass: every emergency access granted.

What the rules count is kept in ``audit_alert_marks`` as blind indexes (no user name, address or patient id in
clear), in fixed windows; an alert is raised once per subject and window. The rules run inside the
transaction that appends the events, so an alert commits with what raised it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from fhir_server.clock import now_us
from fhir_server.security import audit_events as ae
from fhir_server.storage import schema

if TYPE_CHECKING:
    from fhir_server.settings import Settings
    from fhir_server.storage.repository import ResourceRepository

log = logging.getLogger("fhir_server.audit.alert")
M = schema.audit_alert_marks
SECOND = 1_000_000
RAISED = b""  # the item that marks "alert raised" for a subject and window
PURGE_SECONDS = 600

RULES = ("failed-logins", "many-patients", "export", "break-glass")  # the alerts' subtype codes


class Monitor:
    def __init__(self, settings: Settings) -> None:
        self.failed_logins = settings.audit_alert_failed_logins
        self.login_window = settings.audit_alert_login_window_seconds
        self.patients = settings.audit_alert_patients
        self.patient_window = settings.audit_alert_patient_window_seconds
        self.exports = settings.audit_alert_exports
        self._purged: dict[int, float] = {}

    @staticmethod
    def writes(events: list[dict[str, Any]]) -> bool:
        """Whether evaluating these events writes marks (they must then be appended in a transaction of their own)."""
        for event in events:
            facts = _Facts(event)
            if facts.failed_login or facts.export or (facts.patients and facts.username and facts.rest_success):
                return True
        return False

    @staticmethod
    def counts_patient_reads(event: dict[str, Any]) -> bool:
        """Whether ``writes`` would say so of this rest interaction had it succeeded and found patients' records (a
        read decided before what it finds: it names a user, whose patients the many-patients rule counts)."""
        return _Facts(event).username is not None

    def evaluate(self, repo: ResourceRepository, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The alerts these events raise (to be appended with them)."""
        alerts: list[dict[str, Any]] = []
        for event in events:
            facts = _Facts(event)
            if facts.failed_login:
                for kind, value in (("user", facts.username), ("address", facts.address)):
                    if value and self._count(repo, "failed-logins", f"{kind}\x00{value}", self.login_window, event["id"]) >= self.failed_logins:
                        if self._raise_once(repo, "failed-logins", f"{kind}\x00{value}", self.login_window):
                            alerts.append(_alert(event, "failed-logins", f"{self.failed_logins} or more failed logins "
                                                 f"{'for one user' if kind == 'user' else 'from one address'} within "
                                                 f"{self.login_window} s"))
            if facts.patients and facts.username and facts.rest_success:
                subject = f"user\x00{facts.username}"
                if self._patients(repo, subject, facts.patients) > self.patients:
                    if self._raise_once(repo, "many-patients", subject, self.patient_window):
                        alerts.append(_alert(event, "many-patients", f"one user read the records of more than "
                                             f"{self.patients} patients within {self.patient_window} s"))
            if facts.export:
                subject = f"user\x00{facts.username or facts.client or ''}"
                if self._count(repo, "export", subject, self.patient_window, event["id"]) >= self.exports:
                    alerts.append(_alert(event, "export", "an export of audit records or data"
                                         + (f" ({self.exports} or more within {self.patient_window} s)" if self.exports > 1 else "")))
            if facts.break_glass:
                alerts.append(_alert(event, "break-glass", "emergency access (break the glass) was granted",
                                     dicom=ae.EMERGENCY_OVERRIDE_STARTED))
        self._purge_now_and_then(repo)
        return alerts

    def log_alert(self, tenant: str, alert: dict[str, Any]) -> None:
        """The structured log line of an alert (its rule and the AuditEvent to look at; no names)."""
        rule = next((c["code"] for c in alert.get("subtype", []) if c.get("system") == ae.SUBTYPE), "unknown")
        log.warning("audit alert", extra={"rule": rule, "tenant": tenant, "audit_event": alert["id"],
                                          "description": alert.get("outcomeDesc")})

    # --- marks -----------------------------------------------------------------------------------------------

    def _window(self, seconds: int) -> int:
        span = seconds * SECOND
        return now_us() // span * span

    def _insert(self, repo: ResourceRepository, values: list[dict[str, Any]]) -> None:
        dialect_insert = postgresql.insert if repo.conn.dialect.name == "postgresql" else sqlite.insert
        repo.conn.execute(dialect_insert(M).on_conflict_do_nothing(), values)

    def _subject(self, repo: ResourceRepository, rule: str, material: str) -> bytes:
        return repo.sealer.keys.blind("AuditEvent", f"alert:{rule}", material)

    def _count(self, repo: ResourceRepository, rule: str, material: str, window_s: int, item: str) -> int:
        subject, window = self._subject(repo, rule, material), self._window(window_s)
        self._insert(repo, [{"tenant_id": repo.tenant.id, "rule": rule, "subject": subject, "window_start": window,
                             "item": self._subject(repo, rule, f"item\x00{item}")}])
        return int(repo.conn.execute(select(func.count()).select_from(M).where(
            M.c.tenant_id == repo.tenant.id, M.c.rule == rule, M.c.subject == subject, M.c.window_start == window,
            M.c.item != RAISED)).scalar_one())

    def _patients(self, repo: ResourceRepository, material: str, patients: list[str]) -> int:
        """Mark the patients a user read in this window; how many distinct patients that makes (0 when none of them
        is new in the window: nothing to count again)."""
        rule = "many-patients"
        subject, window = self._subject(repo, rule, material), self._window(self.patient_window)
        tid = repo.tenant.id
        items = sorted({self._subject(repo, rule, f"item\x00{pid}") for pid in patients})  # one lock order
        dialect_insert = postgresql.insert if repo.conn.dialect.name == "postgresql" else sqlite.insert
        fresh = repo.conn.execute(dialect_insert(M).on_conflict_do_nothing().returning(M.c.item), [
            {"tenant_id": tid, "rule": rule, "subject": subject, "window_start": window, "item": i} for i in items]).all()
        if not fresh:
            return 0
        return int(repo.conn.execute(select(func.count()).select_from(M).where(
            M.c.tenant_id == tid, M.c.rule == rule, M.c.subject == subject, M.c.window_start == window,
            M.c.item != RAISED)).scalar_one())

    def _raise_once(self, repo: ResourceRepository, rule: str, material: str, window_s: int) -> bool:
        dialect_insert = postgresql.insert if repo.conn.dialect.name == "postgresql" else sqlite.insert
        inserted = repo.conn.execute(dialect_insert(M).on_conflict_do_nothing().values(
            tenant_id=repo.tenant.id, rule=rule, subject=self._subject(repo, rule, material),
            window_start=self._window(window_s), item=RAISED).returning(M.c.rule)).first()
        return inserted is not None  # (rowcount says -1 here with psycopg: RETURNING tells)

    def _purge_now_and_then(self, repo: ResourceRepository) -> None:
        now = time.monotonic()
        if now - self._purged.get(repo.tenant.id, -PURGE_SECONDS) < PURGE_SECONDS:
            return
        self._purged[repo.tenant.id] = now
        oldest = now_us() - 2 * max(self.login_window, self.patient_window) * SECOND
        repo.conn.execute(delete(M).where(M.c.tenant_id == repo.tenant.id, M.c.window_start < oldest))


class _Facts:
    """What the rules look at in an AuditEvent."""

    def __init__(self, event: dict[str, Any]) -> None:
        subtypes = {(c.get("system"), c.get("code")) for c in event.get("subtype", [])}
        event_type = event.get("type", {})
        success = event.get("outcome") == "0"
        self.rest_success = success and event_type.get("code") == "rest"
        self.failed_login = (ae.DCM, "110122") in subtypes and not success
        self.export = (ae.SUBTYPE, "export") in subtypes
        self.username: str | None = None
        self.client: str | None = None
        self.address: str | None = None
        self.break_glass = False
        for agent in event.get("agent", []):
            identifier = agent.get("who", {}).get("identifier", {})
            if identifier.get("system") in (ae.USERNAME, ae.OS_USER):
                self.username = identifier.get("value")
                purposes = {c.get("code") for cc in agent.get("purposeOfUse", []) for c in cc.get("coding", [])}
                self.break_glass = "BTG" in purposes and success and (ae.SUBTYPE, "token-grant") in subtypes
            elif identifier.get("system") == ae.CLIENT_ID:
                self.client = identifier.get("value")
            if agent.get("network", {}).get("type") == "2":
                self.address = agent["network"].get("address")
        self.patients = [e["what"]["reference"].split("/", 1)[1] for e in event.get("entity", [])
                         if e.get("role", {}).get("code") == "1" and e.get("role", {}).get("system") == ae.OBJECT_ROLE]


def _alert(trigger: dict[str, Any], rule: str, description: str, *,
           dicom: str = "110113") -> dict[str, Any]:
    place = ae.Place(trigger.get("source", {}).get("site", ""))
    assert rule in RULES, rule
    alert = ae.security_event(rule, description, ae.Actor(internal=True), place, dicom_subtype=dicom,
                              entities=[ae.event_entity(trigger["id"])])
    alert["agent"] = trigger["agent"]  # who raised it: the agents of the event that crossed the threshold
    alert["source"] = trigger["source"]
    return alert
