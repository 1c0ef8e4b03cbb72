#!/usr/bin/env python3
"""Compile the official FHIR R4 (4.0.1) definitions into the server's package data.

Input: the definition bundles of the npm package ``hl7.fhir.r4.examples@4.0.1``
(HL7, CC0), which the project's developers find in ``../shared/fhir-r4/definitions``;
anyone can fetch the same files with ``npm pack hl7.fhir.r4.examples@4.0.1``.

Output: ``fhir_server/capability/data/structures.json``, a compact element table
for every resource type and data type, which the validator and the registries
read at start-up. The server never reads the original bundles.

Run: ``python tools/compile_definitions.py [--definitions DIR]``. The output is
deterministic (sorted keys), so a re-run that changes nothing shows no diff.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEFINITIONS = ROOT.parent / "shared" / "fhir-r4" / "definitions"
OUTPUT_DIR = ROOT / "fhir_server" / "capability" / "data"

FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
REGEX_EXT = "http://hl7.org/fhir/StructureDefinition/regex"
SYSTEM_PREFIX = "http://hl7.org/fhirpath/System."

# JSON representation of each FHIR primitive type (FHIR R4 "JSON representation
# of primitive elements"): numbers and booleans are JSON numbers and booleans,
# everything else a JSON string.
JSON_KIND = {
    "boolean": "boolean",
    "integer": "integer",
    "positiveInt": "integer",
    "unsignedInt": "integer",
    "decimal": "decimal",
}


def load_bundle(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as fh:
        bundle = json.load(fh)
    return [e["resource"] for e in bundle.get("entry", []) if "resource" in e]


def system_type(path: str, type_entry: dict[str, Any]) -> str:
    """Map a FHIRPath System.* type code on an element to the FHIR primitive it stands for.

    R4 types the ``id`` of resources and elements and ``Extension.url`` with
    System types; the resource id is an ``id``, element ids are strings.
    """
    fhir_type = next(
        (x.get("valueUrl") for x in type_entry.get("extension", []) if x["url"] == FHIR_TYPE_EXT),
        "string",
    )
    if path.count(".") == 1 and path.endswith(".id"):
        # Resource.id: the logical id, constrained to the id pattern.
        return "id"
    return str(fhir_type)


def compile_primitives(types_bundle: list[dict[str, Any]]) -> dict[str, Any]:
    primitives: dict[str, Any] = {}
    for sd in types_bundle:
        if sd.get("resourceType") != "StructureDefinition" or sd.get("kind") != "primitive-type":
            continue
        regex = None
        for el in sd["snapshot"]["element"]:
            if el["path"] == f"{sd['id']}.value":
                for t in el.get("type", []):
                    for x in t.get("extension", []):
                        if x["url"] == REGEX_EXT:
                            regex = x["valueString"]
        primitives[sd["id"]] = {"json": JSON_KIND.get(sd["id"], "string"), "regex": regex}
    return primitives


def compile_structure(sd: dict[str, Any], primitive_names: set[str]) -> dict[str, Any]:
    """Turn one StructureDefinition snapshot into {node path: {element name: spec}}."""
    elements = sd["snapshot"]["element"]
    root = sd["type"]
    nodes: dict[str, dict[str, Any]] = {root: {}}
    paths_with_children = {el["path"].rsplit(".", 1)[0] for el in elements if "." in el["path"]}
    for el in elements:
        path = el["path"]
        if "." not in path:
            continue
        parent, name = path.rsplit(".", 1)
        spec: dict[str, Any] = {"min": el.get("min", 0), "max": el.get("max", "*")}
        if spec["max"] != "*":
            spec["max"] = int(spec["max"])
        if el.get("isSummary"):
            spec["summary"] = True
        if el.get("isModifier"):
            spec["modifier"] = True
        if "contentReference" in el:
            spec["ref"] = el["contentReference"].split("#", 1)[1]
        else:
            types: list[str] = []
            targets: list[str] = []
            for t in el.get("type", []):
                code = t["code"]
                if code.startswith(SYSTEM_PREFIX):
                    code = system_type(path, t)
                types.append(code)
                for prof in t.get("targetProfile", []):
                    targets.append(prof.rsplit("/", 1)[-1])
            if path in paths_with_children and types in (["BackboneElement"], ["Element"]):
                spec["node"] = path
                nodes.setdefault(path, {})
            spec["types"] = types
            if targets:
                spec["targets"] = sorted(set(targets))
        if name.endswith("[x]"):
            name = name[:-3]
            spec["choice"] = True
        nodes.setdefault(parent, {})[name] = spec
    out: dict[str, Any] = {"kind": sd["kind"], "nodes": nodes}
    if sd.get("abstract"):
        out["abstract"] = True
    base = sd.get("baseDefinition")
    if base:
        out["base"] = base.rsplit("/", 1)[-1]
    return out


def compile_search_parameters(definitions: Path) -> dict[str, Any]:
    """The official SearchParameters, reduced to what the indexer and the query parser need."""
    params = []
    for sp in load_bundle(definitions / "search-parameters.json"):
        if sp.get("resourceType") != "SearchParameter":
            continue
        entry: dict[str, Any] = {
            "url": sp["url"],
            "code": sp["code"],
            "type": sp["type"],
            "base": sorted(sp["base"]),
        }
        if sp.get("expression"):
            entry["expression"] = sp["expression"]
        if sp.get("target"):
            entry["target"] = sorted(sp["target"])
        if sp.get("component"):
            entry["component"] = [{"definition": c["definition"], "expression": c["expression"]} for c in sp["component"]]
        if sp.get("modifier"):
            entry["modifier"] = sp["modifier"]
        params.append(entry)
    params.sort(key=lambda p: p["url"])
    digest = hashlib.sha256((definitions / "search-parameters.json").read_bytes()).hexdigest()
    return {
        "fhirVersion": "4.0.1",
        "origin": "hl7.fhir.r4.examples@4.0.1 (HL7, CC0): search-parameters.json",
        "sha256": {"search-parameters.json": digest},
        "parameters": params,
    }


def compile_compartments(definitions: Path) -> dict[str, Any]:
    """The five CompartmentDefinitions: for each compartment type, which parameters link each resource type."""
    compartments: dict[str, Any] = {}
    sources = {}
    for path in sorted(definitions.glob("CompartmentDefinition-*.json")):
        cd = json.loads(path.read_bytes())
        sources[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        compartments[cd["code"]] = {
            r["code"]: r["param"] for r in cd.get("resource", []) if r.get("param")
        }
    return {
        "fhirVersion": "4.0.1",
        "origin": "hl7.fhir.r4.examples@4.0.1 (HL7, CC0): CompartmentDefinition-*.json",
        "sha256": sources,
        "compartments": compartments,
    }


def compile_v2_tables(definitions: Path) -> dict[str, Any]:
    """The HL7 v2 tables (``v2-tables.json``: the v2 CodeSystems of terminology.hl7.org) as table number -> code ->
    display, which the HL7 v2 adapter uses to give each v2 code its system and display."""
    tables: dict[str, dict[str, str]] = {}
    prefix = "http://terminology.hl7.org/CodeSystem/v2-"
    for resource in load_bundle(definitions / "v2-tables.json"):
        url = resource.get("url", "")
        if resource.get("resourceType") != "CodeSystem" or not url.startswith(prefix):
            continue
        codes: dict[str, str] = {}

        def walk(concepts: list[dict[str, Any]]) -> None:
            for c in concepts:
                codes[c["code"]] = c.get("display", "")
                walk(c.get("concept", []))

        walk(resource.get("concept", []))
        tables[url[len(prefix):]] = codes
    return {"source": "v2-tables.json (terminology.hl7.org v2 CodeSystems)", "tables": tables}


def compile_all(definitions: Path) -> dict[str, Any]:
    resources_bundle = load_bundle(definitions / "profiles-resources.json")
    types_bundle = load_bundle(definitions / "profiles-types.json")
    primitives = compile_primitives(types_bundle)
    primitive_names = set(primitives)
    types: dict[str, Any] = {}
    for sd in types_bundle + resources_bundle:
        if sd.get("resourceType") != "StructureDefinition":
            continue
        if sd.get("derivation") == "constraint" or sd.get("kind") not in ("resource", "complex-type"):
            continue
        types[sd["id"]] = compile_structure(sd, primitive_names)
    sources = {}
    for name in ("profiles-resources.json", "profiles-types.json"):
        sources[name] = hashlib.sha256((definitions / name).read_bytes()).hexdigest()
    return {
        "fhirVersion": "4.0.1",
        "origin": "hl7.fhir.r4.examples@4.0.1 (HL7, CC0): profiles-resources.json, profiles-types.json",
        "sha256": sources,
        "primitives": primitives,
        "types": types,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--definitions", type=Path, default=DEFAULT_DEFINITIONS)
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args(argv)
    if not (args.definitions / "profiles-resources.json").exists():
        print(f"no FHIR definitions at {args.definitions}; pass --definitions DIR", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    data = compile_all(args.definitions)
    out = args.output_dir / "structures.json"
    out.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
    resources = sum(1 for t in data["types"].values() if t["kind"] == "resource" and not t.get("abstract"))
    print(f"wrote {out.relative_to(ROOT)}: {resources} resource types, {len(data['types']) - resources} other types")
    params = compile_search_parameters(args.definitions)
    out = args.output_dir / "search_parameters.json"
    out.write_text(json.dumps(params, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {out.relative_to(ROOT)}: {len(params['parameters'])} search parameters")
    compartments = compile_compartments(args.definitions)
    out = args.output_dir / "compartments.json"
    out.write_text(json.dumps(compartments, sort_keys=True, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}: {len(compartments['compartments'])} compartments")
    v2 = compile_v2_tables(args.definitions)
    out = args.output_dir / "v2_tables.json"
    out.write_text(json.dumps(v2, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n")
    print(f"wrote {out.relative_to(ROOT)}: {len(v2['tables'])} HL7 v2 tables")
    return 0


if __name__ == "__main__":
    sys.exit(main())
