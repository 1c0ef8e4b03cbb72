"""Search requests parsed into plain data.

One parser for every source of search criteria: a client's query string (GET or
POST _search), and later conditional headers and SMART granular scopes. The
result is a ``SearchQuery`` of frozen dataclasses; ``search/sql.py`` compiles it.
Malformed input raises ``BadRequest`` naming the parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from fhir_server.errors import BadRequest
from fhir_server.search.dates import InvalidDate, period
from fhir_server.search.parameters import SearchParam, SearchParameters

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_PREFIX = re.compile(r"^(eq|ne|gt|lt|ge|le|sa|eb|ap)(?=[-+0-9.])")
RESULT_PARAMS = {
    "_count", "_sort", "_total", "_summary", "_elements", "_include", "_revinclude", "_format", "_pretty",
    "_cursor", "_contained", "_containedType",
}
MODIFIERS = {
    "string": {"exact", "contains", "missing"},
    "token": {"not", "text", "of-type", "missing"},
    "date": {"missing"},
    "number": {"missing"},
    "quantity": {"missing"},
    "reference": {"identifier", "missing"},
    "uri": {"below", "above", "missing"},
    "special": {"missing"},
}
KNOWN_BUT_UNSUPPORTED = {"in", "not-in", "below", "above", "type", "iterate", "text-advanced", "code-text"}
MAX_VALUES = 100
MAX_CRITERIA = 60


@dataclass(frozen=True, slots=True)
class Criterion:
    """One search parameter with its OR-ed values; criteria are AND-ed."""

    param: SearchParam
    modifier: str | None
    values: tuple[str, ...]
    raw_name: str  # as written, for links and messages

    @property
    def missing(self) -> bool | None:
        if self.modifier != "missing":
            return None
        return self.values[0] == "true"


@dataclass(frozen=True, slots=True)
class SortKey:
    param: SearchParam
    descending: bool


@dataclass(frozen=True, slots=True)
class Include:
    source_type: str
    param: SearchParam | None  # None for "*"
    target_type: str | None
    iterate: bool
    reverse: bool


@dataclass(frozen=True, slots=True)
class SearchQuery:
    resource_types: tuple[str, ...]
    criteria: tuple[Criterion, ...]
    sort: tuple[SortKey, ...] = ()
    count: int = 20
    total: str | None = None  # none | estimate | accurate
    summary: str | None = None  # true | text | data | count | false
    elements: tuple[str, ...] | None = None
    includes: tuple[Include, ...] = ()
    cursor: str | None = None
    ignored: tuple[str, ...] = ()  # parameters ignored under lenient handling
    self_params: tuple[tuple[str, str], ...] = field(default=())  # what the self link shows


def split_values(raw: str) -> list[str]:
    """Split on commas not escaped with a backslash, then unescape \\, \\$ \\| \\\\."""
    out: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw):
            current.append(raw[i : i + 2])
            i += 2
            continue
        if ch == ",":
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    out.append("".join(current))
    return out


def unescape(value: str) -> str:
    return re.sub(r"\\([,$|\\])", r"\1", value)


def split_unescaped(value: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not escaped (used for token system|code)."""
    parts = re.split(r"(?<!\\)" + re.escape(sep), value)
    return [unescape(p) for p in parts]


def split_prefix(value: str) -> tuple[str, str]:
    m = _PREFIX.match(value)
    if m:
        return m.group(1), value[2:]
    return "eq", value


