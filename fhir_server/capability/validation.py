"""Structural validation of FHIR R4 JSON against the official definitions.

Checks, for every resource type alike: element names, cardinality (min and max,
arrays exactly where max > 1), data types, primitive formats (the regexes in the
definitions, plus calendar validity of dates), choice types (one ``value[x]`` at
most), primitive extensions (``_name`` aligned with ``name``), contained resources,
and nested resources (Bundle entries, Parameters). Narrative must be well-formed
XHTML without active content.

The walk collects up to 50 issues, each with the FHIRPath-like location of the
offending element, and raises one ``BadRequest`` carrying them all.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import xml.etree.ElementTree as ET
from decimal import Decimal
from typing import Any

from fhir_server.capability.registry import Element, Node, Primitive, Registry
from fhir_server.errors import BadRequest, Issue, IssueCollector

ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_XHTML_NS = "{http://www.w3.org/1999/xhtml}"
_FORBIDDEN_XHTML = {"script", "object", "applet", "embed", "form", "input", "iframe", "base", "link", "meta", "style"}
_INT32 = (-(2**31), 2**31 - 1)
_MAX_STRING = 1024 * 1024  # FHIR: strings SHALL NOT exceed 1 MB
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # FHIR: no characters below U+0020 but tab, CR, LF
_BLANKS = re.compile(r"\s+")
_BASE64 = re.compile(r"[0-9a-zA-Z+/=]*")


def validate_resource(
    registry: Registry, resource: Any, *, where: str = "", missing_required: str = "error"
) -> list[Issue]:
    """Raise BadRequest listing every structural problem found in ``resource``.

    ``missing_required`` is the severity of a missing required element ("error"
    or "warning"); the warnings are returned so the caller can report them.
    """
    issues = IssueCollector()
    _Walker(registry, issues, missing_required).resource(resource, where, contained=False)
    if issues.errors:
        raise BadRequest(issues=issues.errors)
    return issues.warnings


class _Walker:
    def __init__(self, registry: Registry, issues: IssueCollector, missing_required: str) -> None:
        self.registry = registry
        self.issues = issues
        self.missing_required = missing_required

    def resource(self, value: Any, where: str, *, contained: bool) -> None:
        if not isinstance(value, dict):
            self.issues.add("A resource must be a JSON object", where or "(root)")
            return
        rtype = value.get("resourceType")
        if not isinstance(rtype, str):
            self.issues.add("The resource has no resourceType property", where or "(root)", code="required")
            return
        if not self.registry.is_resource_type(rtype):
            self.issues.add(f"Unknown resource type {rtype!r}", f"{where}.resourceType" if where else "resourceType")
            return
        path = where or rtype
        rid = value.get("id")
        if rid is not None and (not isinstance(rid, str) or not ID_PATTERN.fullmatch(rid)):
            self.issues.add(
                "The id must be 1 to 64 characters of A-Z, a-z, 0-9, '-' and '.'", f"{path}.id", code="value"
            )
        if contained and "contained" in value:
            self.issues.add("A contained resource must not contain resources (dom-2)", f"{path}.contained")
        self.object(value, self.registry.types[rtype].root, path, is_resource=True)

    def object(self, obj: Any, node: Node, path: str, *, is_resource: bool = False) -> None:
        if not isinstance(obj, dict):
            self.issues.add(f"Expected a JSON object for {node.path}", path)
            return
        if not obj:
            self.issues.add("An element must have a value or children; {} is not allowed", path)
            return
        keys = node.keys
        for key, value in obj.items():
            if self.issues.full:
                return
            if key == "resourceType" and is_resource:
                continue
            element = keys.get(key)
            if element is None:
                self.issues.add(f"Unknown element {key!r} in {node.path}", f"{path}.{key}")
                continue
            if key.startswith("_"):
                continue  # checked together with its value below (or alone when there is no value)
            self.element(obj, element, value, path)
        for key in obj:
            if key.startswith("_") and key[1:] not in obj and key in keys:
                self.primitive_extension_only(obj[key], keys[key], path)
        for name, satisfying in node.required:
            if not any(k in obj for k in satisfying):
                self.issues.add(
                    f"Missing required element {name!r} (min 1) in {node.path}",
                    f"{path}.{name}",
                    "required",
                    self.missing_required,
                )
        for name, variants in node.choices.items():
            present = [k for k in variants if k in obj]
            if len(present) > 1:
                self.issues.add(f"Only one of {', '.join(present)} may be present ({name}[x])", f"{path}.{present[1]}")

    def element(self, obj: dict[str, Any], element: Element, value: Any, parent: str) -> None:
        path = f"{parent}.{element.key}"
        extension = obj.get("_" + element.key) if element.primitive is not None else None
        if element.is_array:
            if not isinstance(value, list):
                self.issues.add(f"{element.key} repeats (max {_max(element)}) and must be a JSON array", path)
                return
            if not value:
                self.issues.add("An empty array is not allowed", path)
                return
            if element.max > 0 and len(value) > element.max:
                self.issues.add(f"At most {element.max} {element.key} allowed, found {len(value)}", path)
            ext_list: list[Any] | None = None
            if extension is not None:
                if not isinstance(extension, list) or len(extension) != len(value):
                    self.issues.add(
                        f"_{element.key} must be an array as long as {element.key}", f"{parent}._{element.key}"
                    )
                else:
                    ext_list = extension
            for i, item in enumerate(value):
                item_path = f"{path}[{i}]"
                ext = ext_list[i] if ext_list is not None else None
                if item is None and element.primitive is not None:
                    if ext is None:
                        self.issues.add("null is allowed only where the matching _ entry has content", item_path)
                    else:
                        self.object(ext, self.registry.types["Element"].root, f"{parent}._{element.key}[{i}]")
                    continue
                self.item(element, item, item_path)
                if ext is not None:
                    self.object(ext, self.registry.types["Element"].root, f"{parent}._{element.key}[{i}]")
        else:
            if isinstance(value, list):
                self.issues.add(f"{element.key} does not repeat (max 1); a single value is expected, not an array", path)
                return
            self.item(element, value, path)
            if extension is not None:
                self.object(extension, self.registry.types["Element"].root, f"{parent}._{element.key}")

    def primitive_extension_only(self, ext: Any, element: Element, parent: str) -> None:
        path = f"{parent}._{element.key}"
        element_root = self.registry.types["Element"].root
        if element.is_array:
            if not isinstance(ext, list) or not ext:
                self.issues.add(f"_{element.key} must be a non-empty array", path)
                return
            for i, item in enumerate(ext):
                if item is None:
                    self.issues.add("null entries need a value in the matching array", f"{path}[{i}]")
                else:
                    self.object(item, element_root, f"{path}[{i}]")
        else:
            self.object(ext, element_root, path)

    def item(self, element: Element, value: Any, path: str) -> None:
        if element.primitive is not None:
            self.primitive(element.primitive, value, path)
        elif element.is_resource:
            self.resource(value, path, contained=element.key == "contained")
        elif element.target is not None:
            type_name, node_path = element.target
            self.object(value, self.registry.node(type_name, node_path), path)
        else:  # pragma: no cover - the compiled definitions give every element a target
            self.issues.add(f"No definition for the type {element.type_code}", path)

    def primitive(self, primitive: Primitive, value: Any, path: str) -> None:
        kind = primitive.json_kind
        name = primitive.name
        if kind == "boolean":
            if not isinstance(value, bool):
                self.issues.add(f"Expected a boolean (true or false) for {name}, found {_json_type(value)}", path, "value")
            return
        if kind == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                self.issues.add(f"Expected a JSON integer for {name}, found {_json_type(value)}", path, "value")
            elif not _INT32[0] <= value <= _INT32[1]:
                self.issues.add(f"{name} {value} is outside the 32-bit integer range", path, "value")
            elif name == "positiveInt" and value < 1:
                self.issues.add(f"positiveInt must be 1 or more, found {value}", path, "value")
            elif name == "unsignedInt" and value < 0:
                self.issues.add(f"unsignedInt must be 0 or more, found {value}", path, "value")
            return
        if kind == "decimal":
            if isinstance(value, bool) or not isinstance(value, (int, Decimal, float)):
                self.issues.add(f"Expected a JSON number for decimal, found {_json_type(value)}", path, "value")
            elif isinstance(value, (Decimal, float)) and not math.isfinite(value):
                self.issues.add("A decimal must be finite", path, "value")
            return
        if not isinstance(value, str):
            self.issues.add(f"Expected a JSON string for {name}, found {_json_type(value)}", path, "value")
            return
        if len(value) > _MAX_STRING and name != "base64Binary":  # the 1 MB limit is the string type's; binaries are
            self.issues.add(f"{name} is longer than 1 MB", path, "too-long")  # bound by the body size only
            return
        if _CONTROL.search(value):
            self.issues.add(f"{name} contains a control character (below U+0020 other than tab, CR, LF)", path, "value")
            return
        if name == "xhtml":
            problem = _xhtml_problem(value)
            if problem:
                self.issues.add(f"Invalid narrative: {problem}", path, "value")
            return
        if not value.strip() if name in ("string", "markdown") else not value:
            self.issues.add(f"An empty {name} is not allowed; leave the element out instead", path, "value")
            return
        pattern = primitive.pattern
        if name == "base64Binary":  # the definition's regex, in linear time (it backtracks on megabytes)
            packed = _BLANKS.sub("", value)
            if len(packed) % 4 or not packed or not _BASE64.fullmatch(packed):
                self.issues.add(f"{_shorten(value)!r} is not a valid {name}", path, "value")
            return
        if pattern is not None and name not in ("string", "markdown") and not pattern.fullmatch(value):
            self.issues.add(f"{_shorten(value)!r} is not a valid {name}", path, "value")
            return
        if name in ("date", "dateTime", "instant") and not _calendar_valid(value):
            self.issues.add(f"{_shorten(value)!r} is not a valid {name}: no such day or time", path, "value")


def _calendar_valid(value: str) -> bool:
    if len(value) < 10:
        return True  # year or year-month: the pattern already bounds the month
    try:
        dt.date.fromisoformat(value[:10])
    except ValueError:
        return False
    return True


def _xhtml_problem(value: str) -> str | None:
    if "<!DOCTYPE" in value or "<!ENTITY" in value:
        return "DTDs and entity declarations are not allowed"
    try:
        root = ET.fromstring(value)
    except ET.ParseError as exc:
        return f"not well-formed XHTML ({exc})"
    if root.tag != f"{_XHTML_NS}div":
        return "the root element must be <div xmlns=\"http://www.w3.org/1999/xhtml\">"
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1] if isinstance(el.tag, str) else ""
        if tag in _FORBIDDEN_XHTML:
            return f"the <{tag}> element is not allowed in narrative (txt-1)"
        for attr, attr_value in el.attrib.items():
            name = attr.rsplit("}", 1)[-1].lower()
            if name.startswith("on"):
                return f"event handler attribute {name!r} is not allowed in narrative (txt-1)"
            if name in ("href", "src") and attr_value.strip().lower().startswith(("javascript:", "vbscript:")):
                return f"script URLs are not allowed in {name!r} (txt-1)"
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, Decimal, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _max(element: Element) -> str:
    return "*" if element.max < 0 else str(element.max)


def _shorten(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[:limit] + "..."
