#!/usr/bin/env python3
"""Convert the official FHIRPath Patch test cases from XML to FHIR JSON (the server speaks JSON only).

Input: ``../shared/fhir-test-cases/patch/fhir-patch-tests.xml`` (HL7 FHIR/fhir-test-cases, Apache-2.0).
Output: ``tests/data/fhir-patch-tests.json``: a list of {name, mode, input, diff, output | error},
with every resource converted by the FHIR XML-to-JSON rules (arrays where an element repeats,
JSON numbers and booleans for those primitive types, xhtml as a string), driven by the compiled R4
structure definitions. Also copies ``json-patch-tests.json`` beside it.
"""

from __future__ import annotations

import shutil
import sys
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fhir_server.capability.registry import Node, Registry, load_registry  # noqa: E402
from fhir_server.fhirjson import dumps  # noqa: E402

SOURCE = ROOT.parent / "shared" / "fhir-test-cases" / "patch"
OUT = ROOT / "tests" / "data"
FHIR = "{http://hl7.org/fhir}"
XHTML = "{http://www.w3.org/1999/xhtml}"


def local(tag: str) -> str:
    return tag.split("}", 1)[1] if "}" in tag else tag


def resource(registry: Registry, el: ET.Element) -> dict[str, Any]:
    rtype = local(el.tag)
    out: dict[str, Any] = {"resourceType": rtype}
    out.update(children(registry, registry.types[rtype].root, el))
    return out


def children(registry: Registry, node: Node, el: ET.Element) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in ("id", "url"):
        if attr in el.attrib and attr in node.keys:
            out[attr] = el.attrib[attr]
    for child in el:
        name = local(child.tag)
        element = node.keys.get(name)
        if element is None:
            raise ValueError(f"unknown element {name} in {node.path}")
        if element.is_resource:
            inner = next(iter(child))
            value: Any = resource(registry, inner)
        elif element.type_code == "xhtml":
            child.tail = None
            value = ET.tostring(child, encoding="unicode")
        elif element.primitive is not None:
            raw = child.attrib.get("value")
            kind = element.primitive.json_kind
            value = raw if kind == "string" else (raw == "true" if kind == "boolean" else (int(raw) if kind == "integer" else Decimal(raw)))  # type: ignore[arg-type]
        else:
            assert element.target is not None
            value = children(registry, registry.node(*element.target), child)
        if element.is_array:
            out.setdefault(name, []).append(value)
        else:
            out[name] = value
    return out


def main() -> int:
    ET.register_namespace("", "http://www.w3.org/1999/xhtml")  # xhtml serialised as <div xmlns="...">
    registry = load_registry()
    tree = ET.parse(SOURCE / "fhir-patch-tests.xml")
    cases = []
    for case in tree.getroot().iter("case"):
        item: dict[str, Any] = {"name": case.attrib["name"], "mode": case.attrib.get("mode", "both")}
        for part in ("input", "diff", "output"):
            el = case.find(part)
            if el is not None and len(el):
                item[part] = resource(registry, el[0])
        error = case.find("error")
        if error is not None:
            item["error"] = error.attrib.get("msg") or (error.text or "").strip() or "error"
        cases.append(item)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fhir-patch-tests.json").write_bytes(dumps(cases, pretty=True) + b"\n")
    shutil.copyfile(SOURCE / "json-patch-tests.json", OUT / "json-patch-tests.json")
    print(f"wrote {len(cases)} FHIRPath Patch cases and copied the JSON Patch cases to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
