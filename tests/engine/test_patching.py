"""The official FHIRPath Patch and JSON Patch test cases (converted from ../shared by tools/convert_patch_tests.py)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from fhir_server import fhirjson
from fhir_server.capability.registry import Registry
from fhir_server.engine.patching import apply_fhirpath_patch, apply_json_patch
from fhir_server.errors import FhirError

DATA = Path(__file__).resolve().parent.parent / "data"
FHIRPATH_CASES = fhirjson.loads_stored((DATA / "fhir-patch-tests.json").read_bytes())
JSON_CASES = json.loads((DATA / "json-patch-tests.json").read_text())


def canonical(value: Any) -> Any:
    """Equal resources compare equal: XHTML by its canonical XML, everything else as is."""
    if isinstance(value, dict):
        return {k: (_c14n(v) if k == "div" and isinstance(v, str) else canonical(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def _c14n(xhtml: str) -> str:
    root = ET.fromstring(xhtml)
    for el in root.iter():
        el.text = (el.text or "").strip() or None
        el.tail = (el.tail or "").strip() or None
    return ET.canonicalize(ET.tostring(root, encoding="unicode"), strip_text=True)


def test_all_cases_are_here() -> None:
    assert len(FHIRPATH_CASES) == 33 and len(JSON_CASES) == 16


@pytest.mark.parametrize("case", FHIRPATH_CASES, ids=[c["name"] for c in FHIRPATH_CASES])
def test_fhirpath_patch_case(registry: Registry, case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(FhirError):
            apply_fhirpath_patch(registry, case["input"], case["diff"])
        return
    result = apply_fhirpath_patch(registry, case["input"], case["diff"])
    assert canonical(result) == canonical(case["output"])


@pytest.mark.parametrize("case", JSON_CASES, ids=[c["comment"] for c in JSON_CASES])
def test_json_patch_case(case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(FhirError):
            apply_json_patch(case["doc"], case["patch"])
        return
    assert apply_json_patch(case["doc"], case["patch"]) == case["expected"]
