"""One error hierarchy for the whole server.

Every failure a client can cause is a ``FhirError``: it knows its HTTP status, its
OperationOutcome issue code, and renders itself. Storage, parser and crypto errors
become ``FhirError``s at the engine boundary; ``api/`` is the one place that turns
them into HTTP responses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome.issue: what was wrong, where, and how to fix it."""

    diagnostics: str
    code: str = "invalid"
    severity: str = "error"
    expression: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            out["expression"] = list(self.expression)
        return out


def operation_outcome(issues: list[Issue] | tuple[Issue, ...]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


def information(message: str, code: str = "informational") -> dict[str, Any]:
    return operation_outcome([Issue(message, code=code, severity="information")])


class FhirError(Exception):
    """A failure with an HTTP status and an OperationOutcome."""

    status: int = 400
    code: str = "invalid"

    def __init__(
        self,
        diagnostics: str = "",
        *,
        expression: str | None = None,
        issues: list[Issue] | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics or (issues[0].diagnostics if issues else ""))
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if issues:
            self.issues = list(issues)
        else:
            self.issues = [Issue(diagnostics, self.code, "error", (expression,) if expression else ())]
        self.headers: dict[str, str] = headers or {}

    def operation_outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


class BadRequest(FhirError):
    status = 400
    code = "invalid"


class NotFound(FhirError):
    status = 404
    code = "not-found"


class Gone(FhirError):
    status = 410
    code = "deleted"


class MethodNotAllowed(FhirError):
    status = 405
    code = "not-supported"


class NotAcceptable(FhirError):
    status = 406
    code = "not-supported"


class Conflict(FhirError):
    status = 409
    code = "conflict"


class PreconditionFailed(FhirError):
    status = 412
    code = "conflict"


class PayloadTooLarge(FhirError):
    status = 413
    code = "too-long"


class UnsupportedMediaType(FhirError):
    status = 415
    code = "not-supported"


class Unprocessable(FhirError):
    status = 422
    code = "processing"


class Unauthorized(FhirError):
    status = 401
    code = "login"


class Forbidden(FhirError):
    status = 403
    code = "forbidden"


class ServiceUnavailable(FhirError):
    status = 503
    code = "transient"


class IntegrityFailure(FhirError):
    """A stored record failed its cryptographic integrity check (tampered or misplaced)."""

    status = 500
    code = "exception"


@dataclass
class IssueCollector:
    """Gathers validation issues up to a bound, then stops the walk."""

    limit: int = 50
    issues: list[Issue] = field(default_factory=list)

    def add(self, diagnostics: str, expression: str, code: str = "structure", severity: str = "error") -> None:
        if len(self.issues) < self.limit:
            self.issues.append(Issue(diagnostics, code, severity, (expression,)))

    @property
    def full(self) -> bool:
        return len(self.issues) >= self.limit

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity in ("error", "fatal")]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]
