"""Time as the server stores and shows it.

Stored: integer microseconds since the Unix epoch (UTC). Shown: FHIR instants
(``2024-05-01T10:20:30.123456Z``) and HTTP dates (RFC 9110, second precision).
"""

from __future__ import annotations

import datetime as dt
import time
from email.utils import format_datetime, parsedate_to_datetime

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def now_us() -> int:
    return time.time_ns() // 1000


def to_datetime(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=us)


def from_datetime(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    delta = value - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def instant(us: int) -> str:
    """A FHIR instant with microsecond precision in UTC."""
    return to_datetime(us).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def http_date(us: int) -> str:
    return format_datetime(to_datetime(us).replace(microsecond=0), usegmt=True)


def parse_http_date(value: str) -> int | None:
    """Microseconds of an HTTP date, or None if it is not one."""
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    return from_datetime(parsed)
