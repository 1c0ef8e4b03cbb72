"""FHIR JSON in and out.

Parsing keeps what FHIR needs and orjson would lose: decimals keep their written
precision (``1.50`` stays ``1.50``), duplicate properties are rejected, and
``NaN``/``Infinity`` are refused. Serialising uses orjson, with decimals and
pre-serialised resources (``RawJson``) written through ``orjson.Fragment`` so a
stored body is never parsed again just to be sent.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import orjson

from fhir_server.errors import BadRequest

_LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_MAX_INT_DIGITS = 18  # beyond this an integer literal is kept as a Decimal (orjson handles 64-bit ints only)


class RawJson(bytes):
    """A JSON document already serialised (a stored resource body)."""

    __slots__ = ()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _parse_int(text: str) -> int | Decimal:
    digits = len(text) - (text[0] == "-")
    return int(text) if digits <= _MAX_INT_DIGITS else Decimal(text)


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate property {key!r}")
            seen.add(key)
    return obj


_decoder = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates,
    parse_float=Decimal,
    parse_int=_parse_int,
    parse_constant=_reject_constant,
    strict=True,
)


def parse(data: bytes, *, max_depth: int) -> Any:
    """Parse a request body. Raises BadRequest saying what is wrong and where."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"The body is not valid UTF-8 (byte {exc.start})", code="structure") from None
    if not text.strip():
        raise BadRequest("The request body is empty; a FHIR resource was expected", code="required")
    try:
        value, end = _decoder.raw_decode(text, _skip_space(text, 0))
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"The body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", code="structure"
        ) from None
    except RecursionError:
        raise BadRequest(f"JSON nested deeper than the limit of {max_depth} levels", code="too-costly") from None
    except ValueError as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}", code="structure") from None
    if _skip_space(text, end) != len(text):
        raise BadRequest("The body is not valid JSON: extra data after the document", code="structure")
    check_depth(value, max_depth)
    if _LONE_SURROGATE_ESCAPE.search(data):
        _check_no_lone_surrogates(value)
    return value


def _skip_space(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def check_depth(value: Any, max_depth: int) -> None:
    """Refuse documents nested deeper than max_depth (arrays and objects both count)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise BadRequest(f"JSON nested deeper than the limit of {max_depth} levels", code="too-costly")
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def _check_no_lone_surrogates(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                _check_text(k)
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            _check_text(item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("The body contains an unpaired UTF-16 surrogate escape", code="structure") from None


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return orjson.Fragment(str(obj))
    if isinstance(obj, RawJson):
        return orjson.Fragment(bytes(obj))
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _default_pretty(obj: Any) -> Any:
    if isinstance(obj, RawJson):
        # A fragment is written verbatim; parse it so that it is indented like the rest.
        return loads_stored(obj)
    return _default(obj)


def dumps(value: Any, *, pretty: bool = False) -> bytes:
    if pretty:
        return orjson.dumps(value, default=_default_pretty, option=orjson.OPT_INDENT_2)
    if isinstance(value, RawJson):
        return bytes(value)
    return orjson.dumps(value, default=_default)


def canonical(value: Any) -> bytes:
    """``value`` serialised with every object's keys sorted: the same bytes for the same content, whatever the
    order its properties came in (which JSON, and FHIR, give no meaning)."""
    return orjson.dumps(value, default=_default, option=orjson.OPT_SORT_KEYS)


def loads_stored(data: bytes) -> Any:
    """Parse a body this server wrote (trusted, already validated), keeping decimals exact."""
    return json.loads(data, parse_float=Decimal, parse_int=_parse_int)
