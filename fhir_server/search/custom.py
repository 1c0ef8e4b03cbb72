"""Custom search parameters: SearchParameter resources a tenant stores, on top of the official ones.

A stored SearchParameter with status ``active``, a ``code``, ``base`` types, a ``type`` this server
indexes and an ``expression`` becomes a parameter of the tenant. Its values are extracted on every
write from then on, and a reindex job extracts them for the resources already stored; until that job
has finished, the parameter is reported as not yet usable instead of giving partial results.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from fhir_server.capability.registry import Registry
from fhir_server.errors import BadRequest
from fhir_server.search.parameters import SearchParam, SearchParameters
from fhir_server.search.paths import parts_for_type

CUSTOM_TYPES = frozenset({"number", "date", "string", "token", "reference", "quantity", "uri"})
_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-_]{0,63}")
READY = "ready"
INDEXING = "indexing"


@dataclass(frozen=True, slots=True)
class CustomDefinition:
    resource_id: str
    url: str
    code: str
    type: str
    bases: tuple[str, ...]  # concrete resource types
    expression: str
    targets: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        """What the index rows depend on: a changed fingerprint needs a reindex."""
        material = json.dumps([self.code, self.type, sorted(self.bases), self.expression, sorted(self.targets)])
        return hashlib.sha256(material.encode()).hexdigest()[:32]

    def as_definition(self) -> dict[str, Any]:
        return {"url": self.url, "code": self.code, "type": self.type, "base": list(self.bases),
                "expression": self.expression, "target": list(self.targets)}


def definition_of(base: SearchParameters, resource: dict[str, Any], *, strict: bool) -> CustomDefinition | None:
    """The custom parameter a SearchParameter resource defines, None if it defines none (not active).

    With ``strict`` (a write), a definition this server cannot use is a 400 that says why; otherwise
    (loading what is stored) it is skipped.
    """
    if resource.get("status") != "active":
        return None
    try:
        return _definition(base, resource)
    except BadRequest:
        if strict:
            raise
        return None


def _definition(base: SearchParameters, resource: dict[str, Any]) -> CustomDefinition:
    registry: Registry = base.registry
    code = resource.get("code")
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        raise BadRequest("SearchParameter.code must be letters, digits, '-' or '_' (no ':' or '.')", expression="SearchParameter.code")
    ptype = resource.get("type")
    if ptype not in CUSTOM_TYPES:
        raise BadRequest(
            f"SearchParameter.type {str(ptype)[:20]!r} is not supported for custom parameters; use one of "
            f"{', '.join(sorted(CUSTOM_TYPES))}",
            expression="SearchParameter.type",
            code="not-supported",
        )
    expression = resource.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise BadRequest("An active SearchParameter needs an expression (FHIRPath)", expression="SearchParameter.expression")
    raw_bases = resource.get("base") or []
    bases: list[str] = []
    for b in raw_bases:
        if b in ("Resource", "DomainResource"):
            bases.extend(registry.resource_types)
        elif registry.is_resource_type(b):
            bases.append(b)
        else:
            raise BadRequest(f"SearchParameter.base names an unknown resource type {str(b)[:64]!r}", expression="SearchParameter.base")
    if not bases:
        raise BadRequest("An active SearchParameter needs at least one base type", expression="SearchParameter.base")
    for rtype in dict.fromkeys(bases):
        existing = base.get(rtype, code)
        if existing is not None:
            raise BadRequest(
                f"{rtype} already has a search parameter {code!r} ({existing.url}); choose another code",
                expression="SearchParameter.code",
                code="duplicate",
            )
        parts = parts_for_type(expression, rtype)
        if not parts:
            raise BadRequest(
                f"The expression has no part for {rtype} (parts start with the type name, e.g. {rtype}.extension(...))",
                expression="SearchParameter.expression",
            )
        probe = base.make_custom(rtype, {"url": "", "code": code, "type": ptype, "base": [rtype], "expression": expression})
        if not probe.supported:
            raise BadRequest(f"The expression {expression[:120]!r} cannot be evaluated by this server", expression="SearchParameter.expression")
    url = resource.get("url") if isinstance(resource.get("url"), str) else f"urn:custom-search-parameter:{resource.get('id')}"
    return CustomDefinition(
        resource_id=str(resource.get("id", "")),
        url=str(url),
        code=code,
        type=str(ptype),
        bases=tuple(dict.fromkeys(bases)),
        expression=expression,
        targets=tuple(t for t in resource.get("target") or [] if isinstance(t, str)),
    )


class TenantSearchParameters:
    """The official parameters plus one tenant's custom ones (same interface as SearchParameters)."""

    def __init__(self, base: SearchParameters, customs: list[CustomDefinition], states: dict[tuple[str, str], str]) -> None:
        self.base = base
        self.registry = base.registry
        self.by_url = dict(base.by_url)
        self._custom: dict[str, dict[str, SearchParam]] = {}
        self._states = states
        for d in customs:
            self.by_url[d.url] = d.as_definition()
            for rtype in d.bases:
                self._custom.setdefault(rtype, {})[d.code] = base.make_custom(rtype, d.as_definition())
        self.customs = customs

    def get(self, rtype: str, code: str) -> SearchParam | None:
        found = self.base.get(rtype, code)
        if found is None:
            found = self._custom.get(rtype, {}).get(code)
        return found

    def for_type(self, rtype: str) -> dict[str, SearchParam]:
        extra = self._custom.get(rtype)
        if not extra:
            return self.base.for_type(rtype)
        return {**self.base.for_type(rtype), **extra}

    def indexed(self, rtype: str) -> list[SearchParam]:
        """Custom parameters are extracted on every write, even while their reindex runs."""
        extra = self._custom.get(rtype)
        base = self.base.indexed(rtype)
        return base + [p for p in extra.values() if p.supported] if extra else base

    def usable(self, param: SearchParam) -> str | None:
        if param.code not in self._custom.get(param.resource_type, {}):
            return None
        state = self._states.get((param.resource_type, param.code))
        if state == READY:
            return None
        return (
            f"the custom search parameter {param.code!r} is not yet usable: the resources already stored "
            "are still being indexed for it (see `fhir-server reindex`)"
        )

    def custom_state(self, rtype: str, code: str) -> str | None:
        return self._states.get((rtype, code)) if code in self._custom.get(rtype, {}) else None
