"""Page cursors and Bundle links.

A cursor is opaque to clients (base64url of a small JSON document): the snapshot
bound of the first page (so pages do not shift while data changes) and the
position of the last or first entry shown. A malformed cursor is a 400.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson

from fhir_server.errors import BadRequest

CURSOR_PARAM = "_cursor"


@dataclass(frozen=True, slots=True)
class Cursor:
    snapshot: int  # newest last_updated visible to this paging session
    direction: str  # "next" | "prev"
    key: tuple[Any, ...]

    def encode(self) -> str:
        raw = orjson.dumps({"s": self.snapshot, "d": self.direction, "k": list(self.key)})
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            data = orjson.loads(raw)
            snapshot, direction, key = data["s"], data["d"], data["k"]
            if not isinstance(snapshot, int) or direction not in ("next", "prev") or not isinstance(key, list):
                raise ValueError
        except (binascii.Error, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            raise BadRequest(f"Invalid {CURSOR_PARAM}: use the links of a previous page", expression=CURSOR_PARAM) from None
        return cls(snapshot, direction, tuple(key))


def page_url(base: str, params: list[tuple[str, str]], cursor: Cursor | None = None) -> str:
    query = [(k, v) for k, v in params if k != CURSOR_PARAM]
    if cursor is not None:
        query.append((CURSOR_PARAM, cursor.encode()))
    return f"{base}?{urlencode(query)}" if query else base


def parse_count(value: str | None, default: int, maximum: int) -> int:
    """``_count``: a whole number from 0 to the configured maximum (larger values are capped)."""
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(f"_count must be a whole number from 0 to {maximum}, not {value[:40]!r}", expression="_count")
    return min(int(value), maximum)
