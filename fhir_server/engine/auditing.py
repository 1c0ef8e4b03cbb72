"""The interaction being audited: what the engine did, to which resources and patients, for whom.

Every ``Engine.handle`` call is one interaction (a Bundle entry's too); the HTTP layer opens one before it
reads the request, so that a request refused before it reaches the engine (no token, a body that does not
parse) is recorded as well. The engine's code tells the current interaction what it touched
(``note_record``, ``note_rows``, ``note_patients``); the audit trail (``engine/audit_trail.py``) turns it into
an AuditEvent when it ends: in the transaction of its writes, or, for reads and failures, before the caller
gets the answer.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import orjson

from fhir_server.errors import FhirError, MethodNotAllowed
from fhir_server.security.access import AccessContext
from fhir_server.security.audit_events import BREAK_GLASS_PURPOSE, Actor, Origin, Place, rest_event

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine
    from fhir_server.engine.request import FhirRequest
    from fhir_server.storage.repository import ResourceRepository, VersionRecord
    from fhir_server.storage.search_store import Row

# An interaction's record: not yet written; in its write transaction, committing; to be committed when the
# request's shared read session ends; written; or not writable (the tenant is unknown, or the log failed).
OPEN, COMMITTING, DEFERRED, RECORDED, LOST = "open", "committing", "deferred", "recorded", "lost"
AUDIT_EVENT = "AuditEvent"

_current: ContextVar[Interaction | None] = ContextVar("fhir_interaction", default=None)


def refuse_audit_write(method: str) -> None:
    """AuditEvents are written by the server only, and never changed: any other write is refused, for everyone."""
    if method == "POST":
        raise MethodNotAllowed("AuditEvents are recorded by this server only; they cannot be created through the API")
    raise MethodNotAllowed(f"AuditEvents cannot be changed or deleted ({method} refused): the audit log is append-only")


def current() -> Interaction | None:
    return _current.get()


def classify(method: str, path: tuple[str, ...], body: Any = None) -> str:
    """The restful-interaction code of a request."""
    n = len(path)
    if n == 0:
        if method == "POST":
            return "transaction" if isinstance(body, dict) and body.get("type") == "transaction" else "batch"
        return "search-system"
    head = path[0]
    if any(p.startswith("$") for p in path):
        return "operation"
    if head == "metadata":
        return "capabilities"
    if head == "_history":
        return "history-system"
    if head == "_search":
        return "search-system"
    if n == 1:
        return {"POST": "create", "PUT": "update", "DELETE": "delete", "PATCH": "patch"}.get(method, "search-type")
    if path[1] == "_history":
        return "history-type"
    if path[1] == "_search":
        return "search-type"
    if n == 2:
        return {"PUT": "update", "DELETE": "delete", "PATCH": "patch"}.get(method, "read")
    if path[2] == "_history":
        return "vread" if n == 4 else "history-instance"
    return "search-type"  # a compartment search


class Interaction:
    """One interaction in progress: who (once known), what, and what it touched."""

    def __init__(self, method: str, tenant: str, path: tuple[str, ...], params: tuple[tuple[str, str], ...], base_url: str,
                 access: AccessContext | None, origin: Origin | None, body: Any = None) -> None:
        self.method = "GET" if method == "HEAD" else method
        self.tenant = tenant
        self.path = path
        self.params = params
        self.base_url = base_url
        self.access = access
        self.origin = origin
        self.kind = classify(self.method, path, body)
        self.resources: dict[str, str] = {}  # "Type/id" -> the reference to record (versioned once known)
        self.patients: dict[str, None] = {}  # ids, in the order met
        self.state = OPEN
        self.attached = False  # an engine request has taken it over (the HTTP layer opened it before)
        if len(path) >= 2 and not path[1].startswith(("_", "$")) and self.kind in (
                "read", "vread", "update", "patch", "delete", "history-instance"):
            self.resources[f"{path[0]}/{path[1]}"] = f"{path[0]}/{path[1]}"

    @classmethod
    def of(cls, req: FhirRequest, origin: Origin | None) -> Interaction:
        act = cls(req.method, req.tenant, req.path, req.params, req.base_url, req.access, origin, req.body)
        act.attached = True
        return act

    def attach(self, req: FhirRequest) -> None:
        self.access = req.access
        self.params = req.params
        self.kind = classify(self.method, self.path, req.body)
        self.attached = True

    def note(self, rtype: str, rid: str, version: int | None = None) -> None:
        key = f"{rtype}/{rid}"
        if version is not None:
            self.resources[key] = f"{key}/_history/{version}"
        else:
            self.resources.setdefault(key, key)

    def event(self, status: int, description: str | None = None) -> dict[str, Any]:
        origin = self.origin or Origin()
        request_line = f"{self.method} {self.base_url}/{'/'.join(self.path)}".rstrip("/")
        if self.params:
            request_line += "?" + urlencode(self.params)
        return rest_event(self.kind, status, description, actor_of(self.access, origin.address),
                          Place(self.tenant, self.base_url), resources=list(self.resources.values()),
                          patients=list(self.patients), request_line=request_line, request_id=origin.request_id)


def actor_of(access: AccessContext | None, address: str | None) -> Actor:
    if access is None:
        return Actor(address=address)
    return Actor(client_id=access.client_id, username=access.username, fhir_user=access.fhir_user, roles=access.roles,
                 purpose=BREAK_GLASS_PURPOSE if access.break_glass else (), grant_id=access.token_id, address=address,
                 internal=access.internal)


def failure(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and the description an AuditEvent gives of a failed interaction."""
    if isinstance(exc, FhirError):
        errors = [i for i in exc.issues if i.severity in ("error", "fatal")]
        if exc.status in (400, 422):  # the diagnostics of bad input quote its values (PHI): where and what kind only
            where = ", ".join(e for i in errors for e in i.expression) or "the request"
            return exc.status, f"HTTP {exc.status}: {', '.join(sorted({i.code for i in errors})) or exc.code} in {where}"[:900]
        diagnostics = "; ".join(i.diagnostics for i in errors)[:900]
        return exc.status, f"HTTP {exc.status}: {diagnostics or exc.code}"
    code = getattr(exc, "code", None)
    if isinstance(code, int) and 400 <= code < 600:  # werkzeug's HTTP exceptions (413, 405, ...)
        return code, f"HTTP {code}: {getattr(exc, 'name', '')}"
    return 500, f"HTTP 500: internal error ({type(exc).__name__})"


