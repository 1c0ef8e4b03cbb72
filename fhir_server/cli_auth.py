"""The ``fhir-server`` commands of the authorization server: clients, users, launches.

Each prints what it made as JSON on stdout (secrets appear there once and are never stored).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from fhir_server.security.oauth import app_launch
from fhir_server.security.oauth.store import AuthStore


@contextmanager
def _store(tenant: str) -> Iterator[AuthStore]:
    from fhir_server.cli import _engine
    from fhir_server.storage.tenants import TenantNotFound

    storage = _engine().storage  # with the audit trail: what a command changes is recorded in the same transaction
    try:
        with storage.session(tenant, write=True) as repo:
            yield AuthStore(repo)
    except TenantNotFound:
        raise click.ClickException(f"no tenant called {tenant!r}") from None
    finally:
        storage.db.dispose()


def _record(store: AuthStore, tenant: str, code: str, description: str, *, user: bool = False,
            patient: str | None = None) -> None:
    """The command's AuditEvent, committed with what it changed."""
    from fhir_server.cli_audit import admin_event
    from fhir_server.security import audit_events as ae

    event = admin_event(tenant, code, description,
                        dicom=ae.USER_SECURITY_ATTRIBUTES_CHANGED if user else ae.SECURITY_CONFIGURATION)
    if patient is not None:
        event.setdefault("entity", []).append(ae.patient_entity(patient))
    store.repo.pending_audit.append(event)


def _print(value: dict[str, Any]) -> None:
    click.echo(json.dumps(value, indent=2))


def register(main: click.Group) -> None:
    main.add_command(clients)
    main.add_command(users)
    main.add_command(launch)


@click.group()
def clients() -> None:
    """OAuth clients (SMART apps and backend services)."""


@clients.command("create")
@click.option("--tenant", required=True)
@click.option("--name", required=True, help="A name shown to users on the consent page.")
@click.option("--scope", "scope", required=True, help="The scopes the client may ask for (space-separated).")
@click.option("--redirect-uri", "redirect_uris", multiple=True, help="A redirect URI (exact match); repeat for several.")
@click.option("--public", "public", is_flag=True, help="A public client (no secret; PKCE only).")
@click.option("--secret", "secret", is_flag=True, help="A confidential client with a generated secret (client_secret_basic/post).")
@click.option("--jwks", "jwks_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A confidential client authenticating with private_key_jwt, its public keys in this JWK Set file.")
@click.option("--jwks-uri", "jwks_uri", help="A confidential client authenticating with private_key_jwt, its JWK Set at this URL.")
def clients_create(tenant: str, name: str, scope: str, redirect_uris: tuple[str, ...], public: bool, secret: bool,
                   jwks_file: Path | None, jwks_uri: str | None) -> None:
    """Register a client; prints it as JSON (with client_secret, when one was generated)."""
    from fhir_server.security.scopes import ScopeError, parse_scopes

    chosen = [flag for flag, on in (("--public", public), ("--secret", secret), ("--jwks", jwks_file), ("--jwks-uri", jwks_uri)) if on]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --public, --secret, --jwks FILE, --jwks-uri URL")
    try:
        scopes = parse_scopes(scope)
    except ScopeError as exc:
        raise click.UsageError(str(exc)) from None
    jwks = None
    if jwks_file is not None:
        try:
            jwks = json.loads(jwks_file.read_text())
        except ValueError:
            raise click.UsageError(f"{jwks_file} is not JSON") from None
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
            raise click.UsageError(f"{jwks_file} is not a JWK Set (an object with a non-empty keys array)")
        if any("d" in k for k in jwks["keys"] if isinstance(k, dict)):
            raise click.UsageError(f"{jwks_file} holds a private key; register the public keys only")
    if public and not redirect_uris:
        raise click.UsageError("a public client needs at least one --redirect-uri")
    if any(not u.startswith(("https://", "http://")) or "#" in u for u in redirect_uris):
        raise click.UsageError("redirect URIs are absolute http(s) URLs without a fragment")
    kind = "public" if public else "confidential-symmetric" if secret else "confidential-asymmetric"
    with _store(tenant) as store:
        client_id, client_secret = store.create_client(name=name, kind=kind, scope=str(scopes), redirect_uris=list(redirect_uris),
                                                       jwks=jwks, jwks_uri=jwks_uri)
        _record(store, tenant, "client-registered", f"client {client_id} ({kind}) registered for {scopes}")
    out: dict[str, Any] = {"client_id": client_id, "name": name, "kind": kind, "scope": str(scopes),
                           "redirect_uris": list(redirect_uris)}
    if client_secret:
        out["client_secret"] = client_secret
    out["token_endpoint_auth_method"] = {"public": "none", "confidential-symmetric": "client_secret_basic"}.get(kind, "private_key_jwt")
    _print(out)


