"""FHIR dates as the periods they cover.

A FHIR date, dateTime or instant denotes a period as long as its precision:
``2024`` is the whole year, ``2024-05-01T10:00`` a minute, ``...:30.25`` a
hundredth of a second. ``period`` returns that period as inclusive microsecond
bounds (UTC). A value without a time zone is taken as UTC.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re

from fhir_server.clock import from_datetime

_DATE_TIME = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)


class InvalidDate(ValueError):
    pass


def period(value: str) -> tuple[int, int]:
    """The inclusive [low, high] microsecond bounds of a FHIR date/dateTime/instant."""
    m = _DATE_TIME.fullmatch(value)
    if m is None:
        raise InvalidDate(value)
    try:
        year = int(m["y"])
        if m["m"] is None:
            low = dt.datetime(year, 1, 1, tzinfo=dt.timezone.utc)
            high = dt.datetime(year + 1, 1, 1, tzinfo=dt.timezone.utc) if year < 9999 else None
            return _bounds(low, high)
        month = int(m["m"])
        if m["d"] is None:
            low = dt.datetime(year, month, 1, tzinfo=dt.timezone.utc)
            days = calendar.monthrange(year, month)[1]
            return _bounds(low, low + dt.timedelta(days=days))
        day = int(m["d"])
        if m["H"] is None:
            low = dt.datetime(year, month, day, tzinfo=dt.timezone.utc)
            return _bounds(low, low + dt.timedelta(days=1))
        tz = _zone(m["tz"])
        hour, minute = int(m["H"]), int(m["M"])
        if m["S"] is None:
            low = dt.datetime(year, month, day, hour, minute, tzinfo=tz)
            return _bounds(low, low + dt.timedelta(minutes=1))
        second = int(m["S"])
        leap = second == 60
        if leap:
            second = 59
        frac = m["f"]
        micro = int((frac + "000000")[:6]) if frac else 0
        low = dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
        if leap:
            low += dt.timedelta(seconds=1)
        step = dt.timedelta(microseconds=10 ** (6 - min(len(frac), 6))) if frac else dt.timedelta(seconds=1)
        return _bounds(low, low + step)
    except (ValueError, OverflowError):
        raise InvalidDate(value) from None


def _zone(text: str | None) -> dt.tzinfo:
    if text is None or text == "Z":
        return dt.timezone.utc
    sign = 1 if text[0] == "+" else -1
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 14 or minutes > 59:
        raise ValueError(text)
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))


def _bounds(low: dt.datetime, high_exclusive: dt.datetime | None) -> tuple[int, int]:
    lo = from_datetime(low)
    if high_exclusive is None:
        return lo, from_datetime(dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.timezone.utc))
    return lo, from_datetime(high_exclusive) - 1
