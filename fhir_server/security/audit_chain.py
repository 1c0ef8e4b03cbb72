"""The audit log's hash chain and its signed checkpoints: keys, hashes, signatures and the verifier; no storage.

Every tenant's audit records form one chain. Record n carries

    digest_n = HMAC-SHA-256(K, "record" | the AuditEvent's stored bytes)
    hash_n   = HMAC-SHA-256(K, "link" | tenant | n | hash_(n-1) | digest_n | id | recorded)

with hash_0 = 32 zero bytes and K the tenant's chain key, derived from its index key (which is never rotated,
so a data-key rotation or a re-encryption leaves the chain intact; a crypto-shred takes it along). The hashes
are keyed: someone who can write to the database but holds no key cannot recompute them, so a record that is
changed, removed, inserted or moved breaks the chain where it was touched, and rewriting the records after
it cannot hide that.

Checkpoints sign (tenant, n, hash_n, time) with the tenant's Ed25519 audit key (wrapped by the master key like
its data keys). The verifier checks each signature and that the chain still reaches every checkpoint, so a log
cut short before its last checkpoint is caught by the checkpoint, and one cut short after it by the head row
(updated in the same transaction as the chain).
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

GENESIS = bytes(32)
REORDER_WINDOW = 64  # how far away the verifier looks for the place a moved record belongs


def chain_key(index_key: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=b"fhir-audit-chain/v1", info=b"chain").derive(index_key)


def record_digest(key: bytes, body: bytes) -> bytes:
    return hmac.digest(key, b"fhir-audit-record/v1\x00" + body, "sha256")  # (one call into OpenSSL: hot paths)


def link(key: bytes, tenant_id: int, seq: int, prev: bytes, digest: bytes, res_id: str, recorded: int) -> bytes:
    message = b"fhir-audit-link/v1\x00" + struct.pack(">qq", tenant_id, seq) + prev + digest
    return hmac.digest(key, message + struct.pack(">q", recorded) + res_id.encode(), "sha256")


def checkpoint_message(tenant_id: int, seq: int, chain_hash: bytes, signed_at: int) -> bytes:
    return b"fhir-audit-checkpoint/v1\x00" + struct.pack(">qqq", tenant_id, seq, signed_at) + chain_hash


def sign_checkpoint(seed: bytes, tenant_id: int, seq: int, chain_hash: bytes, signed_at: int) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).sign(checkpoint_message(tenant_id, seq, chain_hash, signed_at))


def public_key(seed: bytes) -> Ed25519PublicKey:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key()


@dataclass(frozen=True, slots=True)
class ChainRow:
    seq: int
    res_id: str
    recorded: int
    digest: bytes
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: bytes
    signed_at: int
    key_version: int
    signature: bytes


@dataclass(frozen=True, slots=True)
class Head:
    seq: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class Finding:
    """The first thing wrong with a log: what (changed, removed, inserted, reordered, truncated, checkpoint,
    unchained), where (the record's position and AuditEvent id, when there is one), and in words."""

    kind: str
    seq: int | None
    res_id: str | None
    message: str


class ChainVerifier:
    """Feed it the chain in order (``row``), then ``finish``; each returns the first Finding, or None."""

    def __init__(self, key: bytes, tenant_id: int, checkpoints: list[Checkpoint], signing_seeds: dict[int, bytes]) -> None:
        self.key = key
        self.tenant_id = tenant_id
        self.expected = 1
        self.previous = GENESIS
        self.checkpoints = {c.seq: c for c in checkpoints}
        self.signing_seeds = signing_seeds
        self.verified = 0

    def check_signatures(self) -> Finding | None:
        for cp in sorted(self.checkpoints.values(), key=lambda c: c.seq):
            seed = self.signing_seeds.get(cp.key_version)
            if seed is None:
                return Finding("checkpoint", cp.seq, None, f"checkpoint at #{cp.seq} names audit key version "
                               f"{cp.key_version}, which the tenant does not have")
            try:
                public_key(seed).verify(cp.signature, checkpoint_message(self.tenant_id, cp.seq, cp.hash, cp.signed_at))
            except InvalidSignature:
                return Finding("checkpoint", cp.seq, None, f"checkpoint at #{cp.seq} has a bad signature: it was altered or forged")
        return None

    def row(self, row: ChainRow, body: bytes | None, problem: str | None = None) -> Finding | None:
        """One record of the chain with its AuditEvent's stored bytes (None: the resource is gone; ``problem``:
        it is there but could not be opened)."""
        if row.seq > self.expected:
            missing = f"#{self.expected}" if row.seq == self.expected + 1 else f"#{self.expected} to #{row.seq - 1}"
            return Finding("removed", self.expected, None, f"record {missing} removed: the log jumps from "
                           f"#{self.expected - 1} to #{row.seq} (AuditEvent/{row.res_id})")
        computed = link(self.key, self.tenant_id, row.seq, row.prev_hash, row.digest, row.res_id, row.recorded)
        if not hmac.compare_digest(computed, row.hash):
            elsewhere = self._belongs_at(row)
            if elsewhere is not None:
                return Finding("reordered", row.seq, row.res_id, f"record #{row.seq} (AuditEvent/{row.res_id}) was moved: "
                               f"it was chained as #{elsewhere}")
            return Finding("changed", row.seq, row.res_id, f"record #{row.seq} (AuditEvent/{row.res_id}) was changed: "
                           "its chain entry does not verify")
        if not hmac.compare_digest(row.prev_hash, self.previous):
            return Finding("inserted", row.seq, row.res_id, f"record #{row.seq} (AuditEvent/{row.res_id}) does not follow "
                           f"#{row.seq - 1}: records before it were inserted, removed or reordered")
        if body is None:
            return Finding("removed", row.seq, row.res_id, f"record #{row.seq}: AuditEvent/{row.res_id} was removed "
                           "from the stored resources")
        if problem is not None:
            return Finding("changed", row.seq, row.res_id, f"record #{row.seq}: AuditEvent/{row.res_id} was changed "
                           f"({problem})")
        if not hmac.compare_digest(record_digest(self.key, body), row.digest):
            return Finding("changed", row.seq, row.res_id, f"record #{row.seq}: AuditEvent/{row.res_id} was changed "
                           "(its stored content is not what was chained)")
        cp = self.checkpoints.get(row.seq)
        if cp is not None and not hmac.compare_digest(cp.hash, row.hash):
            return Finding("checkpoint", row.seq, row.res_id, f"record #{row.seq} does not match the checkpoint signed at it")
        self.previous = row.hash
        self.expected = row.seq + 1
        self.verified += 1
        return None

    def _belongs_at(self, row: ChainRow) -> int | None:
        for delta in range(1, REORDER_WINDOW + 1):
            for seq in (row.seq - delta, row.seq + delta):
                if seq >= 1 and hmac.compare_digest(
                        link(self.key, self.tenant_id, seq, row.prev_hash, row.digest, row.res_id, row.recorded), row.hash):
                    return seq
        return None

    def finish(self, head: Head | None) -> Finding | None:
        last = self.expected - 1
        beyond = [c.seq for c in self.checkpoints.values() if c.seq > last]
        if beyond:
            return Finding("truncated", last + 1, None, f"the log was cut short: it ends at #{last}, but a checkpoint was "
                           f"signed at #{max(beyond)}")
        if head is None:
            if last:
                return Finding("changed", None, None, "the chain's head record is missing")
            return None
        if head.seq > last:
            return Finding("truncated", last + 1, None, f"the log was cut short: it ends at #{last}, but its head says "
                           f"#{head.seq}")
        if head.seq < last or not hmac.compare_digest(head.hash, self.previous):
            return Finding("changed", head.seq, None, f"the chain's head (#{head.seq}) does not match its last record (#{last})")
        return None
