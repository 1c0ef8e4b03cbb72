"""Conformance tests speak only HTTP.

By default each test runs against this project's server, started by the fixture
with `fhir-server migrate` and `fhir-server serve` (gunicorn), once on SQLite and
once on PostgreSQL; the fixture registers the clients and users the tests need with
`fhir-server clients create` and `fhir-server users create`.

Point them at any FHIR R4 server instead with
``pytest conformance_tests --base-url http://host/fhir/tenant``, with
``--bearer-token T`` (a token allowed to read and write everything the tests write) and,
for the SMART tests, ``--smart-config FILE`` (see conformance_tests/smart.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyotp
import pytest
import requests

from conformance_tests import smart
from conformance_tests.client import FhirClient, TokenSource
from testsupport.backends import BACKENDS, database_urls
from testsupport.server import fhir_server_command, free_port, start_server, stop_server

FULL_ACCESS = "system/*.cruds"
APP_SCOPES = ("launch launch/patient launch/encounter openid fhirUser profile offline_access online_access "
              "patient/*.cruds user/*.cruds")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--base-url", default=None, help="FHIR base URL of the server under test (default: start ours)")
    parser.addoption("--bearer-token", default=None, help="Access token for the server under --base-url")
    parser.addoption("--smart-config", default=None, help="JSON file: the clients, users and patients the SMART tests use")
    parser.addoption("--audit-token", default=None, help="Access token allowed to search AuditEvent (the audit tests)")


@dataclass
class Target:
    base: str  # the FHIR base URL
    env: dict[str, str] | None = None  # our server: the environment its CLI runs with
    tmp: Path | None = None

    def cli(self, *args: str, stdin: str | None = None) -> str:
        assert self.env is not None
        out = subprocess.run([*fhir_server_command(), *args], env=self.env, check=True, capture_output=True, text=True,
                             input=stdin, timeout=120)
        return out.stdout


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server" in metafunc.fixturenames:
        external = metafunc.config.getoption("--base-url")
        metafunc.parametrize("server", ["external"] if external else list(BACKENDS), indirect=True, scope="session")


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The server under test."""
    if request.param == "external":
        yield Target(str(request.config.getoption("--base-url")).rstrip("/"))
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
        yield Target(f"{root}/fhir/default", env, tmp)
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def fhir(server: Target, request: pytest.FixtureRequest) -> FhirClient:
    """A client with a token that may read and write everything."""
    return FhirClient(server.base, _full_access(server, request))


def _full_access(server: Target, request: pytest.FixtureRequest) -> TokenSource | None:
    if server.env is None:
        token = request.config.getoption("--bearer-token")
        return (lambda renew: token) if token else None
    client = json.loads(server.cli("clients", "create", "--tenant", "default", "--name", "conformance tests",
                                   "--scope", FULL_ACCESS, "--secret"))
    token_url = smart.discover(server.base)["token_endpoint"]
    return smart.ClientCredentialsToken(token_url, client["client_id"], client["client_secret"], FULL_ACCESS)


@pytest.fixture(scope="session")
def smart_setup(server: Target, fhir: FhirClient, request: pytest.FixtureRequest) -> Iterator[smart.SmartSetup]:
    """Registered clients and users, and patients with data, for the SMART tests."""
    if server.env is None:
        path = request.config.getoption("--smart-config")
        if not path:
            pytest.skip("the SMART tests need --smart-config FILE for a server given with --base-url")
        yield smart.SmartSetup.from_json(json.loads(Path(path).read_text()), server.base)
        return
    callback = smart.CallbackServer()
    try:
        yield _our_smart_setup(server, fhir, callback)
    finally:
        callback.close()


def _our_smart_setup(server: Target, fhir: FhirClient, callback: smart.CallbackServer) -> smart.SmartSetup:
    assert server.tmp is not None

    def client(*args: str, scope: str = APP_SCOPES) -> dict[str, Any]:
        created: dict[str, Any] = json.loads(server.cli("clients", "create", "--tenant", "default", "--name", "SMART conformance",
                                                        "--scope", scope, *args))
        return created

    confidential = client("--secret", "--redirect-uri", smart.REDIRECT_URI)
    public = client("--public", "--redirect-uri", smart.REDIRECT_URI)
    browser = client("--public", "--redirect-uri", callback.url)
    private_jwks, public_jwks = smart.backend_keys()
    (server.tmp / "backend-jwks.json").write_text(json.dumps(public_jwks))
    backend = client("--jwks", str(server.tmp / "backend-jwks.json"), scope="system/*.rs system/Patient.cruds")

    ids = _smart_data(fhir)
    password = "correct horse battery staple"
    server.cli("users", "create", "--tenant", "default", "--username", "dr-smart", "--fhir-user", f"Practitioner/{ids['practitioner']}",
               "--role", "clinician", "--password-stdin", stdin=password)
    server.cli("users", "create", "--tenant", "default", "--username", "dr-mfa", "--fhir-user", f"Practitioner/{ids['practitioner']}",
               "--role", "clinician", "--role", "emergency-access", "--require-mfa", "--password-stdin", stdin=password)
    enrolled = json.loads(server.cli("users", "mfa", "enroll", "--tenant", "default", "--username", "dr-mfa"))
    totp_secret = pyotp.parse_uri(enrolled["otpauth_uri"]).secret

    def launch(patient: str, encounter: str | None = None) -> str:
        resp = requests.post(smart.discover(server.base)["authorization_endpoint"].rsplit("/", 1)[0] + "/launch",
                             json={"patient": patient, **({"encounter": encounter} if encounter else {})},
                             headers={"Authorization": f"Bearer {fhir.token(False) if fhir.token else ''}"}, timeout=30)
        assert resp.status_code == 200, resp.text
        launch_id: str = resp.json()["launch"]
        return launch_id

    return smart.SmartSetup(
        fhir_base=server.base,
        confidential=smart.Client(confidential["client_id"], client_secret=confidential["client_secret"]),
        public=smart.Client(public["client_id"]),
        backend=smart.Client(backend["client_id"], redirect_uri="", private_jwks=private_jwks),
        user=smart.User("dr-smart", password),
        mfa_user=smart.User("dr-mfa", password, totp_secret),
        patient=ids["patient"], other_patient=ids["other_patient"], encounter=ids["encounter"], launch=launch,
        browser_client=smart.Client(browser["client_id"], redirect_uri=callback.url), callback=callback,
    )


def _smart_data(fhir: FhirClient) -> dict[str, str]:
    """Two patients; the first with an encounter and a laboratory and a vital-signs Observation."""
    def create(resource: dict[str, Any]) -> str:
        resp = fhir.post(resource["resourceType"], resource)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])

    def observation(patient: str, category: str, code: str) -> dict[str, Any]:
        return {"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{patient}"},
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]}}

    practitioner = create({"resourceType": "Practitioner", "name": [{"family": "Smart", "given": ["Doctor"]}]})
    patient = create({"resourceType": "Patient", "name": [{"family": "Aardvark", "given": ["Smart"]}], "birthDate": "1970-01-01"})
    other = create({"resourceType": "Patient", "name": [{"family": "Zebra", "given": ["Other"]}], "birthDate": "1980-02-02"})
    encounter = create({"resourceType": "Encounter", "status": "finished", "subject": {"reference": f"Patient/{patient}"},
                        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}})
    create(observation(patient, "laboratory", "2339-0"))
    create(observation(patient, "vital-signs", "8867-4"))
    create(observation(other, "laboratory", "2339-0"))
    return {"practitioner": practitioner, "patient": patient, "other_patient": other, "encounter": encounter}
