"""Parsing and writing FHIR JSON."""

from __future__ import annotations

from decimal import Decimal

import pytest

from fhir_server import fhirjson
from fhir_server.errors import BadRequest


def test_decimals_keep_their_precision() -> None:
    doc = fhirjson.parse(b'{"a": 1.50, "b": 100, "c": 1e400, "d": -0.0, "e": 12345678901234567890123}', max_depth=10)
    assert doc["a"] == Decimal("1.50") and doc["b"] == 100
    assert fhirjson.dumps(doc) == b'{"a":1.50,"b":100,"c":1E+400,"d":-0.0,"e":12345678901234567890123}'


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"a": 1, "a": 2}', "duplicate property"),
        (b'{"a": NaN}', "not allowed"),
        (b'{"a": Infinity}', "not allowed"),
        (b"{", "not valid JSON"),
        (b"", "empty"),
        (b"   ", "empty"),
        (b"\xff\xfe", "UTF-8"),
        (b'{"a": 1} {"b": 2}', "extra data"),
        (b'{"a": "\\ud800"}', "surrogate"),
        (b"[" * 50 + b"]" * 50, "nested deeper"),
        (b"[" * 5000 + b"]" * 5000, "nested deeper"),
    ],
)
def test_bad_json_is_a_400(body: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        fhirjson.parse(body, max_depth=20)
    assert fragment in str(info.value)


def test_bom_is_accepted_and_pairs_decode() -> None:
    assert fhirjson.parse(b'\xef\xbb\xbf{"a": "\\ud83d\\ude00"}', max_depth=5) == {"a": "\U0001F600"}


def test_raw_fragments_are_embedded_and_pretty_printing_expands_them() -> None:
    raw = fhirjson.RawJson(b'{"x":1.0}')
    assert fhirjson.dumps({"r": raw}) == b'{"r":{"x":1.0}}'
    assert fhirjson.dumps(raw) == b'{"x":1.0}'
    assert fhirjson.dumps({"r": raw}, pretty=True) == b'{\n  "r": {\n    "x": 1.0\n  }\n}'
