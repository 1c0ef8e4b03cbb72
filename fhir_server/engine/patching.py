"""PATCH documents applied to a resource: JSON Patch (RFC 6902) and FHIRPath Patch (FHIR R4).

JSON Patch is applied with the ``jsonpatch`` library (python-json-patch, the RFC's reference-grade
Python implementation). FHIRPath Patch is a Parameters resource of ``operation`` parameters (add,
insert, delete, replace, move), each with a FHIRPath ``path``; the paths it takes are the simple
FHIRPath that patches use (names, ``[n]``, ``first()``, ``where(name = 'literal')``), resolved here to
locations in the JSON so that they can be changed. The result is validated by the caller like any
write.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import jsonpatch
import jsonpointer

from fhir_server.capability.registry import Element, Node, Registry
from fhir_server.capability.validation import validate_resource
from fhir_server.errors import BadRequest, Unprocessable

OPERATIONS = {"add", "insert", "delete", "replace", "move"}


def apply_json_patch(resource: dict[str, Any], patch: Any) -> dict[str, Any]:
    if not isinstance(patch, list):
        raise BadRequest("A JSON Patch document is an array of operations (RFC 6902)", code="structure")
    try:
        result = jsonpatch.JsonPatch(patch).apply(resource)
    except jsonpatch.JsonPatchConflict as exc:
        raise Unprocessable(f"The JSON Patch cannot be applied: {exc}") from None
    except jsonpatch.JsonPatchTestFailed as exc:
        raise Unprocessable(f"A JSON Patch test operation failed: {exc}", code="conflict") from None
    except (jsonpatch.InvalidJsonPatch, jsonpointer.JsonPointerException, TypeError, KeyError, IndexError, ValueError) as exc:
        raise BadRequest(f"Invalid JSON Patch: {exc}", code="structure") from None
    if not isinstance(result, dict):
        raise Unprocessable("The JSON Patch replaced the whole resource with something that is not a resource")
    return result


@dataclass
class _Loc:
    """Where a value sits: parent[key], or parent[key][index] for an item of a repeating element.

    ``node`` describes ``value`` when it is an object, ``owner`` describes ``parent`` (registry nodes,
    None where the definitions do not say).
    """

    parent: dict[str, Any] | None
    key: str | None
    index: int | None
    value: Any
    node: Node | None = None
    owner: Node | None = None


def apply_fhirpath_patch(registry: Registry, resource: dict[str, Any], parameters: Any) -> dict[str, Any]:
    if not isinstance(parameters, dict) or parameters.get("resourceType") != "Parameters":
        raise BadRequest("A FHIRPath Patch is a Parameters resource of 'operation' parameters", code="structure")
    validate_resource(registry, parameters, missing_required="warning")  # the shape: parameter[], part[], name, value[x]
    result = copy.deepcopy(resource)
    for n, param in enumerate(parameters.get("parameter") or []):
        where = f"Parameters.parameter[{n}]"
        if param.get("name") != "operation":
            raise BadRequest(f"{where}: every parameter of a FHIRPath Patch is named 'operation'", expression=where)
        parts = {p.get("name"): p for p in param.get("part") or []}
        op = _primitive(parts.get("type"))
        if op not in OPERATIONS:
            raise BadRequest(f"{where}: type must be one of {', '.join(sorted(OPERATIONS))}", expression=f"{where}.part")
        path = _primitive(parts.get("path"))
        if not isinstance(path, str) or not path:
            raise BadRequest(f"{where}: the operation needs a path", expression=f"{where}.part")
        try:
            _apply(registry, result, op, path, parts, where)
        except _PathError as exc:
            raise BadRequest(f"{where}: {exc}", expression=f"{where}.part") from None
    _prune(result)
    return result


def _prune(value: Any) -> bool:
    """Drop the empty objects and arrays a deletion leaves behind (FHIR JSON has none). True if empty."""
    if isinstance(value, dict):
        for key in [k for k, v in value.items() if _prune(v)]:
            del value[key]
        return not value
    if isinstance(value, list):
        value[:] = [v for v in value if not _prune(v)]
        return not value
    return False


class _PathError(ValueError):
    pass


def _apply(registry: Registry, resource: dict[str, Any], op: str, path: str, parts: dict[str, Any], where: str) -> None:
    targets = _evaluate(registry, resource, path)
    if op == "add":
        name = _primitive(parts.get("name"))
        if not isinstance(name, str) or not name:
            raise _PathError("add needs a name")
        if len(targets) != 1 or not isinstance(targets[0].value, dict):
            raise Unprocessable(f"{where}: no single element at {path} to add {name} to", expression=where)
        container, node = targets[0].value, targets[0].node
        value, type_code = _value(parts.get("value"), where)
        key = name
        if node is not None and name in node.choices and type_code:
            key = name + type_code[0].upper() + type_code[1:]
        element = node.keys.get(key) if node is not None else None
        if element.is_array if element is not None else isinstance(container.get(key), list):
            container.setdefault(key, []).append(value)
        else:
            container[key] = value
        return
    if op == "insert":
        index = _primitive(parts.get("index"))
        if not isinstance(index, int) or isinstance(index, bool):
            raise _PathError("insert needs an integer index")
        items, owner = _collection(registry, resource, path, targets)
        if not 0 <= index <= len(items):
            raise Unprocessable(f"{where}: index {index} is outside the list at {path} (0..{len(items)})", expression=where)
        value, _ = _value(parts.get("value"), where)
        items.insert(index, value)
        owner()
        return
    if op == "move":
        source, destination = _primitive(parts.get("source")), _primitive(parts.get("destination"))
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in (source, destination)):
            raise _PathError("move needs integer source and destination")
        items, owner = _collection(registry, resource, path, targets)
        if not (0 <= source < len(items) and 0 <= destination < len(items)):
            raise Unprocessable(f"{where}: source or destination outside the list at {path}", expression=where)
        items.insert(destination, items.pop(source))
        owner()
        return
    if op == "delete":
        if not targets:
            return  # deleting what is not there changes nothing
        if len(targets) > 1:
            raise Unprocessable(f"{where}: {path} matches {len(targets)} elements; delete takes one", expression=where)
        _remove(targets[0])
        return
    # replace
    if len(targets) != 1:
        raise Unprocessable(f"{where}: {path} matches {len(targets)} elements; replace takes exactly one", expression=where)
    value, type_code = _value(parts.get("value"), where)
    t = targets[0]
    if t.parent is None or t.key is None:
        raise Unprocessable(f"{where}: the resource itself cannot be replaced", expression=where)
    element = t.owner.keys.get(t.key) if t.owner is not None else None
    if t.index is None and element is not None and element.choice and type_code:
        # value[x]: a value of another type replaces the element under that type's key
        key = element.name + type_code[0].upper() + type_code[1:]
        if key != t.key:
            _remove(t)
            t.parent[key] = value
            return
    if t.index is None:
        t.parent[t.key] = value
    else:
        t.parent[t.key][t.index] = value


def _remove(t: _Loc) -> None:
    """Delete the value at ``t`` (and its primitive extensions, kept in the "_key" sibling)."""
    if t.parent is None or t.key is None:
        raise _PathError("the resource itself cannot be deleted by a patch")
    sibling = "_" + t.key
    if t.index is None:
        del t.parent[t.key]
        t.parent.pop(sibling, None)
        return
    items = t.parent[t.key]
    del items[t.index]
    extensions = t.parent.get(sibling)
    if isinstance(extensions, list) and t.index < len(extensions):
        del extensions[t.index]
        if not any(x is not None for x in extensions):
            del t.parent[sibling]
    if not items:
        del t.parent[t.key]
        t.parent.pop(sibling, None)


def _collection(registry: Registry, resource: dict[str, Any], path: str, targets: list[_Loc]) -> tuple[list[Any], Any]:
    """The list a path names (all its items share one parent and key), and a callback that tidies up."""
    if targets:
        parents = {(id(t.parent), t.key) for t in targets}
        if len(parents) != 1 or targets[0].index is None:
            raise _PathError(f"{path} is not a list")
        parent, key = targets[0].parent, targets[0].key
        assert parent is not None and key is not None
        return parent[key], lambda: None
    # An empty list: find its owner (the path without its last name).
    head, _, name = path.rpartition(".")
    owners = _evaluate(registry, resource, head) if head else []
    if len(owners) != 1 or not isinstance(owners[0].value, dict):
        raise _PathError(f"nothing at {path}")
    container = owners[0].value
    items: list[Any] = []

    def attach() -> None:
        if items:
            container[name] = items

    return items, attach


_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\[(\d+)\])?")
_WHERE = re.compile(r"where\(\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*'([^']*)'\s*\)")


def _evaluate(registry: Registry, resource: dict[str, Any], path: str) -> list[_Loc]:
    """The locations a patch path selects (FHIRPath subset: names, [n], first(), where(a = 'x'))."""
    steps = _split(path)
    if not steps or steps[0] != resource.get("resourceType"):
        raise _PathError(f"the path must start with {resource.get('resourceType')}")
    current = [_Loc(None, None, None, resource, _resource_node(registry, resource))]
    for step in steps[1:]:
        if step == "first()":
            current = current[:1]
            continue
        m = _WHERE.fullmatch(step)
        if m:
            field, literal = m.group(1).split("."), m.group(2)
            current = [loc for loc in current if literal in _values_at(loc.value, field)]
            continue
        m = _STEP.fullmatch(step)
        if m is None:
            raise _PathError(f"unsupported path step {step!r}")
        name, index = m.group(1), m.group(3)
        found: list[_Loc] = []
        for loc in current:
            if not isinstance(loc.value, dict):
                continue
            key: str | None = name if name in loc.value else None
            if key is None and loc.node is not None and name in loc.node.choices:  # value[x]: valueString, ...
                key = next((k for k in loc.node.choices[name] if k in loc.value), None)
            if key is None:
                continue
            value = loc.value[key]
            element = loc.node.keys.get(key) if loc.node is not None else None
            for i, item in (enumerate(value) if isinstance(value, list) else [(None, value)]):
                found.append(_Loc(loc.value, key, i, item, _child_node(registry, element, item), loc.node))
        if index is not None:
            i = int(index)
            found = found[i : i + 1]
        current = found
    return current


def _resource_node(registry: Registry, resource: Any) -> Node | None:
    definition = registry.types.get(resource.get("resourceType", "")) if isinstance(resource, dict) else None
    return definition.root if definition is not None else None


def _child_node(registry: Registry, element: Element | None, value: Any) -> Node | None:
    if element is None or not isinstance(value, dict):
        return None
    if element.is_resource:
        return _resource_node(registry, value)
    return registry.node(*element.target) if element.target is not None else None


def _split(path: str) -> list[str]:
    steps, depth, start = [], 0, 0
    for i, ch in enumerate(path):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "." and depth == 0:
            steps.append(path[start:i])
            start = i + 1
    steps.append(path[start:])
    return [s.strip() for s in steps if s.strip()]


def _values_at(value: Any, path: list[str]) -> list[Any]:
    current = [value]
    for name in path:
        nxt: list[Any] = []
        for c in current:
            if isinstance(c, dict) and name in c:
                v = c[name]
                nxt.extend(v if isinstance(v, list) else [v])
        current = nxt
    return current


def _primitive(part: dict[str, Any] | None) -> Any:
    if not isinstance(part, dict):
        return None
    for k, v in part.items():
        if k.startswith("value"):
            return int(v) if isinstance(v, Decimal) and v == v.to_integral_value() and k == "valueInteger" else v
    return None


def _value(part: dict[str, Any] | None, where: str) -> tuple[Any, str | None]:
    """The value an operation carries (valueX, or nested parts for an anonymous type) and its type."""
    if not isinstance(part, dict):
        raise BadRequest(f"{where}: the operation needs a value", expression=where)
    for k, v in part.items():
        if k.startswith("value") and len(k) > 5:
            return copy.deepcopy(v), k[5].lower() + k[6:]
    if part.get("part"):
        obj: dict[str, Any] = {}
        for sub in part["part"]:
            name = sub.get("name")
            if not isinstance(name, str):
                raise BadRequest(f"{where}: every part of a value needs a name", expression=where)
            value, _ = _value(sub, where)
            if name in obj:
                obj[name] = obj[name] if isinstance(obj[name], list) else [obj[name]]
                obj[name].append(value)
            else:
                obj[name] = value
        return obj, None
    raise BadRequest(f"{where}: the operation needs a value", expression=where)