# --- what the engine tells the current interaction ----------------------------------------------------------

def note_record(engine: Engine, rec: VersionRecord, body: dict[str, Any] | None = None, *, resource: bool = True) -> None:
    """A resource version read or written: the resource, and the patients whose record it is in (from its body)."""
    act = _current.get()
    if act is None or not engine.audit.enabled:
        return
    if resource:
        act.note(rec.res_type, rec.res_id, rec.version)
    if body is None and rec.body is not None:
        body = orjson.loads(rec.body)
    if body is not None:
        for pid in engine.audit.patients_in(rec.res_type, rec.res_id, body, act.base_url):
            act.patients.setdefault(pid)


def note_rows(engine: Engine, repo: ResourceRepository, rows: list[Row]) -> None:
    """Search results (current versions, so their index rows say whose record they are in)."""
    act = _current.get()
    if act is None or not rows or not engine.audit.enabled:
        return
    for pid in engine.audit.patients_of_rows(repo, [(r.res_type, r.res_id) for r in rows]):
        act.patients.setdefault(pid)


def note_patients(engine: Engine, ids: set[str] | list[str]) -> None:
    act = _current.get()
    if act is not None and engine.audit.enabled:
        for pid in sorted(ids):
            act.patients.setdefault(pid)


def note_resource(engine: Engine, rtype: str, rid: str, version: int | None = None) -> None:
    act = _current.get()
    if act is not None and engine.audit.enabled:
        act.note(rtype, rid, version)


def enter(act: Interaction) -> object:
    return _current.set(act)


def leave(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]
