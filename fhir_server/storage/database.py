"""Database engines and transactions for SQLite and PostgreSQL.

SQLite: WAL journal, full fsync on commit, a busy timeout, and write
transactions opened with ``BEGIN IMMEDIATE`` so two writers serialise instead
of failing half-way. PostgreSQL: psycopg 3, a pooled engine, and the tenant of
each transaction bound with ``set_config('fhir.tenant_id', ..., true)`` so that
row-level security applies to every statement of that transaction.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from fhir_server.settings import Settings

TENANT_SETTING = "fhir.tenant_id"
_CLEAR_TENANT = text(f"SELECT set_config('{TENANT_SETTING}', '', :local)")


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` URLs and use psycopg 3 for them."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def make_engine(url: str, settings: Settings, *, pooled: bool = True) -> Engine:
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, settings)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql://")
    # No pre-ping (it costs a round trip per request): a connection the server dropped fails one
    # request, and SQLAlchemy then invalidates the whole pool; connections are also recycled.
    kwargs: dict[str, Any] = {"pool_pre_ping": False, "pool_recycle": 1800}
    if pooled:
        kwargs.update(pool_size=settings.db_pool_size, max_overflow=settings.db_pool_size)
    else:
        kwargs["poolclass"] = NullPool
    # hide_parameters: a database error's text must never carry values (PHI) into a log.
    return create_engine(url, connect_args={"application_name": "fhir-server"}, hide_parameters=True, **kwargs)


def _sqlite_engine(url: str, settings: Settings) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        # The data directory holds PHI (encrypted) and, by default, the master key: owner only.
        Path(database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = create_engine(
        url,
        hide_parameters=True,
        connect_args={"check_same_thread": False, "timeout": settings.sqlite_busy_timeout_ms / 1000},
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
    )
    busy = settings.sqlite_busy_timeout_ms

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event, not the driver, decide how transactions start.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("fhir_write") else "BEGIN")

    return engine


class Database:
    """One engine and the transactions opened on it."""

    def __init__(self, url: str, settings: Settings, *, pooled: bool = True) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url, settings, pooled=pooled)
        self.dialect = self.engine.dialect.name  # "sqlite" | "postgresql"
        self._pid = os.getpid()

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @contextmanager
    def transaction(self, *, write: bool, binds_tenant_first: bool = False) -> Iterator[Connection]:
        """A connection inside one transaction: committed on success, rolled back on any error.

        Reads on PostgreSQL run in autocommit mode instead: PostgreSQL's READ COMMITTED gives
        each statement its own snapshot anyway, and this saves the BEGIN and COMMIT round trips.
        The tenant binding of such a read lives on the pooled connection, so every unit of work
        starts by binding or clearing it: ``binds_tenant_first`` promises that the caller's first
        statement is ``tenants.lookup`` (which always writes the setting); otherwise the setting
        is cleared here, and row-level security shows nothing until the caller binds a tenant.
        """
        if os.getpid() != self._pid:
            # A forked worker must not share the parent's pooled connections.
            self.engine.dispose(close=False)
            self._pid = os.getpid()
        with self.engine.connect() as conn:
            conn.info["fhir_write"] = write
            if not write and self.is_postgres:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.info["fhir_autocommit"] = True
                try:
                    if not binds_tenant_first:
                        conn.execute(_CLEAR_TENANT, {"local": False})
                    yield conn
                finally:
                    conn.info["fhir_autocommit"] = False
                return
            conn.info["fhir_autocommit"] = False
            with conn.begin():
                if self.is_postgres and not binds_tenant_first:
                    conn.execute(_CLEAR_TENANT, {"local": True})
                yield conn

    def dispose(self) -> None:
        self.engine.dispose()
