"""The application factory: wiring only, no logic."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from fhir_server import logs
from fhir_server.api import health, hl7v2, routes, smart
from fhir_server.api.proxy import TrustedProxy
from fhir_server.api.rendering import fhir_error, http_error, render_outcome, unexpected_error
from fhir_server.capability.registry import load_registry
from fhir_server.engine.engine import Engine
from fhir_server.engine.reindex import JobRunner
from fhir_server.errors import FhirError, Issue, operation_outcome
from fhir_server.hl7v2.intake import Intake
from fhir_server.security import audit_events
from fhir_server.security.crypto import cipher_named
from fhir_server.security.keys import provider_from_settings
from fhir_server.settings import Settings, SettingsError
from fhir_server.storage.database import Database
from fhir_server.storage.store import Storage

access_log = logging.getLogger("fhir_server.access")
log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.load()
    logs.configure(settings.log_level)
    access_log.disabled = not settings.access_log
    if settings.production and settings.cipher == "null":
        raise SettingsError("FHIR_CIPHER=null (no encryption) is refused in production")
    if settings.production and not settings.audit:
        raise SettingsError("FHIR_AUDIT=false (no audit log) is refused in production")

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]

    db = Database(settings.effective_database_url, settings)
    storage = Storage(db, provider_from_settings(settings), cipher_named(settings.cipher), settings)
    engine = Engine(load_registry(), storage, settings)
    if settings.background_jobs:
        engine.jobs = JobRunner(engine, settings.job_poll_seconds)
        engine.jobs.kick()  # resume jobs a stopped worker left behind
    app.extensions["fhir_settings"] = settings
    app.extensions["fhir_storage"] = storage
    app.extensions["fhir_engine"] = engine
    app.extensions["fhir_hl7v2"] = Intake(engine)

    app.register_blueprint(health.bp)
    app.register_blueprint(routes.bp)
    app.register_blueprint(smart.bp)
    app.register_blueprint(hl7v2.bp)
    if settings.cors_origins.strip():
        _cors(app, settings)
    if settings.trusted_proxy:
        app.wsgi_app = TrustedProxy(app.wsgi_app, settings.trusted_proxy)  # type: ignore[method-assign]
    app.register_error_handler(FhirError, fhir_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(OperationalError, _database_unavailable)
    app.register_error_handler(Exception, unexpected_error)
    app.before_request(_start_request)
    if settings.production:
        app.before_request(_https_only)
    app.after_request(_finish_request)
    return app


def _cors(app: Flask, settings: Settings) -> None:
    """Browser apps from the configured origins may call the FHIR API and the token endpoints."""
    from flask_cors import CORS

    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    options = {
        "origins": origins,
        "allow_headers": ["Authorization", "Content-Type", "Accept", "Prefer", "If-Match", "If-None-Match",
                          "If-None-Exist", "If-Modified-Since", "X-Request-Id"],
        "expose_headers": ["Location", "Content-Location", "ETag", "Last-Modified", "X-Request-Id"],
        "methods": ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        "max_age": 600,
    }
    # Patterns are regular expressions matched at the start of the path.
    CORS(app, resources={r"/fhir/.*": options, r"/auth/[^/]+/(token|revoke|introspect|jwks|style\.json)$": options})


def _database_unavailable(exc: OperationalError) -> Response:
    log.error(
        "database unavailable",
        extra={"error_type": type(exc.orig).__name__ if exc.orig else "unknown", "sqlstate": getattr(exc.orig, "sqlstate", None)},
    )
    outcome = operation_outcome([Issue("The database is unavailable; retry later", "transient")])
    return render_outcome(503, outcome, {"Retry-After": "5"})


def _start_request() -> None:
    incoming = request.headers.get("X-Request-Id", "")
    rid = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    g.request_id = rid
    g.started = time.perf_counter()
    logs.request_id.set(rid)
    audit_events.set_origin(audit_events.Origin(request.remote_addr, rid))


OPEN_OVER_HTTP = ("/healthz", "/readyz")  # load balancers' health checks
_OPEN_TO_EVERY_ORIGIN = re.compile(r"/fhir/[^/]+/(metadata|\.well-known/(smart|openid)-configuration)|/auth/[^/]+/jwks")


def _https_only() -> Response | None:
    """In production every request but the health checks must have come over HTTPS (here, or to the trusted proxy)."""
    if request.is_secure or request.path in OPEN_OVER_HTTP:
        return None
    outcome = operation_outcome([Issue("This server accepts HTTPS only", "security")])
    return render_outcome(403, outcome, {})


def _finish_request(response: Response) -> Response:
    rid = g.get("request_id")
    if rid:
        response.headers["X-Request-Id"] = rid
    if request.is_secure:
        response.headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if _OPEN_TO_EVERY_ORIGIN.fullmatch(request.path) and "Access-Control-Allow-Origin" not in response.headers:
        response.headers["Access-Control-Allow-Origin"] = "*"  # discovery is public: any browser app may read it
    started = g.get("started")
    if not access_log.isEnabledFor(logging.INFO):
        return response
    access_log.info(
        "request",
        extra={
            "method": request.method,
            "route": request.environ.get("fhir.route", request.url_rule.rule if request.url_rule else "{unknown}"),
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2) if started else None,
        },
    )
    return response
