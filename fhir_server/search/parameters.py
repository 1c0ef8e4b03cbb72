"""The search parameters of every resource type, from the official definitions (and, later, custom ones).

Each (resource type, code) pair is a ``SearchParam`` with its expression narrowed to
that type and compiled once. ``param_key`` is the fixed 64-bit key of the pair that
index rows carry: a contract, like the blind-index function (changing it orphans
every index row).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Protocol

from fhir_server.capability.registry import Registry, load_registry
from fhir_server.search.paths import CompiledPath, PathError, Typed, parts_for_type, split_union

# Parameters the server does not implement (full-text search and named queries).
UNSUPPORTED = frozenset({"_content", "_text", "_query"})
# Types whose values this server can index and query.
INDEXED_TYPES = frozenset({"number", "date", "string", "token", "reference", "quantity", "uri", "composite"})
# What the components of a composite may be: the first is matched by hash, the others by hash or range.
COMPOSITE_FIRST = frozenset({"token", "reference"})
COMPOSITE_REST = frozenset({"token", "string", "quantity", "number", "date"})


def param_key(resource_type: str, code: str) -> int:
    """The fixed key of a (resource type, parameter) pair in every index row."""
    digest = hashlib.sha256(f"fhir-search-param/v1\x00{resource_type}\x00{code}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class Component:
    definition: str  # url of the component's own SearchParameter
    expression: str  # relative to the composite's root
    type: str = ""  # the component parameter's type
    paths: tuple[CompiledPath, ...] = ()

    def evaluate(self, resource: dict[str, Any], root: Typed) -> list[Typed]:
        return [v for path in self.paths for v in path.evaluate(resource, [root])]


@dataclass(slots=True)
class SearchParam:
    code: str
    type: str
    resource_type: str
    url: str
    expression: str | None
    paths: tuple[CompiledPath, ...]
    targets: tuple[str, ...]
    key: int
    components: tuple[Component, ...] = ()
    supported: bool = True
    special: str | None = None  # "_id" | "_lastUpdated": answered from the resources table
    derived: dict[str, int] = field(default_factory=dict)  # sub-index keys (":text", ":of-type", ":identifier"...)
    # Parameters whose values together are exactly this one's (combo-code: code and component-code): it has no
    # index rows of its own, and is searched as the OR of them (see ``unions``).
    union_of: tuple[SearchParam, ...] = ()

    def sub_key(self, suffix: str) -> int:
        key = self.derived.get(suffix)
        if key is None:
            key = param_key(self.resource_type, self.code + suffix)
            self.derived[suffix] = key
        return key


class ParameterSource(Protocol):
    """What the extractor, the parser and the compiler need: the official parameters, or a tenant's view."""

    registry: Registry
    by_url: dict[str, dict[str, Any]]

    def get(self, rtype: str, code: str) -> SearchParam | None: ...

    def for_type(self, rtype: str) -> dict[str, SearchParam]: ...

    def indexed(self, rtype: str) -> list[SearchParam]: ...

    def usable(self, param: SearchParam) -> str | None: ...


