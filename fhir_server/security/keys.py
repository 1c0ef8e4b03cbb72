"""Master keys: where they come from, and wrapping data keys with them.

A ``KeyProvider`` wraps and unwraps tenant data keys; the server never stores a
data key in the clear. ``LocalKeyProvider`` holds master keys in memory, read
from ``FHIR_MASTER_KEY`` or ``FHIR_MASTER_KEY_FILE``; a cloud KMS plugs in by
implementing the same three members.

A key file holds one base64 key per line: the first is current (it wraps new
keys), the others only unwrap keys they wrapped earlier (kept during a master
rotation, so that a crash between steps never strands a data key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fhir_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12


class KeyUnavailable(Exception):
    """A wrapped key cannot be unwrapped: its master key is missing or the wrapping was tampered with."""


class KeyProvider(Protocol):
    @property
    def current_key_id(self) -> str: ...

    def wrap(self, key: bytes, context: bytes) -> tuple[str, bytes]:
        """Encrypt ``key`` bound to ``context``; returns (master key id, wrapped bytes)."""
        ...

    def unwrap(self, master_key_id: str, wrapped: bytes, context: bytes) -> bytes: ...


def master_key_id(key: bytes) -> str:
    """A public fingerprint of a master key (never the key itself)."""
    return hashlib.sha256(b"fhir-server master key id\x00" + key).hexdigest()[:32]


class LocalKeyProvider:
    """Master keys held in this process (from the environment or a key file)."""

    def __init__(self, keys: list[bytes], *, source: str = "memory", path: Path | None = None) -> None:
        self.source = source
        self.path = path  # a key file is re-read when it changes (wrapping) or names an unknown key (unwrapping)
        self._mtime = path.stat().st_mtime_ns if path is not None and path.exists() else None
        self._set(keys)

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return
        if mtime != self._mtime:
            self._set(read_key_file(self.path))
            self._mtime = mtime

    def _set(self, keys: list[bytes]) -> None:
        if not keys:
            raise SettingsError("no master key configured")
        for k in keys:
            if len(k) != KEY_BYTES:
                raise SettingsError(f"a master key must be {KEY_BYTES} bytes (base64 of 32 random bytes)")
        self._keys = {master_key_id(k): k for k in keys}
        self._current = master_key_id(keys[0])

    @property
    def current_key_id(self) -> str:
        return self._current

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def wrap(self, key: bytes, context: bytes) -> tuple[str, bytes]:
        self._refresh()  # after a master rotation, new keys must be wrapped under the new current key
        nonce = os.urandom(NONCE_BYTES)
        return self._current, nonce + AESGCM(self._keys[self._current]).encrypt(nonce, key, context)

    def unwrap(self, master_key_id: str, wrapped: bytes, context: bytes) -> bytes:
        master = self._keys.get(master_key_id)
        if master is None and self.path is not None:
            # The key file may have changed under us (a master-key rotation by the CLI).
            self._set(read_key_file(self.path))
            master = self._keys.get(master_key_id)
        if master is None:
            raise KeyUnavailable(f"master key {master_key_id} is not configured")
        try:
            return AESGCM(master).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], context)
        except InvalidTag:
            raise KeyUnavailable("a wrapped key failed its integrity check") from None


def decode_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError("a master key must be base64 (of 32 random bytes)") from None
    if len(key) != KEY_BYTES:
        raise SettingsError(f"a master key must decode to {KEY_BYTES} bytes, not {len(key)}")
    return key


def read_key_file(path: Path) -> list[bytes]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SettingsError(f"cannot read FHIR_MASTER_KEY_FILE {path}: {exc.strerror}") from None
    keys = [decode_key(line) for line in lines if line.strip() and not line.startswith("#")]
    if not keys:
        raise SettingsError(f"the master key file {path} holds no key")
    return keys


def write_key_file(path: Path, keys: list[bytes]) -> None:
    """Write keys atomically with mode 0600 (first line current)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(base64.b64encode(k).decode() + "\n" for k in keys))
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def default_key_file(settings: Settings) -> Path:
    return settings.data_path / "master.key"


def key_file_path(settings: Settings) -> Path | None:
    """The key file in use: the configured one, or the generated default when no key is configured."""
    if settings.master_key:
        return None
    if settings.master_key_file:
        return Path(settings.master_key_file).expanduser()
    return default_key_file(settings)


def provider_from_settings(settings: Settings, *, create: bool = True) -> LocalKeyProvider:
    """The key provider the settings ask for.

    With no key configured, outside production, a key file is generated under the
    data directory (mode 0600) and the server says so; in production a missing key
    stops the server.
    """
    if settings.master_key:
        keys = [decode_key(part) for part in settings.master_key.split(",") if part.strip()]
        return LocalKeyProvider(keys, source="FHIR_MASTER_KEY")
    if settings.master_key_file:
        path = Path(settings.master_key_file).expanduser()
        return LocalKeyProvider(read_key_file(path), source=str(path), path=path)
    if settings.production:
        raise SettingsError(
            "no master key: set FHIR_MASTER_KEY_FILE (or FHIR_MASTER_KEY) in production; "
            "generate one with `fhir-server keys generate-master --output FILE`"
        )
    path = default_key_file(settings)
    if path.exists():
        return LocalKeyProvider(read_key_file(path), source=str(path), path=path)
    if not create:
        raise SettingsError(f"no master key configured and none at {path}")
    if _create_key_file_once(path):
        log.warning("generated a new master key at %s (mode 0600); back it up: without it the data is lost", path)
    return LocalKeyProvider(read_key_file(path), source=str(path), path=path)


def _create_key_file_once(path: Path) -> bool:
    """Create ``path`` with a fresh key unless it exists; safe when processes race (link is atomic)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    write_key_file(tmp, [os.urandom(KEY_BYTES)])
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
