"""Benchmark plumbing: PostgreSQL databases, servers started as in production, wrk runs, process stats."""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from testsupport.server import client_credentials

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "lua"
BIN = Path(sys.executable).parent
DEFAULT_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Database:
    name: str
    owner_url: str
    app_url: str
    admin_url: str

    def drop(self) -> None:
        engine = create_engine(self.admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"))
            conn.execute(text(f"DROP ROLE IF EXISTS {self.name}_app"))
            conn.execute(text(f"DROP ROLE IF EXISTS {self.name}_owner"))
        engine.dispose()


def create_database(admin_url: str) -> Database:
    """A fresh database with an owner role (migrations) and an application role (the server), as in production."""
    if admin_url.startswith("postgresql://"):
        admin_url = "postgresql+psycopg://" + admin_url[len("postgresql://") :]
    name = f"fhir_bench_{secrets.token_hex(3)}"
    password = secrets.token_hex(12)
    engine = create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE ROLE {name}_owner LOGIN PASSWORD '{password}'"))
        conn.execute(text(f"CREATE ROLE {name}_app LOGIN PASSWORD '{password}'"))
        conn.execute(text(f"CREATE DATABASE {name} OWNER {name}_owner"))
    engine.dispose()
    base = make_url(admin_url)
    owner = base.set(username=f"{name}_owner", password=password, database=name).render_as_string(hide_password=False)
    app = base.set(username=f"{name}_app", password=password, database=name).render_as_string(hide_password=False)
    return Database(name, owner, app, admin_url)


@dataclass
class Server:
    """`fhir-server serve` (gunicorn) or any gunicorn app, with its process tree."""

    base_url: str
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    client: dict[str, str] | None = None  # a backend-services client (fhir-server clients create --secret)
    _token: tuple[float, str] | None = None

    def headers(self) -> dict[str, str]:
        """What every request to a fhir-server carries: a fresh access token (client_credentials, renewed well
        before its five minutes are up), and X-Forwarded-Proto from the trusted "proxy" (the benchmark itself)."""
        if self.client is None:
            return {}
        if self._token is None or time.monotonic() - self._token[0] > 200:
            root = self.base_url.split("/fhir/")[0]
            token = client_credentials(f"{root}/auth/default/token", self.client["client_id"], self.client["client_secret"],
                                       "system/*.cruds", headers={"X-Forwarded-Proto": "https"})
            self._token = (time.monotonic(), token)
        return {"Authorization": f"Bearer {self._token[1]}", "X-Forwarded-Proto": "https"}

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def peak_rss_mib(self) -> float:
        """The largest peak resident set (VmHWM) among the worker processes."""
        peaks = []
        for pid in self.worker_pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) / 1024)
            except OSError:
                continue
        return round(max(peaks), 1) if peaks else 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_fhir_server(db: Database, workdir: Path, *, cipher: str = "aes-256-gcm", workers: int = 3,
                      threads: int = int(os.environ.get("BENCH_THREADS", "2")),
                      extra_env: dict[str, str] | None = None) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    key_file = workdir / "master.key"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_")}
    env.update(
        FHIR_ENV="production",
        FHIR_DATA_DIR=str(workdir),
        FHIR_DATABASE_URL=db.app_url,
        FHIR_MIGRATION_DATABASE_URL=db.owner_url,
        FHIR_MASTER_KEY_FILE=str(key_file),
        FHIR_PORT=str(port),
        FHIR_WORKERS=str(workers),
        FHIR_THREADS=str(threads),
        FHIR_LOG_LEVEL="WARNING",
        FHIR_ACCESS_LOG="false",
        FHIR_CIPHER=cipher,
        FHIR_MAX_PAGE_SIZE="1000",
        FHIR_TRUSTED_PROXY="127.0.0.1",  # production serves HTTPS only: the benchmark plays the TLS-terminating proxy
    )
    env.update(extra_env or {})
    if cipher == "null" or env.get("FHIR_AUDIT") == "false":
        env["FHIR_ENV"] = "development"  # production refuses the null cipher and an unaudited server, by design
    if not key_file.exists():
        subprocess.run([str(BIN / "fhir-server"), "keys", "generate-master", "--output", str(key_file)], env=env, check=True,
                       capture_output=True)
    subprocess.run([str(BIN / "fhir-server"), "migrate"], env=env, check=True, capture_output=True)
    log = workdir / "server.log"
    proc = subprocess.Popen([str(BIN / "fhir-server"), "serve"], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    _wait_ready(f"{root}/readyz", proc, log)
    out = subprocess.run([str(BIN / "fhir-server"), "clients", "create", "--tenant", "default", "--name", "benchmark",
                          "--scope", "system/*.cruds", "--secret"], env=env, check=True, capture_output=True, text=True)
    return Server(f"{root}/fhir/default", proc, log, env, client=json.loads(out.stdout))


def start_gunicorn_app(app_spec: str, workdir: Path, env_extra: dict[str, str], *, workers: int = 3, threads: int = 2) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / f"{app_spec.split(':')[-1].split('(')[0]}.log"
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [str(BIN / "gunicorn"), "-w", str(workers), "--threads", str(threads), "-k", "gthread", "-b", f"127.0.0.1:{port}",
         "--log-level", "warning", app_spec],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=str(ROOT),
    )
    root = f"http://127.0.0.1:{port}"
    _wait_ready(f"{root}/healthz", proc, log)
    return Server(root, proc, log, env)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up: {log.read_text()[-3000:]}")


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    client_cpu_pct: float
    raw: dict[str, Any]


def wrk(url: str, script: str, args: list[str], *, connections: int, threads: int, seconds: int,
        headers: dict[str, str] | None = None) -> WrkResult:
    """Run wrk with a Lua script; ``headers`` go on every request (common.lua reads them from BENCH_HEADERS)."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (make bench installs the Debian package)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
         "-s", str(LUA / script), url, "--", *args],
        capture_output=True, text=True, timeout=seconds + 60,
        env={**os.environ, "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items())},
    )
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((l for l in out.stdout.splitlines() if l.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    data = json.loads(line[len("BENCHJSON "):])
    secs = data["duration_us"] / 1e6
    errors = sum(data[k] for k in data if k.startswith("errors_"))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return WrkResult(
        requests=data["requests"],
        seconds=round(secs, 2),
        rps=round(data["requests"] / secs, 1),
        p50_ms=round(data["p50_us"] / 1000, 2),
        p95_ms=round(data["p95_us"] / 1000, 2),
        p99_ms=round(data["p99_us"] / 1000, 2),
        errors=errors,
        client_cpu_pct=round(100 * cpu / wall, 1),
        raw=data,
    )