class SearchParameters:
    """Read-only after construction: (type, code) -> SearchParam, and url -> definition."""

    def __init__(self, registry: Registry, definitions: list[dict[str, Any]]) -> None:
        self.registry = registry
        self.by_url: dict[str, dict[str, Any]] = {d["url"]: d for d in definitions}
        self._by_type: dict[str, dict[str, SearchParam]] = {t: {} for t in registry.resource_types}
        for d in definitions:
            bases = d["base"]
            types = registry.resource_types if set(bases) & {"Resource", "DomainResource"} else bases
            for rtype in types:
                if rtype not in self._by_type:
                    continue
                self._by_type[rtype][d["code"]] = self._make(rtype, d)
        for params in self._by_type.values():
            unions(params)

    def _make(self, rtype: str, d: dict[str, Any]) -> SearchParam:
        code, ptype = d["code"], d["type"]
        expression = d.get("expression")
        parts = parts_for_type(expression, rtype) if expression else []
        special = code if code in ("_id", "_lastUpdated") else None
        components: tuple[Component, ...] = ()
        if ptype == "composite":
            components = tuple(
                Component(
                    c["definition"],
                    c["expression"],
                    self.by_url.get(c["definition"], {}).get("type", ""),
                    tuple(CompiledPath(self.registry, rtype, part, relative=True) for part in split_union(c["expression"])),
                )
                for c in d.get("component", ())
            )
        supported = (
            code not in UNSUPPORTED
            and (ptype in INDEXED_TYPES)
            and (bool(parts) or special is not None)
            and (
                ptype != "composite"
                or (
                    len(components) >= 2
                    and components[0].type in COMPOSITE_FIRST
                    and all(c.type in COMPOSITE_REST for c in components[1:])
                    and (len(components) == 2 or all(c.type == "number" for c in components[1:]))
                )
            )
        )
        paths: tuple[CompiledPath, ...] = ()
        if supported and not special:
            try:
                paths = tuple(CompiledPath(self.registry, rtype, p) for p in parts)
            except PathError:
                supported = False
        return SearchParam(
            code=code,
            type=ptype,
            resource_type=rtype,
            url=d["url"],
            expression=" | ".join(parts) if parts else expression,
            paths=paths,
            targets=tuple(d.get("target", ())),
            key=param_key(rtype, code),
            components=components,
            supported=supported,
            special=special,
        )

    def make_custom(self, rtype: str, definition: dict[str, Any]) -> SearchParam:
        """A parameter for a custom definition (search/custom.py), compiled like the official ones."""
        return self._make(rtype, definition)

    def for_type(self, rtype: str) -> dict[str, SearchParam]:
        return self._by_type.get(rtype, {})

    def get(self, rtype: str, code: str) -> SearchParam | None:
        return self._by_type.get(rtype, {}).get(code)

    def usable(self, param: SearchParam) -> str | None:
        """None when the parameter can be searched now; otherwise why not (a custom one still indexing)."""
        return None

    def indexed(self, rtype: str) -> list[SearchParam]:
        """The parameters whose values are extracted into index rows on every write of ``rtype``."""
        return [p for p in self.for_type(rtype).values() if p.supported and p.special is None and not p.union_of]


def _parts(p: SearchParam) -> tuple[str, ...]:
    return tuple(p.expression.split(" | ")) if p.expression else ()


def _shape(p: SearchParam) -> tuple[object, ...]:
    """What besides its expression makes two parameters index alike: type, targets, and a composite's components."""
    return p.type, p.targets, tuple((c.expression, c.type) for c in p.components)


def unions(params: dict[str, SearchParam]) -> None:
    """Mark the parameters of one type whose expression is the union of other parameters' expressions, of the
    same type and shape (R4: Observation's combo-code, combo-value-quantity, combo-code-value-quantity...).

    Their values are exactly their parts' values, so their index rows would repeat their parts' rows (for an
    Observation, about 40 % of them); they are searched as the OR of their parts instead. Only parameters whose
    parts are indexed on their own qualify, and each part of the expression is claimed once.
    """
    # Fewest parts first: a union is marked before it could be taken for a part of a larger one (it has no rows).
    candidates = sorted((p for p in params.values() if p.supported and p.special is None), key=lambda p: len(_parts(p)))
    for p in candidates:
        whole = _parts(p)
        if len(whole) < 2:
            continue
        rest = set(whole)
        found: list[SearchParam] = []
        for q in candidates:
            mine = set(_parts(q))
            if q is not p and not q.union_of and _shape(q) == _shape(p) and mine and mine <= rest and len(mine) < len(whole):
                found.append(q)
                rest -= mine
        if not rest and len(found) >= 2:
            p.union_of = tuple(found)


@cache
def load_search_parameters() -> SearchParameters:
    with resources.files("fhir_server.capability").joinpath("data/search_parameters.json").open("rb") as fh:
        data = json.load(fh)
    return SearchParameters(load_registry(), data["parameters"])
