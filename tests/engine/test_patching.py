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


def op(kind: str, path: str, **parts: Any) -> dict[str, Any]:
    part: list[dict[str, Any]] = [{"name": "type", "valueCode": kind}, {"name": "path", "valueString": path}]
    for name, value in parts.items():
        if name == "name":
            part.append({"name": "name", "valueString": value})
        else:
            part.append({"name": "value", **value})
    return {"name": "operation", "part": part}


def patch_of(*ops: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(ops)}


def test_a_choice_element_replaced_by_another_type_changes_key(registry: Registry) -> None:
    patient = {"resourceType": "Patient", "id": "p", "deceasedBoolean": True, "_deceasedBoolean": {"id": "x"}}
    out = apply_fhirpath_patch(registry, patient, patch_of(op("replace", "Patient.deceased", value={"valueDateTime": "2020-01-02"})))
    assert out == {"resourceType": "Patient", "id": "p", "deceasedDateTime": "2020-01-02"}


def test_names_are_matched_as_the_definitions_say(registry: Registry) -> None:
    """periodMax is not period[x]: deleting an absent period leaves periodMax alone."""
    request = {"resourceType": "MedicationRequest", "id": "m", "status": "active", "intent": "order", "subject": {"reference": "Patient/p"},
               "medicationCodeableConcept": {"text": "x"},
               "dosageInstruction": [{"timing": {"repeat": {"periodMax": 4}}}]}
    out = apply_fhirpath_patch(registry, request, patch_of(op("delete", "MedicationRequest.dosageInstruction.timing.repeat.period")))
    assert out["dosageInstruction"][0]["timing"]["repeat"] == {"periodMax": 4}
    out = apply_fhirpath_patch(registry, request, patch_of(op("delete", "MedicationRequest.medication")))
    assert "medicationCodeableConcept" not in out


def test_deleting_a_primitive_takes_its_extensions(registry: Registry) -> None:
    patient = {"resourceType": "Patient", "id": "p", "birthDate": "1970-01-01", "_birthDate": {"extension": [{"url": "u", "valueString": "v"}]},
               "name": [{"given": ["A", "B"], "_given": [{"id": "a"}, None]}]}
    out = apply_fhirpath_patch(registry, patient, patch_of(op("delete", "Patient.birthDate"), op("delete", "Patient.name.given[0]")))
    assert out == {"resourceType": "Patient", "id": "p", "name": [{"given": ["B"]}]}


@pytest.mark.parametrize("parameters", [
    {"resourceType": "Parameters", "parameter": "x"},
    {"resourceType": "Parameters", "parameter": [1]},
    {"resourceType": "Parameters", "parameter": {"name": "operation"}},
    {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [1]}]},
    {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": {"name": "type"}}]},
    {"resourceType": "Parameters", "parameter": [{"name": ["operation"], "part": []}]},
    {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [{"name": "type", "valueCode": ["add"]}]}]},
    {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"}, {"name": "name", "valueString": "x"},
        {"name": "value", "part": 5}]}]},
    {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"}, {"name": "name", "valueString": "x"},
        {"name": "value", "part": [5]}]}]},
])
def test_malformed_fhirpath_patches_are_400(registry: Registry, parameters: dict[str, Any]) -> None:
    with pytest.raises(FhirError) as info:
        apply_fhirpath_patch(registry, {"resourceType": "Patient", "id": "p"}, parameters)
    assert info.value.status == 400
