"""Custom SearchParameters: stored, reindexed (resumably), then searchable; not usable before."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_server.engine import reindex
from fhir_server.engine.engine import Engine
from fhir_server.errors import BadRequest
from testsupport.engine_calls import call, resource

BIRTH_SEX = "http://example.org/fhir/StructureDefinition/birth-sex"


def birth_sex_parameter(expression: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "SearchParameter", "id": "birth-sex", "url": "http://example.org/fhir/SearchParameter/birth-sex",
        "name": "birth-sex", "status": "active", "description": "Birth sex (an extension)", "code": "birth-sex",
        "base": ["Patient"], "type": "token",
        "expression": expression or f"Patient.extension('{BIRTH_SEX}').value", **extra,
    }


def patient(pid: str, sex: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Patient", "id": pid}
    if sex:
        body["extension"] = [{"url": BIRTH_SEX, "valueCode": sex}]
    return body


def matches(engine: Engine, tenant: str, query: tuple[tuple[str, str], ...], strict: bool = False) -> set[str]:
    b = resource(call(engine, tenant, "GET", "Patient", params=query, prefer_handling="strict" if strict else None))
    return {e["resource"]["id"] for e in b.get("entry", []) if e["search"]["mode"] == "match"}


def run_jobs(engine: Engine) -> int:
    return reindex.JobRunner(engine, 60).run_pending()


def test_custom_parameter_lifecycle(engine: Engine, tenant: str) -> None:
    run_jobs(engine)  # jobs other tests left in the shared database (other tenants): the counts below are this test's
    for pid, sex in (("a", "F"), ("b", "M"), ("c", None)):
        call(engine, tenant, "PUT", f"Patient/{pid}", patient(pid, sex))
    assert call(engine, tenant, "PUT", "SearchParameter/birth-sex", birth_sex_parameter()).status == 201
    call(engine, tenant, "PUT", "Patient/d", patient("d", "F"))  # written after: indexed at once
    # Not usable until the stored resources are indexed: strict handling says so, lenient ignores it (and says so).
    with pytest.raises(BadRequest) as info:
        matches(engine, tenant, (("birth-sex", "F"),), strict=True)
    assert "not yet usable" in info.value.issues[0].diagnostics
    lenient = resource(call(engine, tenant, "GET", "Patient", params=(("birth-sex", "F"),)))
    assert any(e["search"]["mode"] == "outcome" for e in lenient["entry"])
    caps = resource(call(engine, tenant, "GET", "metadata"))
    patient_caps = next(r for r in caps["rest"][0]["resource"] if r["type"] == "Patient")
    assert any(p["name"] == "birth-sex" and "not yet usable" in p.get("documentation", "") for p in patient_caps["searchParam"])

    assert run_jobs(engine) == 1
    assert matches(engine, tenant, (("birth-sex", "F"),), strict=True) == {"a", "d"}
    assert matches(engine, tenant, (("birth-sex", "M"),)) == {"b"}
    assert matches(engine, tenant, (("birth-sex:missing", "true"),)) == {"c"}
    caps = resource(call(engine, tenant, "GET", "metadata"))
    patient_caps = next(r for r in caps["rest"][0]["resource"] if r["type"] == "Patient")
    assert any(p["name"] == "birth-sex" and "not yet usable" not in p.get("documentation", "") for p in patient_caps["searchParam"])

    # New and updated resources are indexed as they are written.
    call(engine, tenant, "PUT", "Patient/b", patient("b", "F"))
    assert matches(engine, tenant, (("birth-sex", "F"),)) == {"a", "b", "d"}

    # An unchanged definition needs no reindex; a changed one does.
    call(engine, tenant, "PUT", "SearchParameter/birth-sex", birth_sex_parameter(description="edited"))
    assert matches(engine, tenant, (("birth-sex", "F"),), strict=True) == {"a", "b", "d"}
    call(engine, tenant, "PUT", "SearchParameter/birth-sex", birth_sex_parameter(expression=f"Patient.extension('{BIRTH_SEX}').value | Patient.gender"))
    with pytest.raises(BadRequest):
        matches(engine, tenant, (("birth-sex", "F"),), strict=True)
    assert run_jobs(engine) == 1
    assert matches(engine, tenant, (("birth-sex", "F"),), strict=True) == {"a", "b", "d"}

    # Retired or deleted: the parameter is gone.
    call(engine, tenant, "DELETE", "SearchParameter/birth-sex")
    with pytest.raises(BadRequest) as info:
        matches(engine, tenant, (("birth-sex", "F"),), strict=True)
    assert "unknown search parameter" in info.value.issues[0].diagnostics


def test_chained_search_through_a_custom_parameter(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/x", patient("x", "F"))
    call(engine, tenant, "PUT", "Observation/o", {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "t"},
                                                   "subject": {"reference": "Patient/x"}})
    call(engine, tenant, "PUT", "SearchParameter/birth-sex", birth_sex_parameter())
    run_jobs(engine)
    b = resource(call(engine, tenant, "GET", "Observation", params=(("subject:Patient.birth-sex", "F"),)))
    assert [e["resource"]["id"] for e in b["entry"]] == ["o"]


def test_reindex_resumes_after_losing_its_lease(engine: Engine, tenant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(7):
        call(engine, tenant, "PUT", f"Patient/p{i}", patient(f"p{i}", "F"))
    monkeypatch.setattr(reindex, "BATCH", 2)
    call(engine, tenant, "PUT", "SearchParameter/birth-sex", birth_sex_parameter())
    job_id = reindex.runnable(engine)[0]
    assert reindex.claim(engine, job_id, "first")

    class Died(Exception):
        pass

    batches = []

    def die_after_two(n: int) -> None:
        batches.append(n)
        if len(batches) == 2:
            raise Died

    with pytest.raises(Died):
        reindex.run(engine, job_id, "first", progress=die_after_two)
    assert not reindex.claim(engine, job_id, "second")  # the lease is still held
    from sqlalchemy import update

    from fhir_server.storage import schema

    with engine.storage.db.transaction(write=True) as conn:  # time passes: the lease expires
        conn.execute(update(schema.reindex_jobs).where(schema.reindex_jobs.c.id == job_id).values(lease_until=0))
    assert reindex.claim(engine, job_id, "second")
    assert reindex.run(engine, job_id, "second") == "done"
    assert reindex.run(engine, job_id, "first") == "lost"
    assert matches(engine, tenant, (("birth-sex", "F"),), strict=True) == {f"p{i}" for i in range(7)}


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"type": "composite"}, "not supported"),
        ({"base": ["Nope"]}, "unknown resource type"),
        ({"code": "name"}, "already has"),
        ({"code": "a.b"}, "SearchParameter.code"),
        ({"expression": "Observation.status"}, "no part for Patient"),
        ({"expression": "Patient.extension(("}, "cannot be evaluated"),
    ],
)
def test_unusable_definitions_are_refused(engine: Engine, tenant: str, changes: dict[str, Any], fragment: str) -> None:
    body = {**birth_sex_parameter(), **changes}
    with pytest.raises(BadRequest) as info:
        call(engine, tenant, "PUT", "SearchParameter/birth-sex", body)
    assert fragment in info.value.issues[0].diagnostics


def test_draft_search_parameters_are_just_stored(engine: Engine, tenant: str) -> None:
    assert call(engine, tenant, "PUT", "SearchParameter/birth-sex", birth_sex_parameter(status="draft", type="composite")).status == 201
    with pytest.raises(BadRequest) as info:
        matches(engine, tenant, (("birth-sex", "F"),), strict=True)
    assert "unknown search parameter" in info.value.issues[0].diagnostics
