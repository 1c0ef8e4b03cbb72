"""A TLS-terminating proxy in front of the server: its X-Forwarded-* headers count, nobody else's.

With ``FHIR_TRUSTED_PROXY`` set (one address or several, comma-separated), a request arriving from
one of those addresses has its scheme, client address and host taken from X-Forwarded-Proto, -For
and -Host (werkzeug's ProxyFix, one hop). From any other address those headers are removed, so a
client cannot claim to have come over HTTPS or from elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from werkzeug.middleware.proxy_fix import ProxyFix

FORWARDED = ("HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PORT",
             "HTTP_X_FORWARDED_PREFIX", "HTTP_FORWARDED")


class TrustedProxy:
    def __init__(self, app: Any, proxies: str) -> None:
        self.app = app
        self.fixed = ProxyFix(app, x_for=1, x_proto=1, x_host=1, x_port=1, x_prefix=1)
        self.proxies = frozenset(p.strip() for p in proxies.split(",") if p.strip())

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("REMOTE_ADDR") in self.proxies:
            return self.fixed(environ, start_response)
        for key in FORWARDED:
            environ.pop(key, None)
        return self.app(environ, start_response)  # type: ignore[no-any-return]
