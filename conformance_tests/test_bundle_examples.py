"""The official R4 example Bundles, posted to the base URL.

The six examples of type ``transaction`` or ``batch`` are posted as published (two need resources
to exist first, which the tests arrange). Every other example Bundle (collections, documents,
messages, search sets: 27 more) is turned into a transaction that stores its entries, so that the
reference rewriting is tried on the shapes real documents have. After each transaction, every
resource it wrote is read back and found by ``_id`` search, and no reference (or narrative link) to a
``urn:uuid:`` / ``urn:oid:`` entry is left in what was stored.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from conformance_tests.client import FhirClient, parse

EXAMPLES = Path(__file__).parent / "data" / "r4-examples"
BUNDLES = sorted(EXAMPLES.glob("Bundle-*.json"))


def load(path: Path) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(path.read_bytes(), parse_float=Decimal)
    return body


def of_type(*kinds: str) -> list[Path]:
    return [p for p in BUNDLES if load(p)["type"] in kinds]


TRANSACTIONS = of_type("transaction")
BATCHES = of_type("batch")
OTHERS = [p for p in BUNDLES if p not in TRANSACTIONS and p not in BATCHES]


def test_the_example_bundles_are_all_here() -> None:
    assert len(BUNDLES) == 33  # top-level Bundle examples: 4 transactions, 2 batches, 27 others
    assert [p.name for p in TRANSACTIONS + BATCHES] == [
        "Bundle-bundle-transaction.json", "Bundle-hla-1.json", "Bundle-ussg-fht.json", "Bundle-xds.json",
        "Bundle-bundle-request-medsallergies.json", "Bundle-bundle-request-simplesummary.json",
    ]


def post_bundle(fhir: FhirClient, bundle: dict[str, Any]) -> dict[str, Any]:
    resp = fhir.post("", bundle)
    assert resp.status_code == 200, resp.text[:2000]
    out: dict[str, Any] = parse(resp)
    assert out["resourceType"] == "Bundle"
    assert out["type"] == f"{bundle['type']}-response"
    assert len(out["entry"]) == len(bundle["entry"])
    return out


def urns(bundle: dict[str, Any]) -> set[str]:
    return {e["fullUrl"].lower() for e in bundle["entry"] if str(e.get("fullUrl", "")).startswith("urn:")}


def links(value: Any, key: str | None = None) -> list[str]:
    """Where a reference to another entry can be: references, and href/src of narrative links."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in links(v, k)]
    if isinstance(value, list):
        return [s for v in value for s in links(v, key)]
    if isinstance(value, str) and key == "reference":
        return [value]
    if isinstance(value, str) and key == "div":
        return re.findall(r"""(?:href|src)\s*=\s*["']([^"']*)["']""", value)
    return []


def check_written(fhir: FhirClient, sent: dict[str, Any], out: dict[str, Any]) -> int:
    """Every entry that wrote a resource: readable at its location, found by _id, no bundle-local URN left."""
    local = urns(sent)
    written = 0
    for i, (entry, result) in enumerate(zip(sent["entry"], out["entry"])):
        response = result["response"]
        if entry["request"]["method"] not in ("POST", "PUT", "PATCH"):
            continue
        assert response["status"][:3] in ("200", "201"), (i, response)
        assert response.get("etag", "").startswith('W/"'), (i, response)
        assert "lastModified" in response, (i, response)
        rtype, rid = response["location"].split("/")[-4:-2] if "/_history/" in response["location"] else response["location"].split("/")[-2:]
        got = fhir.get(f"{rtype}/{rid}")
        assert got.status_code == 200, (i, got.text[:500])
        stored = parse(got)
        found = parse(fhir.get(rtype, params={"_id": rid}))
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [rid], (i, rtype, rid)
        leftovers = [s for s in links(stored) if s.lower() in local]
        assert not leftovers, (i, leftovers[:3])
        written += 1
    return written


# --- the transaction examples -------------------------------------------------------------------------

