"""The CapabilityStatement, generated from the registries and the settings (never a static file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fhir_server import __version__
from fhir_server.capability.registry import Registry
from fhir_server.clock import instant
from fhir_server.security.oauth import smart_security

TYPE_INTERACTIONS = ("read", "vread", "update", "delete", "history-instance", "history-type", "create")
SYSTEM_INTERACTIONS = ("history-system",)


@dataclass(frozen=True, slots=True)
class Features:
    """What the engine really implements; the statement says exactly this."""

    type_interactions: tuple[str, ...] = TYPE_INTERACTIONS
    system_interactions: tuple[str, ...] = SYSTEM_INTERACTIONS
    search_params: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # type -> searchParam entries
    system_search_params: list[dict[str, str]] = field(default_factory=list)
    conditional_create: bool = False
    conditional_read: str = "not-supported"
    conditional_update: bool = False
    conditional_delete: str = "not-supported"
    patch_formats: tuple[str, ...] = ()
    search_includes: dict[str, list[str]] = field(default_factory=dict)
    search_revincludes: dict[str, list[str]] = field(default_factory=dict)
    operations: list[dict[str, str]] = field(default_factory=list)
    security: dict[str, Any] | None = None


def capability_statement(registry: Registry, base_url: str, started_at: int, features: Features) -> dict[str, Any]:
    resources = []
    for rtype in registry.resource_types:
        entry: dict[str, Any] = {
            "type": rtype,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}",
            "interaction": [{"code": code} for code in features.type_interactions],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": features.conditional_create,
            "conditionalRead": features.conditional_read,
            "conditionalUpdate": features.conditional_update,
            "conditionalDelete": features.conditional_delete,
            "referencePolicy": ["literal", "logical"],
        }
        params = features.search_params.get(rtype)
        if params:
            entry["interaction"].append({"code": "search-type"})
            entry["searchParam"] = params
        if features.search_includes.get(rtype):
            entry["searchInclude"] = features.search_includes[rtype]
        if features.search_revincludes.get(rtype):
            entry["searchRevInclude"] = features.search_revincludes[rtype]
        resources.append(entry)
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": "Every R4 resource type, validated against the R4 definitions and stored encrypted.",
        "resource": resources,
        "interaction": [{"code": code} for code in features.system_interactions],
    }
    if features.system_search_params:
        rest["searchParam"] = features.system_search_params
    if features.operations:
        rest["operation"] = features.operations
    rest["security"] = features.security or smart_security(base_url)
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": instant(started_at),
        "publisher": "fhir-server",
        "kind": "instance",
        "software": {"name": "fhir-server", "version": __version__},
        "implementation": {"description": "fhir-server FHIR R4 endpoint", "url": base_url},
        "fhirVersion": registry.fhir_version,
        "format": ["application/fhir+json", "json"],
        "rest": [rest],
    }
    if features.patch_formats:
        statement["patchFormat"] = list(features.patch_formats)
    return statement
