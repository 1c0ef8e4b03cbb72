"""What the engine implements, as the CapabilityStatement reports it (generated, never hand-written)."""

from __future__ import annotations

from fhir_server.capability.statement import Features
from dataclasses import replace

from fhir_server.search.parameters import ParameterSource, SearchParameters

SEARCH_TYPE_INTERACTIONS = ("read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create")
SYSTEM_INTERACTIONS = ("transaction", "batch", "history-system", "search-system")
PATCH_FORMATS = ("application/json-patch+json", "application/fhir+json")
COMMON = ("_id", "_lastUpdated", "_tag", "_profile", "_security", "_source")


def search_features(params: SearchParameters, *, conditional_delete: str = "single") -> Features:
    search_params: dict[str, list[dict[str, str]]] = {}
    includes: dict[str, list[str]] = {}
    revincludes: dict[str, list[str]] = {}
    for rtype in params.registry.resource_types:
        entries = []
        for code, p in sorted(params.for_type(rtype).items()):
            if not p.supported:
                continue
            entries.append({"name": code, "definition": p.url, "type": "special" if p.type == "special" else p.type})
            if p.type == "reference":
                includes.setdefault(rtype, []).append(f"{rtype}:{code}")
                for target in p.targets or ():
                    revincludes.setdefault(target, []).append(f"{rtype}:{code}")
        search_params[rtype] = entries
        if rtype in includes:
            includes[rtype].insert(0, "*")
    first = params.registry.resource_types[0]
    system = []
    for code in COMMON:
        common = params.get(first, code)
        if common is not None and common.supported:
            system.append({"name": code, "definition": common.url, "type": common.type})
    return Features(
        type_interactions=SEARCH_TYPE_INTERACTIONS,
        system_interactions=SYSTEM_INTERACTIONS,
        search_params=search_params,
        system_search_params=system,
        search_includes=includes,
        search_revincludes={k: sorted(set(v)) for k, v in revincludes.items()},
        conditional_create=True,
        conditional_read="full-support",
        conditional_update=True,
        conditional_delete=conditional_delete,
        patch_formats=PATCH_FORMATS,
    )


def custom_features(base: Features, params: ParameterSource) -> Features:
    """The official features plus a tenant's custom search parameters (with whether they are usable yet)."""
    search_params = {t: list(v) for t, v in base.search_params.items()}
    for rtype in params.registry.resource_types:
        official = {e["name"] for e in search_params.get(rtype, [])}
        for code, p in sorted(params.for_type(rtype).items()):
            if code in official or not p.supported:
                continue
            problem = params.usable(p)
            entry = {"name": code, "definition": p.url, "type": p.type,
                     "documentation": "Custom search parameter" + (" (indexing: not yet usable)" if problem else "")}
            search_params.setdefault(rtype, []).append(entry)
    return replace(base, search_params=search_params)
