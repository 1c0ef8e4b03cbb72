"""Baselines measured in the same run as the server, with the same gunicorn settings.

- ``http_app()``: answers a fixed 1 KB JSON document (the cost of HTTP, gunicorn and Flask alone).
- ``pk_app()``: one primary-key SELECT of an encrypted resource version and its decryption (the
  floor under a FHIR read: what the server adds on top of it is the engine).
"""

from __future__ import annotations

import os
import random
from typing import Any

import orjson
from flask import Flask, Response
from sqlalchemy import select

FIXED = orjson.dumps({"resourceType": "Basic", "id": "fixed", "note": "x" * 960})


def http_app() -> Flask:
    app = Flask(__name__)

    @app.get("/healthz")
    def health() -> Response:
        return Response(b"{}", content_type="application/json")

    @app.get("/fixed")
    def fixed() -> Response:
        return Response(FIXED, content_type="application/fhir+json")

    return app


def pk_app() -> Flask:
    from fhir_server.security.crypto import AesGcmCipher, Sealer
    from fhir_server.security.keys import provider_from_settings
    from fhir_server.settings import Settings
    from fhir_server.storage import schema
    from fhir_server.storage.database import Database
    from fhir_server.storage.tenants import KeyRing, lookup

    settings = Settings.load()
    db = Database(settings.effective_database_url, settings)
    keyring = KeyRing(db, provider_from_settings(settings), settings.key_cache_seconds)
    ids = [line for line in open(os.environ["BENCH_IDS_FILE"]).read().split() if line]
    V = schema.resource_versions
    app = Flask(__name__)

    @app.get("/healthz")
    def health() -> Response:
        return Response(b"{}", content_type="application/json")

    @app.get("/pk")
    def pk() -> Response:
        rtype, rid = random.choice(ids).split("/")
        with db.transaction(write=False) as conn:
            tenant = lookup(conn, "default")
            sealer = Sealer(AesGcmCipher(), keyring.keys_for(conn, tenant))
            row: Any = conn.execute(
                select(V.c.version, V.c.key_version, V.c.body).where(
                    V.c.tenant_id == tenant.id, V.c.res_type == rtype, V.c.res_id == rid, V.c.version == 1
                )
            ).one()
        body = sealer.open_resource(rtype, rid, row.version, row.key_version, row.body)
        return Response(body, content_type="application/fhir+json")

    return app
