"""Property-based: date, number and quantity prefixes against a reference implementation written here.

The reference follows the FHIR R4 definitions of the prefixes literally (search.html, "prefix"),
over half-open ranges computed independently of the server's code with datetime and Decimal:

  eq  the search range fully contains the target range
  ne  it does not
  gt  the range above the search value overlaps the target
  lt  the range below the search value overlaps the target
  ge  gt, or eq          le  lt, or eq
  sa  the target lies entirely above the search range
  eb  the target lies entirely below the search range

``ap`` is implementation-defined (the spec recommends about 10%) and is tested by example elsewhere.
"""

from __future__ import annotations

import calendar
import datetime as dt
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_server.engine.engine import Engine
from testsupport.engine_calls import call, resource

PREFIXES = ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
UTC = dt.timezone.utc


# --- the reference -------------------------------------------------------------------------------

def matches(prefix: str, s_lo: Any, s_hi: Any, t_lo: Any, t_hi: Any) -> bool:
    contains = s_lo <= t_lo and t_hi <= s_hi
    above = t_hi > s_hi
    below = t_lo < s_lo
    return {
        "eq": contains,
        "ne": not contains,
        "gt": above,
        "lt": below,
        "ge": above or contains,
        "le": below or contains,
        "sa": t_lo >= s_hi,
        "eb": t_hi <= s_lo,
    }[prefix]


def date_interval(text: str) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of a FHIR date/dateTime, written without the server's parser."""
    date_part, _, time_part = text.partition("T")
    pieces = [int(x) for x in date_part.split("-")]
    if len(pieces) == 1:
        start = dt.datetime(pieces[0], 1, 1, tzinfo=UTC)
        return start, start.replace(year=pieces[0] + 1)
    if len(pieces) == 2:
        start = dt.datetime(pieces[0], pieces[1], 1, tzinfo=UTC)
        return start, start + dt.timedelta(days=calendar.monthrange(pieces[0], pieces[1])[1])
    if not time_part:
        start = dt.datetime(*pieces, tzinfo=UTC)
        return start, start + dt.timedelta(days=1)
    zone = UTC
    for sign in ("Z", "+", "-"):
        if sign in time_part:
            clock, _, offset = time_part.partition(sign)
            if sign != "Z":
                h, m = offset.split(":")
                delta = dt.timedelta(hours=int(h), minutes=int(m))
                zone = dt.timezone(delta if sign == "+" else -delta)
            time_part = clock
            break
    fields = time_part.split(":")
    hour, minute = int(fields[0]), int(fields[1])
    if len(fields) == 2:
        start = dt.datetime(*pieces, hour, minute, tzinfo=zone)
        return start, start + dt.timedelta(minutes=1)
    sec, _, frac = fields[2].partition(".")
    micro = int((frac + "000000")[:6]) if frac else 0
    start = dt.datetime(*pieces, hour, minute, int(sec), micro, tzinfo=zone)
    step = dt.timedelta(microseconds=10 ** (6 - len(frac))) if frac else dt.timedelta(seconds=1)
    return start, start + step


def decimal_interval(text: str) -> tuple[Decimal, Decimal]:
    d = Decimal(text)
    half = Decimal(5) * Decimal(10) ** (d.as_tuple().exponent - 1)  # type: ignore[operator]
    return d - half, d + half


# --- strategies ----------------------------------------------------------------------------------

@st.composite
def fhir_datetimes(draw: Any, *, with_time: bool = True, stored: bool = False) -> str:
    """Dates and dateTimes of every precision (a stored dateTime has seconds if it has a time)."""
    year = draw(st.integers(2019, 2021))
    precisions = ["y", "m", "d", "min", "s", "ms"] if with_time else ["y", "m", "d"]
    if stored:
        precisions = [p for p in precisions if p != "min"]
    precision = draw(st.sampled_from(precisions))
    month = draw(st.integers(1, 12))
    day = draw(st.integers(1, calendar.monthrange(year, month)[1]))
    if precision == "y":
        return f"{year}"
    if precision == "m":
        return f"{year}-{month:02d}"
    if precision == "d":
        return f"{year}-{month:02d}-{day:02d}"
    hour, minute, second = draw(st.integers(0, 23)), draw(st.integers(0, 59)), draw(st.integers(0, 59))
    zone = draw(st.sampled_from(["Z", "+02:00", "-05:00", "+00:00"]))
    if precision == "min":
        return f"{year}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}{zone}"
    if precision == "s":
        return f"{year}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}{zone}"
    ms = draw(st.integers(0, 999))
    return f"{year}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}.{ms:03d}{zone}"


