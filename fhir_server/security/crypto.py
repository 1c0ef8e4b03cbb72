"""Sealing resource bodies and blind-indexing identifying values.

Envelope encryption: each tenant has data keys (one per key version) and one
index key, all wrapped by a master key (``security/keys.py``). A body is sealed
with AES-256-GCM under the tenant's current data key; the associated data binds
the ciphertext to (tenant, resource type, id, version), so a ciphertext copied
to another row or tenant, or with one bit flipped, fails to open.

Sealed format: ``b"\\x01" + nonce (12 random bytes) + ciphertext + tag``. The
null cipher (``b"\\x00" + plaintext``) exists only so benchmarks can measure the
cost of encryption in the same build; production refuses it.

Blind indexes: ``blind_index`` is the one function the search indexer uses for
identifying values (strings, tokens, uris): an HMAC-SHA-256, keyed per tenant and
per search parameter, over the normalised value. It leaks equality and frequency
within one parameter of one tenant, nothing else (see docs/security.md).
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT_AES_GCM = 0x01
FORMAT_NULL = 0x00
NONCE_BYTES = 12
KEY_BYTES = 32

# Bump only with a migration that recomputes every index row: stored hashes depend on it.
BLIND_INDEX_VERSION = 1
BLIND_INDEX_BYTES = 16
CONTENT_KEY = "\x00content"  # the content digest's key name: no search parameter's code starts with NUL


class IntegrityError(Exception):
    """A sealed record did not open: it was altered, moved, or its key is gone."""


class Cipher(Protocol):
    name: str

    def seal(self, key: bytes, plaintext: bytes, aad: bytes) -> bytes: ...

    def open(self, key: bytes, sealed: bytes, aad: bytes) -> bytes: ...


class AesGcmCipher:
    name = "aes-256-gcm"

    def seal(self, key: bytes, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)  # random 96-bit nonce per record
        return bytes((FORMAT_AES_GCM,)) + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)

    def open(self, key: bytes, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < 1 + NONCE_BYTES + 16:
            raise IntegrityError("sealed record too short")
        if sealed[0] == FORMAT_NULL:
            raise IntegrityError("an unencrypted record where an encrypted one was expected")
        if sealed[0] != FORMAT_AES_GCM:
            raise IntegrityError("unknown sealed-record format")
        try:
            return AESGCM(key).decrypt(sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :], aad)
        except InvalidTag:
            raise IntegrityError("authentication tag mismatch") from None


class NullCipher:
    """No encryption: for measuring encryption's cost in benchmarks only."""

    name = "null"

    def seal(self, key: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return bytes((FORMAT_NULL,)) + plaintext

    def open(self, key: bytes, sealed: bytes, aad: bytes) -> bytes:
        if sealed[:1] == bytes((FORMAT_NULL,)):
            return sealed[1:]
        raise IntegrityError("an encrypted record while running with the null cipher")


def cipher_named(name: str) -> Cipher:
    return NullCipher() if name == "null" else AesGcmCipher()


def resource_aad(tenant_id: int, res_type: str, res_id: str, version: int) -> bytes:
    """Associated data of a resource version: where the ciphertext belongs."""
    return f"fhir-resource/v1\x00{tenant_id}\x00{res_type}\x00{res_id}\x00{version}".encode()


def record_aad(kind: str, tenant_id: int, record_id: str) -> bytes:
    """Associated data of other sealed records (audit entries, HL7 messages, job payloads)."""
    return f"fhir-record/v1\x00{kind}\x00{tenant_id}\x00{record_id}".encode()


def key_wrap_context(tenant_id: int, purpose: str, version: int) -> bytes:
    return f"fhir-tenant-key/v1\x00{tenant_id}\x00{purpose}\x00{version}".encode()


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def derive_param_key(index_key: bytes, resource_type: str, param: str) -> bytes:
    """The HMAC key of one search parameter, derived from the tenant's index key."""
    return HKDF(
        algorithm=SHA256(),
        length=32,
        salt=b"fhir-blind-index/v%d" % BLIND_INDEX_VERSION,
        info=f"{resource_type}\x00{param}".encode(),
    ).derive(index_key)


def blind_index(param_key: bytes, normalized_value: str) -> bytes:
    """The blind index of a normalised value under a parameter key (16 bytes).

    A pure function with a golden test: changing it breaks every stored index.
    """
    return hmac.digest(param_key, normalized_value.encode("utf-8"), "sha256")[:BLIND_INDEX_BYTES]


@dataclass(frozen=True, slots=True)
class TenantKeys:
    """The unwrapped keys of one tenant, as one request needs them."""

    tenant_id: int
    write_version: int
    data_keys: dict[int, bytes]
    index_key: bytes
    _param_keys: dict[tuple[str, str], bytes] = field(default_factory=dict, repr=False, compare=False)

    def data_key(self, version: int) -> bytes:
        try:
            return self.data_keys[version]
        except KeyError:
            raise IntegrityError(f"data key version {version} is not available") from None

    def blind(self, resource_type: str, key_name: str, material: str) -> bytes:
        """The blind index of ``material`` for one search parameter of this tenant."""
        pk = self._param_keys.get((resource_type, key_name)) or self._derived(resource_type, key_name)
        return blind_index(pk, material)

    def content_digest(self, resource_type: str, resource_id: str, content: bytes) -> bytes:
        """A keyed digest of one resource's content (16 bytes): the same for its versions of equal content. Nothing
        is learnt of the content without the tenant's index key, nor that two resources have the same content (the
        id is hashed with it)."""
        pk = self._param_keys.get((resource_type, CONTENT_KEY)) or self._derived(resource_type, CONTENT_KEY)
        return hmac.digest(pk, resource_id.encode() + b"\x00" + content, "sha256")[:BLIND_INDEX_BYTES]

    def _derived(self, resource_type: str, key_name: str) -> bytes:
        """The HMAC key of (type, key name), derived and remembered (up to a bound: names come from requests)."""
        pk = derive_param_key(self.index_key, resource_type, key_name)
        if len(self._param_keys) < 100_000:
            self._param_keys[(resource_type, key_name)] = pk
        return pk


class Sealer:
    """Seals and opens resource bodies of one tenant with one cipher."""

    def __init__(self, cipher: Cipher, keys: TenantKeys) -> None:
        self.cipher = cipher
        self.keys = keys

    def seal_resource(self, res_type: str, res_id: str, version: int, body: bytes) -> tuple[int, bytes]:
        kv = self.keys.write_version
        aad = resource_aad(self.keys.tenant_id, res_type, res_id, version)
        return kv, self.cipher.seal(self.keys.data_key(kv), body, aad)

    def open_resource(self, res_type: str, res_id: str, version: int, key_version: int, sealed: bytes) -> bytes:
        aad = resource_aad(self.keys.tenant_id, res_type, res_id, version)
        return self.cipher.open(self.keys.data_key(key_version), sealed, aad)

    def seal_record(self, kind: str, record_id: str, body: bytes) -> tuple[int, bytes]:
        kv = self.keys.write_version
        return kv, self.cipher.seal(self.keys.data_key(kv), body, record_aad(kind, self.keys.tenant_id, record_id))

    def open_record(self, kind: str, record_id: str, key_version: int, sealed: bytes) -> bytes:
        aad = record_aad(kind, self.keys.tenant_id, record_id)
        return self.cipher.open(self.keys.data_key(key_version), sealed, aad)
