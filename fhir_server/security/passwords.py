"""User credentials: passwords hashed with scrypt, time-based one-time passwords (RFC 6238).

A password hash is ``scrypt$n$r$p$salt$hash`` (base64), so the parameters can grow later and old
hashes still verify. TOTP is pyotp's (30-second steps, 6 digits, SHA-1 as authenticator apps expect),
accepting the neighbouring step for clock drift; a code is refused twice in a row by the caller,
which remembers the last step used.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

import pyotp

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_PASSWORD_BYTES = 1024  # longer passwords are refused before hashing (no hashing cost from attackers)


def hash_password(password: str) -> str:
    data = password.encode("utf-8")
    if len(data) > MAX_PASSWORD_BYTES:
        raise ValueError("password too long")
    salt = os.urandom(SALT_BYTES)
    digest = hashlib.scrypt(data, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=HASH_BYTES)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    data = password.encode("utf-8")
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt" or len(data) > MAX_PASSWORD_BYTES:
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(data, salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# A hash to verify against when the user does not exist, so that the answer takes as long.
DUMMY_HASH = hash_password("not a real password")


def new_totp_secret() -> str:
    return pyotp.random_base32()


def totp_uri(secret: str, username: str, issuer: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=issuer)


def totp_step(secret: str, code: str, *, at: float | None = None) -> int | None:
    """The time step the code belongs to (the current one or a neighbour), or None if it is wrong."""
    code = code.strip()
    if not (len(code) == 6 and code.isascii() and code.isdigit()):
        return None
    totp = pyotp.TOTP(secret)
    now = at if at is not None else time.time()
    step = int(now // totp.interval)
    for candidate in (step, step - 1, step + 1):
        if hmac.compare_digest(totp.generate_otp(candidate), code):
            return candidate
    return None