@st.composite
def decimals(draw: Any) -> str:
    digits = draw(st.integers(1, 9999))
    scale = draw(st.integers(0, 3))
    return str(Decimal(digits).scaleb(-scale)) if scale else str(digits)


def _found(engine: Engine, tenant: str, rtype: str, rid: str, param: str, value: str) -> bool:
    b = resource(call(engine, tenant, "GET", rtype, params=(("_id", rid), (param, value))))
    return bool(b.get("entry"))


# --- properties ----------------------------------------------------------------------------------

@SETTINGS
@given(stored=fhir_datetimes(stored=True), searched=fhir_datetimes(), prefix=st.sampled_from(PREFIXES))
def test_date_prefixes_match_the_reference(engine: Engine, tenant: str, stored: str, searched: str, prefix: str) -> None:
    body = {"resourceType": "Observation", "id": "d", "status": "final", "code": {"text": "x"}, "effectiveDateTime": stored}
    call(engine, tenant, "PUT", "Observation/d", body)
    t_lo, t_hi = date_interval(stored)
    s_lo, s_hi = date_interval(searched)
    expected = matches(prefix, s_lo, s_hi, t_lo, t_hi)
    assert _found(engine, tenant, "Observation", "d", "date", prefix + searched) == expected, (stored, prefix + searched)


@SETTINGS
@given(start=fhir_datetimes(with_time=False), end=fhir_datetimes(with_time=False), searched=fhir_datetimes(), prefix=st.sampled_from(PREFIXES))
def test_period_prefixes_match_the_reference(engine: Engine, tenant: str, start: str, end: str, searched: str, prefix: str) -> None:
    lo_start, _ = date_interval(start)
    _, hi_end = date_interval(end)
    if hi_end <= lo_start:
        start, end = end, start
        lo_start, _ = date_interval(start)
        _, hi_end = date_interval(end)
    body = {"resourceType": "Observation", "id": "p", "status": "final", "code": {"text": "x"},
            "effectivePeriod": {"start": start, "end": end}}
    call(engine, tenant, "PUT", "Observation/p", body)
    s_lo, s_hi = date_interval(searched)
    expected = matches(prefix, s_lo, s_hi, lo_start, hi_end)
    assert _found(engine, tenant, "Observation", "p", "date", prefix + searched) == expected, (start, end, prefix + searched)


@SETTINGS
@given(stored=decimals(), searched=decimals(), prefix=st.sampled_from(PREFIXES))
def test_number_prefixes_match_the_reference(engine: Engine, tenant: str, stored: str, searched: str, prefix: str) -> None:
    from fhir_server import fhirjson

    value = fhirjson.parse(stored.encode(), max_depth=2)
    call(engine, tenant, "PUT", "RiskAssessment/n", {"resourceType": "RiskAssessment", "id": "n", "status": "final",
                                                      "subject": {"reference": "Patient/x"}, "prediction": [{"probabilityDecimal": value}]})
    t_lo, t_hi = decimal_interval(stored)
    s_lo, s_hi = decimal_interval(searched)
    expected = matches(prefix, s_lo, s_hi, t_lo, t_hi)
    assert _found(engine, tenant, "RiskAssessment", "n", "probability", prefix + searched) == expected, (stored, prefix + searched)


@SETTINGS
@given(stored=decimals(), searched=decimals(), prefix=st.sampled_from(PREFIXES),
       units=st.sampled_from([("mg", "mg", Decimal(1)), ("mg", "g", Decimal("0.001")), ("g", "mg", Decimal(1000)), ("mg", "kg", Decimal("0.000001"))]))
def test_quantity_prefixes_match_the_reference(engine: Engine, tenant: str, stored: str, searched: str, prefix: str,
                                               units: tuple[str, str, Decimal]) -> None:
    from fhir_server import fhirjson

    stored_unit, search_unit, stored_per_search = units  # 1 stored_unit is stored_per_search search_units
    value = fhirjson.parse(stored.encode(), max_depth=2)
    call(engine, tenant, "PUT", "Observation/q", {"resourceType": "Observation", "id": "q", "status": "final", "code": {"text": "x"},
                                                   "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": stored_unit}})
    t_lo, t_hi = decimal_interval(stored)
    # Express the stored range in the search unit, exactly.
    t_lo, t_hi = t_lo * stored_per_search, t_hi * stored_per_search
    s_lo, s_hi = decimal_interval(searched)
    expected = matches(prefix, s_lo, s_hi, t_lo, t_hi)
    query = f"{prefix}{searched}|http://unitsofmeasure.org|{search_unit}"
    assert _found(engine, tenant, "Observation", "q", "value-quantity", query) == expected, (stored, stored_unit, query)
