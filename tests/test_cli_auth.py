"""The authorization server's commands, run as a user runs them: clients, users, MFA, launches."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
from joserfc.jwk import RSAKey

from fhir_server.security import passwords
from fhir_server.security.oauth import store as oauth_store
from fhir_server.security.oauth.store import AuthStore
from fhir_server.security.crypto import cipher_named
from fhir_server.security.keys import provider_from_settings
from fhir_server.settings import Settings
from fhir_server.storage.database import Database
from fhir_server.storage.store import Storage
from testsupport.backends import DatabaseUrls
from testsupport.cli import cli_environment, run


@pytest.fixture
def cli_env(fresh_db: DatabaseUrls, tmp_path: Path) -> dict[str, str]:
    return cli_environment(fresh_db, tmp_path)


def _store_of(env: dict[str, str]) -> Storage:
    """The storage the CLI's settings name (its database, its master key file)."""
    settings = Settings.load(environ=env)
    return Storage(Database(settings.effective_database_url, settings), provider_from_settings(settings),
                   cipher_named(settings.cipher), settings)


def test_clients(cli_env: dict[str, str], tmp_path: Path) -> None:
    public = json.loads(run(cli_env, "clients", "create", "--tenant", "default", "--name", "App", "--scope",
                            "launch/patient patient/*.rs", "--public", "--redirect-uri", "https://app.example/cb").stdout)
    assert public["kind"] == "public" and "client_secret" not in public and public["token_endpoint_auth_method"] == "none"
    secret = json.loads(run(cli_env, "clients", "create", "--tenant", "default", "--name", "Svc", "--scope", "system/*.rs",
                            "--secret").stdout)
    assert len(secret["client_secret"]) >= 40 and secret["redirect_uris"] == []
    key = RSAKey.generate_key(2048, private=True)
    (tmp_path / "public.json").write_text(json.dumps({"keys": [key.as_dict(private=False) | {"kid": "k1"}]}))
    (tmp_path / "private.json").write_text(json.dumps({"keys": [key.as_dict(private=True) | {"kid": "k1"}]}))
    jwt_client = json.loads(run(cli_env, "clients", "create", "--tenant", "default", "--name", "Bulk", "--scope", "system/*.rs",
                                "--jwks", str(tmp_path / "public.json")).stdout)
    assert jwt_client["token_endpoint_auth_method"] == "private_key_jwt"
    listed = run(cli_env, "clients", "list", "--tenant", "default").stdout
    assert all(c["client_id"] in listed for c in (public, secret, jwt_client))

    for args, message in [
        (["--secret", "--public"], "exactly one"),
        (["--public"], "redirect-uri"),
        (["--secret", "--redirect-uri", "app://cb"], "absolute http"),
        (["--jwks", str(tmp_path / "private.json")], "private key"),
    ]:
        proc = run(cli_env, "clients", "create", "--tenant", "default", "--name", "x", "--scope", "system/*.rs", *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
    proc = run(cli_env, "clients", "create", "--tenant", "default", "--name", "x", "--scope", "nonsense/*.rs", "--secret", check=False)
    assert proc.returncode != 0 and "not a SMART scope" in proc.stderr

    assert "disabled" in run(cli_env, "clients", "disable", "--tenant", "default", secret["client_id"]).stdout
    assert "disabled" in run(cli_env, "clients", "list", "--tenant", "default").stdout


def test_users_mfa_and_launches(cli_env: dict[str, str]) -> None:
    run(cli_env, "users", "create", "--tenant", "default", "--username", "dr", "--fhir-user", "Practitioner/1", "--role", "clinician",
        "--password-stdin", stdin="first password here\n")
    proc = run(cli_env, "users", "create", "--tenant", "default", "--username", "dr", "--password-stdin", stdin="x" * 20, check=False)
    assert proc.returncode != 0
    run(cli_env, "users", "set-password", "--tenant", "default", "--username", "dr", "--password-stdin", stdin="second password\n")
    enrolled = json.loads(run(cli_env, "users", "mfa", "enroll", "--tenant", "default", "--username", "dr").stdout)
    totp = pyotp.parse_uri(enrolled["otpauth_uri"])
    assert totp.secret == enrolled["secret"] and passwords.totp_step(totp.secret, totp.now()) is not None
    assert "required" in run(cli_env, "tenants", "require-mfa", "default").stdout

    storage = _store_of(cli_env)
    with storage.session("default", write=False) as repo:
        store = AuthStore(repo)
        user = store.user("dr")
        assert user is not None and passwords.verify_password("second password", user.password_hash)
        assert user.has_mfa and user.mfa_required and store.tenant_requires_mfa()
        assert store.mfa_secret("dr") == enrolled["secret"]
    storage.db.dispose()

    proc = run(cli_env, "launch", "create", "--tenant", "default", "--patient", "nobody", check=False)
    assert proc.returncode != 0 and "no Patient/nobody" in proc.stderr
    from fhir_server.engine.engine import Engine
    from fhir_server.capability.registry import load_registry
    from testsupport.engine_calls import call, patient

    storage = _store_of(cli_env)
    settings = Settings.load(environ=cli_env)
    call(Engine(load_registry(), storage, settings), "default", "PUT", "Patient/p1", patient("p1"))
    storage.db.dispose()
    out = json.loads(run(cli_env, "launch", "create", "--tenant", "default", "--patient", "p1", "--app-launch-url",
                         "https://app.example/launch", "--iss", "https://fhir.example.org/fhir/default").stdout)
    query = parse_qs(urlsplit(out["app_launch_url"]).query)
    assert out["patient"] == "p1" and query == {"iss": ["https://fhir.example.org/fhir/default"], "launch": [out["launch"]]}
    proc = run(cli_env, "launch", "create", "--tenant", "default", "--patient", "p1", "--app-launch-url", "https://app/l", check=False)
    assert proc.returncode != 0 and "--iss" in proc.stderr


def test_disabling_a_user_revokes_their_tokens(cli_env: dict[str, str]) -> None:
    run(cli_env, "users", "create", "--tenant", "default", "--username", "leaver", "--password-stdin", stdin="a password long enough")
    storage = _store_of(cli_env)
    with storage.session("default", write=True) as repo:
        AuthStore(repo).save_token("tok-of-leaver", kind="access", grant_id="g", client_id="app", username="leaver",
                                   scope="user/*.rs", context={}, lifetime_s=3600)
    assert "revoked" in run(cli_env, "users", "disable", "--tenant", "default", "--username", "leaver").stdout
    with storage.session("default", write=False) as repo:
        record = AuthStore(repo).token("tok-of-leaver")
        user = AuthStore(repo).user("leaver")
    assert record is not None and not record.active() and user is not None and not user.active
    assert "enabled" in run(cli_env, "users", "disable", "--tenant", "default", "--username", "leaver", "--enable").stdout
    proc = run(cli_env, "users", "disable", "--tenant", "default", "--username", "nobody", check=False)
    assert proc.returncode != 0 and "no user" in proc.stderr
    storage.db.dispose()


def test_client_ids_never_begin_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line takes a client id as an argument (clients disable ID): one beginning with "-" would be read
    as an option. Random URL-safe ids begin with "-" once in 64: such a draw is drawn again."""
    draws = iter(["-4JWWaS-SMeVyeXxX4IY-v9l", "--xX4IY-v9l4JWWaSSMeVye", "a-4JWWaSSMeVyeXxX4IY-v9"])
    monkeypatch.setattr(oauth_store, "new_secret", lambda nbytes=32: next(draws))
    assert oauth_store.new_client_id() == "a-4JWWaSSMeVyeXxX4IY-v9"
    monkeypatch.undo()
    ids = [oauth_store.new_client_id() for _ in range(2000)]
    assert not any(i.startswith("-") for i in ids) and {len(i) for i in ids} == {24} and len(set(ids)) == 2000
