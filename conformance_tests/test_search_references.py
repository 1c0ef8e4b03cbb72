"""Search across references over HTTP: chains, _has, _include/_revinclude, compartments, composites,
_list, _type, and a custom SearchParameter. Expected results are worked out by hand from the data
loaded here (every resource carries this run's tag, so other data on the server does not interfere).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from conformance_tests.client import FhirClient, parse

RUN = uuid.uuid4().hex[:10]
TAG = f"http://conformance.example/run|{RUN}"


def rid(name: str) -> str:
    return f"{name}-{RUN}"


def tagged(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "meta": {"tag": [{"system": "http://conformance.example/run", "code": RUN}]}}


DATA: list[dict[str, Any]] = [
    {"resourceType": "Organization", "id": rid("org"), "name": f"Clinic {RUN}"},
    {"resourceType": "Practitioner", "id": rid("drA"), "name": [{"family": "Alvarez"}]},
    {"resourceType": "Practitioner", "id": rid("drB"), "name": [{"family": "Bergstrom"}]},
    {"resourceType": "Patient", "id": rid("p1"), "gender": "female", "name": [{"family": "Okafor", "given": ["Ada"]}],
     "generalPractitioner": [{"reference": f"Practitioner/{rid('drA')}"}], "managingOrganization": {"reference": f"Organization/{rid('org')}"}},
    {"resourceType": "Patient", "id": rid("p2"), "gender": "male", "name": [{"family": "Lindqvist", "given": ["Bo"]}],
     "generalPractitioner": [{"reference": f"Practitioner/{rid('drB')}"}]},
    {"resourceType": "Patient", "id": rid("p3"), "gender": "female", "name": [{"family": "Okafor", "given": ["Cleo"]}],
     "generalPractitioner": [{"reference": f"Practitioner/{rid('drB')}"}]},
    {"resourceType": "Encounter", "id": rid("e1"), "status": "finished", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
     "subject": {"reference": f"Patient/{rid('p1')}"}},
    {"resourceType": "Observation", "id": rid("o1"), "status": "final", "subject": {"reference": f"Patient/{rid('p1')}"},
     "encounter": {"reference": f"Encounter/{rid('e1')}"},
     "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
     "valueQuantity": {"value": 88, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}},
    {"resourceType": "Observation", "id": rid("o2"), "status": "final", "subject": {"reference": f"Patient/{rid('p2')}"},
     "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
     "valueQuantity": {"value": 61, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}},
    {"resourceType": "Observation", "id": rid("o3"), "status": "final", "subject": {"reference": f"Patient/{rid('p3')}"},
     "performer": [{"reference": f"Practitioner/{rid('drA')}"}],
     "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
     "component": [
         {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
          "valueQuantity": {"value": 142, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
         {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
          "valueQuantity": {"value": 91, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]},
    {"resourceType": "MedicationRequest", "id": rid("m1"), "status": "active", "intent": "order",
     "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975"}]},
     "subject": {"reference": f"Patient/{rid('p1')}"}, "requester": {"reference": f"Practitioner/{rid('drA')}"}},
    {"resourceType": "Provenance", "id": rid("prov"), "recorded": "2024-01-01T00:00:00Z",
     "target": [{"reference": f"Observation/{rid('o1')}"}], "agent": [{"who": {"reference": f"Practitioner/{rid('drA')}"}}]},
    {"resourceType": "List", "id": rid("list"), "status": "current", "mode": "working",
     "entry": [{"item": {"reference": f"Patient/{rid('p1')}"}}, {"item": {"reference": f"Patient/{rid('p3')}"}}]},
]


@pytest.fixture(scope="module")
def loaded(fhir: FhirClient) -> FhirClient:
    for body in DATA:
        r = fhir.put(f"{body['resourceType']}/{body['id']}", tagged(body))
        assert r.status_code in (200, 201), r.text[:300]
    return fhir


def ids(bundle: dict[str, Any], mode: str = "match") -> set[str]:
    return {e["resource"]["id"].removesuffix(f"-{RUN}") for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode}


def search(fhir: FhirClient, path: str, **params: str) -> dict[str, Any]:
    r = fhir.get(path, params={"_tag": TAG, "_count": "100", **params})
    assert r.status_code == 200, r.text[:500]
    return parse(r)  # type: ignore[no-any-return]


def test_chains(loaded: FhirClient) -> None:
    assert ids(search(loaded, "Observation", **{"subject:Patient.family": "okafor"})) == {"o1", "o3"}
    assert ids(search(loaded, "Observation", **{"patient.gender": "male"})) == {"o2"}
    assert ids(search(loaded, "Observation", **{"subject:Patient.general-practitioner.family": "bergstrom"})) == {"o2", "o3"}
    assert ids(search(loaded, "Observation", **{"subject:Patient.general-practitioner:Practitioner.family:exact": "Alvarez"})) == {"o1"}
    assert ids(search(loaded, "Observation", **{"patient.organization.name": f"clinic {RUN}"})) == {"o1"}
    assert ids(search(loaded, "Observation", **{"encounter.class": "AMB"})) == {"o1"}


def test_reverse_chains(loaded: FhirClient) -> None:
    assert ids(search(loaded, "Patient", **{"_has:Observation:patient:code": "8867-4"})) == {"p1", "p2"}
    assert ids(search(loaded, "Patient", **{"_has:Observation:patient:code": "8867-4", "gender": "female"})) == {"p1"}
    assert ids(search(loaded, "Practitioner", **{"_has:Patient:general-practitioner:_has:Observation:patient:code": "85354-9"})) == {"drB"}
    assert ids(search(loaded, "Observation", **{"_has:Provenance:target:agent": f"Practitioner/{rid('drA')}"})) == {"o1"}


def test_include_and_revinclude(loaded: FhirClient) -> None:
    b = search(loaded, "MedicationRequest", _include="MedicationRequest:subject")
    assert ids(b) == {"m1"} and ids(b, "include") == {"p1"} and b["total"] == 1
    b = search(loaded, "Observation", _include="Observation:subject:Patient", code="8867-4")
    assert ids(b, "include") == {"p1", "p2"}
    b = search(loaded, "Observation", **{"_include": "Observation:subject", "_include:iterate": "Patient:general-practitioner"})
    assert ids(b, "include") == {"p1", "p2", "p3", "drA", "drB"}
    b = search(loaded, "Patient", _id=rid("p1"), _revinclude="Observation:subject")
    assert ids(b) == {"p1"} and ids(b, "include") == {"o1"}
    b = search(loaded, "Observation", _id=rid("o1"), _revinclude="Provenance:target")
    assert ids(b, "include") == {"prov"}
    b = search(loaded, "Observation", _include="*", code="8867-4")
    assert ids(b, "include") == {"p1", "p2", "e1"}
    # included resources appear once, count in neither _total nor _count
    r = loaded.get("Observation", params={"_tag": TAG, "_include": "Observation:performer", "_count": "1", "_sort": "-_id"})
    page = parse(r)
    assert len([e for e in page["entry"] if e["search"]["mode"] == "match"]) == 1 and page["total"] == 3


def test_compartments(loaded: FhirClient) -> None:
    b = parse(loaded.get(f"Patient/{rid('p1')}/Observation"))
    assert ids(b) == {"o1"}
    b = parse(loaded.get(f"Patient/{rid('p3')}/Observation", params={"code": "85354-9"}))
    assert ids(b) == {"o3"}
    b = parse(loaded.get(f"Patient/{rid('p1')}/*", params={"_count": "100"}))
    assert ids(b) == {"p1", "e1", "o1", "m1"}  # the List only lists p1: it is not about p1 (List.subject)
    b = parse(loaded.get(f"Practitioner/{rid('drA')}/Observation"))
    assert ids(b) == {"o3"}


def test_composites(loaded: FhirClient) -> None:
    assert ids(search(loaded, "Observation", **{"code-value-quantity": "http://loinc.org|8867-4$gt70"})) == {"o1"}
    assert ids(search(loaded, "Observation", **{"component-code-value-quantity": "http://loinc.org|8480-6$gt140"})) == {"o3"}
    assert ids(search(loaded, "Observation", **{"component-code-value-quantity": "http://loinc.org|8462-4$gt140"})) == set()
    assert ids(search(loaded, "Observation", **{"combo-code-value-quantity": "8867-4$61"})) == {"o2"}


def test_list_and_type(loaded: FhirClient) -> None:
    assert ids(search(loaded, "Patient", _list=rid("list"))) == {"p1", "p3"}
    b = parse(loaded.get("", params={"_type": "Patient,Practitioner", "_tag": TAG, "_count": "100"}))
    assert ids(b) == {"p1", "p2", "p3", "drA", "drB"}


def test_custom_search_parameter(loaded: FhirClient) -> None:
    url = "http://example.org/fhir/StructureDefinition/birth-sex"
    code = f"birth-sex-{RUN}"
    for pid, sex in (("c1", "F"), ("c2", "M")):
        loaded.put(f"Patient/{rid(pid)}", tagged({"resourceType": "Patient", "id": rid(pid), "extension": [{"url": url, "valueCode": sex}]}))
    sp = {"resourceType": "SearchParameter", "id": rid("sp"), "url": f"http://example.org/fhir/SearchParameter/{code}", "name": "birthsex",
          "status": "active", "description": "Birth sex extension", "code": code, "base": ["Patient"], "type": "token",
          "expression": f"Patient.extension('{url}').value"}
    assert loaded.put(f"SearchParameter/{rid('sp')}", sp).status_code == 201
    deadline = time.monotonic() + 90
    while True:  # the server indexes the stored Patients in the background; until then it says so
        r = loaded.get("Patient", params={code: "F", "_tag": TAG}, headers={"Prefer": "handling=strict"})
        if r.status_code == 200:
            break
        assert r.status_code == 400 and "not yet usable" in r.text, r.text[:300]
        assert time.monotonic() < deadline, "the custom parameter never became usable"
        time.sleep(0.5)
    assert ids(parse(r)) == {"c1"}
