"""Running the fhir-server command as a user does (a subprocess with FHIR_* settings), for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy.engine import make_url

from testsupport.backends import DatabaseUrls, admin_url

CLI = [sys.executable, "-m", "fhir_server.cli"]


def run(env: dict[str, str], *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    return proc


def cli_environment(urls: DatabaseUrls, tmp_path: Path) -> dict[str, str]:
    """FHIR_* settings for a fresh database with a master key of its own, migrated."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_")}
    env.update(
        FHIR_DATABASE_URL=urls.app_url,
        FHIR_MIGRATION_DATABASE_URL=urls.owner_url,
        FHIR_DATA_DIR=str(tmp_path / "data"),
        FHIR_MASTER_KEY_FILE=str(tmp_path / "master.key"),
    )
    run(env, "keys", "generate-master", "--output", str(tmp_path / "master.key"))
    run(env, "migrate")
    return env


def admin_or_owner(urls: DatabaseUrls) -> str:
    """A URL that sees every row: on PostgreSQL the cluster's administrator (past row-level security)."""
    if urls.backend == "postgresql":
        return make_url(admin_url()).set(database=make_url(urls.owner_url).database).render_as_string(hide_password=False)
    return urls.owner_url
