"""Running the app under gunicorn (never the Flask development server)."""

from __future__ import annotations

import ssl
from typing import Any

from gunicorn.app.base import BaseApplication

from fhir_server.settings import Settings


class GunicornServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "bind": f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}",
            "workers": s.workers,
            "threads": s.threads,
            "worker_class": "gthread",
            "timeout": s.timeout,
            "graceful_timeout": 30,
            "keepalive": 5,
            "accesslog": None,  # the app writes its own access log, without query strings or ids
            "errorlog": "-",
            "loglevel": s.log_level.lower(),
            "proc_name": "fhir-server",
            "limit_request_line": 8190,
            "preload_app": False,
        }
        if s.tls_cert and s.tls_key:
            options.update(certfile=s.tls_cert, keyfile=s.tls_key, ssl_context=_tls_context)
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Each worker builds its own app (and database pool) after the fork.
        from fhir_server.app import create_app

        return create_app(self.settings)


def _tls_context(config: Any, default_ssl_context_factory: Any) -> ssl.SSLContext:
    """TLS 1.2 or newer only, with the default (strong) cipher suites."""
    context: ssl.SSLContext = default_ssl_context_factory()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def run(settings: Settings) -> None:
    from fhir_server.storage import audit_log

    audit_log.share_busy_clock()  # before the workers are forked: their chainers index when all of them are idle
    GunicornServer(settings).run()
