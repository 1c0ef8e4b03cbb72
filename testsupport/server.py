"""Starting ``fhir-server serve`` (gunicorn) as a user does, for tests that speak HTTP to it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fhir_server_command() -> list[str]:
    exe = shutil.which("fhir-server", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "fhir_server.cli"]


def start_server(env: dict[str, str], log_path: Path, *, new_session: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """Run ``fhir-server serve`` with ``env`` (FHIR_PORT set) until /readyz answers; (process, root URL).

    ``new_session`` puts gunicorn and its workers in a process group of their own, to kill them all.
    """
    log = open(log_path, "ab")
    proc = subprocess.Popen([*fhir_server_command(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=new_session)
    log.close()
    root = f"http://127.0.0.1:{env['FHIR_PORT']}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{root}/readyz", timeout=2).status_code == 200:
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
