"""Search through the engine on every back-end: each parameter type, modifier, prefix and result control."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from fhir_server.engine.engine import Engine
from fhir_server.errors import BadRequest, NotFound
from testsupport.engine_calls import call, resource


def put(engine: Engine, tenant: str, body: dict[str, Any]) -> None:
    assert call(engine, tenant, "PUT", f"{body['resourceType']}/{body['id']}", body).status in (200, 201)


def search(engine: Engine, tenant: str, rtype: str, query: str = "", **kw: Any) -> dict[str, Any]:
    params = tuple(parse_qsl(query, keep_blank_values=True))
    path = rtype
    return resource(call(engine, tenant, "GET", path, params=params, **kw))


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def found(engine: Engine, tenant: str, rtype: str, query: str) -> set[str]:
    return set(ids(search(engine, tenant, rtype, query + "&_count=1000")))


@pytest.fixture
def people(engine: Engine, tenant: str) -> str:
    put(engine, tenant, {
        "resourceType": "Patient", "id": "p1", "active": True, "gender": "female", "birthDate": "1970-03-15",
        "name": [{"family": "Müller-Lüdenscheidt", "given": ["Anna", "Maria"]}],
        "identifier": [{"system": "http://hospital/mrn", "value": "MRN-1",
                        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}],
        "telecom": [{"system": "phone", "value": "555-0100"}],
        "address": [{"line": ["1 Main Street"], "city": "Springfield", "postalCode": "12345"}],
        "meta": {"tag": [{"system": "http://tags", "code": "vip"}], "profile": ["http://example.org/StructureDefinition/p"],
                 "security": [{"system": "http://sec", "code": "R"}], "source": "http://source.example/a"},
        "generalPractitioner": [{"reference": "Practitioner/dr1"}],
        "managingOrganization": {"reference": "http://other.example/fhir/Organization/o9"},
    })
    put(engine, tenant, {
        "resourceType": "Patient", "id": "p2", "active": False, "gender": "male", "birthDate": "1985",
        "name": [{"family": "Smith", "given": ["John"], "text": "John Smith"}],
        "identifier": [{"system": "http://hospital/mrn", "value": "MRN-2"}],
        "address": [{"city": "Shelbyville"}],
        "generalPractitioner": [{"reference": "Practitioner/dr2"}],
    })
    put(engine, tenant, {"resourceType": "Patient", "id": "p3", "name": [{"family": "Smithers"}], "deceasedBoolean": True})
    put(engine, tenant, {"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Who"}]})
    put(engine, tenant, {"resourceType": "Practitioner", "id": "dr2", "name": [{"family": "House"}]})
    return tenant


@pytest.fixture
def observations(engine: Engine, people: str) -> str:
    tenant = people
    def obs(oid: str, code: str, value: Any, when: str, subject: str, **extra: Any) -> None:
        body = {"resourceType": "Observation", "id": oid, "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": f"Code {code}"}], "text": f"text {code}"},
                "subject": {"reference": subject}, "effectiveDateTime": when, **extra}
        if value is not None:
            body["valueQuantity"] = value
        put(engine, tenant, body)
    obs("o1", "8480-6", {"value": 120, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}, "2024-05-01T10:00:00Z", "Patient/p1")
    obs("o2", "8480-6", {"value": 140.5, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}, "2024-05-02T10:00:00+02:00", "Patient/p2")
    obs("o3", "2339-0", {"value": 5.4, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}, "2023-12-31", "Patient/p1")
    obs("o4", "2339-0", {"value": 0.0054, "unit": "g", "system": "http://unitsofmeasure.org", "code": "g"}, "2022", "Patient/p2")
    obs("o5", "1234-5", None, "2024-05-01T23:30:00-05:00", "Patient/p3", category=[{"coding": [{"system": "http://cat", "code": "lab"}]}])
    return tenant


def test_string_search(engine: Engine, people: str) -> None:
    t = people
    assert found(engine, t, "Patient", "name=smith") == {"p2", "p3"}  # starts-with, case-insensitive
    assert found(engine, t, "Patient", "name=SMITHE") == {"p3"}
    assert found(engine, t, "Patient", "family=muller") == {"p1"}  # accent-insensitive
    assert found(engine, t, "Patient", "family:exact=Smith") == {"p2"}
    assert found(engine, t, "Patient", "family:exact=smith") == set()
    assert found(engine, t, "Patient", "name:contains=ithe") == {"p3"}
    assert found(engine, t, "Patient", "name:contains=lüden") == {"p1"}
    assert found(engine, t, "Patient", "name:contains=it") == {"p2", "p3"}  # shorter than a trigram
    assert found(engine, t, "Patient", "given=maria") == {"p1"}
    assert found(engine, t, "Patient", "name=john smith") == {"p2"}  # HumanName.text
    assert found(engine, t, "Patient", "address=springfield") == {"p1"}
    assert found(engine, t, "Patient", "address-city=shelby") == {"p2"}
    assert found(engine, t, "Patient", "address-postalcode=123") == {"p1"}
    assert found(engine, t, "Patient", "phonetic=Smyth") == {"p2"}


def test_long_string_prefix_is_confirmed_after_decryption(engine: Engine, tenant: str) -> None:
    long_name = "Wolfeschlegelsteinhausenbergerdorff-Alpha"
    put(engine, tenant, {"resourceType": "Patient", "id": "a", "name": [{"family": long_name}]})
    put(engine, tenant, {"resourceType": "Patient", "id": "b", "name": [{"family": long_name[:33] + "Beta"}]})
    assert found(engine, tenant, "Patient", f"family={long_name[:38]}") == {"a"}
    assert found(engine, tenant, "Patient", f"family={long_name[:32]}") == {"a", "b"}
    assert search(engine, tenant, "Patient", f"family={long_name[:38]}&_total=accurate")["total"] == 1


def test_token_search(engine: Engine, people: str) -> None:
    t = people
    assert found(engine, t, "Patient", "gender=female") == {"p1"}
    assert found(engine, t, "Patient", "gender=male,female") == {"p1", "p2"}
    assert found(engine, t, "Patient", "gender:not=male") == {"p1", "p3"}
    assert found(engine, t, "Patient", "identifier=MRN-1") == {"p1"}
    assert found(engine, t, "Patient", "identifier=http://hospital/mrn|MRN-2") == {"p2"}
    assert found(engine, t, "Patient", "identifier=http://other|MRN-2") == set()
    assert found(engine, t, "Patient", "identifier=http://hospital/mrn|") == {"p1", "p2"}
    assert found(engine, t, "Patient", "identifier=|MRN-1") == set()  # it has a system
    assert found(engine, t, "Patient", "identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|MRN-1") == {"p1"}
    assert found(engine, t, "Patient", "active=true") == {"p1"}
    assert found(engine, t, "Patient", "deceased=true") == {"p3"}
    assert found(engine, t, "Patient", "phone=555-0100") == {"p1"}
    assert found(engine, t, "Patient", "gender:missing=true") == {"p3"}
    assert found(engine, t, "Patient", "gender:missing=false") == {"p1", "p2"}
    assert found(engine, t, "Patient", "_tag=http://tags|vip") == {"p1"}
    assert found(engine, t, "Patient", "_security=R") == {"p1"}
    assert found(engine, t, "Patient", "_profile=http://example.org/StructureDefinition/p") == {"p1"}
    assert found(engine, t, "Patient", "_source=http://source.example/a") == {"p1"}
    assert found(engine, t, "Patient", "_id=p1,p3") == {"p1", "p3"}


def test_token_text_and_code(engine: Engine, observations: str) -> None:
    t = observations
    assert found(engine, t, "Observation", "code=8480-6") == {"o1", "o2"}
    assert found(engine, t, "Observation", "code=http://loinc.org|2339-0") == {"o3", "o4"}
    assert found(engine, t, "Observation", "code:text=text 1234") == {"o5"}
    assert found(engine, t, "Observation", "code:text=code 2339") == {"o3", "o4"}
    assert found(engine, t, "Observation", "category=lab") == {"o5"}
    assert found(engine, t, "Observation", "code=8480-6&subject=Patient/p2") == {"o2"}  # AND


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("birthdate=1970", {"p1"}),
        ("birthdate=1970-03", {"p1"}),
        ("birthdate=1970-03-15", {"p1"}),
        ("birthdate=eq1985-06-01", set()),  # 1985 is wider than the day searched
        ("birthdate=ge1985-06-01", {"p2"}),  # but overlaps what lies above it
        ("birthdate=lt1971", {"p1"}),
        ("birthdate=gt1971", {"p2"}),
        ("birthdate=ne1970", {"p2"}),
        ("birthdate=sa1970-12-31", {"p2"}),
        ("birthdate=eb1985", {"p1"}),
        ("birthdate=le1970-03-15", {"p1"}),
        ("birthdate=ge1970-03-15&birthdate=le1970-03-15", {"p1"}),
        ("birthdate=1970,1985", {"p1", "p2"}),
        ("birthdate:missing=true", {"p3"}),
    ],
)
def test_date_prefixes(engine: Engine, people: str, query: str, expected: set[str]) -> None:
    assert found(engine, people, "Patient", query) == expected


def test_dates_respect_time_zones(engine: Engine, observations: str) -> None:
    t = observations
    # o2 is 2024-05-02T10:00+02:00 = 08:00Z; o5 is 2024-05-01T23:30-05:00 = 2024-05-02T04:30Z
    assert found(engine, t, "Observation", "date=2024-05-02T08:00:00Z") == {"o2"}
    assert found(engine, t, "Observation", "date=ge2024-05-02T00:00:00Z&date=lt2024-05-03") == {"o2", "o5"}
    assert found(engine, t, "Observation", "date=2024-05-01") == {"o1"}
    assert found(engine, t, "Observation", "date=2024-05-01T23:30-05:00") == {"o5"}


def test_quantity_search(engine: Engine, observations: str) -> None:
    t = observations
    assert found(engine, t, "Observation", "value-quantity=120") == {"o1"}
    assert found(engine, t, "Observation", "value-quantity=gt130") == {"o2"}
    assert found(engine, t, "Observation", "value-quantity=lt6") == {"o3", "o4"}
    assert found(engine, t, "Observation", "value-quantity=140.5|http://unitsofmeasure.org|mm[Hg]") == {"o2"}
    assert found(engine, t, "Observation", "value-quantity=140|http://unitsofmeasure.org|mm[Hg]") == set()
    assert found(engine, t, "Observation", "value-quantity=140.5||mmHg") == {"o2"}
    # UCUM: 5.4 mg is 0.0054 g; both are found whichever unit is asked for.
    assert found(engine, t, "Observation", "value-quantity=5.4|http://unitsofmeasure.org|mg") == {"o3", "o4"}
    assert found(engine, t, "Observation", "value-quantity=0.0054|http://unitsofmeasure.org|g") == {"o3", "o4"}
    assert found(engine, t, "Observation", "value-quantity=5.4e3|http://unitsofmeasure.org|ug") == {"o3", "o4"}
    # 5400 ug claims a precision of 1 ug, finer than 5.4 mg's 0.1 mg: eq needs the stored range inside.
    assert found(engine, t, "Observation", "value-quantity=5400|http://unitsofmeasure.org|ug") == set()
    assert found(engine, t, "Observation", "value-quantity:missing=true") == {"o5"}


def test_number_search(engine: Engine, tenant: str) -> None:
    for rid, p in (("r1", 0.5), ("r2", 0.25), ("r3", 100)):
        put(engine, tenant, {"resourceType": "RiskAssessment", "id": rid, "status": "final", "subject": {"reference": "Patient/x"},
                             "prediction": [{"probabilityDecimal": p}]})
    assert found(engine, tenant, "RiskAssessment", "probability=0.5") == {"r1"}
    assert found(engine, tenant, "RiskAssessment", "probability=gt0.3") == {"r1", "r3"}
    assert found(engine, tenant, "RiskAssessment", "probability=le0.25") == {"r2"}
    assert found(engine, tenant, "RiskAssessment", "probability=100") == {"r3"}
    assert found(engine, tenant, "RiskAssessment", "probability=1e2") == {"r3"}
    assert found(engine, tenant, "RiskAssessment", "probability=ap0.26") == {"r2"}


def test_reference_search(engine: Engine, observations: str) -> None:
    t = observations
    assert found(engine, t, "Observation", "subject=Patient/p1") == {"o1", "o3"}
    assert found(engine, t, "Observation", "subject=p1") == {"o1", "o3"}
    assert found(engine, t, "Observation", "patient=p2") == {"o2", "o4"}
    assert found(engine, t, "Observation", "subject:Patient=p3") == {"o5"}
    assert found(engine, t, "Observation", "subject:Group=p3") == set()
    assert found(engine, t, "Observation", "subject=http://test/fhir/" + t + "/Patient/p1") == {"o1", "o3"}
    assert found(engine, t, "Patient", "general-practitioner=Practitioner/dr1") == {"p1"}
    assert found(engine, t, "Patient", "organization=http://other.example/fhir/Organization/o9") == {"p1"}
    assert found(engine, t, "Patient", "organization=Organization/o9") == set()  # another server's o9
    assert found(engine, t, "Observation", "subject:missing=true") == set()


def test_reference_identifier_and_uri(engine: Engine, tenant: str) -> None:
    put(engine, tenant, {"resourceType": "Observation", "id": "oi", "status": "final", "code": {"text": "x"},
                         "subject": {"identifier": {"system": "http://hospital/mrn", "value": "MRN-9"}}})
    assert found(engine, tenant, "Observation", "subject:identifier=http://hospital/mrn|MRN-9") == {"oi"}
    assert found(engine, tenant, "Observation", "subject:identifier=MRN-9") == {"oi"}
    put(engine, tenant, {"resourceType": "ValueSet", "id": "vs", "status": "active", "url": "http://acme.org/fhir/ValueSet/123"})
    assert found(engine, tenant, "ValueSet", "url=http://acme.org/fhir/ValueSet/123") == {"vs"}
    assert found(engine, tenant, "ValueSet", "url:below=http://acme.org/fhir") == {"vs"}
    assert found(engine, tenant, "ValueSet", "url:below=http://acme.org/fh") == set()
    assert found(engine, tenant, "ValueSet", "url:above=http://acme.org/fhir/ValueSet/123/_history/5") == {"vs"}
    assert found(engine, tenant, "ValueSet", "url=http://acme.org/fhir") == set()


def test_updates_and_deletes_are_reflected(engine: Engine, people: str) -> None:
    t = people
    put(engine, t, {"resourceType": "Patient", "id": "p2", "name": [{"family": "Jones"}]})
    assert found(engine, t, "Patient", "name=smith") == {"p3"}
    assert found(engine, t, "Patient", "name=jones") == {"p2"}
    call(engine, t, "DELETE", "Patient/p3")
    assert found(engine, t, "Patient", "name=smith") == set()
    assert "p3" not in found(engine, t, "Patient", "")


def test_paging_and_sorting(engine: Engine, tenant: str) -> None:
    for i in range(12):
        put(engine, tenant, {"resourceType": "Patient", "id": f"s{i:02d}", "birthDate": f"{1950 + (i * 7) % 12}-01-01",
                             "name": [{"family": f"Fam{(i * 5) % 12:02d}"}]})
    b = search(engine, tenant, "Patient", "_count=5&_sort=birthdate")
    pages = [ids(b)]
    assert b["total"] == 12
    while (nxt := _link(b, "next")) is not None:
        # A write between pages must neither repeat nor skip what remains.
        put(engine, tenant, {"resourceType": "Patient", "id": f"late{len(pages)}", "birthDate": "1900-01-01"})
        b = _follow(engine, tenant, nxt)
        pages.append(ids(b))
    flat = [x for p in pages for x in p]
    assert len(flat) == 12 and len(set(flat)) == 12 and [len(p) for p in pages] == [5, 5, 2]
    years = {f"s{i:02d}": 1950 + (i * 7) % 12 for i in range(12)}
    assert [years[x] for x in flat] == sorted(years.values())
    back = _follow(engine, tenant, _link(b, "previous"))  # type: ignore[arg-type]
    assert ids(back) == pages[1]
    desc = ids(search(engine, tenant, "Patient", "_id=" + ",".join(years) + "&_sort=-birthdate,_id&_count=100"))
    assert desc == sorted(years, key=lambda x: (-years[x], x))
    by_name = ids(search(engine, tenant, "Patient", "_id=" + ",".join(years) + "&_sort=family&_count=4"))
    assert by_name == sorted(years, key=lambda x: f"fam{(int(x[1:]) * 5) % 12:02d}")[:4]
    by_name_page2 = _follow(engine, tenant, _link(search(engine, tenant, "Patient", "_id=" + ",".join(years) + "&_sort=family&_count=4"), "next"))  # type: ignore[arg-type]
    assert ids(by_name_page2) == sorted(years, key=lambda x: f"fam{(int(x[1:]) * 5) % 12:02d}")[4:8]


def _link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((l["url"] for l in bundle["link"] if l["relation"] == relation), None)


def _follow(engine: Engine, tenant: str, url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    path = parts.path.split(f"/fhir/{tenant}/", 1)[1]
    return resource(call(engine, tenant, "GET", path, params=tuple(parse_qsl(parts.query))))


def test_total_summary_and_elements(engine: Engine, observations: str) -> None:
    t = observations
    assert search(engine, t, "Observation", "_total=none").get("total") is None
    assert search(engine, t, "Observation", "_total=accurate&_count=1")["total"] == 5
    count = search(engine, t, "Observation", "code=8480-6&_summary=count")
    assert count["total"] == 2 and "entry" not in count
    summary = search(engine, t, "Patient", "_id=p1&_summary=true")["entry"][0]["resource"]
    assert "name" in summary and "telecom" in summary and "address" in summary
    assert any(tag["code"] == "SUBSETTED" for tag in summary["meta"]["tag"])
    elements = search(engine, t, "Patient", "_id=p1&_elements=gender,birthDate")["entry"][0]["resource"]
    assert set(elements) == {"resourceType", "id", "meta", "gender", "birthDate"}
    data = search(engine, t, "Observation", "_id=o1&_summary=data")["entry"][0]["resource"]
    assert "text" not in data


def test_include_and_revinclude(engine: Engine, observations: str) -> None:
    t = observations
    b = search(engine, t, "Observation", "code=8480-6&_include=Observation:subject")
    assert set(ids(b)) == {"o1", "o2"} and set(ids(b, "include")) == {"p1", "p2"}
    assert b["total"] == 2
    b = search(engine, t, "Patient", "_id=p1&_revinclude=Observation:subject")
    assert ids(b) == ["p1"] and set(ids(b, "include")) == {"o1", "o3"}
    b = search(engine, t, "Observation", "_id=o1&_include=Observation:subject&_include:iterate=Patient:general-practitioner")
    assert set(ids(b, "include")) == {"p1", "dr1"}
    b = search(engine, t, "Observation", "_id=o1,o3&_include=*")
    assert ids(b, "include") == ["p1"]  # once, though both point at it
    b = search(engine, t, "Observation", "_id=o1&_include=Observation:subject:Group")
    assert ids(b, "include") == []


def test_system_search_and_post_search(engine: Engine, observations: str) -> None:
    t = observations
    b = resource(call(engine, t, "GET", "", params=(("_type", "Patient,Practitioner"), ("_id", "p1,dr1,o1"))))
    assert set(ids(b)) == {"p1", "dr1"}
    b = resource(call(engine, t, "GET", "", params=(("_id", "p1,o1"),)))
    assert set(ids(b)) == {"p1", "o1"}
    via_get = ids(search(engine, t, "Observation", "code=8480-6&_sort=_id"))
    via_post = ids(resource(call(engine, t, "POST", "Observation/_search", params=(("code", "8480-6"), ("_sort", "_id")))))
    assert via_get == via_post == ["o1", "o2"]


def test_unknown_parameters_lenient_and_strict(engine: Engine, people: str) -> None:
    t = people
    b = search(engine, t, "Patient", "nonsense=1&gender=male")
    assert ids(b) == ["p2"]
    assert "nonsense" not in _link(b, "self")  # type: ignore[operator]
    assert any(e["search"]["mode"] == "outcome" for e in b["entry"])
    with pytest.raises(BadRequest) as info:
        search(engine, t, "Patient", "nonsense=1", prefer_handling="strict")
    assert info.value.issues[0].expression == ("nonsense",)


@pytest.mark.parametrize(
    ("rtype", "query", "where"),
    [
        ("Patient", "birthdate=2020-13-01", "birthdate"),
        ("Patient", "birthdate=yesterday", "birthdate"),
        ("Patient", "name=ge2020", "name"),
        ("Patient", "name:fuzzy=x", "name:fuzzy"),
        ("Patient", "gender:in=http://vs", "gender:in"),
        ("Observation", "value-quantity=1|2|3|4", "value-quantity"),
        ("Observation", "value-quantity=abc", "value-quantity"),
        ("Patient", "_count=lots", "_count"),
        ("Patient", "_sort=nonsense", "_sort"),
        ("Patient", "gender:missing=maybe", "gender:missing"),
        ("Patient", "_include=Patient:name", "_include"),
        ("Patient", "_summary=everything", "_summary"),
        ("Patient", "general-practitioner=a/b/c", "general-practitioner"),
    ],
)
def test_bad_searches_name_the_parameter(engine: Engine, tenant: str, rtype: str, query: str, where: str) -> None:
    with pytest.raises(BadRequest) as info:
        search(engine, tenant, rtype, query)
    expressions = [e for i in info.value.issues for e in i.expression]
    assert where in expressions or any(where in i.diagnostics for i in info.value.issues), info.value.issues


# --- chains, _has, _list (search across references) -------------------------------------------------


def test_chained_parameters(engine: Engine, observations: str) -> None:
    t = observations
    assert found(engine, t, "Observation", "subject:Patient.name=smith") == {"o2", "o4", "o5"}
    assert found(engine, t, "Observation", "subject.name=smith") == {"o2", "o4", "o5"}  # subject may be several types
    assert found(engine, t, "Observation", "patient.family:exact=Smith") == {"o2", "o4"}
    assert found(engine, t, "Observation", "patient.general-practitioner.name=house") == {"o2", "o4"}
    assert found(engine, t, "Observation", "patient.general-practitioner:Practitioner.family=who&code=8480-6") == {"o1"}
    assert found(engine, t, "Observation", "subject:Patient.identifier=http://hospital/mrn|MRN-1") == {"o1", "o3"}
    assert found(engine, t, "Observation", "subject:Patient.birthdate=lt1980,1985") == {"o1", "o2", "o3", "o4"}
    assert found(engine, t, "Observation", "subject:Group.identifier=MRN-1") == set()
    with pytest.raises(BadRequest):
        search(engine, t, "Observation", "code.name=x")  # code is not a reference


def test_reverse_chaining(engine: Engine, observations: str) -> None:
    t = observations
    assert found(engine, t, "Patient", "_has:Observation:patient:code=2339-0") == {"p1", "p2"}
    assert found(engine, t, "Patient", "_has:Observation:subject:code=1234-5") == {"p3"}
    assert found(engine, t, "Patient", "_has:Observation:patient:code=2339-0&gender=male") == {"p2"}
    assert found(engine, t, "Practitioner", "_has:Patient:general-practitioner:_has:Observation:patient:code=8480-6") == {"dr1", "dr2"}
    assert found(engine, t, "Practitioner", "_has:Patient:general-practitioner:_has:Observation:patient:value-quantity=gt130") == {"dr2"}
    assert found(engine, t, "Patient", "_has:Observation:patient:code=nope") == set()
    with pytest.raises(BadRequest):
        search(engine, t, "Patient", "_has:Observation:code:code=x")


def test_list(engine: Engine, observations: str) -> None:
    t = observations
    put(engine, t, {"resourceType": "List", "id": "l1", "status": "current", "mode": "working",
                    "entry": [{"item": {"reference": "Patient/p1"}}, {"item": {"reference": "Patient/p3"}}, {"item": {"reference": "Observation/o2"}}]})
    assert found(engine, t, "Patient", "_list=l1") == {"p1", "p3"}
    assert found(engine, t, "Observation", "_list=l1") == {"o2"}
    assert found(engine, t, "Patient", "_list=l1&gender=female") == {"p1"}
    assert found(engine, t, "Patient", "_list=nope") == set()


def test_compartment_search(engine: Engine, observations: str) -> None:
    t = observations
    def comp(path: str, query: str = "") -> set[str]:
        return set(ids(resource(call(engine, t, "GET", path, params=tuple(parse_qsl(query + "&_count=1000"))))))
    assert comp("Patient/p1/Observation") == {"o1", "o3"}
    assert comp("Patient/p1/Observation", "code=8480-6") == {"o1"}
    assert comp("Patient/p2/Observation", "_sort=-date") == {"o2", "o4"}
    assert comp("Patient/p1/*") == {"p1", "o1", "o3"}
    assert comp("Patient/p1/Patient") == {"p1"}
    assert comp("Practitioner/dr1/Patient") == {"p1"}
    assert comp("Patient/nobody/Observation") == set()
    b = resource(call(engine, t, "GET", "Patient/p1/Observation", params=(("_count", "1"),)))
    assert _link(b, "self").endswith(f"/fhir/{t}/Patient/p1/Observation?_count=1")  # type: ignore[union-attr]
    assert "/Patient/p1/Observation?" in _link(b, "next")  # type: ignore[operator]
    with pytest.raises(NotFound):
        call(engine, t, "GET", "Observation/o1/Patient")
    with pytest.raises(BadRequest):
        call(engine, t, "GET", "Patient/p1/CodeSystem")


def test_composite_parameters(engine: Engine, tenant: str) -> None:
    t = tenant
    put(engine, t, {"resourceType": "Observation", "id": "bp", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
                    "component": [
                        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                         "valueQuantity": {"value": 150, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
                        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                         "valueQuantity": {"value": 90, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]})
    put(engine, t, {"resourceType": "Observation", "id": "glu", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
                    "valueQuantity": {"value": 6.3, "system": "http://unitsofmeasure.org", "code": "mmol/L"}})
    put(engine, t, {"resourceType": "Observation", "id": "abo", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "883-9"}]},
                    "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "112144000"}]},
                    "effectiveDateTime": "2024-03-01"})
    put(engine, t, {"resourceType": "Observation", "id": "note", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8251-1"}]}, "valueString": "Feeling much better today"})
    put(engine, t, {"resourceType": "Observation", "id": "when", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "21112-8"}]}, "valueDateTime": "1980-05-17"})
    assert found(engine, t, "Observation", "code-value-quantity=http://loinc.org|2339-0$gt5") == {"glu"}
    assert found(engine, t, "Observation", "code-value-quantity=2339-0$gt6") == set()  # 6 means [5.5, 6.5): 6.3 is inside
    assert found(engine, t, "Observation", "code-value-quantity=2339-0$lt6") == set()
    assert found(engine, t, "Observation", "code-value-quantity=2339-0$6.3|http://unitsofmeasure.org|mmol/L") == {"glu"}
    assert found(engine, t, "Observation", "component-code-value-quantity=http://loinc.org|8480-6$gt140") == {"bp"}
    # the code and the value must belong to the same component: diastolic is not over 140
    assert found(engine, t, "Observation", "component-code-value-quantity=http://loinc.org|8462-4$gt140") == set()
    assert found(engine, t, "Observation", "component-code-value-quantity=8462-4$90,8480-6$200") == {"bp"}
    assert found(engine, t, "Observation", "combo-code-value-quantity=8480-6$150") == {"bp"}
    assert found(engine, t, "Observation", "combo-code-value-quantity=2339-0$6.3") == {"glu"}
    assert found(engine, t, "Observation", "code-value-concept=http://loinc.org|883-9$http://snomed.info/sct|112144000") == {"abo"}
    assert found(engine, t, "Observation", "code-value-concept=883-9$112144001") == set()
    assert found(engine, t, "Observation", "code-value-string=8251-1$feeling much") == {"note"}
    assert found(engine, t, "Observation", "code-value-string=8251-1$better") == set()
    assert found(engine, t, "Observation", "code-value-date=21112-8$1980") == {"when"}
    assert found(engine, t, "Observation", "code-value-date=21112-8$gt1990") == set()
    with pytest.raises(BadRequest):
        search(engine, t, "Observation", "code-value-quantity=2339-0")


def test_combo_parameters_search_their_parts(engine: Engine, tenant: str) -> None:
    """Observation's combo-* parameters have no index rows of their own: each is the OR of its parts (code and
    component-code, and so on), with every modifier, prefix, composite and sort meaning what the union means."""
    loinc = "http://loinc.org"

    def q(value: float, unit: str = "mg") -> dict[str, Any]:
        return {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}

    def obs(oid: str, code: str | None, value: float | None = None, components: tuple[tuple[str, float | None], ...] = (),
            text: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"resourceType": "Observation", "id": oid, "status": "final",
                                "code": {"coding": [{"system": loinc, "code": code or "none", "display": text or code}]}}
        if value is not None:
            body["valueQuantity"] = q(value)
        body["component"] = [
            {"code": {"coding": [{"system": loinc, "code": c, "display": "Systolic blood pressure measured sitting"}]},
             **({"valueQuantity": q(v)} if v is not None else
                {"dataAbsentReason": {"coding": [{"system": "urn:dar", "code": "error"}]}})}
            for c, v in components]
        if not body["component"]:
            del body["component"]
        return body

    put(engine, tenant, obs("top", "A", 5))
    put(engine, tenant, obs("inner", "B", None, (("A", 7), ("C", None))))
    put(engine, tenant, obs("none", "D", text="Diastolic blood pressure measured sitting"))
    assert found(engine, tenant, "Observation", f"combo-code={loinc}|A") == {"top", "inner"}
    assert found(engine, tenant, "Observation", "combo-code=A,D") == {"top", "inner", "none"}
    assert found(engine, tenant, "Observation", "code=A") == {"top"}
    assert found(engine, tenant, "Observation", "component-code=A") == {"inner"}
    assert found(engine, tenant, "Observation", "combo-code:not=A") == {"none"}
    assert found(engine, tenant, "Observation", "combo-value-quantity:missing=true") == {"none"}
    assert found(engine, tenant, "Observation", "combo-value-quantity:missing=false") == {"top", "inner"}
    assert found(engine, tenant, "Observation", "combo-data-absent-reason=error") == {"inner"}
    assert found(engine, tenant, "Observation", "combo-data-absent-reason:missing=true") == {"top", "none"}
    assert found(engine, tenant, "Observation", "combo-value-quantity=gt6||mg") == {"inner"}
    assert found(engine, tenant, "Observation", "combo-value-quantity=le7") == {"top", "inner"}
    assert found(engine, tenant, "Observation", "combo-code-value-quantity=A$gt6") == {"inner"}
    assert found(engine, tenant, "Observation", "combo-code-value-quantity=A$lt6") == {"top"}
    assert found(engine, tenant, "Observation", "combo-code-value-quantity=B$gt0") == set()  # B has no value
    # :text, short (decided by the index) and longer than the index's prefixes (confirmed on the bodies)
    assert found(engine, tenant, "Observation", "combo-code:text=systolic") == {"inner"}
    assert found(engine, tenant, "Observation", "combo-code:text=systolic blood pressure") == {"inner"}
    assert found(engine, tenant, "Observation", "combo-code:text=diastolic blood pressure") == {"none"}
    assert found(engine, tenant, "Observation", "combo-code:text=blood pressure") == set()
    # Sorted by the smallest of its parts' values
    assert ids(search(engine, tenant, "Observation", "combo-value-quantity:missing=false&_sort=combo-value-quantity")) == ["top", "inner"]
    assert ids(search(engine, tenant, "Observation", "combo-value-quantity:missing=false&_sort=-combo-value-quantity")) == ["inner", "top"]
    # None of them is written to the index
    combos = [p for p in engine.search_params.for_type("Observation").values() if p.union_of]
    assert {p.code for p in combos} >= {"combo-code", "combo-value-quantity", "combo-code-value-quantity"}
    from sqlalchemy import func, select

    from fhir_server.storage import schema
    with engine.storage.session(tenant, write=False) as repo:
        for table in (schema.idx_hash, schema.idx_quantity, schema.idx_composite):
            keys = {p.key for p in combos} | {p.sub_key(":text") for p in combos}
            assert repo.conn.execute(select(func.count()).select_from(table).where(table.c.param_key.in_(keys))).scalar() == 0
