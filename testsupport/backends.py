"""Database back-ends for the test suites (tests/ and conformance_tests/); fixtures come from ../conftest.py.

Every storage test runs on SQLite and on PostgreSQL. PostgreSQL is reached at
``FHIR_TEST_POSTGRES_URL`` (an administrative URL: it must be allowed to create
databases and roles), or a local server on 127.0.0.1:5432 as ``postgres``. Each
test session gets its own database, an owner role that runs the migrations and
an application role that does not own the tables, so row-level security is
exercised exactly as in production. Without PostgreSQL those tests are skipped,
except under ``CI=true``, where they fail.

At the end the run prints which back-ends ran.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgresql")

_ran: set[str] = set()
_skipped: dict[str, str] = {}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def admin_url() -> str:
    url = os.environ.get("FHIR_TEST_POSTGRES_URL") or DEFAULT_ADMIN_URL
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


@dataclass(frozen=True)
class DatabaseUrls:
    backend: str
    app_url: str  # the server's connection: not the tables' owner
    owner_url: str  # migrations and administrative commands


class PostgresProvisioner:
    """Creates a throw-away database with an owner role and an application role."""

    def __init__(self, admin: str) -> None:
        self.admin = admin
        self.engine = create_engine(admin, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        self.created: list[tuple[str, str, str]] = []

    def check(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def create(self) -> DatabaseUrls:
        suffix = secrets.token_hex(4)
        db, owner, app = f"fhir_t_{suffix}", f"fhir_t_{suffix}_owner", f"fhir_t_{suffix}_app"
        password = secrets.token_hex(12)
        with self.engine.connect() as conn:
            conn.execute(text(f"CREATE ROLE {owner} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{password}'"))
            conn.execute(text(f"CREATE ROLE {app} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{password}'"))
            conn.execute(text(f"CREATE DATABASE {db} OWNER {owner}"))
        self.created.append((db, owner, app))
        base = make_url(self.admin)
        owner_url = base.set(username=owner, password=password, database=db)
        app_url = base.set(username=app, password=password, database=db)
        return DatabaseUrls(
            "postgresql",
            app_url.render_as_string(hide_password=False),
            owner_url.render_as_string(hide_password=False),
        )

    def drop_all(self) -> None:
        with self.engine.connect() as conn:
            for db, owner, app in self.created:
                conn.execute(text(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                conn.execute(text(f"DROP ROLE IF EXISTS {app}"))
                conn.execute(text(f"DROP ROLE IF EXISTS {owner}"))
        self.engine.dispose()


def postgres_fixture() -> Iterator[PostgresProvisioner]:
    prov = PostgresProvisioner(admin_url())
    try:
        prov.check()
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "no PostgreSQL here"
        reason = f"PostgreSQL not reachable at {make_url(admin_url()).render_as_string()}: {type(exc).__name__}"
        _skipped["postgresql"] = reason
        if in_ci():
            pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)")
        pytest.skip(reason)
    try:
        yield prov
    finally:
        prov.drop_all()


def database_urls(request: pytest.FixtureRequest, backend: str, tmp_dir: str) -> DatabaseUrls:
    """Fresh database URLs for ``backend`` (a new SQLite file, or a new PostgreSQL database)."""
    _ran.add(backend)
    if backend == "sqlite":
        url = f"sqlite:///{tmp_dir}/fhir.db"
        return DatabaseUrls("sqlite", url, url)
    prov: PostgresProvisioner = request.getfixturevalue("postgres")
    return prov.create()


def terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    ran = ", ".join(b for b in BACKENDS if b in _ran) or "none"
    terminalreporter.write_line(f"storage back-ends exercised: {ran}")
    for backend, reason in _skipped.items():
        terminalreporter.write_line(f"storage back-end skipped: {backend} ({reason})")
