"""Fixtures for unit and integration tests: settings, storage, engine and app on each back-end.

The database of a back-end is created and migrated once per session; each test
gets a fresh tenant, so tests never see each other's data.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from testsupport.auth import AuthorizedClient
from testsupport.backends import BACKENDS, DatabaseUrls, database_urls
from fhir_server.app import create_app
from fhir_server.capability.registry import Registry, load_registry
from fhir_server.engine.engine import Engine
from fhir_server.security.crypto import cipher_named
from fhir_server.security.keys import LocalKeyProvider, decode_key
from fhir_server.settings import Settings
from fhir_server.storage import migrate, tenants
from fhir_server.storage.database import Database
from fhir_server.storage.store import Storage

TEST_MASTER_KEY = base64.b64encode(bytes(range(32))).decode()


def make_settings(urls: DatabaseUrls, data_dir: Path, **overrides: Any) -> Settings:
    return Settings.load(
        environ={},
        env="test",
        database_url=urls.app_url,
        migration_database_url=urls.owner_url,
        master_key=TEST_MASTER_KEY,
        data_dir=str(data_dir),
        access_log=False,
        db_pool_size=4,
        background_jobs=False,
        **overrides,
    )


def make_storage(settings: Settings, url: str) -> Storage:
    provider = LocalKeyProvider([decode_key(TEST_MASTER_KEY)])
    return Storage(Database(url, settings), provider, cipher_named(settings.cipher), settings)


@pytest.fixture(scope="session", params=BACKENDS)
def db_urls(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DatabaseUrls:
    tmp = tmp_path_factory.mktemp(f"db-{request.param}")
    urls = database_urls(request, request.param, str(tmp))
    settings = make_settings(urls, tmp)
    migrate.upgrade(settings, LocalKeyProvider([decode_key(TEST_MASTER_KEY)]))
    return urls


@pytest.fixture(scope="session")
def backend(db_urls: DatabaseUrls) -> str:
    return db_urls.backend


@pytest.fixture
def fresh_db(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> DatabaseUrls:
    """A database of its own (for tests that rotate its master key, kill its server, count all its rows)."""
    return database_urls(request, backend, str(tmp_path))


@pytest.fixture(scope="session")
def settings(db_urls: DatabaseUrls, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(db_urls, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def storage(settings: Settings, db_urls: DatabaseUrls) -> Iterator[Storage]:
    s = make_storage(settings, db_urls.app_url)
    yield s
    s.audit_log.stop()
    s.db.dispose()


@pytest.fixture(scope="session")
def owner_storage(settings: Settings, db_urls: DatabaseUrls) -> Iterator[Storage]:
    s = make_storage(settings, db_urls.owner_url)
    yield s
    s.audit_log.stop()
    s.db.dispose()


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry()


@pytest.fixture
def new_tenant(owner_storage: Storage) -> Any:
    """A factory of fresh tenants: returns the new tenant's name."""

    def make(prefix: str = "t") -> str:
        name = f"{prefix}-{secrets.token_hex(5)}"
        with owner_storage.db.transaction(write=True) as conn:
            tenants.create(conn, name, owner_storage.provider)
        return name

    return make


@pytest.fixture
def tenant(new_tenant: Any) -> str:
    return str(new_tenant())


@pytest.fixture(scope="session")
def engine(registry: Registry, storage: Storage, settings: Settings) -> Engine:
    return Engine(registry, storage, settings)


@pytest.fixture
def engine_with(engine: Engine, storage: Storage, settings: Settings) -> Iterator[Any]:
    """A factory of engines with settings of their own over the shared storage (the shared engine's audit trail,
    which the last engine made writes the storage's audit records, is put back afterwards)."""
    hook = storage.before_commit

    def make(**overrides: Any) -> Engine:
        return Engine(engine.registry, storage, settings.with_overrides(**overrides))

    yield make
    storage.before_commit = hook


@pytest.fixture(scope="session")
def app(settings: Settings) -> Iterator[Flask]:
    application = create_app(settings)
    yield application
    application.extensions["fhir_storage"].audit_log.stop()
    application.extensions["fhir_storage"].db.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client that authorizes itself (a full-access token of whichever tenant a URL names)."""
    app.test_client_class = AuthorizedClient
    return app.test_client()