def test_hla_transaction(fhir: FhirClient) -> None:
    sent = load(EXAMPLES / "Bundle-hla-1.json")
    out = post_bundle(fhir, sent)
    assert check_written(fhir, sent, out) == 22
    assert all(e["response"]["status"].startswith("201") for e in out["entry"])
    report_location = out["entry"][0]["response"]["location"]
    report = parse(fhir.get(report_location.split("/_history/")[0]))
    # the report's results point at the sequences created by the same transaction
    for ref in report.get("result", []) + [r for ext in report.get("extension", []) for r in [ext.get("valueReference", {})]]:
        if ref.get("reference", "").startswith("Observation/") or ref.get("reference", "").startswith("MolecularSequence/"):
            assert fhir.get(ref["reference"]).status_code == 200, ref


def test_ussg_family_history_transaction(fhir: FhirClient) -> None:
    """PUTs named by absolute URLs (http://hl7.org/fhir/us/sdc/...): each acts on this server, by id."""
    sent = load(EXAMPLES / "Bundle-ussg-fht.json")
    out = post_bundle(fhir, sent)
    assert check_written(fhir, sent, out) == 11
    questionnaire = parse(fhir.get("Questionnaire/54127-6"))
    answer_sets = {i.get("answerValueSet") for i in strings_items(questionnaire) if i.get("answerValueSet")}
    canonical = {s for s in answer_sets if not s.startswith("#")}  # the rest name contained value sets
    assert canonical and all(s.startswith("http://hl7.org/fhir/us/sdc/ValueSet/") for s in canonical)  # canonicals kept


