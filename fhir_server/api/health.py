"""Liveness and readiness probes (no tenant, no authentication, no PHI)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app
from sqlalchemy.exc import SQLAlchemyError

from fhir_server.fhirjson import dumps
from fhir_server.storage import migrate

bp = Blueprint("health", __name__)
log = logging.getLogger(__name__)


def _json(status: int, body: dict[str, object]) -> Response:
    return Response(dumps(body), status=status, content_type="application/json")


@bp.get("/healthz")
def healthz() -> Response:
    """The process is alive and serving requests."""
    return _json(200, {"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """The database answers and its schema is at the revision this build expects."""
    storage = current_app.extensions["fhir_storage"]
    try:
        with storage.db.transaction(write=False) as conn:
            current = migrate.current_revision(conn)
    except SQLAlchemyError as exc:
        log.warning("readiness check: database unreachable", extra={"error_type": type(exc).__name__})
        return _json(503, {"status": "unavailable", "database": "unreachable"})
    head = migrate.head_revision()
    if current != head:
        return _json(503, {"status": "unavailable", "database": "ok", "schema": current, "expected": head})
    return _json(200, {"status": "ok", "database": "ok", "schema": current})
