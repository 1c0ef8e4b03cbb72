"""The authorization server's records, in the tenant's unit of work (``Storage.session``).

Secrets are never stored as they are: client secrets, codes, tokens, launch ids and session ids are
long random strings kept as SHA-256 digests; passwords as scrypt hashes; TOTP seeds and the signing
key sealed with the tenant's data key (AES-256-GCM, bound to the tenant and record).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from fhir_server.clock import now_us
from fhir_server.storage import schema
from fhir_server.storage.repository import ResourceRepository

C, U, CODES, T = schema.oauth_clients, schema.oauth_users, schema.oauth_codes, schema.oauth_tokens
L, J, S, K = schema.oauth_launches, schema.oauth_jtis, schema.oauth_sessions, schema.oauth_keys

SECOND = 1_000_000
LOCKOUT_FAILURES = 5  # failed logins in a row that lock an account
LOCKOUT_SECONDS = 15 * 60
CLIENT_KINDS = ("public", "confidential-symmetric", "confidential-asymmetric")


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def new_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def new_client_id() -> str:
    """A client's id: 18 random bytes, URL-safe, never beginning with "-" (administrators pass it to the command
    line, which would read such an id as an option)."""
    while (client_id := new_secret(18)).startswith("-"):
        pass
    return client_id


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    name: str
    kind: str
    secret_hash: bytes | None
    redirect_uris: tuple[str, ...]
    scope: str
    jwks: dict[str, Any] | None
    jwks_uri: str | None
    active: bool


@dataclass(frozen=True)
class UserRecord:
    username: str
    password_hash: str
    fhir_user: str | None
    roles: tuple[str, ...]
    has_mfa: bool
    mfa_required: bool
    mfa_last_step: int
    failed_logins: int
    locked_until: int
    active: bool


@dataclass(frozen=True)
class CodeRecord:
    grant_id: str
    client_id: str
    username: str
    redirect_uri: str
    scope: str
    context: dict[str, Any]
    code_challenge: str
    expires_at: int
    used_at: int | None


@dataclass(frozen=True)
class TokenRecord:
    kind: str
    grant_id: str
    client_id: str
    username: str | None
    scope: str
    context: dict[str, Any]
    issued_at: int
    expires_at: int
    revoked_at: int | None

    def active(self, now: int | None = None) -> bool:
        return self.revoked_at is None and self.expires_at > (now if now is not None else now_us())


@dataclass
class SessionRecord:
    username: str | None
    stage: str  # anonymous | password (the password was right; a second factor is due) | done
    csrf: str
    pending: dict[str, Any] | None
    created_at: int
    last_seen: int
    extra: dict[str, Any] = field(default_factory=dict)


class AuthStore:
    def __init__(self, repo: ResourceRepository) -> None:
        self.repo = repo
        self.conn = repo.conn
        self.tid = repo.tenant.id

    # --- clients ---------------------------------------------------------------------------------

    def create_client(self, *, name: str, kind: str, scope: str, redirect_uris: list[str], jwks: dict[str, Any] | None,
                      jwks_uri: str | None) -> tuple[str, str | None]:
        """A new client: (client_id, client_secret or None). The secret is shown once, never stored."""
        if kind not in CLIENT_KINDS:
            raise ValueError(f"client kind must be one of {', '.join(CLIENT_KINDS)}")
        client_id = new_client_id()
        secret = new_secret(32) if kind == "confidential-symmetric" else None
        self.conn.execute(insert(C).values(
            tenant_id=self.tid, client_id=client_id, name=name, kind=kind, secret_hash=digest(secret) if secret else None,
            redirect_uris=json.dumps(redirect_uris), scope=scope, jwks=json.dumps(jwks) if jwks else None, jwks_uri=jwks_uri,
            active=True, created_at=now_us(),
        ))
        return client_id, secret

    def client(self, client_id: str) -> ClientRecord | None:
        if not client_id or len(client_id) > 64 or not client_id.isprintable():
            return None
        row = self.conn.execute(select(C).where(C.c.tenant_id == self.tid, C.c.client_id == client_id)).first()
        if row is None:
            return None
        return ClientRecord(row.client_id, row.name, row.kind, row.secret_hash, tuple(json.loads(row.redirect_uris)),
                            row.scope, json.loads(row.jwks) if row.jwks else None, row.jwks_uri, row.active)

    def clients(self) -> list[ClientRecord]:
        rows = self.conn.execute(select(C.c.client_id).where(C.c.tenant_id == self.tid).order_by(C.c.created_at))
        return [c for r in rows if (c := self.client(r.client_id)) is not None]

    def deactivate_client(self, client_id: str) -> bool:
        done = self.conn.execute(update(C).where(C.c.tenant_id == self.tid, C.c.client_id == client_id).values(active=False))
        self.conn.execute(update(T).where(T.c.tenant_id == self.tid, T.c.client_id == client_id, T.c.revoked_at.is_(None))
                          .values(revoked_at=now_us()))
        return bool(done.rowcount)

    # --- users -----------------------------------------------------------------------------------

    def create_user(self, *, username: str, password_hash: str, fhir_user: str | None, roles: list[str],
                    mfa_required: bool) -> None:
        self.conn.execute(insert(U).values(
            tenant_id=self.tid, username=username, password_hash=password_hash, fhir_user=fhir_user, roles=json.dumps(roles),
            mfa_secret=None, mfa_required=mfa_required, mfa_last_step=0, failed_logins=0, locked_until=0, active=True,
            created_at=now_us(),
        ))

    def user(self, username: str) -> UserRecord | None:
        if not username or len(username) > 128 or not username.isprintable():
            return None
        row = self.conn.execute(select(U).where(U.c.tenant_id == self.tid, U.c.username == username)).first()
        if row is None:
            return None
        return UserRecord(row.username, row.password_hash, row.fhir_user, tuple(json.loads(row.roles)), row.mfa_secret is not None,
                          row.mfa_required, row.mfa_last_step, row.failed_logins, row.locked_until, row.active)

    def set_user_active(self, username: str, active: bool) -> bool:
        """Enable or disable a user; disabling revokes every token issued to them, at once."""
        done = self.conn.execute(update(U).where(U.c.tenant_id == self.tid, U.c.username == username).values(active=active))
        if not active:
            self.conn.execute(update(T).where(T.c.tenant_id == self.tid, T.c.username == username, T.c.revoked_at.is_(None))
                              .values(revoked_at=now_us()))
        return bool(done.rowcount)

    def login_failed(self, username: str) -> bool:
        """Count a failed login; the account locks after LOCKOUT_FAILURES in a row. True when this one locked it."""
        user = self.user(username)
        if user is None:
            return False
        failures = user.failed_logins + 1
        locked_until = now_us() + LOCKOUT_SECONDS * SECOND if failures >= LOCKOUT_FAILURES else user.locked_until
        self.conn.execute(update(U).where(U.c.tenant_id == self.tid, U.c.username == username)
                          .values(failed_logins=0 if failures >= LOCKOUT_FAILURES else failures, locked_until=locked_until))
        return failures >= LOCKOUT_FAILURES

    def login_succeeded(self, username: str) -> None:
        self.conn.execute(update(U).where(U.c.tenant_id == self.tid, U.c.username == username).values(failed_logins=0))

    def set_password(self, username: str, password_hash: str) -> bool:
        done = self.conn.execute(update(U).where(U.c.tenant_id == self.tid, U.c.username == username)
                                 .values(password_hash=password_hash, failed_logins=0, locked_until=0))
        return bool(done.rowcount)

    def set_mfa_secret(self, username: str, secret: str, *, required: bool = True) -> None:
        sealed = self._seal("oauth-mfa", username, secret.encode())
        self.conn.execute(update(U).where(U.c.tenant_id == self.tid, U.c.username == username)
                          .values(mfa_secret=sealed, mfa_required=required, mfa_last_step=0))

    def mfa_secret(self, username: str) -> str | None:
        row = self.conn.execute(select(U.c.mfa_secret).where(U.c.tenant_id == self.tid, U.c.username == username)).first()
        if row is None or row.mfa_secret is None:
            return None
        return self._open("oauth-mfa", username, row.mfa_secret).decode()

    def use_mfa_step(self, username: str, step: int) -> bool:
        """Record a TOTP step as used; False when it (or a later one) was used already (a replayed code)."""
        done = self.conn.execute(update(U).where(U.c.tenant_id == self.tid, U.c.username == username, U.c.mfa_last_step < step)
                                 .values(mfa_last_step=step))
        return bool(done.rowcount)

    def tenant_requires_mfa(self) -> bool:
        t = schema.tenants
        return bool(self.conn.execute(select(t.c.require_mfa).where(t.c.id == self.tid)).scalar_one())

    def set_tenant_mfa(self, required: bool) -> None:
        t = schema.tenants
        self.conn.execute(update(t).where(t.c.id == self.tid).values(require_mfa=required))

    # --- authorization codes ------------------------------------------------------------------------

    def save_code(self, code: str, *, grant_id: str, client_id: str, username: str, redirect_uri: str, scope: str,
                  context: dict[str, Any], code_challenge: str, lifetime_s: int) -> None:
        self.conn.execute(insert(CODES).values(
            tenant_id=self.tid, code_hash=digest(code), grant_id=grant_id, client_id=client_id, username=username,
            redirect_uri=redirect_uri, scope=scope, context=self._seal_context("code", digest(code), context),
            code_challenge=code_challenge,
            expires_at=now_us() + lifetime_s * SECOND, used_at=None,
        ))

    def code(self, code: str) -> CodeRecord | None:
        """The code's record, its row locked until the transaction ends (two exchanges of one code serialise)."""
        if not code or len(code) > 512:
            return None
        row = self.conn.execute(select(CODES).where(CODES.c.tenant_id == self.tid, CODES.c.code_hash == digest(code))
                                .with_for_update()).first()
        if row is None:
            return None
        return CodeRecord(row.grant_id, row.client_id, row.username, row.redirect_uri, row.scope,
                          self._open_context("code", row.code_hash, row.context),
                          row.code_challenge, row.expires_at, row.used_at)

    def use_code(self, code: str) -> None:
        """Mark the code used: it was exchanged for tokens, and can never be again."""
        self.conn.execute(update(CODES).where(CODES.c.tenant_id == self.tid, CODES.c.code_hash == digest(code))
                          .values(used_at=now_us()))

    # --- tokens -------------------------------------------------------------------------------------

    def save_token(self, token: str, *, kind: str, grant_id: str, client_id: str, username: str | None, scope: str,
                   context: dict[str, Any], lifetime_s: int) -> int:
        now = now_us()
        self.conn.execute(insert(T).values(
            tenant_id=self.tid, token_hash=digest(token), kind=kind, grant_id=grant_id, client_id=client_id,
            username=username, scope=scope, context=self._seal_context("token", digest(token), context), issued_at=now,
            expires_at=now + lifetime_s * SECOND, revoked_at=None,
        ))
        return now

    def token(self, token: str, *, lock: bool = False) -> TokenRecord | None:
        """The token's record; ``lock`` holds its row until the transaction ends (a refresh token being rotated)."""
        if not token or len(token) > 512:
            return None
        query = select(T).where(T.c.tenant_id == self.tid, T.c.token_hash == digest(token))
        row = self.conn.execute(query.with_for_update() if lock else query).first()
        if row is None:
            return None
        return TokenRecord(row.kind, row.grant_id, row.client_id, row.username, row.scope,
                           self._open_context("token", row.token_hash, row.context),
                           row.issued_at, row.expires_at, row.revoked_at)

    def revoke_token(self, token: str) -> None:
        self.conn.execute(update(T).where(T.c.tenant_id == self.tid, T.c.token_hash == digest(token), T.c.revoked_at.is_(None))
                          .values(revoked_at=now_us()))

    def revoke_grant(self, grant_id: str) -> int:
        """Revoke every token issued under one grant (a code, and the refreshes that followed it)."""
        done = self.conn.execute(update(T).where(T.c.tenant_id == self.tid, T.c.grant_id == grant_id, T.c.revoked_at.is_(None))
                                 .values(revoked_at=now_us()))
        return int(done.rowcount)

    # --- EHR launches -------------------------------------------------------------------------------

    def create_launch(self, context: dict[str, Any], created_by: str, lifetime_s: int = 3600) -> str:
        launch = new_secret(24)
        self.conn.execute(insert(L).values(tenant_id=self.tid, launch_hash=digest(launch),
                                           context=self._seal_context("launch", digest(launch), context),
                                           created_by=created_by, expires_at=now_us() + lifetime_s * SECOND))
        return launch

    def take_launch(self, launch: str) -> dict[str, Any] | None:
        """The launch's context; the launch is used up (a launch id in a URL that leaks cannot be replayed)."""
        if not launch or len(launch) > 512:
            return None
        row = self.conn.execute(delete(L).where(L.c.tenant_id == self.tid, L.c.launch_hash == digest(launch))
                                .returning(L.c.context, L.c.expires_at)).first()
        if row is None or row.expires_at <= now_us():
            return None
        return self._open_context("launch", digest(launch), row.context)

    # --- client assertion ids -------------------------------------------------------------------------

    def remember_jti(self, client_id: str, jti: str, expires_at: int) -> bool:
        """False when this client used this assertion id before (a replay)."""
        if len(jti) > 255 or not jti.isprintable():
            return False
        self.conn.execute(delete(J).where(J.c.tenant_id == self.tid, J.c.expires_at < now_us()))
        dialect_insert = postgresql.insert if self.conn.dialect.name == "postgresql" else sqlite.insert
        stmt = dialect_insert(J).values(tenant_id=self.tid, client_id=client_id, jti=jti, expires_at=expires_at)
        return self.conn.execute(stmt.on_conflict_do_nothing().returning(J.c.jti)).first() is not None

    # --- login sessions ------------------------------------------------------------------------------

    def create_session(self) -> tuple[str, SessionRecord]:
        sid = new_secret(32)
        now = now_us()
        record = SessionRecord(None, "anonymous", new_secret(24), None, now, now)
        self.conn.execute(insert(S).values(tenant_id=self.tid, session_hash=digest(sid), username=None, stage=record.stage,
                                           csrf=record.csrf, pending=None, created_at=now, last_seen=now))
        return sid, record

    def session(self, sid: str, *, idle_s: int) -> SessionRecord | None:
        """The session, if it exists and was used in the last ``idle_s`` seconds (it is then touched)."""
        if not sid or len(sid) > 512:
            return None
        now = now_us()
        row = self.conn.execute(select(S).where(S.c.tenant_id == self.tid, S.c.session_hash == digest(sid))).first()
        if row is None:
            return None
        if row.last_seen + idle_s * SECOND < now:
            self.conn.execute(delete(S).where(S.c.tenant_id == self.tid, S.c.session_hash == digest(sid)))
            return None
        self.conn.execute(update(S).where(S.c.tenant_id == self.tid, S.c.session_hash == digest(sid)).values(last_seen=now))
        return SessionRecord(row.username, row.stage, row.csrf, json.loads(row.pending) if row.pending else None,
                             row.created_at, now)

    def save_session(self, sid: str, record: SessionRecord) -> None:
        self.conn.execute(update(S).where(S.c.tenant_id == self.tid, S.c.session_hash == digest(sid)).values(
            username=record.username, stage=record.stage, csrf=record.csrf,
            pending=json.dumps(record.pending) if record.pending is not None else None, last_seen=now_us(),
        ))

    def end_session(self, sid: str) -> None:
        self.conn.execute(delete(S).where(S.c.tenant_id == self.tid, S.c.session_hash == digest(sid)))

    def purge_expired(self, *, session_idle_s: int) -> None:
        """Drop what can no longer be used: codes an hour and tokens a day after they expired (kept that long for
        reuse detection), assertion ids and launches once expired, login sessions idle longer than allowed."""
        now = now_us()
        self.conn.execute(delete(S).where(S.c.tenant_id == self.tid, S.c.last_seen < now - session_idle_s * SECOND))
        self.conn.execute(delete(CODES).where(CODES.c.tenant_id == self.tid, CODES.c.expires_at < now - 3600 * SECOND))
        self.conn.execute(delete(J).where(J.c.tenant_id == self.tid, J.c.expires_at < now))
        self.conn.execute(delete(T).where(T.c.tenant_id == self.tid, T.c.expires_at < now - 86400 * SECOND))
        self.conn.execute(delete(L).where(L.c.tenant_id == self.tid, L.c.expires_at < now))

    # --- signing keys --------------------------------------------------------------------------------

    def signing_keys(self) -> list[tuple[str, bytes, dict[str, Any]]]:
        """(kid, private key PEM, public JWK) of the tenant's signing keys, newest first."""
        rows = self.conn.execute(select(K).where(K.c.tenant_id == self.tid).order_by(K.c.created_at.desc()))
        return [(r.kid, self._open("oauth-key", r.kid, r.private_key), json.loads(r.public_jwk)) for r in rows]

    def add_signing_key(self, kid: str, private_pem: bytes, public_jwk: dict[str, Any]) -> None:
        self.conn.execute(insert(K).values(tenant_id=self.tid, kid=kid, private_key=self._seal("oauth-key", kid, private_pem),
                                           public_jwk=json.dumps(public_jwk), created_at=now_us()))

    # --- sealing -------------------------------------------------------------------------------------

    def _seal_context(self, kind: str, key_digest: bytes, context: dict[str, Any]) -> str:
        """A launch context (patient, encounter, a break-glass reason...) sealed like resources: base64 text."""
        return base64.b64encode(self._seal(f"oauth-{kind}-context", key_digest.hex(), json.dumps(context).encode())).decode()

    def _open_context(self, kind: str, key_digest: bytes, stored: str) -> dict[str, Any]:
        context: dict[str, Any] = json.loads(self._open(f"oauth-{kind}-context", bytes(key_digest).hex(), base64.b64decode(stored)))
        return context

    def _seal(self, kind: str, record_id: str, data: bytes) -> bytes:
        key_version, sealed = self.repo.sealer.seal_record(kind, record_id, data)
        return struct.pack(">I", key_version) + sealed

    def _open(self, kind: str, record_id: str, blob: bytes) -> bytes:
        (key_version,) = struct.unpack(">I", blob[:4])
        return self.repo.sealer.open_record(kind, record_id, key_version, blob[4:])
