"""Sealing, associated data, and the blind-index contract."""

from __future__ import annotations

import pytest

from fhir_server.security import crypto
from fhir_server.security.keys import KeyUnavailable, LocalKeyProvider

KEY = bytes(range(32))


def test_seal_open_round_trip_with_random_nonces() -> None:
    c = crypto.AesGcmCipher()
    aad = crypto.resource_aad(1, "Patient", "a", 1)
    a, b = c.seal(KEY, b"secret", aad), c.seal(KEY, b"secret", aad)
    assert a != b and a[0] == crypto.FORMAT_AES_GCM and len(a) == 1 + 12 + len(b"secret") + 16
    assert c.open(KEY, a, aad) == b"secret"


@pytest.mark.parametrize(
    "other",
    [
        crypto.resource_aad(2, "Patient", "a", 1),  # another tenant
        crypto.resource_aad(1, "Patient", "b", 1),  # another id
        crypto.resource_aad(1, "Observation", "a", 1),  # another type
        crypto.resource_aad(1, "Patient", "a", 2),  # another version
    ],
)
def test_ciphertext_is_bound_to_its_row(other: bytes) -> None:
    c = crypto.AesGcmCipher()
    sealed = c.seal(KEY, b"secret", crypto.resource_aad(1, "Patient", "a", 1))
    with pytest.raises(crypto.IntegrityError):
        c.open(KEY, sealed, other)


def test_every_flipped_bit_is_detected() -> None:
    c = crypto.AesGcmCipher()
    aad = crypto.resource_aad(1, "Patient", "a", 1)
    sealed = c.seal(KEY, b"x" * 20, aad)
    for bit in range(len(sealed) * 8):
        tampered = bytearray(sealed)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(crypto.IntegrityError):
            c.open(KEY, bytes(tampered), aad)


def test_null_cipher_and_aes_records_do_not_mix() -> None:
    aad = b"a"
    with pytest.raises(crypto.IntegrityError):
        crypto.AesGcmCipher().open(KEY, crypto.NullCipher().seal(KEY, b"x" * 40, aad), aad)
    with pytest.raises(crypto.IntegrityError):
        crypto.NullCipher().open(KEY, crypto.AesGcmCipher().seal(KEY, b"x", aad), aad)


def test_blind_index_golden_values() -> None:
    # Changing these values breaks every stored index: bump BLIND_INDEX_VERSION and reindex instead.
    param_key = crypto.derive_param_key(KEY, "Patient", "family")
    assert param_key.hex() == GOLDEN_PARAM_KEY
    assert crypto.blind_index(param_key, "smith").hex() == GOLDEN_SMITH
    assert crypto.BLIND_INDEX_VERSION == 1
    assert crypto.derive_param_key(KEY, "Patient", "given") != param_key
    assert crypto.derive_param_key(bytes(32), "Patient", "family") != param_key


GOLDEN_PARAM_KEY = "aa315f0df56ceac872d54b6fbd58391c719fcadec93d7c91b4ca7982fe454a3d"
GOLDEN_SMITH = "6820e4da58ba93c544d54ca517c4e84d"


def test_blind_index_matches_an_independent_hkdf_hmac() -> None:
    """RFC 5869 HKDF-SHA256 and HMAC-SHA256 written out here, so the contract does not rest on one library."""
    import hashlib
    import hmac

    prk = hmac.new(b"fhir-blind-index/v1", KEY, hashlib.sha256).digest()
    okm = hmac.new(prk, b"Patient\x00family" + b"\x01", hashlib.sha256).digest()
    assert okm.hex() == GOLDEN_PARAM_KEY
    assert hmac.new(okm, b"smith", hashlib.sha256).digest()[:16].hex() == GOLDEN_SMITH


def test_key_wrapping_is_bound_to_tenant_and_version() -> None:
    provider = LocalKeyProvider([KEY])
    ctx = crypto.key_wrap_context(1, "data", 1)
    key_id, wrapped = provider.wrap(b"k" * 32, ctx)
    assert provider.unwrap(key_id, wrapped, ctx) == b"k" * 32
    with pytest.raises(KeyUnavailable):
        provider.unwrap(key_id, wrapped, crypto.key_wrap_context(2, "data", 1))
    with pytest.raises(KeyUnavailable):
        LocalKeyProvider([bytes(32)]).unwrap(key_id, wrapped, ctx)
