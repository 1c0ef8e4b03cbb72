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
from fhir_server.search.parameters import ParameterSource, SearchParam

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
MAX_CHAIN = 4  # links in a chain, and nesting of _has
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


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
class Chain:
    """``param.inner``: resources whose reference ``param`` points at a ``target_type`` matching ``inner``."""

    param: SearchParam
    target_type: str
    inner: Clause
    raw_name: str


@dataclass(frozen=True, slots=True)
class Has:
    """``_has:source:param:inner``: resources that some ``source`` resource matching ``inner`` references by ``param``."""

    source_type: str
    param: SearchParam
    inner: Clause
    raw_name: str


@dataclass(frozen=True, slots=True)
class AnyOf:
    """At least one of the options (a chain through several possible target types; a compartment)."""

    options: tuple[Clause, ...]
    raw_name: str


@dataclass(frozen=True, slots=True)
class AllOf:
    """Every one of the clauses (a scope's compartment and its criteria, as one option of an AnyOf)."""

    clauses: tuple[Clause, ...]
    raw_name: str


@dataclass(frozen=True, slots=True)
class InList:
    """``_list=id``: resources that List/id has as an entry item."""

    list_id: str
    raw_name: str


Clause = Criterion | Chain | Has | AnyOf | AllOf | InList


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
    by_type: dict[str, tuple[Clause, ...]]  # the criteria (AND-ed), resolved for each type searched
    sort: tuple[SortKey, ...] = ()
    count: int = 20
    total: str | None = None  # none | estimate | accurate
    summary: str | None = None  # true | text | data | count | false
    elements: tuple[str, ...] | None = None
    includes: tuple[Include, ...] = ()
    cursor: str | None = None
    ignored: tuple[str, ...] = ()  # parameters ignored under lenient handling
    self_params: tuple[tuple[str, str], ...] = field(default=())  # what the self link shows

    @property
    def criteria(self) -> tuple[Clause, ...]:
        return self.by_type[self.resource_types[0]]


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


def _looks_like_date(text: str) -> bool:
    """A value such as ge2020-01 on a string parameter is a date prefix sent to the wrong kind of parameter."""
    if not re.fullmatch(r"\d{4}(-\d{2}(-\d{2}(T[0-9:.+\-Z]+)?)?)?", text):
        return False
    try:
        period(text)
    except InvalidDate:
        return False
    return True


def split_prefix(value: str) -> tuple[str, str]:
    m = _PREFIX.match(value)
    if m:
        return m.group(1), value[2:]
    return "eq", value


