"""Property-based: no body, however broken, gets a 500, and a rejected request writes nothing."""

from __future__ import annotations

import json
from typing import Any

from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_server.capability.registry import load_registry

FHIR = "application/fhir+json"
RESOURCE_TYPES = list(load_registry().resource_types)
FIELD_NAMES = ["id", "meta", "text", "name", "status", "code", "subject", "value", "valueQuantity", "identifier",
               "extension", "_birthDate", "birthDate", "contained", "resourceType", "active", "gender", "entry", "item"]

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)
resource_like = st.builds(
    lambda rtype, fields: {"resourceType": rtype, **fields},
    st.sampled_from(RESOURCE_TYPES) | st.text(max_size=12),
    st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=6),
)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _no_server_error(resp: Any) -> None:
    assert resp.status_code < 500, resp.data[:500]
    if resp.status_code >= 400:
        assert resp.get_json(force=True)["resourceType"] == "OperationOutcome"


@SETTINGS
@given(body=st.binary(max_size=300))
def test_random_bytes(client: FlaskClient, tenant: str, body: bytes) -> None:
    _no_server_error(client.post(f"/fhir/{tenant}/Patient", data=body, content_type=FHIR))
    _no_server_error(client.put(f"/fhir/{tenant}/Patient/fz", data=body, content_type=FHIR))


@SETTINGS
@given(doc=json_values)
def test_random_json(client: FlaskClient, tenant: str, doc: Any) -> None:
    data = json.dumps(doc).encode()
    _no_server_error(client.post(f"/fhir/{tenant}/Observation", data=data, content_type=FHIR))


@SETTINGS
@given(resource=resource_like, pid=st.text(min_size=1, max_size=70))
def test_random_resources(client: FlaskClient, tenant: str, resource: dict[str, Any], pid: str) -> None:
    rtype = resource["resourceType"] if isinstance(resource["resourceType"], str) else "Patient"
    resource["id"] = pid
    data = json.dumps(resource).encode()
    from urllib.parse import quote

    url = f"/fhir/{tenant}/{quote(rtype, safe='') or 'Patient'}/{quote(pid, safe='')}"
    before = client.get(f"/fhir/{tenant}/_history?_count=1000").get_json().get("entry", [])
    resp = client.put(url, data=data, content_type=FHIR)
    _no_server_error(resp)
    after = client.get(f"/fhir/{tenant}/_history?_count=1000").get_json().get("entry", [])
    # A rejected write leaves no trace; an accepted one adds exactly one version, unless it changed nothing
    # (the same resource again: the current version stands, and is what it answers with).
    unchanged = resp.status_code == 200 and resp.headers.get("ETag") in {
        f'W/"{e["resource"]["meta"]["versionId"]}"' for e in before
        if e.get("resource") and e["resource"]["resourceType"] == rtype and e["resource"]["id"] == pid}
    assert len(after) == len(before) + (1 if resp.status_code < 300 and not unchanged else 0)


@SETTINGS
@given(path=st.lists(st.text(max_size=10), max_size=5), query=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3), method=st.sampled_from(["GET", "DELETE", "HEAD"]))
def test_random_urls(client: FlaskClient, tenant: str, path: list[str], query: dict[str, str], method: str) -> None:
    from urllib.parse import quote, urlencode

    url = f"/fhir/{tenant}/" + "/".join(quote(p, safe="") for p in path)
    if query:
        url += "?" + urlencode(query)
    resp = client.open(url, method=method)
    assert resp.status_code < 500, resp.data[:300]