class QueryParser:
    def __init__(self, params: SearchParameters, *, default_count: int, max_count: int) -> None:
        self.params = params
        self.default_count = default_count
        self.max_count = max_count

    def parse(self, resource_types: tuple[str, ...], pairs: list[tuple[str, str]], *, strict: bool) -> SearchQuery:
        criteria: list[Criterion] = []
        ignored: list[str] = []
        shown: list[tuple[str, str]] = []
        sort: tuple[SortKey, ...] = ()
        count = self.default_count
        total = summary = cursor = None
        elements: tuple[str, ...] | None = None
        includes: list[Include] = []
        for name, raw in pairs:
            base, _, modifier = name.partition(":")
            if base in RESULT_PARAMS:
                if base == "_count":
                    count = self._count(raw)
                elif base == "_sort":
                    sort = self._sort(resource_types, raw, strict)
                elif base == "_total":
                    if raw not in ("none", "estimate", "accurate"):
                        raise BadRequest("_total must be none, estimate or accurate", expression="_total")
                    total = raw
                elif base == "_summary":
                    if raw not in ("true", "text", "data", "count", "false"):
                        raise BadRequest("_summary must be true, text, data, count or false", expression="_summary")
                    summary = raw
                elif base == "_elements":
                    elements = tuple(e.strip() for e in raw.split(",") if e.strip())
                elif base in ("_include", "_revinclude"):
                    includes.extend(self._include(resource_types, base, modifier, raw, strict))
                elif base == "_cursor":
                    cursor = raw
                    continue
                elif base in ("_contained", "_containedType"):
                    if raw not in ("false", "entry") and strict:
                        raise BadRequest(f"{base}={raw[:20]} is not supported", expression=base, code="not-supported")
                if base not in ("_format", "_pretty"):
                    shown.append((name, raw))
                continue
            problem = self._criterion(resource_types, name, base, modifier, raw, criteria)
            if problem is None:
                shown.append((name, raw))
            elif strict:
                raise BadRequest(problem, expression=name, code="not-supported")
            else:
                ignored.append(f"{name}: {problem}")
        if len(criteria) > MAX_CRITERIA:
            raise BadRequest(f"At most {MAX_CRITERIA} search criteria are allowed", code="too-costly")
        return SearchQuery(
            resource_types=resource_types,
            criteria=tuple(criteria),
            sort=sort,
            count=count,
            total=total,
            summary=summary,
            elements=elements,
            includes=tuple(includes),
            cursor=cursor,
            ignored=tuple(ignored),
            self_params=tuple(shown),
        )

    # --- criteria -------------------------------------------------------------------------------

    def _criterion(
        self, types: tuple[str, ...], name: str, base: str, modifier: str, raw: str, out: list[Criterion]
    ) -> str | None:
        """Append the criterion; return why it was not understood (None when it was)."""
        if "." in base or base.startswith("_has"):
            return "chained and reverse-chained parameters are not supported yet"
        definitions = [self.params.get(t, base) for t in types]
        if any(d is None for d in definitions):
            where = types[0] if len(types) == 1 else "every type searched"
            return f"unknown search parameter {base!r} for {where}"
        param = definitions[0]
        assert param is not None
        if not all(d is not None and d.supported for d in definitions):
            return f"the search parameter {base!r} is not supported by this server"
        ptype = "special" if param.special else param.type
        if modifier:
            if ptype == "reference" and modifier[:1].isupper():
                if not self.params.registry.is_resource_type(modifier):
                    raise BadRequest(f"Unknown resource type {modifier!r} in {name}", expression=name)
            elif modifier in KNOWN_BUT_UNSUPPORTED and modifier not in MODIFIERS.get(ptype, set()):
                raise BadRequest(f"The modifier :{modifier} is not supported on {base}", expression=name, code="not-supported")
            elif modifier not in MODIFIERS.get(ptype, set()) and not (param.special == "_id" and modifier in ("not", "missing")):
                raise BadRequest(
                    f"Unknown modifier :{modifier} for the {param.type} parameter {base}; "
                    f"allowed: {', '.join(sorted(MODIFIERS.get(ptype, set())))}",
                    expression=name,
                )
        values = [unescape(v) if ptype != "token" else v for v in split_values(raw)]
        if len(values) > MAX_VALUES:
            raise BadRequest(f"At most {MAX_VALUES} values may be OR-ed in {name}", expression=name, code="too-costly")
        if modifier == "missing":
            if raw not in ("true", "false"):
                raise BadRequest(f"{name} must be true or false", expression=name)
        else:
            for v in values:
                self._check_value(param, name, modifier, v)
        out.append(Criterion(param, modifier or None, tuple(values), name))
        return None

    def _check_value(self, param: SearchParam, name: str, modifier: str, value: str) -> None:
        if value == "":
            raise BadRequest(f"{name} has an empty value", expression=name)
        ptype = param.type if not param.special else param.special
        if ptype in ("date", "_lastUpdated"):
            prefix, rest = split_prefix(value)
            try:
                period(rest)
            except InvalidDate:
                raise BadRequest(
                    f"{name}: {value[:40]!r} is not a date; use [prefix]YYYY[-MM[-DD[Thh:mm[:ss][Z|+hh:mm]]]], "
                    "prefixes eq ne gt lt ge le sa eb ap",
                    expression=name,
                ) from None
        elif ptype in ("number", "quantity"):
            prefix, rest = split_prefix(value)
            number = rest.split("|", 1)[0]
            try:
                d = Decimal(number)
                if not d.is_finite():
                    raise InvalidOperation
            except InvalidOperation:
                raise BadRequest(f"{name}: {value[:40]!r} is not a number (with an optional prefix)", expression=name) from None
            if ptype == "number" and "|" in rest:
                raise BadRequest(f"{name}: a number takes no unit", expression=name)
        elif ptype == "string" and modifier != "exact" and _PREFIX.match(value) and re.fullmatch(r"[a-z]{2}[-+0-9.:T]+", value):
            raise BadRequest(
                f"{name}: string parameters take no comparison prefix ({value[:2]!r}); use {name}:exact to search the literal text",
                expression=name,
            )

    def _count(self, raw: str) -> int:
        if not raw.isdigit():
            raise BadRequest(f"_count must be a whole number from 0 to {self.max_count}", expression="_count")
        return min(int(raw), self.max_count)

    def _sort(self, types: tuple[str, ...], raw: str, strict: bool) -> tuple[SortKey, ...]:
        keys = []
        for item in raw.split(","):
            item = item.strip()
            if not item:
                continue
            descending = item.startswith("-")
            code = item[1:] if descending else item
            params = [self.params.get(t, code) for t in types]
            if any(p is None or not p.supported for p in params):
                raise BadRequest(f"Cannot sort by {code!r}: not a supported search parameter here", expression="_sort")
            if params[0] is not None and params[0].type == "composite":
                raise BadRequest(f"Cannot sort by the composite parameter {code!r}", expression="_sort")
            keys.append(SortKey(params[0], descending))  # type: ignore[arg-type]
        return tuple(keys)

    def _include(self, types: tuple[str, ...], name: str, modifier: str, raw: str, strict: bool) -> list[Include]:
        reverse = name == "_revinclude"
        iterate = modifier in ("iterate", "recurse")
        if modifier and not iterate:
            raise BadRequest(f"Unknown modifier :{modifier} on {name}", expression=name)
        if raw == "*":
            return [Include(t, None, None, iterate, reverse) for t in types]
        parts = raw.split(":")
        if len(parts) not in (2, 3):
            raise BadRequest(f"{name} must be Type:parameter[:TargetType] or *", expression=name)
        source = parts[0]
        if not self.params.registry.is_resource_type(source):
            raise BadRequest(f"Unknown resource type {source!r} in {name}", expression=name)
        if parts[1] == "*":
            return [Include(source, None, parts[2] if len(parts) == 3 else None, iterate, reverse)]
        param = self.params.get(source, parts[1])
        if param is None or param.type != "reference" or not param.supported:
            raise BadRequest(f"{name}: {parts[1]!r} is not a reference search parameter of {source}", expression=name)
        target = parts[2] if len(parts) == 3 else None
        if target is not None and not self.params.registry.is_resource_type(target):
            raise BadRequest(f"Unknown resource type {target!r} in {name}", expression=name)
        if not reverse and not iterate and source not in types:
            raise BadRequest(f"_include={raw}: {source} is not the type being searched (use :iterate)", expression=name)
        return [Include(source, param, target, iterate, reverse)]
