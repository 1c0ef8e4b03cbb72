"""Starting ``fhir-server serve`` (gunicorn) as a user does, for tests that speak HTTP to it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fhir_server_command() -> list[str]:
    exe = shutil.which("fhir-server", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "fhir_server.cli"]


def start_server(env: dict[str, str], log_path: Path, *, new_session: bool = False,
                 https: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """Run ``fhir-server serve`` with ``env`` (FHIR_PORT set) until /readyz answers; (process, root URL).

    ``new_session`` puts gunicorn and its workers in a process group of their own, to kill them all.
    """
    log = open(log_path, "ab")
    proc = subprocess.Popen([*fhir_server_command(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=new_session)
    log.close()
    root = f"{'https' if https else 'http'}://127.0.0.1:{env['FHIR_PORT']}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with warnings.catch_warnings():  # a self-signed test certificate: readiness only, nothing sent
                warnings.simplefilter("ignore")
                ready = requests.get(f"{root}/readyz", timeout=2, verify=False).status_code == 200
            if ready:
                return proc, root
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def backend_client(env: dict[str, str], tenant: str = "default", scope: str = "system/*.cruds") -> dict[str, str]:
    """A confidential backend-services client of ``tenant``, made with ``fhir-server clients create``."""
    out = subprocess.run([*fhir_server_command(), "clients", "create", "--tenant", tenant, "--name", "test-suite",
                          "--scope", scope, "--secret"], env=env, check=True, capture_output=True, timeout=120)
    client: dict[str, str] = json.loads(out.stdout)
    return client


def client_credentials(token_url: str, client_id: str, client_secret: str, scope: str,
                       headers: dict[str, str] | None = None) -> str:
    """An access token from a token endpoint: the client_credentials grant with client_secret_basic."""
    resp = requests.post(token_url, data={"grant_type": "client_credentials", "scope": scope},
                         auth=(client_id, client_secret), headers=headers, timeout=30)
    resp.raise_for_status()
    token: str = resp.json()["access_token"]
    return token


def client_credentials_token(root: str, client: dict[str, str], tenant: str = "default", scope: str = "system/*.cruds") -> str:
    """An access token for ``client`` (as ``backend_client`` prints it) from this server's token endpoint."""
    return client_credentials(f"{root}/auth/{tenant}/token", client["client_id"], client["client_secret"], scope)
