"""Structural validation against the R4 definitions."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from fhir_server.capability.registry import Registry
from fhir_server.capability.validation import validate_resource
from fhir_server.errors import BadRequest


def problems(registry: Registry, resource: Any, **kw: Any) -> list[tuple[str, str]]:
    try:
        validate_resource(registry, resource, **kw)
    except BadRequest as exc:
        return [(i.expression[0] if i.expression else "", i.diagnostics) for i in exc.issues]
    return []


def test_registry_has_every_r4_resource_type(registry: Registry) -> None:
    assert len(registry.resource_types) == 146
    assert "Patient" in registry.resource_types and "Resource" not in registry.resource_types
    assert registry.is_resource_type("Observation") and not registry.is_resource_type("observation")


def test_valid_patient(registry: Registry) -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p-1",
        "meta": {"tag": [{"system": "http://x", "code": "a"}]},
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Hi</div>'},
        "name": [{"family": "Doe", "given": ["J", None], "_given": [None, {"extension": [{"url": "http://e", "valueString": "x"}]}]}],
        "birthDate": "1970-02",
        "multipleBirthInteger": 2,
        "deceasedBoolean": False,
        "contained": [{"resourceType": "Organization", "id": "o1", "name": "Org"}],
        "managingOrganization": {"reference": "#o1"},
    }
    assert problems(registry, patient) == []


@pytest.mark.parametrize(
    ("resource", "where", "fragment"),
    [
        ({"resourceType": "Patient", "foo": 1}, "Patient.foo", "Unknown element"),
        ({"resourceType": "Patient", "active": "true"}, "Patient.active", "boolean"),
        ({"resourceType": "Patient", "birthDate": "2020-02-30"}, "Patient.birthDate", "no such day"),
        ({"resourceType": "Patient", "birthDate": "20-01-01"}, "Patient.birthDate", "not a valid date"),
        ({"resourceType": "Patient", "name": {"family": "x"}}, "Patient.name", "JSON array"),
        ({"resourceType": "Patient", "gender": ["male"]}, "Patient.gender", "does not repeat"),
        ({"resourceType": "Patient", "name": []}, "Patient.name", "empty array"),
        ({"resourceType": "Patient", "name": [{}]}, "Patient.name[0]", "{} is not allowed"),
        ({"resourceType": "Patient", "gender": ""}, "Patient.gender", "empty"),
        ({"resourceType": "Patient", "id": "a_b"}, "Patient.id", "1 to 64"),
        ({"resourceType": "Patient", "id": "a" * 65}, "Patient.id", "1 to 64"),
        ({"resourceType": "Patient", "multipleBirthInteger": 1.5}, "Patient.multipleBirthInteger", "integer"),
        ({"resourceType": "Patient", "multipleBirthInteger": 2**31}, "Patient.multipleBirthInteger", "32-bit"),
        ({"resourceType": "Patient", "deceasedBoolean": True, "deceasedDateTime": "2020"}, "Patient.deceasedDateTime", "Only one"),
        ({"resourceType": "Patient", "deceased": True}, "Patient.deceased", "Unknown element"),
        ({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": "1"}}, "Observation.valueQuantity.value", "number"),
        ({"resourceType": "Patient", "contained": [{"resourceType": "Patient", "contained": [{"resourceType": "Patient"}]}]}, "Patient.contained[0].contained", "dom-2"),
        ({"resourceType": "Patient", "text": {"status": "generated", "div": "<div>no namespace</div>"}}, "Patient.text.div", "root element"),
        ({"resourceType": "Patient", "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><script>x</script></div>'}}, "Patient.text.div", "script"),
        ({"resourceType": "Patient", "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml" onclick="x">a</div>'}}, "Patient.text.div", "event handler"),
        ({"resourceType": "Patient", "communication": [{"preferred": True}]}, "Patient.communication[0].language", "Missing required"),
        ({"resourceType": "Patient", "name": [{"given": [None]}]}, "Patient.name[0].given[0]", "null"),
        ({"resourceType": "Patient", "_birthDate": {"extension": [{"url": "http://e"}]}, "resourceType2": 1}, "Patient.resourceType2", "Unknown element"),
        ({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Patient", "bad": 1}}]}, "Bundle.entry[0].resource.bad", "Unknown element"),
        ({"resourceType": "Nope"}, "resourceType", "Unknown resource type"),
        ({"resourceType": "Account", "meta": {"": None}}, "Account.meta.", "Unknown element"),
        ({"id": "x"}, "(root)", "no resourceType"),
    ],
)
def test_invalid_resources_name_the_element(registry: Registry, resource: Any, where: str, fragment: str) -> None:
    found = problems(registry, resource, missing_required="error")
    assert any(w == where and fragment in d for w, d in found), found


def test_missing_required_is_a_warning_when_configured(registry: Registry) -> None:
    resource = {"resourceType": "Observation", "code": {"text": "x"}}  # no status
    assert problems(registry, resource, missing_required="error") == [
        ("Observation.status", "Missing required element 'status' (min 1) in Observation")
    ]
    warnings = validate_resource(registry, resource, missing_required="warning")
    assert [w.expression for w in warnings] == [("Observation.status",)]
    assert warnings[0].severity == "warning"


def test_primitive_extension_alone_is_allowed(registry: Registry) -> None:
    resource = {"resourceType": "Patient", "_birthDate": {"extension": [{"url": "http://e", "valueCode": "unknown"}]}}
    assert problems(registry, resource) == []


def test_content_reference_recursion(registry: Registry) -> None:
    q = {
        "resourceType": "Questionnaire",
        "status": "draft",
        "item": [{"linkId": "1", "type": "group", "item": [{"linkId": "1.1", "type": "string", "item": [{"linkId": "x", "type": "string", "bogus": 1}]}]}],
    }
    assert problems(registry, q) == [("Questionnaire.item[0].item[0].item[0].bogus", "Unknown element 'bogus' in Questionnaire.item")]


def test_decimal_and_extension_values(registry: Registry) -> None:
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "valueQuantity": {"value": Decimal("1.50"), "unit": "mg"},
        "extension": [{"url": "http://e", "valueDecimal": 3}],
    }
    assert problems(registry, obs) == []


def test_issue_count_is_bounded(registry: Registry) -> None:
    resource = {"resourceType": "Patient", **{f"bad{i}": i for i in range(200)}}
    assert len(problems(registry, resource)) == 50


def test_base64_binary_is_checked_in_linear_time_and_not_held_to_the_string_limit(registry: Registry) -> None:
    import base64
    import os

    data = base64.b64encode(os.urandom(3 * 1024 * 1024)).decode()  # 4 MiB of base64: more than a string may hold
    assert problems(registry, {"resourceType": "Binary", "contentType": "application/pdf", "data": data}) == []
    wrapped = "\n".join(data[i:i + 76] for i in range(0, 76 * 20, 76))  # MIME line breaks between quads
    assert problems(registry, {"resourceType": "Binary", "contentType": "text/plain", "data": wrapped}) == []
    for bad in ("abc", "ab!=", "    "):
        [(where, text)] = problems(registry, {"resourceType": "Binary", "contentType": "text/plain", "data": bad})
        assert where == "Binary.data" and ("base64Binary" in text or "empty" in text)
    assert problems(registry, {"resourceType": "Patient", "name": [{"family": "x" * (1024 * 1024 + 1)}]}) == [
        ("Patient.name[0].family", "string is longer than 1 MB")]
