"""Transport security: HTTPS with TLS 1.2 or newer and HSTS; in production, plain HTTP only behind a trusted proxy."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import warnings
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from testsupport.backends import DatabaseUrls
from testsupport.cli import cli_environment, run
from testsupport.server import free_port, start_server, stop_server


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def handshake(port: int, version: ssl.TLSVersion) -> str | None:
    """The negotiated protocol when the client offers only ``version`` (None: the server refused)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1: deprecated, which is the point
            context.minimum_version = context.maximum_version = version
    except (ValueError, ssl.SSLError):
        return None  # this OpenSSL cannot even offer it
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as tls:
            return tls.version()
    except (ssl.SSLError, OSError):
        return None


@pytest.fixture
def env(fresh_db: DatabaseUrls, tmp_path: Path, backend: str) -> dict[str, str]:
    if backend != "sqlite":
        pytest.skip("transport does not depend on the database")
    env = cli_environment(fresh_db, tmp_path)
    env.update(FHIR_PORT=str(free_port()), FHIR_WORKERS="1", FHIR_THREADS="2", FHIR_LOG_LEVEL="WARNING")
    return env


def test_https_with_tls_12_or_newer_and_hsts(env: dict[str, str], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    env.update(FHIR_TLS_CERT=str(cert), FHIR_TLS_KEY=str(key), FHIR_HOST="0.0.0.0")  # any address may be bound now
    proc, _ = start_server(env, tmp_path / "server.log", https=True)
    port = int(env["FHIR_PORT"])
    try:
        resp = requests.get(f"https://127.0.0.1:{port}/fhir/default/metadata", verify=str(cert), timeout=10)
        assert resp.status_code == 200
        assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
        assert resp.json()["rest"][0]["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
        assert requests.get(f"https://127.0.0.1:{port}/fhir/default/Patient", verify=str(cert), timeout=10).status_code == 401
        assert handshake(port, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        assert handshake(port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
        assert handshake(port, ssl.TLSVersion.TLSv1_1) is None
        assert handshake(port, ssl.TLSVersion.TLSv1) is None
        with pytest.raises(requests.ConnectionError):  # plain HTTP on the TLS port gets nowhere
            requests.get(f"http://127.0.0.1:{port}/fhir/default/metadata", timeout=10)
    finally:
        stop_server(proc)


def test_serve_refuses_bad_tls_settings(env: dict[str, str], tmp_path: Path) -> None:
    proc = run(env, "serve", "--tls-cert", str(tmp_path / "missing.pem"), check=False)
    assert proc.returncode != 0 and "go together" in proc.stderr
    (tmp_path / "junk.pem").write_text("not a certificate")
    proc = run(env, "serve", "--tls-cert", str(tmp_path / "junk.pem"), "--tls-key", str(tmp_path / "junk.pem"), check=False)
    assert proc.returncode != 0 and "cannot use the TLS certificate" in proc.stderr


def test_production_refuses_plain_http_unless_behind_a_trusted_proxy(env: dict[str, str], tmp_path: Path) -> None:
    env["FHIR_ENV"] = "production"
    proc = run(env, "serve", check=False)
    assert proc.returncode != 0 and "plain HTTP in production" in proc.stderr

    env["FHIR_TRUSTED_PROXY"] = "127.0.0.1"
    server, root = start_server(env, tmp_path / "server.log")
    assert "FHIR_BASE_URL is not set" in (tmp_path / "server.log").read_text()
    try:
        assert requests.get(f"{root}/healthz", timeout=10).status_code == 200  # load balancers' checks
        direct = requests.get(f"{root}/fhir/default/metadata", timeout=10)
        assert direct.status_code == 403 and direct.json()["resourceType"] == "OperationOutcome"
        forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Host": "fhir.example.org"}
        resp = requests.get(f"{root}/fhir/default/metadata", headers=forwarded, timeout=10)
        assert resp.status_code == 200 and "Strict-Transport-Security" in resp.headers
        # The base URL comes from the proxy's headers: the SMART endpoints are announced on the public name.
        config = requests.get(f"{root}/fhir/default/.well-known/smart-configuration", headers=forwarded, timeout=10).json()
        assert config["token_endpoint"] == "https://fhir.example.org/auth/default/token"
    finally:
        stop_server(server)
