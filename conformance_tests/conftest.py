"""Conformance tests speak only HTTP.

By default each test runs against this project's server, started by the fixture
with `fhir-server migrate` and `fhir-server serve` (gunicorn), once on SQLite and
once on PostgreSQL. Point them at any FHIR R4 server instead with
``pytest conformance_tests --base-url http://host/fhir/tenant``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from conformance_tests.client import FhirClient
from testsupport.backends import BACKENDS, database_urls


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--base-url", default=None, help="FHIR base URL of the server under test (default: start ours)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server" in metafunc.fixturenames:
        external = metafunc.config.getoption("--base-url")
        metafunc.parametrize("server", ["external"] if external else list(BACKENDS), indirect=True, scope="session")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fhir_server_command() -> list[str]:
    exe = shutil.which("fhir-server", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "fhir_server.cli"]


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of the server under test."""
    if request.param == "external":
        yield str(request.config.getoption("--base-url")).rstrip("/")
        return
    tmp = tmp_path_factory.mktemp(f"server-{request.param}")
    urls = database_urls(request, request.param, str(tmp))
    port = _free_port()
    env = {
        **os.environ,
        "FHIR_DATA_DIR": str(tmp / "data"),
        "FHIR_DATABASE_URL": urls.app_url,
        "FHIR_MIGRATION_DATABASE_URL": urls.owner_url,
        "FHIR_PORT": str(port),
        "FHIR_WORKERS": "2",
        "FHIR_THREADS": "4",
        "FHIR_LOG_LEVEL": "WARNING",
    }
    cmd = _fhir_server_command()
    subprocess.run([*cmd, "migrate"], env=env, check=True, capture_output=True, timeout=120)
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([*cmd, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{root}/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"{root}/fhir/default"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def fhir(server: str) -> FhirClient:
    return FhirClient(server)