@clients.command("list")
@click.option("--tenant", required=True)
def clients_list(tenant: str) -> None:
    with _store(tenant) as store:
        records = store.clients()
    for c in records:
        click.echo(f"{c.client_id}\t{c.kind}\t{'active' if c.active else 'disabled'}\t{c.name}")


@clients.command("disable")
@click.option("--tenant", required=True)
@click.argument("client_id")
def clients_disable(tenant: str, client_id: str) -> None:
    """Disable a client and revoke every token it holds."""
    with _store(tenant) as store:
        if not store.deactivate_client(client_id):
            raise click.ClickException(f"no client {client_id!r}")
        _record(store, tenant, "client-disabled", f"client {client_id} disabled and its tokens revoked")
    click.echo(f"client {client_id} disabled; its tokens are revoked")


@click.group()
def users() -> None:
    """Users who log in to authorize apps."""


@users.command("create")
@click.option("--tenant", required=True)
@click.option("--username", required=True)
@click.option("--fhir-user", "fhir_user", help="The user's FHIR resource, e.g. Practitioner/123 (the fhirUser claim).")
@click.option("--role", "roles", multiple=True, help="A role (clinician, emergency-access, ...); repeat for several.")
@click.option("--require-mfa", is_flag=True, help="The user must pass TOTP multi-factor authentication.")
@click.option("--password-stdin", is_flag=True, required=True, help="Read the password from standard input.")
def users_create(tenant: str, username: str, fhir_user: str | None, roles: tuple[str, ...], require_mfa: bool,
                 password_stdin: bool) -> None:
    from fhir_server.security import passwords

    password = _password_from_stdin()
    if fhir_user is not None and (fhir_user.count("/") != 1 or not fhir_user.split("/")[0] in
                                  ("Practitioner", "PractitionerRole", "Patient", "RelatedPerson", "Person")):
        raise click.UsageError("--fhir-user is Practitioner/ID, PractitionerRole/ID, Patient/ID, RelatedPerson/ID or Person/ID")
    if not username or len(username) > 128 or any(c.isspace() for c in username):
        raise click.UsageError("a username is 1 to 128 characters without spaces")
    with _store(tenant) as store:
        if store.user(username) is not None:
            raise click.ClickException(f"user {username!r} exists")
        store.create_user(username=username, password_hash=passwords.hash_password(password), fhir_user=fhir_user,
                          roles=list(roles), mfa_required=require_mfa)
        _record(store, tenant, "user-created", f"user {username} created with roles "
                f"{', '.join(roles) or '(none)'}{', second factor required' if require_mfa else ''}", user=True)
    _print({"username": username, "fhirUser": fhir_user, "roles": list(roles), "mfa_required": require_mfa})


def _password_from_stdin() -> str:
    password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 12:
        raise click.UsageError("the password must have at least 12 characters")
    if len(password.encode()) > 1024:
        raise click.UsageError("the password is too long")
    return password


@users.command("set-password")
@click.option("--tenant", required=True)
@click.option("--username", required=True)
@click.option("--password-stdin", is_flag=True, required=True)
def users_set_password(tenant: str, username: str, password_stdin: bool) -> None:
    """Set a new password (and unlock the account)."""
    from fhir_server.security import passwords

    password = _password_from_stdin()
    with _store(tenant) as store:
        if not store.set_password(username, passwords.hash_password(password)):
            raise click.ClickException(f"no user {username!r}")
        _record(store, tenant, "user-password-set", f"password of user {username} set", user=True)
    click.echo(f"password of {username} set")


