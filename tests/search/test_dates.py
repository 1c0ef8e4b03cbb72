"""FHIR dates as periods."""

from __future__ import annotations

import datetime as dt

import pytest

from fhir_server.clock import from_datetime
from fhir_server.search.dates import InvalidDate, period

UTC = dt.timezone.utc


def us(*args: int, tz: dt.tzinfo = UTC) -> int:
    return from_datetime(dt.datetime(*args, tzinfo=tz))  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("2024", us(2024, 1, 1), us(2025, 1, 1) - 1),
        ("2024-02", us(2024, 2, 1), us(2024, 3, 1) - 1),
        ("2023-02", us(2023, 2, 1), us(2023, 3, 1) - 1),
        ("2024-02-29", us(2024, 2, 29), us(2024, 3, 1) - 1),
        ("2024-02-29T10:00", us(2024, 2, 29, 10), us(2024, 2, 29, 10, 1) - 1),
        ("2024-02-29T10:00:05Z", us(2024, 2, 29, 10, 0, 5), us(2024, 2, 29, 10, 0, 6) - 1),
        ("2024-02-29T10:00:05.25+02:00", us(2024, 2, 29, 8, 0, 5, 250000), us(2024, 2, 29, 8, 0, 5, 260000) - 1),
        ("2024-12-31T23:59:60Z", us(2025, 1, 1), us(2025, 1, 1, 0, 0, 1) - 1),
    ],
)
def test_periods(value: str, low: int, high: int) -> None:
    assert period(value) == (low, high)


@pytest.mark.parametrize("value", ["", "2024-13", "2023-02-29", "2024-01-01T25:00", "x", "2024-01-01T10:00+15:00", "2024-1-1"])
def test_invalid(value: str) -> None:
    with pytest.raises(InvalidDate):
        period(value)
