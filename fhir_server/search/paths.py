"""Evaluating search-parameter expressions: a typed fast path, with fhirpathpy for the rest.

Nearly every R4 search expression is a path with a few well-known twists:
``Observation.subject``, ``(Observation.value as Quantity)``, ``Condition.abatement.as(Age)``,
``Account.subject.where(resolve() is Patient)``, ``Patient.telecom.where(system='email')``,
``Bundle.entry[0].resource``, ``Patient.extension('http://...').value``. Those are compiled
here into steps that walk the JSON *with its FHIR types* (from the structure registry), so the
indexer knows whether a value is a Period, a CodeableConcept or a dateTime. Anything else is
compiled once with fhirpathpy and its results' types are inferred from their shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fhir_server.capability.registry import Node, Registry

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


@dataclass(frozen=True, slots=True)
class Typed:
    """A value found by an expression, with its FHIR type ("" when unknown)."""

    value: Any
    type: str


@dataclass(frozen=True, slots=True)
class _Step:
    kind: str  # field | as | where_resolve | where_eq | index | extension
    arg: Any = None
    arg2: Any = None


class PathError(ValueError):
    """The expression is outside the fast path's subset."""


def split_union(expression: str) -> list[str]:
    """Split a FHIRPath union ``a | b | c`` at the top level (not inside parentheses or quotes)."""
    parts: list[str] = []
    depth, quote, start = 0, False, 0
    for i, ch in enumerate(expression):
        if ch == "'":
            quote = not quote
        elif not quote and ch == "(":
            depth += 1
        elif not quote and ch == ")":
            depth -= 1
        elif not quote and depth == 0 and ch == "|":
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


def parts_for_type(expression: str, resource_type: str) -> list[str]:
    """The union parts of a (possibly multi-base) expression that apply to ``resource_type``."""
    out = []
    for part in split_union(expression):
        head = part.lstrip("(")
        root = re.match(_IDENT, head)
        name = root.group(0) if root else ""
        if name in (resource_type, "Resource", "DomainResource") or not name[:1].isupper():
            out.append(part)
    return out


_AS_PAREN = re.compile(rf"^\((.+)\s+as\s+({_IDENT})\)$")
_AS_PAREN_TAIL = re.compile(rf"^\((.+)\s+as\s+({_IDENT})\)\.(.+)$")