@users.command("disable")
@click.option("--tenant", required=True)
@click.option("--username", required=True)
@click.option("--enable", is_flag=True, help="Enable the user again instead.")
def users_disable(tenant: str, username: str, enable: bool) -> None:
    """Disable a user (no more logins; every token issued to them is revoked at once), or --enable again."""
    with _store(tenant) as store:
        if not store.set_user_active(username, enable):
            raise click.ClickException(f"no user {username!r}")
        _record(store, tenant, "user-enabled" if enable else "user-disabled",
                f"user {username} {'enabled' if enable else 'disabled; their tokens revoked'}", user=True)
    click.echo(f"user {username} {'enabled' if enable else 'disabled; their tokens are revoked'}")


@users.group("mfa")
def users_mfa() -> None:
    """TOTP multi-factor authentication."""


@users_mfa.command("enroll")
@click.option("--tenant", required=True)
@click.option("--username", required=True)
def users_mfa_enroll(tenant: str, username: str) -> None:
    """Give the user a new TOTP secret (required from now on); prints the otpauth URI for an authenticator app."""
    from fhir_server.security import passwords

    secret = passwords.new_totp_secret()
    with _store(tenant) as store:
        if store.user(username) is None:
            raise click.ClickException(f"no user {username!r}")
        store.set_mfa_secret(username, secret, required=True)
        _record(store, tenant, "user-mfa-enrolled", f"user {username} given a new TOTP secret",
                user=True)
    _print({"username": username, "otpauth_uri": passwords.totp_uri(secret, username, f"fhir-server {tenant}"), "secret": secret})


@click.command("require-mfa")  # registered under `tenants` by cli.py
@click.argument("tenant")
@click.option("--off", is_flag=True, help="Stop requiring it.")
def tenants_require_mfa(tenant: str, off: bool) -> None:
    """Require TOTP multi-factor authentication of every user of the tenant."""
    with _store(tenant) as store:
        store.set_tenant_mfa(not off)
        _record(store, tenant, "tenant-mfa",
                f"every user must pass a second factor: {'no' if off else 'yes'}")
    click.echo(f"tenant {tenant}: multi-factor authentication {'not ' if off else ''}required")


@click.group()
def launch() -> None:
    """EHR launches."""


@launch.command("create")
@click.option("--tenant", required=True)
@click.option("--patient", required=True, help="The patient's id (the launch's patient context).")
@click.option("--encounter", help="The encounter's id (encounter context).")
@click.option("--app-launch-url", help="The app's launch URL: the output then has the URL to open, with iss and launch.")
@click.option("--iss", help="The FHIR base URL apps see (default: FHIR_BASE_URL/fhir/TENANT).")
def launch_create(tenant: str, patient: str, encounter: str | None, app_launch_url: str | None, iss: str | None) -> None:
    """Make a launch id binding patient (and encounter) context; prints it as JSON."""
    context: dict[str, Any] = {"patient": patient, **({"encounter": encounter} if encounter else {})}
    with _store(tenant) as store:
        for rtype, rid in (("Patient", patient), ("Encounter", encounter)):
            if rid is not None:
                found = store.repo.read(rtype, rid)
                if found is None or found.deleted:
                    raise click.ClickException(f"no {rtype}/{rid} in tenant {tenant}")
        launch_id = store.create_launch(context, created_by="fhir-server launch create")
        _record(store, tenant, "launch-created", "an EHR launch context was made for a patient",
                patient=patient)
    out: dict[str, Any] = {"launch": launch_id, **context}
    if app_launch_url:
        base = _settings_base_url()
        issuer = iss or (f"{base.rstrip('/')}/fhir/{tenant}" if base else None)
        if issuer is None:
            raise click.UsageError("--app-launch-url needs --iss (or FHIR_BASE_URL) to name the FHIR server to the app")
        out["app_launch_url"] = app_launch(app_launch_url, issuer, launch_id)
    _print(out)


def _settings_base_url() -> str | None:
    from fhir_server.settings import Settings

    return Settings.load().base_url

