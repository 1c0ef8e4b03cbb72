"""Who is calling, and with what grant: the AccessContext every engine request carries.

The API layer builds it from a validated access token; the server's own callers (the command
line, background jobs, tests of the engine) use ``AccessContext.internal()`` explicitly. There is no
default: a request without a context cannot be built.
"""

from __future__ import annotations

from dataclasses import dataclass

from fhir_server.security.scopes import Grant, Scopes

AUDIT_EVENT = "AuditEvent"
AUDITOR_ROLE = "auditor"  # a user role: may read and search the audit log with user/ scopes


@dataclass(frozen=True, slots=True)
class AccessContext:
    scopes: Scopes
    patient: str | None = None  # the launch patient (patient/ scopes are limited to its compartment)
    encounter: str | None = None
    client_id: str | None = None
    subject: str | None = None  # the user's username, or the client for a backend service
    username: str | None = None  # the logged-in user, when there is one
    roles: tuple[str, ...] = ()  # the user's roles (clinician, auditor, emergency-access, ...)
    fhir_user: str | None = None  # e.g. Practitioner/123
    user_patient: str | None = None  # a related person's patient: their user/ scopes reach that record only
    token_id: str | None = None  # an identifier of the token (not the token), for audit
    break_glass: str | None = None  # the reason given, when the grant is an emergency access
    internal: bool = False  # the server itself: every interaction is allowed

    @staticmethod
    def internal_access() -> AccessContext:
        return AccessContext(Scopes(), subject="fhir-server", internal=True)

    def grants_for(self, permission: str, resource_type: str) -> list[Grant]:
        """The clinical grants that allow ``permission`` (a letter of cruds) on ``resource_type``.

        The audit log is the auditors': AuditEvents are reached only by a ``system/`` grant that names
        AuditEvent (not ``system/*``), or by a ``user/`` grant of a user with the auditor role; never by
        ``patient/`` grants.
        """
        found = [g for g in self.scopes.grants if g.covers(permission, resource_type)]
        if resource_type == AUDIT_EVENT and found:
            auditor = AUDITOR_ROLE in self.roles
            found = [g for g in found if (g.context == "system" and g.resource_type == AUDIT_EVENT)
                     or (g.context == "user" and auditor)]
        return found


INTERNAL = AccessContext.internal_access()
ANONYMOUS = AccessContext(Scopes())  # no token: only what is open to everyone (the CapabilityStatement)
