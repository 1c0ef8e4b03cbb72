"""History over HTTP, with paging links that can be followed."""

from __future__ import annotations

import uuid

from conformance_tests.client import FhirClient, parse


def test_instance_history(fhir: FhirClient) -> None:
    pid = "h-" + uuid.uuid4().hex[:12]
    for family in ("A", "B", "C"):
        fhir.put(f"Patient/{pid}", {"resourceType": "Patient", "id": pid, "name": [{"family": family}]})
    fhir.delete(f"Patient/{pid}")
    bundle = parse(fhir.get(f"Patient/{pid}/_history"))
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "history"
    entries = bundle["entry"]
    assert [e["request"]["method"] for e in entries] == ["DELETE", "PUT", "PUT", "PUT"]
    assert [e["resource"]["name"][0]["family"] for e in entries[1:]] == ["C", "B", "A"]
    for e in entries:
        assert "response" in e and e["response"]["status"]


def test_type_history_paging(fhir: FhirClient) -> None:
    rtype = "Basic"
    tag = uuid.uuid4().hex[:8]
    ids = [f"b-{tag}-{i}" for i in range(5)]
    for rid in ids:
        fhir.put(f"{rtype}/{rid}", {"resourceType": rtype, "id": rid, "code": {"text": tag}})
    seen: list[str] = []
    page = parse(fhir.get(f"{rtype}/_history", params={"_count": "2"}))
    pages = 0
    while True:
        pages += 1
        assert len(page.get("entry", [])) <= 2
        seen += [e["fullUrl"].rsplit("/", 1)[-1] for e in page.get("entry", [])]
        if set(ids) <= set(seen):
            break
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        assert nxt, "ran out of pages before seeing every new version"
        page = parse(fhir.get(nxt[0]))
        assert pages < 50
    newest_first = [i for i in seen if i in ids]
    assert newest_first == list(reversed(ids))


def test_system_history_since(fhir: FhirClient) -> None:
    first = fhir.post("Basic", {"resourceType": "Basic", "code": {"text": "since"}})
    since = parse(first)["meta"]["lastUpdated"]
    second = parse(fhir.post("Basic", {"resourceType": "Basic", "code": {"text": "since"}}))
    bundle = parse(fhir.get("_history", params={"_since": since, "_count": "100"}))
    urls = [e["fullUrl"] for e in bundle.get("entry", [])]
    assert any(u.endswith(second["id"]) for u in urls)
    assert all(e["response"]["lastModified"] >= since for e in bundle["entry"] if "lastModified" in e.get("response", {}))
