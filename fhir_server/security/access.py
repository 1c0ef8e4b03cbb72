"""Who is calling, and with what grant: the AccessContext every engine request carries.

The API layer builds it from a validated access token; the server's own callers (the command
line, background jobs, tests of the engine) use ``AccessContext.internal()`` explicitly. There is no
default: a request without a context cannot be built.
"""

from __future__ import annotations

from dataclasses import dataclass

from fhir_server.security.scopes import Grant, Scopes


@dataclass(frozen=True, slots=True)
class AccessContext:
    scopes: Scopes
    patient: str | None = None  # the launch patient (patient/ scopes are limited to its compartment)
    encounter: str | None = None
    client_id: str | None = None
    subject: str | None = None  # the user's username, or the client for a backend service
    fhir_user: str | None = None  # e.g. Practitioner/123
    user_patient: str | None = None  # a related person's patient: their user/ scopes reach that record only
    token_id: str | None = None  # an identifier of the token (not the token), for audit
    break_glass: str | None = None  # the reason given, when the grant is an emergency access
    internal: bool = False  # the server itself: every interaction is allowed

    @staticmethod
    def internal_access() -> AccessContext:
        return AccessContext(Scopes(), subject="fhir-server", internal=True)

    def grants_for(self, permission: str, resource_type: str) -> list[Grant]:
        """The clinical grants that allow ``permission`` (a letter of cruds) on ``resource_type``."""
        return [g for g in self.scopes.grants if g.covers(permission, resource_type)]


INTERNAL = AccessContext.internal_access()
ANONYMOUS = AccessContext(Scopes())  # no token: only what is open to everyone (the CapabilityStatement)
