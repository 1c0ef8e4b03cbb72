"""The HL7 v2 message store: every message kept (sealed) from before it is processed, with its status and ACK.

A message is admitted (stored, status ``processing``) in a transaction of its own before anything is done with it,
so that no message is lost whatever happens next; its outcome (``processed``, ``error`` or ``rejected``, and the
ACK) is written when it is known. The sender and control id (MSH-3, MSH-4, MSH-10) are kept as a blind index, unique
per tenant: a message that comes again finds the first one and its ACK (``Admission.earlier``).

A message being processed names its owner (host, process id and a per-process instance). One left ``processing``
is taken up again by the next attempt at once when its owner is known to be gone (a process of this host that no
longer runs, an earlier instance of this very process id, or an attempt that gave up and released it), and otherwise
once it is ``STALE_SECONDS`` old (an owner on another host, which cannot be asked); until then it is ``busy``.

Failed messages stay (the dead-letter list: ``pending(status="error")``) until ``fhir-server hl7 replay`` processes
them again after a mapping fix.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import and_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from fhir_server.clock import now_us
from fhir_server.storage import schema

if TYPE_CHECKING:
    from fhir_server.storage.repository import ResourceRepository
    from fhir_server.storage.store import Storage

M = schema.hl7_messages
KIND = "hl7v2-message"  # the sealed bodies' associated data kind
ACK_KIND = "hl7v2-ack"
STALE_SECONDS = 120  # a message "processing" this long was left by a process that died
PROCESSING, PROCESSED, ERROR, REJECTED = "processing", "processed", "error", "rejected"
STATUSES = (PROCESSING, PROCESSED, ERROR, REJECTED)
_HOST = socket.gethostname()[:64]
_INSTANCES: dict[int, str] = {}  # pid -> this process's instance (a forked child gets one of its own)


def owner() -> str:
    pid = os.getpid()
    return f"{_HOST}:{pid}:{_INSTANCES.setdefault(pid, uuid.uuid4().hex[:12])}"


def abandoned(who: str | None) -> bool:
    """Nobody works on a message this owner holds any more (as far as this host can tell)."""
    if who is None:
        return True
    parts = who.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
        return False  # another host's: only time tells
    pid = int(parts[1])
    if pid == os.getpid():
        return who != owner()  # an earlier process that had this pid (a container restarted, say)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False


@dataclass(frozen=True, slots=True)
class Admission:
    id: str
    earlier: bytes | None = None  # the ACK of the same message received before (a repeat: not processed again)
    earlier_status: str | None = None
    earlier_body: bytes | None = None  # that message as it was received
    busy: bool = False  # the same message is being processed now, elsewhere
    fresh: bool = False  # stored just now, never seen before: nothing of it can have been processed yet


@dataclass(frozen=True, slots=True)
class Stored:
    id: str
    received: int
    updated: int
    status: str
    kind: str | None
    error_code: str | None
    attempts: int


class MessageStore:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @staticmethod
    def _dedupe(repo: ResourceRepository, key: tuple[str, str] | None) -> bytes | None:
        if key is None:
            return None
        material = "\x00".join(key).encode()
        return hmac.new(repo.sealer.keys.index_key, b"hl7v2-message\x00" + material, hashlib.sha256).digest()

    def admit(self, tenant: str, data: bytes, kind: str | None, key: tuple[str, str] | None) -> Admission:
        """Store a message before it is processed (committed when this returns); or find it stored already."""
        message_id = str(uuid.uuid4())
        now = now_us()
        with self.storage.session(tenant, write=True, audited=False, tenant_lock=False) as repo:
            dedupe = self._dedupe(repo, key)
            kv, sealed = repo.sealer.seal_record(KIND, message_id, data)
            dialect_insert = postgresql.insert if repo.conn.dialect.name == "postgresql" else sqlite.insert
            inserted = repo.conn.execute(dialect_insert(M).values(
                tenant_id=repo.tenant.id, id=message_id, received=now, updated=now, dedupe=dedupe, status=PROCESSING,
                kind=(kind or "")[:24] or None, attempts=1, owner=owner(), key_version=kv, body=sealed,
            ).on_conflict_do_nothing().returning(M.c.id)).first()
            if inserted is not None:
                return Admission(message_id, fresh=True)
            row = repo.conn.execute(select(M).where(M.c.tenant_id == repo.tenant.id, M.c.dedupe == dedupe)).one()
            if row.status != PROCESSING:
                ack = repo.sealer.open_record(ACK_KIND, row.id, row.ack_key_version, bytes(row.ack)) if row.ack else None
                body = repo.sealer.open_record(KIND, row.id, row.key_version, bytes(row.body))
                return Admission(row.id, earlier=ack, earlier_status=row.status, earlier_body=body)
            if self._take(repo, row, now):  # left by a process that died: this attempt takes it over
                return Admission(row.id)
            return Admission(row.id, busy=True)

    @staticmethod
    def _take(repo: ResourceRepository, row: object, now: int) -> bool:
        """Make this process the owner of a stored message, unless another one is at it now."""
        free = row.status != PROCESSING or abandoned(row.owner)  # type: ignore[attr-defined]
        taken = repo.conn.execute(update(M).where(
            M.c.tenant_id == repo.tenant.id, M.c.id == row.id, M.c.updated == row.updated,  # type: ignore[attr-defined]
            M.c.status == row.status,  # type: ignore[attr-defined]
            *(() if free else (M.c.updated < now - STALE_SECONDS * 1_000_000,)),
        ).values(status=PROCESSING, owner=owner(), updated=now, attempts=M.c.attempts + 1))
        return taken.rowcount == 1

    def claim(self, tenant: str, message_id: str) -> bool:
        """Take a stored message up again (a replay): False when another process works on it now."""
        now = now_us()
        with self.storage.session(tenant, write=True, audited=False, tenant_lock=False) as repo:
            row = repo.conn.execute(select(M.c.id, M.c.status, M.c.updated, M.c.owner).where(
                M.c.tenant_id == repo.tenant.id, M.c.id == message_id)).first()
            return row is not None and self._take(repo, row, now)

    def release(self, tenant: str, message_id: str) -> None:
        """Give up on a message this process was processing (it failed for a reason of ours, not the message's): the
        next attempt takes it up at once."""
        with self.storage.session(tenant, write=True, audited=False, tenant_lock=False) as repo:
            repo.conn.execute(update(M).where(M.c.tenant_id == repo.tenant.id, M.c.id == message_id,
                                              M.c.status == PROCESSING, M.c.owner == owner()).values(owner=None))

    def finish(self, tenant: str, message_id: str, status: str, error_code: str | None, ack: bytes) -> None:
        """A message's outcome and ACK."""
        assert status in (PROCESSED, ERROR, REJECTED)
        with self.storage.session(tenant, write=True, audited=False, tenant_lock=False) as repo:
            kv, sealed = repo.sealer.seal_record(ACK_KIND, message_id, ack)
            repo.conn.execute(update(M).where(M.c.tenant_id == repo.tenant.id, M.c.id == message_id).values(
                status=status, error_code=error_code, owner=None, ack_key_version=kv, ack=sealed, updated=now_us()))

    def load(self, tenant: str, message_id: str) -> tuple[Stored, bytes] | None:
        with self.storage.session(tenant, write=False, shared=False) as repo:
            row = repo.conn.execute(select(M).where(M.c.tenant_id == repo.tenant.id, M.c.id == message_id)).first()
            if row is None:
                return None
            return _stored(row), repo.sealer.open_record(KIND, row.id, row.key_version, bytes(row.body))

    def listing(self, tenant: str, *, status: str | None = None, limit: int = 1000) -> Iterator[Stored]:
        """The stored messages (oldest first), of one status if given."""
        with self.storage.session(tenant, write=False, shared=False) as repo:
            where = [M.c.tenant_id == repo.tenant.id]
            if status is not None:
                where.append(M.c.status == status)
            rows = repo.conn.execute(select(M.c.id, M.c.received, M.c.updated, M.c.status, M.c.kind, M.c.error_code,
                                            M.c.attempts).where(and_(*where)).order_by(M.c.received, M.c.id)
                                     .limit(limit)).all()
        for row in rows:
            yield _stored(row)


def _stored(row: object) -> Stored:
    return Stored(row.id, row.received, row.updated, row.status, row.kind, row.error_code, row.attempts)  # type: ignore[attr-defined]
