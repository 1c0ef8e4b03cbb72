"""What the storage layer's exceptions mean to a FHIR client."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import OperationalError

from fhir_server.errors import BadRequest, FhirError, IntegrityFailure, NotFound, PreconditionFailed
from fhir_server.security.crypto import IntegrityError
from fhir_server.security.keys import KeyUnavailable
from fhir_server.storage.repository import AlreadyExists, VersionConflict
from fhir_server.storage.tenants import TENANT_NAME, TenantNotFound

log = logging.getLogger(__name__)

CONFLICTS = frozenset({"40P01", "40001"})  # deadlock detected, serialization failure


@contextmanager
def storage_errors(tenant: str) -> Iterator[None]:
    """Turn storage exceptions raised inside the block into FHIR errors (4xx, or 500 for integrity)."""
    try:
        yield
    except TenantNotFound:
        if not TENANT_NAME.fullmatch(tenant):
            raise BadRequest(
                f"Invalid tenant name {tenant[:80]!r}: use 1 to 63 lowercase letters, digits and hyphens",
                expression="tenant",
            ) from None
        raise NotFound(f"Unknown tenant {tenant[:63]!r}", expression="tenant") from None
    except VersionConflict as exc:
        if exc.current is None:
            raise PreconditionFailed("If-Match was given but the resource does not exist", expression="If-Match") from None
        raise PreconditionFailed(
            f"If-Match does not match the current version (W/\"{exc.current}\"); read the resource and retry",
            expression="If-Match",
            headers={"ETag": f'W/"{exc.current}"'},
        ) from None
    except AlreadyExists:
        raise FhirError("A resource with this id already exists", status=409, code="duplicate") from None
    except OperationalError as exc:
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if sqlstate not in CONFLICTS:
            raise
        log.warning("transaction conflicted with a concurrent one", extra={"tenant": tenant, "sqlstate": sqlstate})
        raise FhirError(
            "The request conflicted with a concurrent one and was rolled back; nothing was changed: retry it",
            status=409, code="transient", headers={"Retry-After": "1"},
        ) from None
    except (IntegrityError, KeyUnavailable) as exc:
        log.error("stored record failed its integrity check", extra={"tenant": tenant, "reason": str(exc)})
        raise IntegrityFailure(
            "A stored record failed its integrity check (it was altered, moved, or its key is unavailable); "
            "the incident has been logged"
        ) from None
