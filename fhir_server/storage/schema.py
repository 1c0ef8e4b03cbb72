"""The database schema, as SQLAlchemy Core tables.

Every tenant table carries ``tenant_id`` first in its primary key and its indexes.
Times are integers (microseconds since the Unix epoch, UTC) so that SQLite and
PostgreSQL sort and compare them alike. Resource bodies are ciphertext.

The DDL itself lives in the Alembic migrations (``migrations/versions``); a test
checks that a migrated database matches these tables.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Text,
    Table,
    false,
)

metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(63), nullable=False, unique=True),
    Column("status", String(16), nullable=False),  # active | deleting
    Column("created_at", BigInteger, nullable=False),
    Column("data_key_version", Integer, nullable=False),  # the data-key version used for new writes
    # Bumped whenever a SearchParameter of the tenant is written: the tenant's custom parameters changed.
    Column("search_epoch", Integer, nullable=False, server_default="0"),
    # Every user of the tenant must pass TOTP multi-factor authentication to log in.
    Column("require_mfa", Boolean, nullable=False, server_default=false()),
)

# Keys of a tenant, each wrapped (encrypted) by a master key. purpose: "data" keys seal
# resource bodies and are rotated; the "index" key derives blind-index keys and is not.
tenant_keys = Table(
    "tenant_keys",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("purpose", String(8), nullable=False),
    Column("version", Integer, nullable=False),
    Column("master_key_id", String(64), nullable=False),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", "purpose", "version", name="pk_tenant_keys"),
)

# The current state of every resource: found by primary key without touching history.
resources = Table(
    "resources",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False),
    # Which index tables hold this resource's rows (search/extract.py MASK_*), so a rewrite
    # deletes only where there is something to delete.
    Column("index_mask", SmallInteger, nullable=False, server_default="0"),
    # A keyed digest of the current version's content (all but meta.versionId and meta.lastUpdated), so an
    # update with the same content is recognised without reading the body; NULL when not known.
    Column("content_digest", LargeBinary(16), nullable=True),
    PrimaryKeyConstraint("tenant_id", "res_type", "res_id", name="pk_resources"),
    Index("ix_resources_type_updated", "tenant_id", "res_type", "last_updated"),
)

# Every version ever written, sealed. A deletion is a version with no body.
resource_versions = Table(
    "resource_versions",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("method", String(8), nullable=False),  # POST | PUT | PATCH | DELETE
    Column("deleted", Boolean, nullable=False),
    Column("key_version", Integer, nullable=False),
    Column("body", LargeBinary, nullable=True),
    PrimaryKeyConstraint("tenant_id", "res_type", "res_id", "version", name="pk_resource_versions"),
    Index("ix_versions_updated", "tenant_id", "last_updated"),
    Index("ix_versions_type_updated", "tenant_id", "res_type", "last_updated"),
)

# --- search index ------------------------------------------------------------------------
# Rows of the current version of each resource; replaced on every write. param_key is the
# fixed 64-bit key of (resource type, parameter) from search/parameters.py.

# Identifying values (strings, tokens, uris) as blind indexes: never plaintext.
idx_hash = Table(
    "idx_hash",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param_key", BigInteger, nullable=False),
    Column("hash", LargeBinary(16), nullable=False),
    PrimaryKeyConstraint("tenant_id", "res_type", "res_id", "param_key", "hash", name="pk_idx_hash"),
    Index("ix_idx_hash_lookup", "tenant_id", "param_key", "hash", "res_id"),
)

# Dates as the inclusive microsecond range they cover.
idx_date = Table(
    "idx_date",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param_key", BigInteger, nullable=False),
    Column("low", BigInteger, nullable=False),
    Column("high", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", "res_type", "res_id", "param_key", "low", "high", name="pk_idx_date"),
    Index("ix_idx_date_low", "tenant_id", "param_key", "low"),
    Index("ix_idx_date_high", "tenant_id", "param_key", "high"),
)

# Numbers as the half-open range their written precision implies.
idx_number = Table(
    "idx_number",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param_key", BigInteger, nullable=False),
    Column("low", Float, nullable=False),
    Column("high", Float, nullable=False),
    PrimaryKeyConstraint("tenant_id", "res_type", "res_id", "param_key", "low", "high", name="pk_idx_number"),
    Index("ix_idx_number_low", "tenant_id", "param_key", "low"),
)

# Quantities: the range, and blind indexes of the unit (system|code, code, unit text); a second
# row in UCUM canonical units where the unit converts.
idx_quantity = Table(
    "idx_quantity",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param_key", BigInteger, nullable=False),
    Column("low", Float, nullable=False),
    Column("high", Float, nullable=False),
    Column("system_code_hash", LargeBinary(16), nullable=True),
    Column("code_hash", LargeBinary(16), nullable=True),
    Column("unit_hash", LargeBinary(16), nullable=True),
    Column("canonical", Boolean, nullable=False),
    Index("ix_idx_quantity_res", "tenant_id", "res_type", "res_id"),
    Index("ix_idx_quantity_low", "tenant_id", "param_key", "low"),
)

# References stay plaintext (ids, not identifying values) so chains and includes are joins.
idx_reference = Table(
    "idx_reference",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param_key", BigInteger, nullable=False),
    Column("target_type", String(64), nullable=True),
    Column("target_id", String(64), nullable=True),
    Column("target_version", String(64), nullable=True),
    Column("url", String(4096), nullable=True),
    Column("url_hash", LargeBinary(16), nullable=True),
    Index("ix_idx_reference_res", "tenant_id", "res_type", "res_id"),
    Index("ix_idx_reference_target", "tenant_id", "param_key", "target_id", "target_type"),
    Index("ix_idx_reference_any_target", "tenant_id", "target_type", "target_id"),
    Index("ix_idx_reference_url", "tenant_id", "param_key", "url_hash"),
)

# Composite parameters whose later components are ranges (code$value-quantity, code$date, chromosome$start$end):
# the first component as a blind index, the others as ranges (and the unit's blind indexes).
idx_composite = Table(
    "idx_composite",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param_key", BigInteger, nullable=False),
    Column("hash", LargeBinary(16), nullable=False),
    Column("low", Float, nullable=False),
    Column("high", Float, nullable=False),
    Column("low2", Float, nullable=True),
    Column("high2", Float, nullable=True),
    Column("system_code_hash", LargeBinary(16), nullable=True),
    Column("code_hash", LargeBinary(16), nullable=True),
    Column("unit_hash", LargeBinary(16), nullable=True),
    Column("canonical", Boolean, nullable=False),
    Index("ix_idx_composite_res", "tenant_id", "res_type", "res_id"),
    Index("ix_idx_composite_lookup", "tenant_id", "param_key", "hash"),
)

# Custom search parameters: indexing until their reindex job finishes, then ready.
search_param_state = Table(
    "search_param_state",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("code", String(64), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # indexing | ready
    Column("job_id", Integer, nullable=True),
    Column("updated_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", "res_type", "code", name="pk_search_param_state"),
)

# Reindex jobs (no PHI: types, an id cursor and counts), claimed by a worker with a lease so that a
# killed run is resumed by another worker or by `fhir-server reindex`.
reindex_jobs = Table(
    "reindex_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant_id", Integer, nullable=False),
    Column("types", Text, nullable=False),  # JSON list of resource types
    Column("status", String(16), nullable=False),  # pending | running | done | failed
    Column("cursor_type", String(64), nullable=True),
    Column("cursor_id", String(64), nullable=True),
    Column("processed", BigInteger, nullable=False),
    Column("total", BigInteger, nullable=False),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("error", Text, nullable=True),
    Index("ix_reindex_jobs_status", "status", "lease_until"),
)

# --- SMART on FHIR authorization (security/oauth) -----------------------------------------------------
# Secrets are never stored: client secrets, codes, tokens, launch ids and session ids as SHA-256 digests
# (they are long random strings), passwords as scrypt hashes, TOTP seeds and signing keys sealed with
# the tenant's data key.

oauth_clients = Table(
    "oauth_clients",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("client_id", String(64), nullable=False),
    Column("name", String(200), nullable=False),
    Column("kind", String(32), nullable=False),  # public | confidential-symmetric | confidential-asymmetric
    Column("secret_hash", LargeBinary(32), nullable=True),
    Column("redirect_uris", Text, nullable=False),  # JSON list
    Column("scope", Text, nullable=False),  # what the client may ask for
    Column("jwks", Text, nullable=True),  # JSON Web Key Set, for private_key_jwt
    Column("jwks_uri", Text, nullable=True),
    Column("active", Boolean, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", "client_id", name="pk_oauth_clients"),
)

oauth_users = Table(
    "oauth_users",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("username", String(128), nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("fhir_user", String(200), nullable=True),  # e.g. Practitioner/123
    Column("roles", Text, nullable=False),  # JSON list: clinician, emergency-access, ...
    Column("mfa_secret", LargeBinary, nullable=True),  # sealed TOTP seed
    Column("mfa_required", Boolean, nullable=False),
    Column("mfa_last_step", BigInteger, nullable=False),  # the last TOTP step accepted: a code is used once
    Column("failed_logins", Integer, nullable=False),
    Column("locked_until", BigInteger, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", "username", name="pk_oauth_users"),
)

oauth_codes = Table(
    "oauth_codes",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("code_hash", LargeBinary(32), nullable=False),
    Column("grant_id", String(64), nullable=False),  # the tokens issued from it share it (revoked together)
    Column("client_id", String(64), nullable=False),
    Column("username", String(128), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("scope", Text, nullable=False),
    Column("context", Text, nullable=False),  # sealed JSON (base64): patient, encounter, break_glass, nonce, ...
    Column("code_challenge", String(128), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("used_at", BigInteger, nullable=True),
    PrimaryKeyConstraint("tenant_id", "code_hash", name="pk_oauth_codes"),
)

oauth_tokens = Table(
    "oauth_tokens",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("token_hash", LargeBinary(32), nullable=False),
    Column("kind", String(8), nullable=False),  # access | refresh
    Column("grant_id", String(64), nullable=False),
    Column("client_id", String(64), nullable=False),
    Column("username", String(128), nullable=True),
    Column("scope", Text, nullable=False),
    Column("context", Text, nullable=False),  # sealed JSON (base64): patient, encounter, fhirUser, break_glass, ...
    Column("issued_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
    PrimaryKeyConstraint("tenant_id", "token_hash", name="pk_oauth_tokens"),
    Index("ix_oauth_tokens_grant", "tenant_id", "grant_id"),
)

oauth_launches = Table(
    "oauth_launches",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("launch_hash", LargeBinary(32), nullable=False),
    Column("context", Text, nullable=False),  # sealed JSON (base64): patient, encounter
    Column("created_by", String(128), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", "launch_hash", name="pk_oauth_launches"),
)

oauth_jtis = Table(  # client assertion ids seen, until they expire: a replayed assertion is refused
    "oauth_jtis",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("client_id", String(64), nullable=False),
    Column("jti", String(255), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", "client_id", "jti", name="pk_oauth_jtis"),
)

oauth_sessions = Table(  # the login pages' server-side sessions
    "oauth_sessions",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("session_hash", LargeBinary(32), nullable=False),
    Column("username", String(128), nullable=True),
    Column("stage", String(16), nullable=False),  # anonymous | password | done
    Column("csrf", String(64), nullable=False),
    Column("pending", Text, nullable=True),  # JSON: the authorization request being answered, and choices so far
    Column("created_at", BigInteger, nullable=False),
    Column("last_seen", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", "session_hash", name="pk_oauth_sessions"),
)

oauth_keys = Table(  # the server's signing keys (id_token), per tenant
    "oauth_keys",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("kid", String(64), nullable=False),
    Column("private_key", LargeBinary, nullable=False),  # sealed PEM
    Column("public_jwk", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", "kid", name="pk_oauth_keys"),
)

# --- the audit log (security/audit_chain.py, storage/audit_log.py) -------------------------------------------
# AuditEvents are resources of their tenant (resources, resource_versions, index rows: readable and
# searchable like any other); these tables chain them. A record is written (sealed) to audit_pending in the
# transaction of the interaction it records, or before a read's answer leaves; the chainer makes it a
# resource and moves it to audit_log, giving it the next sequence number, the previous record's hash and its
# own, in one tenant-wide order, and queues it in audit_unindexed for its search index. The application role
# may only read and append audit_log and audit_checkpoints (on PostgreSQL; the migration revokes UPDATE and
# DELETE). No plaintext PHI: ids, times, hashes, and the pending records sealed like every resource version.

audit_pending = Table(
    "audit_pending",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_id", String(64), nullable=False),  # the AuditEvent's id
    Column("recorded", BigInteger, nullable=False),  # its lastUpdated (microseconds)
    Column("digest", LargeBinary(32), nullable=False),  # HMAC of its stored bytes under the tenant's chain key
    Column("key_version", Integer, nullable=False),
    Column("body", LargeBinary, nullable=False),  # sealed, as version 1 of the AuditEvent will be
    # A read's record written by the read's own statement (PostgreSQL), before its outcome was known: the version
    # that statement found (NULL: none) and whether it is a deletion. The chainer completes it (audit_log.py).
    Column("draft", Boolean, nullable=True),
    Column("read_version", Integer, nullable=True),
    Column("read_deleted", Boolean, nullable=True),
    Column("read_patients", Text, nullable=True),  # the Patients whose record it is in, as indexed (ids, space-separated)
    PrimaryKeyConstraint("tenant_id", "res_id", name="pk_audit_pending"),
)

audit_unindexed = Table(  # chained records whose search index is not written yet
    "audit_unindexed",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_id", String(64), nullable=False),
    PrimaryKeyConstraint("tenant_id", "res_id", name="pk_audit_unindexed"),
)

audit_legacy = Table(  # AuditEvents stored before the audit log existed (written by clients): not records of it
    "audit_legacy",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("res_id", String(64), nullable=False),
    PrimaryKeyConstraint("tenant_id", "res_id", name="pk_audit_legacy"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("seq", BigInteger, nullable=False),  # 1, 2, 3, ... without gaps
    Column("res_id", String(64), nullable=False),
    Column("recorded", BigInteger, nullable=False),
    Column("digest", LargeBinary(32), nullable=False),
    Column("prev_hash", LargeBinary(32), nullable=False),  # the hash of record seq - 1 (zeros for the first)
    Column("hash", LargeBinary(32), nullable=False),  # HMAC over (tenant, seq, prev_hash, digest, res_id, recorded)
    PrimaryKeyConstraint("tenant_id", "seq", name="pk_audit_log"),
    Index("ix_audit_log_res", "tenant_id", "res_id", unique=True),
    Index("ix_audit_log_recorded", "tenant_id", "recorded"),
)

audit_heads = Table(  # the end of each tenant's chain; its row lock serialises the chainers
    "audit_heads",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", LargeBinary(32), nullable=False),
    Column("checkpoint_seq", BigInteger, nullable=False),
    Column("checkpoint_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", name="pk_audit_heads"),
)

audit_checkpoints = Table(  # (seq, hash) signed with the tenant's Ed25519 audit key (tenant_keys purpose "audit")
    "audit_checkpoints",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", LargeBinary(32), nullable=False),
    Column("signed_at", BigInteger, nullable=False),
    Column("key_version", Integer, nullable=False),
    Column("signature", LargeBinary(64), nullable=False),
    PrimaryKeyConstraint("tenant_id", "seq", name="pk_audit_checkpoints"),
)

audit_alert_marks = Table(  # what the monitoring rules count: blind-indexed subjects and items in fixed windows
    "audit_alert_marks",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("rule", String(32), nullable=False),
    Column("subject", LargeBinary(16), nullable=False),  # e.g. a user or an address, blind-indexed
    Column("window_start", BigInteger, nullable=False),
    Column("item", LargeBinary(16), nullable=False),  # e.g. a patient, or an event; b"" marks "alert raised"
    PrimaryKeyConstraint("tenant_id", "rule", "subject", "window_start", "item", name="pk_audit_alert_marks"),
)

# HL7 v2 messages as received (``hl7v2/store.py``): every one stored sealed before it is processed, with its status
# and its ACK (sealed too); ``dedupe`` is a blind index of the sender and control id (MSH-3, MSH-4, MSH-10), unique
# per tenant, so a repeated message finds the first one's ACK. No plaintext PHI: ids, times, codes and hashes.
hl7_messages = Table(
    "hl7_messages",
    metadata,
    Column("tenant_id", Integer, nullable=False),
    Column("id", String(36), nullable=False),
    Column("received", BigInteger, nullable=False),  # microseconds
    Column("updated", BigInteger, nullable=False),
    Column("dedupe", LargeBinary(32), nullable=True),  # NULL: no control id, so no repeat can be told
    Column("status", String(16), nullable=False),  # received | processing | processed | error | rejected
    Column("kind", String(24), nullable=True),  # MSH-9, e.g. ADT^A01 (no PHI)
    Column("error_code", String(8), nullable=True),  # HL7 table 0357 code of the first error
    Column("attempts", Integer, nullable=False),
    Column("owner", String(96), nullable=True),  # processing: the process at it (host:pid:instance); NULL: nobody
    Column("key_version", Integer, nullable=False),
    Column("body", LargeBinary, nullable=False),  # the message's bytes, sealed
    Column("ack_key_version", Integer, nullable=True),
    Column("ack", LargeBinary, nullable=True),  # the ACK's bytes, sealed
    PrimaryKeyConstraint("tenant_id", "id", name="pk_hl7_messages"),
    Index("ix_hl7_messages_dedupe", "tenant_id", "dedupe", unique=True),
    Index("ix_hl7_messages_status", "tenant_id", "status", "received"),
)
HL7_TABLES = ("hl7_messages",)

AUDIT_TABLES = ("audit_pending", "audit_unindexed", "audit_legacy", "audit_log", "audit_heads", "audit_checkpoints",
                "audit_alert_marks")
APPEND_ONLY_TABLES = ("audit_log", "audit_checkpoints")  # the application role may not update or delete their rows
READ_ONLY_TABLES = ("audit_legacy",)  # written by the migration only

OAUTH_TABLES = ("oauth_clients", "oauth_users", "oauth_codes", "oauth_tokens", "oauth_launches", "oauth_jtis",
                "oauth_sessions", "oauth_keys")

INDEX_TABLES = ("idx_hash", "idx_date", "idx_number", "idx_quantity", "idx_reference", "idx_composite")

# Tables whose rows belong to one tenant: partitioned and row-level secured on PostgreSQL.
TENANT_TABLES = ("tenant_keys", "resources", "resource_versions", *INDEX_TABLES, "search_param_state", *OAUTH_TABLES,
                 *AUDIT_TABLES, *HL7_TABLES)