class QueryParser:
    def __init__(self, params: ParameterSource, *, default_count: int, max_count: int) -> None:
        self.params = params
        self.default_count = default_count
        self.max_count = max_count

    def parse(
        self,
        resource_types: tuple[str, ...],
        pairs: list[tuple[str, str]],
        *,
        strict: bool,
        extra: dict[str, tuple[Clause, ...]] | None = None,
    ) -> SearchQuery:
        """Parse a search; ``extra`` adds clauses per type (a compartment's membership)."""
        by_type: dict[str, list[Clause]] = {t: list((extra or {}).get(t, ())) for t in resource_types}
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
            clauses: dict[str, Clause] = {}
            problem = None
            for rtype in resource_types:
                found = self.clause(rtype, name, raw)
                if isinstance(found, str):
                    problem = found if len(resource_types) == 1 else f"{found} (searching {rtype})"
                    break
                clauses[rtype] = found
            if problem is None:
                for rtype, clause in clauses.items():
                    by_type[rtype].append(clause)
                shown.append((name, raw))
            elif strict:
                raise BadRequest(problem, expression=name, code="not-supported")
            else:
                ignored.append(f"{name}: {problem}")
        if any(len(c) > MAX_CRITERIA for c in by_type.values()):
            raise BadRequest(f"At most {MAX_CRITERIA} search criteria are allowed", code="too-costly")
        return SearchQuery(
            resource_types=resource_types,
            by_type={t: tuple(c) for t, c in by_type.items()},
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

    def clause(self, rtype: str, name: str, raw: str, depth: int = 0) -> Clause | str:
        """The clause ``name=raw`` means on ``rtype``, or why it is not understood (a string).

        Malformed values raise BadRequest at once; an unknown or unsupported parameter is returned
        as a problem, which lenient handling ignores and strict handling reports.
        """
        if _CONTROL.search(raw) or _CONTROL.search(name):
            raise BadRequest(f"{name[:80]}: search values may not contain control characters", expression=name[:80])
        if depth > MAX_CHAIN:
            raise BadRequest(f"{name[:80]}: chains and _has nest at most {MAX_CHAIN} deep", expression=name, code="too-costly")
        if name.startswith("_has:"):
            return self._has(rtype, name, raw, depth)
        if "." in name:
            return self._chain(rtype, name, raw, depth)
        base, _, modifier = name.partition(":")
        if base == "_list":
            if modifier:
                raise BadRequest("_list takes no modifier", expression=name)
            if raw.startswith("$"):
                return f"functional lists ({raw[:40]}) are not supported"
            if not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", raw):
                raise BadRequest(f"_list must be the id of a List, not {raw[:40]!r}", expression=name)
            return InList(raw, name)
        param = self.params.get(rtype, base)
        if param is None:
            return f"unknown search parameter {base!r} for {rtype}"
        if not param.supported:
            return f"the search parameter {base!r} is not supported by this server"
        usable = self.params.usable(param)
        if usable is not None:
            return usable
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
        values = [unescape(v) if ptype not in ("token", "composite") else v for v in split_values(raw)]
        if len(values) > MAX_VALUES:
            raise BadRequest(f"At most {MAX_VALUES} values may be OR-ed in {name}", expression=name, code="too-costly")
        if modifier == "missing":
            if raw not in ("true", "false"):
                raise BadRequest(f"{name} must be true or false", expression=name)
        else:
            for v in values:
                self._check_value(param, name, modifier, v)
        return Criterion(param, modifier or None, tuple(values), name)

    def _chain(self, rtype: str, name: str, raw: str, depth: int) -> Clause | str:
        head, _, rest = name.partition(".")
        code, _, type_modifier = head.partition(":")
        param = self.params.get(rtype, code)
        if param is None:
            return f"unknown search parameter {code!r} for {rtype} (in the chain {name[:80]})"
        if param.type != "reference" or not param.supported:
            raise BadRequest(f"{name[:80]}: only reference parameters can be chained, and {code!r} is a {param.type}", expression=name)
        if type_modifier:
            if not self.params.registry.is_resource_type(type_modifier):
                raise BadRequest(f"Unknown resource type {type_modifier!r} in {name[:80]}", expression=name)
            targets: tuple[str, ...] = (type_modifier,)
        else:
            targets = param.targets or self.params.registry.resource_types
        options: list[Clause] = []
        problem = None
        for target in targets:
            inner = self.clause(target, rest, raw, depth + 1)
            if isinstance(inner, str):
                problem = problem or inner
                continue
            options.append(Chain(param, target, inner, name))
        if not options:
            return problem or f"{name[:80]}: no type {code!r} can point at has that parameter"
        return options[0] if len(options) == 1 else AnyOf(tuple(options), name)

    def _has(self, rtype: str, name: str, raw: str, depth: int) -> Clause | str:
        parts = name.split(":", 3)
        if len(parts) < 4:
            raise BadRequest(f"{name[:80]}: use _has:Type:reference-parameter:parameter=value", expression=name)
        _, source, ref_code, inner_name = parts
        if not self.params.registry.is_resource_type(source):
            raise BadRequest(f"Unknown resource type {source!r} in {name[:80]}", expression=name)
        param = self.params.get(source, ref_code)
        if param is None or param.type != "reference" or not param.supported:
            raise BadRequest(f"{name[:80]}: {ref_code!r} is not a reference parameter of {source}", expression=name)
        if param.targets and rtype not in param.targets:
            raise BadRequest(f"{name[:80]}: {source}.{ref_code} cannot point at a {rtype}", expression=name)
        inner = self.clause(source, inner_name, raw, depth + 1)
        if isinstance(inner, str):
            return inner
        return Has(source, param, inner, name)

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
        elif ptype == "string" and modifier != "exact" and _PREFIX.match(value) and _looks_like_date(value[2:]):
            raise BadRequest(
                f"{name}: string parameters take no comparison prefix ({value[:2]!r}); use {name}:exact to search the literal text",
                expression=name,
            )

    def _count(self, raw: str) -> int:
        if not (raw.isascii() and raw.isdigit()):
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
