"""The fhir-server command, run as a user runs it (subprocesses with FHIR_* settings)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from fhir_server.storage import schema
from testsupport.auth import AuthorizedClient
from testsupport.backends import DatabaseUrls
from testsupport.cli import CLI, admin_or_owner, cli_environment, run


@pytest.fixture
def cli_env(fresh_db: DatabaseUrls, tmp_path: Path) -> dict[str, str]:
    return cli_environment(fresh_db, tmp_path)


def test_generate_master_refuses_to_overwrite(cli_env: dict[str, str], tmp_path: Path) -> None:
    key = tmp_path / "master.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    proc = run(cli_env, "keys", "generate-master", "--output", str(key), check=False)
    assert proc.returncode != 0 and "refusing" in proc.stderr


def test_tenant_lifecycle_and_keys(cli_env: dict[str, str]) -> None:
    name = "cli-" + os.urandom(3).hex()
    assert "created tenant" in run(cli_env, "tenants", "create", name).stdout
    assert run(cli_env, "tenants", "create", name, check=False).returncode != 0
    assert run(cli_env, "tenants", "create", "Bad_Name", check=False).returncode != 0
    assert name in run(cli_env, "tenants", "list").stdout
    assert "version 2" in run(cli_env, "keys", "rotate", "--tenant", name).stdout
    # The versions under the old key are the tenant's first audit records: "tenant created", and "data key
    # rotated", which commits with the rotation and so is sealed with the key it replaced.
    assert "2 versions re-encrypted" in run(cli_env, "keys", "reencrypt", "--tenant", name).stdout
    assert "re-wrapped" in run(cli_env, "keys", "rotate-master").stdout
    assert len(Path(cli_env["FHIR_MASTER_KEY_FILE"]).read_text().split()) == 1
    # Each command left its record, the re-encryption and the new master key left the chain intact.
    run(cli_env, "audit", "chain", "--tenant", name)
    assert "the log is intact" in run(cli_env, "audit", "verify", "--tenant", name).stdout
    exported = run(cli_env, "audit", "export", "--tenant", name).stdout
    for code in ("tenant-created", "data-key-rotated", "reencrypted", "master-key-rotated"):
        assert f'"code":"{code}"' in exported, code
    out = run(cli_env, "tenants", "delete", name, "--crypto-shred", "--yes").stdout
    assert "keys destroyed" in out and "rows removed" in out
    assert name not in run(cli_env, "tenants", "list").stdout
    assert run(cli_env, "keys", "rotate", "--tenant", "no-such-tenant", check=False).returncode != 0
    # The tenant's own log went with it; the server's log keeps its creation and deletion.
    server_log = run(cli_env, "audit", "export", "--tenant", "server-audit").stdout
    assert '"code":"tenant-deleted"' in server_log and f"tenant {name} (id" in server_log
    assert server_log.count(f"tenant {name} (id") == 2 and '"code":"tenant-created"' in server_log
    assert "the log is intact" in run(cli_env, "audit", "verify", "--tenant", "server-audit").stdout
    assert run(cli_env, "tenants", "delete", "server-audit", "--crypto-shred", "--yes", check=False).returncode != 0


def test_delete_requires_crypto_shred_flag(cli_env: dict[str, str]) -> None:
    assert run(cli_env, "tenants", "delete", "default", "--yes", check=False).returncode != 0


def test_killed_reencrypt_resumes_and_finishes(cli_env: dict[str, str], fresh_db: DatabaseUrls, backend: str) -> None:
    """SIGKILL `keys reencrypt` part-way; the next run re-encrypts the rest and everything stays readable."""
    name = "rk-" + os.urandom(3).hex()
    run(cli_env, "tenants", "create", name)
    from fhir_server.app import create_app
    from fhir_server.settings import Settings

    settings = Settings.load(environ=cli_env, access_log=False)
    app = create_app(settings)
    app.test_client_class = AuthorizedClient
    client = app.test_client()
    for i in range(300):
        r = client.put(f"/fhir/{name}/Basic/b{i}", json={"resourceType": "Basic", "id": f"b{i}", "code": {"text": str(i)}},
                       headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 201
    run(cli_env, "keys", "rotate", "--tenant", name)
    proc = subprocess.Popen([*CLI, "keys", "reencrypt", "--tenant", name, "--batch-size", "2"], env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    engine = create_engine(admin_or_owner(fresh_db), poolclass=NullPool)
    V = schema.resource_versions
    with engine.connect() as conn:  # the Basic resources and the audit records of their writes
        tid = conn.execute(select(schema.tenants.c.id).where(schema.tenants.c.name == name)).scalar_one()
        stale = conn.execute(select(func.count()).select_from(V).where(
            V.c.tenant_id == tid, V.c.key_version == 1, V.c.body.is_not(None))).scalar_one()
    assert stale > 300
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                moved = conn.execute(select(func.count()).select_from(V).where(V.c.key_version == 2)).scalar_one()
            if moved >= 20:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with engine.connect() as conn:
            left = conn.execute(select(func.count()).select_from(V).where(
                V.c.tenant_id == tid, V.c.key_version == 1, V.c.body.is_not(None))).scalar_one()
        assert 0 < left < stale, f"the kill should land mid-way ({stale - left} of {stale} moved)"
        out = run(cli_env, "keys", "reencrypt", "--tenant", name).stdout
        assert f"{left} versions re-encrypted" in out
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(V).where(V.c.tenant_id == tid, V.c.key_version == 1)).scalar_one() == 0
    finally:
        engine.dispose()
    for i in range(300):
        assert client.get(f"/fhir/{name}/Basic/b{i}").status_code == 200


def test_serve_refuses_a_stale_schema(cli_env: dict[str, str], tmp_path: Path) -> None:
    fresh = dict(cli_env, FHIR_DATABASE_URL=f"sqlite:///{tmp_path}/empty.db", FHIR_MIGRATION_DATABASE_URL="")
    proc = run(fresh, "serve", "--port", "0", check=False)
    assert proc.returncode != 0 and "fhir-server migrate" in proc.stderr


def test_production_without_master_key_refuses(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_")}
    env.update(FHIR_ENV="production", FHIR_DATA_DIR=str(tmp_path))
    proc = run(env, "migrate", check=False)
    assert proc.returncode != 0 and "no master key" in proc.stderr
    assert not (tmp_path / "master.key").exists()


def test_invalid_setting_is_named(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_")}
    env.update(FHIR_PORT="eighty", FHIR_DATA_DIR=str(tmp_path))
    proc = run(env, "migrate", check=False)
    assert proc.returncode != 0 and "FHIR_PORT" in proc.stderr


def test_hl7_list_and_replay(cli_env: dict[str, str], fresh_db: DatabaseUrls) -> None:
    from fhir_server.app import create_app
    from fhir_server.settings import Settings
    from testsupport.auth import mint_token

    name = "hl7-" + os.urandom(3).hex()
    run(cli_env, "tenants", "create", name)
    app = create_app(Settings.load(cli_env))
    try:
        token = mint_token(app.extensions["fhir_storage"], name)
        bad = b"MSH|^~\\&|ADT|HOSP|FHIR|HOSP|20240101120000||ADT^A01|cli1|P|2.5\rPID|1||^^^HOSP^MR||X^Y"
        resp = app.test_client().post(f"/hl7v2/{name}", data=bad, content_type="text/plain",
                                      headers={"Authorization": f"Bearer {token}"})
        assert b"MSA|AE|cli1" in resp.data
    finally:
        app.extensions["fhir_storage"].audit_log.stop()
        app.extensions["fhir_storage"].db.dispose()
    listed = run(cli_env, "hl7", "list", "--tenant", name, "--status", "error").stdout.strip().splitlines()
    assert len(listed) == 1
    message_id, _, status, kind, code, attempts = listed[0].split("\t")
    assert (status, kind, code, attempts) == ("error", "ADT^A01", "101", "1")
    # The message itself is wrong, so a replay gives the same AE (and says so with exit code 1).
    replayed = run(cli_env, "hl7", "replay", "--tenant", name, check=False)
    assert replayed.returncode == 1 and f"{message_id}\tAE" in replayed.stdout and "1 replayed, 0 accepted" in replayed.stdout
    assert run(cli_env, "hl7", "replay", "--tenant", name, "--id", "nope", check=False).returncode != 0
    assert "\t2" in run(cli_env, "hl7", "list", "--tenant", name).stdout  # two attempts now
