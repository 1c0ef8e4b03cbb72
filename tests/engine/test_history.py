"""History at instance, type and system level: filters and paging."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from fhir_server.clock import instant, now_us
from fhir_server.engine.engine import Engine
from fhir_server.engine.request import FhirResponse
from fhir_server.errors import BadRequest, NotFound

from testsupport.engine_calls import call, patient, resource


def bundle(resp: FhirResponse) -> dict[str, Any]:
    assert resp.status == 200 and isinstance(resp.body, dict)
    return resource(resp)


def entries(b: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    for e in b.get("entry", []):
        version = e["response"]["etag"][3:-1]
        out.append((e["request"]["method"], e["fullUrl"].rsplit("/", 2)[-2] + "/" + e["fullUrl"].rsplit("/", 1)[-1], version))
    return out


def follow(engine: Engine, tenant: str, b: dict[str, Any], relation: str) -> dict[str, Any] | None:
    link = next((l["url"] for l in b["link"] if l["relation"] == relation), None)
    if link is None:
        return None
    parts = urlsplit(link)
    path = parts.path.split(f"/fhir/{tenant}/", 1)[1] if f"/fhir/{tenant}/" in parts.path else ""
    return bundle(call(engine, tenant, "GET", path, params=tuple(parse_qsl(parts.query))))


def test_instance_history_newest_first_with_deletes(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/h", patient("h"))
    call(engine, tenant, "PUT", "Patient/h", patient("h", "Two"))
    call(engine, tenant, "DELETE", "Patient/h")
    b = bundle(call(engine, tenant, "GET", "Patient/h/_history"))
    assert b["type"] == "history" and b["total"] == 3
    assert entries(b) == [("DELETE", "Patient/h", "3"), ("PUT", "Patient/h", "2"), ("PUT", "Patient/h", "1")]
    assert "resource" not in b["entry"][0] and b["entry"][0]["response"]["status"].startswith("204")
    assert b["entry"][2]["response"]["status"].startswith("201")
    assert b["entry"][1]["resource"]["name"] == [{"family": "Two"}]
    with pytest.raises(NotFound):
        call(engine, tenant, "GET", "Patient/none/_history")


def test_type_and_system_history(engine: Engine, tenant: str) -> None:
    created = call(engine, tenant, "POST", "Patient", patient()).body
    call(engine, tenant, "PUT", "Observation/o1", {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}})
    call(engine, tenant, "PUT", "Patient/p2", patient("p2"))
    system = entries(bundle(call(engine, tenant, "GET", "_history")))
    assert system == [("PUT", "Patient/p2", "1"), ("PUT", "Observation/o1", "1"), ("POST", f"Patient/{bytes_id(created)}", "1")]
    typed = entries(bundle(call(engine, tenant, "GET", "Patient/_history")))
    assert [e[1] for e in typed] == ["Patient/p2", f"Patient/{bytes_id(created)}"]
    post_entry = bundle(call(engine, tenant, "GET", "Patient/_history"))["entry"][1]
    assert post_entry["request"] == {"method": "POST", "url": "Patient"}


def bytes_id(body: Any) -> str:
    return str(json.loads(body)["id"])


def test_since_and_at(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/s", patient("s"))
    middle = now_us()
    call(engine, tenant, "PUT", "Patient/s", patient("s", "Later"))
    since = entries(bundle(call(engine, tenant, "GET", "Patient/s/_history", params=(("_since", instant(middle)),))))
    assert since == [("PUT", "Patient/s", "2")]
    at = entries(bundle(call(engine, tenant, "GET", "_history", params=(("_at", instant(middle)),))))
    assert at == [("PUT", "Patient/s", "1")]
    with pytest.raises(BadRequest):
        call(engine, tenant, "GET", "_history", params=(("_since", "yesterday"),))
    with pytest.raises(BadRequest):
        call(engine, tenant, "GET", "_history", params=(("_count", "-1"),))


def test_paging_is_stable_and_walks_both_ways(engine: Engine, tenant: str) -> None:
    for i in range(7):
        call(engine, tenant, "PUT", f"Patient/p{i}", patient(f"p{i}"))
    first = bundle(call(engine, tenant, "GET", "Patient/_history", params=(("_count", "3"),)))
    seen = [entries(first)]
    # A write after the first page must not shift later pages.
    call(engine, tenant, "PUT", "Patient/late", patient("late"))
    page = first
    while (page := follow(engine, tenant, page, "next")) is not None:
        seen.append(entries(page))
    flat = [e[1] for p in seen for e in p]
    assert flat == [f"Patient/p{i}" for i in reversed(range(7))]
    assert [len(p) for p in seen] == [3, 3, 1]
    # Walk back from the last page.
    last = first
    for _ in range(2):
        last = follow(engine, tenant, last, "next")  # type: ignore[assignment]
    back = follow(engine, tenant, last, "previous")
    assert back is not None and entries(back) == seen[1]
    back2 = follow(engine, tenant, back, "previous")
    assert back2 is not None and entries(back2) == seen[0]
    assert follow(engine, tenant, back2, "previous") is None
    with pytest.raises(BadRequest):
        call(engine, tenant, "GET", "Patient/_history", params=(("_cursor", "!!!"),))


def test_count_zero_and_cap(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/z", patient("z"))
    b = bundle(call(engine, tenant, "GET", "Patient/z/_history", params=(("_count", "0"),)))
    assert "entry" not in b and b["total"] == 1
