"""Conformance tests speak only HTTP.

By default each test runs against this project's server, started by the fixture
with `fhir-server migrate` and `fhir-server serve` (gunicorn), once on SQLite and
once on PostgreSQL. Point them at any FHIR R4 server instead with
``pytest conformance_tests --base-url http://host/fhir/tenant``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from conformance_tests.client import FhirClient
from testsupport.backends import BACKENDS, database_urls
from testsupport.server import fhir_server_command, free_port, start_server, stop_server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--base-url", default=None, help="FHIR base URL of the server under test (default: start ours)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server" in metafunc.fixturenames:
        external = metafunc.config.getoption("--base-url")
        metafunc.parametrize("server", ["external"] if external else list(BACKENDS), indirect=True, scope="session")


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of the server under test."""
    if request.param == "external":
        yield str(request.config.getoption("--base-url")).rstrip("/")
        return
    tmp = tmp_path_factory.mktemp(f"server-{request.param}")
    urls = database_urls(request, request.param, str(tmp))
    env = {
        **os.environ,
        "FHIR_DATA_DIR": str(tmp / "data"),
        "FHIR_DATABASE_URL": urls.app_url,
        "FHIR_MIGRATION_DATABASE_URL": urls.owner_url,
        "FHIR_PORT": str(free_port()),
        "FHIR_WORKERS": "2",
        "FHIR_THREADS": "4",
        "FHIR_LOG_LEVEL": "WARNING",
    }
    subprocess.run([*fhir_server_command(), "migrate"], env=env, check=True, capture_output=True, timeout=120)
    proc, root = start_server(env, tmp / "server.log")
    try:
        yield f"{root}/fhir/default"
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def fhir(server: str) -> FhirClient:
    return FhirClient(server)