class CompiledPath:
    """One union part, compiled for evaluation against resources of one type."""

    def __init__(self, registry: Registry, resource_type: str, text: str, *, relative: bool = False) -> None:
        self.text = text
        self.registry = registry
        self.resource_type = resource_type
        self.relative = relative
        # A relative expression may still start from the resource (composite components: %resource.x).
        self.from_resource = relative and text.strip().startswith("%resource.")
        if self.from_resource:
            text = text.strip()[len("%resource.") :]
        self._fallback: Callable[[Any], list[Any]] | None = None
        self.steps: list[_Step] | None
        try:
            self.steps = self._compile(text)
        except PathError:
            self.steps = None
            self._fallback = _fhirpathpy(text, resource_type)

    @property
    def fast(self) -> bool:
        return self.steps is not None

    def _compile(self, text: str) -> list[_Step]:
        text = text.strip()
        m = _AS_PAREN.match(text)
        if m:
            return [*self._compile(m.group(1)), _Step("as", m.group(2))]
        m = _AS_PAREN_TAIL.match(text)
        if m:
            return [*self._compile(m.group(1)), _Step("as", m.group(2)), *self._compile_tail(m.group(3))]
        if not self.relative:
            root = re.match(_IDENT, text)
            if root is None or root.group(0) not in (self.resource_type, "Resource", "DomainResource"):
                raise PathError(text)
            text = text[root.end() :]
            if not text:
                return []
            if not text.startswith("."):
                raise PathError(text)
            text = text[1:]
        return self._compile_tail(text)

    def _compile_tail(self, text: str) -> list[_Step]:
        steps: list[_Step] = []
        pos = 0
        while pos < len(text):
            m = re.compile(rf"({_IDENT})(\[(\d+)\])?").match(text, pos)
            if m is None:
                raise PathError(text)
            name = m.group(1)
            pos = m.end()
            if pos < len(text) and text[pos] == "(":
                close = _matching_paren(text, pos)
                arg = text[pos + 1 : close].strip()
                pos = close + 1
                steps.append(self._function(name, arg))
            else:
                steps.append(_Step("field", name))
                if m.group(3) is not None:
                    steps.append(_Step("index", int(m.group(3))))
            if pos < len(text):
                if text[pos] != ".":
                    raise PathError(text)
                pos += 1
        return steps

    def _function(self, name: str, arg: str) -> _Step:
        if name in ("as", "ofType") and re.fullmatch(_IDENT, arg):
            return _Step("as", arg)
        if name == "where":
            m = re.fullmatch(rf"resolve\(\)\s+is\s+({_IDENT})", arg)
            if m:
                return _Step("where_resolve", m.group(1))
            m = re.fullmatch(rf"({_IDENT}(?:\.{_IDENT})*)\s*=\s*'([^']*)'", arg)
            if m:
                return _Step("where_eq", m.group(1).split("."), m.group(2))
        if name == "extension":
            m = re.fullmatch(r"'([^']*)'", arg)
            if m:
                return _Step("extension", m.group(1))
        if name == "first" and arg == "":
            return _Step("index", 0)
        raise PathError(name)

    def evaluate(self, resource: dict[str, Any], start: list[Typed] | None = None) -> list[Typed]:
        if self.steps is None:
            assert self._fallback is not None
            try:
                found = self._fallback(resource if start is None else [t.value for t in start])
            except Exception:  # noqa: BLE001 - a failing optional expression indexes nothing
                return []
            return [Typed(v, infer_type(v)) for v in found if v is not None]
        if start is None or self.from_resource:
            current = [Typed(resource, resource.get("resourceType", ""))]
        else:
            current = start
        for step in self.steps:
            current = self._apply(step, current)
            if not current:
                break
        return current

    # --- steps ---------------------------------------------------------------------------------

    def _apply(self, step: _Step, items: list[Typed]) -> list[Typed]:
        kind = step.kind
        if kind == "field":
            out: list[Typed] = []
            for item in items:
                out.extend(self._field(item, step.arg))
            return out
        if kind == "as":
            return [i for i in items if self._is_a(i.type, step.arg)]
        if kind == "index":
            return items[step.arg : step.arg + 1]
        if kind == "where_resolve":
            return [i for i in items if reference_type(i.value) == step.arg]
        if kind == "where_eq":
            return [i for i in items if step.arg2 in _plain_values(i.value, step.arg)]
        if kind == "extension":
            ext_items = self._apply(_Step("field", "extension"), items)
            return [i for i in ext_items if isinstance(i.value, dict) and i.value.get("url") == step.arg]
        raise AssertionError(kind)  # pragma: no cover

    def _field(self, item: Typed, name: str) -> list[Typed]:
        value = item.value
        if not isinstance(value, dict):
            return []
        node = self._node_of(item)
        if node is None:
            raw = value.get(name)
            return [Typed(v, infer_type(v)) for v in _as_list(raw)]
        keys = node.choices.get(name)
        if keys is None:
            element = node.keys.get(name)
            if element is None:
                return []
            return [Typed(v, self._child_type(element, v)) for v in _as_list(value.get(name))]
        out: list[Typed] = []
        for key in keys:
            if key in value:
                element = node.keys[key]
                out.extend(Typed(v, element.type_code) for v in _as_list(value[key]))
        return out

    def _child_type(self, element: Any, value: Any) -> str:
        if element.type_code == "Resource" and isinstance(value, dict):
            return str(value.get("resourceType", ""))
        if element.target is not None and element.target[0] != element.type_code:
            # An inline backbone element: remember where its definition lives.
            return f"{element.target[0]}#{element.target[1]}"
        return str(element.type_code)

    def _node_of(self, item: Typed) -> Node | None:
        t = item.type
        if "#" in t:
            type_name, path = t.split("#", 1)
            return self.registry.types[type_name].nodes.get(path)
        definition = self.registry.types.get(t)
        return definition.root if definition is not None else None

    def _is_a(self, type_name: str, wanted: str) -> bool:
        """FHIRPath ``is``: the type itself or one it specialises (an Age is a Quantity)."""
        system = _SYSTEM_TYPES.get(wanted)
        if system is not None:
            return type_name in system
        for _ in range(10):
            if not type_name:
                return False
            if type_name == wanted:
                return True
            definition = self.registry.types.get(type_name)
            type_name = definition.base if definition is not None and definition.base else ""
        return False