def strings_items(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [value, *[x for v in value.values() for x in strings_items(v)]]
    if isinstance(value, list):
        return [x for v in value for x in strings_items(v)]
    return []


def test_xds_transaction(fhir: FhirClient) -> None:
    """Absolute full URLs on another base, a conditional create, and references by "Type/id" to entries."""
    sent = load(EXAMPLES / "Bundle-xds.json")
    out = post_bundle(fhir, sent)
    assert check_written(fhir, sent, out) == 5
    doc = parse(fhir.get(out["entry"][0]["response"]["location"].split("/_history/")[0]))
    patient = out["entry"][1]["response"]["location"].split("/_history/")[0]
    assert doc["subject"]["reference"] == patient
    authors = {a["reference"] for a in doc["author"]}
    assert authors == {out["entry"][i]["response"]["location"].split("/_history/")[0] for i in (2, 3)}
    # (posted again it creates a second patient: the example's ifNoneExist names an identifier its patient lacks)


def _prepare_bundle_transaction(fhir: FhirClient) -> dict[str, Any]:
    """Bundle-bundle-transaction updates Patient/123a with ifMatch W/"2" and deletes Patient/234: make them exist."""
    sent = load(EXAMPLES / "Bundle-bundle-transaction.json")
    body = dict(load(EXAMPLES / "Patient-example.json"), id="123a")
    for _ in range(3):
        current = fhir.get("Patient/123a")
        version = int(parse(current)["meta"]["versionId"]) if current.status_code == 200 else 0
        if version >= 2:
            break
        # Content of its own each time: a server may (this one does) make no version of an update that changes nothing
        tagged = dict(body, meta={"tag": [{"system": "urn:example:conformance-tests", "code": f"write-{version + 1}"}]})
        assert fhir.put("Patient/123a", tagged).status_code in (200, 201)
    if version != 2:  # a server reused by an earlier run: ask for the version it has now
        sent["entry"][4]["request"]["ifMatch"] = f'W/"{version}"'
    assert fhir.put("Patient/234", dict(body, id="234")).status_code in (200, 201)
    return sent


def test_bundle_transaction_as_published_fails_whole_on_its_operation_entry(fhir: FhirClient) -> None:
    """Entry 7 invokes ValueSet/$lookup, which R4 does not define ($lookup is CodeSystem's): nothing is written."""
    sent = _prepare_bundle_transaction(fhir)
    before = parse(fhir.get("Patient/123a"))["meta"]["versionId"]
    resp = fhir.post("", sent)
    assert 400 <= resp.status_code < 500, resp.text[:1000]
    outcome = parse(resp)
    assert outcome["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[7]" in outcome["issue"][0]["diagnostics"]
    assert fhir.get("Patient/234").status_code == 200  # the DELETE before it was rolled back
    assert parse(fhir.get("Patient/123a"))["meta"]["versionId"] == before


def test_bundle_transaction(fhir: FhirClient) -> None:
    sent = _prepare_bundle_transaction(fhir)
    del sent["entry"][7]  # the operation entry (see the test above)
    out = post_bundle(fhir, sent)
    assert check_written(fhir, sent, out) == 5
    status = [e["response"]["status"][:3] for e in out["entry"]]
    assert status[0] == "201" and status[1] in ("200", "201") and status[2] in ("200", "201") and status[3] in ("200", "201")
    assert status[4] == "200" and out["entry"][4]["response"]["etag"] != sent["entry"][4]["request"]["ifMatch"]
    assert status[5][0] == "2" and status[6][0] == "2"  # deletes (Patient/234; a conditional delete matching nothing)
    assert fhir.get("Patient/234").status_code == 410
    peter = out["entry"][7]  # GET Patient?name=peter ran after the writes: it finds the patient just created
    assert peter["response"]["status"].startswith("200")
    created = out["entry"][0]["response"]["location"].split("/_history/")[0]
    assert created in {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in peter["resource"].get("entry", [])}
    assert out["entry"][8]["response"]["status"].startswith("404")  # GET Patient/12334: no such patient


# --- the batch examples ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", BATCHES, ids=[p.stem for p in BATCHES])
def test_batch_examples(fhir: FhirClient, path: Path) -> None:
    """GET-only batches about Patient/example: each entry answered on its own."""
    assert fhir.put("Patient/example", load(EXAMPLES / "Patient-example.json")).status_code in (200, 201)
    sent = load(path)
    out = post_bundle(fhir, sent)
    first = out["entry"][0]
    assert first["response"]["status"].startswith("200") and first["resource"]["id"] == "example"
    for entry in out["entry"][1:]:
        assert entry["response"]["status"].startswith("200"), entry
        assert entry["resource"]["type"] == "searchset"


# --- every other example Bundle, stored by a transaction ------------------------------------------

def as_transaction(bundle: dict[str, Any]) -> dict[str, Any]:
    """Each entry's resource POSTed (bundle-local or no full URL) or PUT under its id."""
    entries, targets = [], set()
    for e in bundle.get("entry", []):
        resource = e.get("resource")
        if not isinstance(resource, dict):
            continue
        full_url = str(e.get("fullUrl", ""))
        rtype, rid = resource["resourceType"], resource.get("id")
        if rid and not full_url.startswith("urn:"):
            if f"{rtype}/{rid}" in targets:  # a search set may list one resource twice; a transaction writes it once
                continue
            targets.add(f"{rtype}/{rid}")
            request = {"method": "PUT", "url": f"{rtype}/{rid}"}
        else:
            request = {"method": "POST", "url": rtype}
        entries.append({**({"fullUrl": full_url} if full_url else {}), "resource": resource, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@pytest.mark.parametrize("path", OTHERS, ids=[p.stem for p in OTHERS])
def test_other_example_bundles_stored_by_transaction(fhir: FhirClient, path: Path) -> None:
    sent = as_transaction(load(path))
    if not sent["entry"]:
        pytest.skip("no entries with resources")
    out = post_bundle(fhir, sent)
    assert check_written(fhir, sent, out) == len(sent["entry"])
    # references between entries point at what the transaction stored
    by_urn = {e["fullUrl"]: r["response"]["location"].split("/_history/")[0] for e, r in zip(sent["entry"], out["entry"])
              if str(e.get("fullUrl", "")).startswith("urn:")}
    for e, r in zip(sent["entry"], out["entry"]):
        original = json.dumps(e["resource"], default=str)
        for urn, location in by_urn.items():
            if re.search(rf'"reference": "{re.escape(urn)}"', original):
                stored = json.dumps(parse(fhir.get(r["response"]["location"].split("/_history/")[0])), default=str)
                assert f'"reference": "{location}"' in stored, (urn, location)
