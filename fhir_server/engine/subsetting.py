"""_summary and _elements: returning part of a resource, marked SUBSETTED."""

from __future__ import annotations

from typing import Any

from fhir_server.capability.registry import Node, Registry

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
_ALWAYS = ("resourceType", "id", "meta")


def subset(registry: Registry, resource: dict[str, Any], *, summary: str | None, elements: tuple[str, ...] | None) -> dict[str, Any]:
    """The resource reduced as _summary / _elements ask; unchanged for _summary=false or nothing asked."""
    rtype = resource.get("resourceType", "")
    definition = registry.types.get(rtype)
    if definition is None:
        return resource
    if elements is not None:
        wanted = {e.split(".", 1)[0] for e in elements}
        mandatory = {k for name, keys in definition.root.required for k in keys}
        out = {k: v for k, v in resource.items() if k in _ALWAYS or k in mandatory or _base_name(definition.root, k) in wanted}
        return _mark(out)
    if summary in (None, "false"):
        return resource
    if summary == "data":
        return _mark({k: v for k, v in resource.items() if k != "text"})
    if summary == "text":
        mandatory = {k for name, keys in definition.root.required for k in keys}
        return _mark({k: v for k, v in resource.items() if k in _ALWAYS or k == "text" or k in mandatory})
    # _summary=true: the elements marked isSummary, recursively through backbone elements.
    return _mark(_summary_of(registry, definition.root, resource, top=True))


def _base_name(node: Node, key: str) -> str:
    element = node.keys.get(key)
    if element is None:
        return key
    return element.name


def _summary_of(registry: Registry, node: Node, obj: dict[str, Any], *, top: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if top and key in _ALWAYS:
            out[key] = value
            continue
        element = node.keys.get(key)
        if element is None or not (element.summary or element.min > 0):
            continue
        target = element.target
        if target is not None and target[0] == node.type_name and target[1] != node.path:
            child = registry.node(*target)
            if isinstance(value, list):
                out[key] = [_summary_of(registry, child, v, top=False) if isinstance(v, dict) else v for v in value]
            elif isinstance(value, dict):
                out[key] = _summary_of(registry, child, value, top=False)
        else:
            out[key] = value
    return out


def _mark(resource: dict[str, Any]) -> dict[str, Any]:
    meta = dict(resource.get("meta") or {})
    tags = [t for t in meta.get("tag", []) if not (t.get("system") == SUBSETTED["system"] and t.get("code") == "SUBSETTED")]
    meta["tag"] = [*tags, dict(SUBSETTED)]
    out = dict(resource)
    out["meta"] = meta
    # keep resourceType, id, meta first
    return {k: out[k] for k in _ALWAYS if k in out} | {k: v for k, v in out.items() if k not in _ALWAYS}