# FHIRPath System types written in search expressions (value.as(DateTime)) and the FHIR types they cover.
_SYSTEM_TYPES = {
    "DateTime": ("dateTime", "instant"),
    "Date": ("date",),
    "Time": ("time",),
    "String": ("string", "code", "id", "markdown", "uri", "url", "canonical", "oid", "uuid"),
    "Boolean": ("boolean",),
    "Integer": ("integer", "positiveInt", "unsignedInt"),
    "Decimal": ("decimal",),
}


def _matching_paren(text: str, open_pos: int) -> int:
    depth = 0
    quote = False
    for i in range(open_pos, len(text)):
        ch = text[i]
        if ch == "'":
            quote = not quote
        elif not quote and ch == "(":
            depth += 1
        elif not quote and ch == ")":
            depth -= 1
            if depth == 0:
                return i
    raise PathError(text)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _plain_values(value: Any, path: list[str]) -> list[Any]:
    current = [value]
    for name in path:
        nxt: list[Any] = []
        for c in current:
            if isinstance(c, dict):
                nxt.extend(_as_list(c.get(name)))
        current = nxt
    return current


def reference_type(value: Any) -> str | None:
    """The resource type a Reference points at (from its literal reference, or its type element)."""
    if not isinstance(value, dict):
        return None
    ref = value.get("reference")
    if isinstance(ref, str) and not ref.startswith("#"):
        parts = ref.split("?", 1)[0].split("/")
        if len(parts) >= 4 and parts[-2] == "_history":
            parts = parts[:-2]
        if len(parts) >= 2:
            return parts[-2]
    declared = value.get("type")
    return declared if isinstance(declared, str) else None


def infer_type(value: Any) -> str:
    """The FHIR type of a value found without type information (fhirpathpy results)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, str):
        return "string"
    if not isinstance(value, dict):
        return "decimal" if value is not None else ""
    if "resourceType" in value:
        return str(value["resourceType"])
    keys = set(value)
    if "coding" in keys or ("text" in keys and len(keys - {"id", "extension"}) == 1):
        return "CodeableConcept"
    if keys & {"reference", "identifier", "display"} and not keys & {"system", "code", "value"}:
        return "Reference"
    if "value" in keys and keys & {"unit", "code", "comparator"}:
        return "Quantity"
    if "value" in keys and "currency" in keys:
        return "Money"
    if keys & {"start", "end"} and not keys - {"start", "end", "id", "extension"}:
        return "Period"
    if keys & {"low", "high"}:
        return "Range"
    if "system" in keys and "value" in keys:
        return "Identifier"
    if keys & {"system", "code"}:
        return "Coding"
    if keys & {"family", "given"}:
        return "HumanName"
    if keys & {"line", "city", "postalCode", "country"}:
        return "Address"
    if "url" in keys and any(k.startswith("value") for k in keys):
        return "Extension"
    return ""


def _fhirpathpy(text: str, resource_type: str) -> Callable[[Any], list[Any]]:
    from fhirpathpy import compile as fhirpath_compile
    from fhirpathpy.models import models

    try:
        fn = fhirpath_compile(text, model=models["r4"])
        # fhirpathpy reports some syntax errors only when the expression first runs: run it once.
        fn({"resourceType": resource_type}, None)
    except Exception as exc:  # noqa: BLE001 - fhirpathpy raises plain exceptions for syntax errors
        raise PathError(f"cannot compile FHIRPath {text!r}: {exc}") from None
    return fn  # type: ignore[return-value]
