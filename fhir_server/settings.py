"""Server settings: safe defaults, then ``FHIR_*`` environment variables, then explicit overrides.

Every setting is validated (marshmallow) at start-up; a bad value stops the
server with a message naming the variable and what it accepts.
"""

from __future__ import annotations

import os
import zoneinfo
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from marshmallow import Schema, ValidationError, fields as mf, validate


class SettingsError(Exception):
    """A setting has a value the server cannot run with."""


class _SettingsSchema(Schema):
    env = mf.String(load_default="development", validate=validate.OneOf(["development", "production", "test"]))
    data_dir = mf.String(load_default=".fhir-data")
    database_url = mf.String(load_default=None, allow_none=True)
    migration_database_url = mf.String(load_default=None, allow_none=True)
    host = mf.String(load_default="127.0.0.1")
    port = mf.Integer(load_default=8080, validate=validate.Range(min=0, max=65535))
    workers = mf.Integer(load_default=lambda: (os.cpu_count() or 1) + 1, validate=validate.Range(min=1, max=256))
    threads = mf.Integer(load_default=2, validate=validate.Range(min=1, max=256))
    base_url = mf.String(load_default=None, allow_none=True)
    max_body_bytes = mf.Integer(load_default=16 * 1024 * 1024, validate=validate.Range(min=1024))
    max_json_depth = mf.Integer(load_default=100, validate=validate.Range(min=8, max=900))
    default_page_size = mf.Integer(load_default=20, validate=validate.Range(min=1, max=10000))
    max_page_size = mf.Integer(load_default=1000, validate=validate.Range(min=1, max=10000))
    validate_required = mf.String(load_default="warning", validate=validate.OneOf(["error", "warning"]))
    max_sort_matches = mf.Integer(load_default=10000, validate=validate.Range(min=1))
    log_level = mf.String(
        load_default="INFO", validate=validate.OneOf(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    )
    access_log = mf.Boolean(load_default=True)
    db_pool_size = mf.Integer(load_default=10, validate=validate.Range(min=1, max=200))
    sqlite_busy_timeout_ms = mf.Integer(load_default=30000, validate=validate.Range(min=0))
    master_key = mf.String(load_default=None, allow_none=True)
    master_key_file = mf.String(load_default=None, allow_none=True)
    cipher = mf.String(load_default="aes-256-gcm", validate=validate.OneOf(["aes-256-gcm", "null"]))
    key_cache_seconds = mf.Integer(load_default=300, validate=validate.Range(min=0))
    timeout = mf.Integer(load_default=120, validate=validate.Range(min=1))
    background_jobs = mf.Boolean(load_default=True)
    conditional_delete = mf.String(load_default="single", validate=validate.OneOf(["single", "multiple"]))
    max_conditional_delete = mf.Integer(load_default=100, validate=validate.Range(min=1, max=100000))
    max_bundle_entries = mf.Integer(load_default=10000, validate=validate.Range(min=1))
    job_poll_seconds = mf.Float(load_default=10.0, validate=validate.Range(min=0.1))
    auth_session_idle_seconds = mf.Integer(load_default=900, validate=validate.Range(min=30, max=86400))
    cors_origins = mf.String(load_default="")
    trusted_proxy = mf.String(load_default=None, allow_none=True)
    tls_cert = mf.String(load_default=None, allow_none=True)
    tls_key = mf.String(load_default=None, allow_none=True)
    audit = mf.Boolean(load_default=True)
    audit_sink = mf.String(load_default=None, allow_none=True)
    audit_checkpoint_records = mf.Integer(load_default=1000, validate=validate.Range(min=1))
    audit_checkpoint_seconds = mf.Integer(load_default=60, validate=validate.Range(min=1))
    audit_alert_failed_logins = mf.Integer(load_default=5, validate=validate.Range(min=1))
    audit_alert_login_window_seconds = mf.Integer(load_default=900, validate=validate.Range(min=1))
    audit_alert_patients = mf.Integer(load_default=50, validate=validate.Range(min=1))
    audit_alert_patient_window_seconds = mf.Integer(load_default=3600, validate=validate.Range(min=1))
    audit_alert_exports = mf.Integer(load_default=1, validate=validate.Range(min=1))
    audit_server_tenant = mf.String(load_default="server-audit")
    hl7_timezone = mf.String(load_default="UTC", validate=lambda z: _is_zone(z))
    hl7_max_message_bytes = mf.Integer(load_default=10 * 1024 * 1024, validate=validate.Range(min=1024))
    hl7_mllp_port = mf.Integer(load_default=2575, validate=validate.Range(min=0, max=65535))
    hl7_mllp_idle_seconds = mf.Float(load_default=600.0, validate=validate.Range(min=0.1))
    hl7_mllp_workers = mf.Integer(load_default=4, validate=validate.Range(min=1, max=64))
    hl7_mllp_processes = mf.Integer(load_default=1, validate=validate.Range(min=1, max=64))
    hl7_mllp_max_connections = mf.Integer(load_default=500, validate=validate.Range(min=1))
    hl7_tls_cert = mf.String(load_default=None, allow_none=True)
    hl7_tls_key = mf.String(load_default=None, allow_none=True)
    hl7_tls_client_ca = mf.String(load_default=None, allow_none=True)


def _is_zone(name: str) -> bool:
    if name.upper() == "UTC":
        return True
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValidationError(f"{name!r} is not an IANA time zone (e.g. Europe/Berlin, America/New_York)") from None
    return True


@dataclass(frozen=True, slots=True)
class Settings:
    env: str = "development"
    data_dir: str = ".fhir-data"
    database_url: str | None = None
    migration_database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 3
    threads: int = 2
    base_url: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    max_json_depth: int = 100
    default_page_size: int = 20
    max_page_size: int = 1000
    validate_required: str = "warning"
    max_sort_matches: int = 10000
    log_level: str = "INFO"
    access_log: bool = True
    db_pool_size: int = 10
    sqlite_busy_timeout_ms: int = 30000
    master_key: str | None = None
    master_key_file: str | None = None
    cipher: str = "aes-256-gcm"
    key_cache_seconds: int = 300
    timeout: int = 120
    background_jobs: bool = True
    conditional_delete: str = "single"
    max_conditional_delete: int = 100
    max_bundle_entries: int = 10000
    job_poll_seconds: float = 10.0
    auth_session_idle_seconds: int = 900
    cors_origins: str = ""  # comma-separated origins allowed to call from browsers (CORS)
    trusted_proxy: str | None = None  # the address of a TLS-terminating proxy whose X-Forwarded-* headers count
    tls_cert: str | None = None  # PEM certificate (chain) to serve HTTPS with
    tls_key: str | None = None  # its PEM private key
    audit: bool = True  # false only for measuring audit's cost in benchmarks; refused in production
    audit_sink: str | None = None  # a file that also receives every audit record as a JSON line (for a SIEM)
    audit_checkpoint_records: int = 1000  # sign a checkpoint of the chain after this many records...
    audit_checkpoint_seconds: int = 60  # ...or this long after the last one
    audit_alert_failed_logins: int = 5  # failed logins of one user, or from one address, that raise an alert...
    audit_alert_login_window_seconds: int = 900  # ...within this window
    audit_alert_patients: int = 50  # one user reading more patients' records than this raises an alert...
    audit_alert_patient_window_seconds: int = 3600  # ...within this window (exports are counted in it too)
    audit_alert_exports: int = 1  # exports by one operator or client in that window that raise an alert
    audit_server_tenant: str = "server-audit"  # the tenant whose log records server-wide events (tenants deleted)
    hl7_timezone: str = "UTC"  # HL7 v2: the time zone of times sent without one (an IANA name)
    hl7_max_message_bytes: int = 10 * 1024 * 1024  # HL7 v2: the largest message (or batch) taken
    hl7_mllp_port: int = 2575  # HL7 v2 over MLLP: the listener's port
    hl7_mllp_idle_seconds: float = 600.0  # a connection that sends nothing this long is closed
    hl7_mllp_workers: int = 4  # messages processed at once (each with a database connection), per listener process
    hl7_mllp_processes: int = 1  # listener processes (more than one: an acceptor hands them the connections)
    hl7_mllp_max_connections: int = 500  # connections beyond this are closed as they come
    hl7_tls_cert: str | None = None  # PEM certificate (chain) of the MLLP listener (required off loopback)
    hl7_tls_key: str | None = None  # its PEM private key
    hl7_tls_client_ca: str | None = None  # PEM CA certificates that senders' client certificates must chain to

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_path / 'fhir.db'}"

    @property
    def effective_migration_url(self) -> str:
        return self.migration_database_url or self.effective_database_url

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **overrides)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build from defaults, then FHIR_* variables of ``environ`` (os.environ by default), then overrides."""
        environ = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for f in fields(cls):
            var = f"FHIR_{f.name.upper()}"
            if var in environ and environ[var] != "":
                raw[f.name] = environ[var]
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            loaded = _SettingsSchema().load(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"FHIR_{name.upper()}: {' '.join(map(str, msgs)) if isinstance(msgs, list) else msgs}"
                for name, msgs in sorted(exc.messages_dict.items())
            )
            raise SettingsError(f"invalid settings: {problems}") from None
        settings = cls(**loaded)
        if settings.max_page_size < settings.default_page_size:
            raise SettingsError("invalid settings: FHIR_MAX_PAGE_SIZE must be at least FHIR_DEFAULT_PAGE_SIZE")
        return settings
