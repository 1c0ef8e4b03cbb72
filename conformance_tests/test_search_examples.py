"""Every search parameter of every resource type, exercised with values taken from the official examples.

For each (resource type, parameter) for which some stored example carries a value, the test
searches ``Type?param=<value from the example>&_id=<example id>`` (which must find it) and the
same with a value that is not the example's (which must not). The values are computed here,
independently of the server: parameter types and expressions come from the official
search-parameters.json, expressions are evaluated with fhirpathpy. It reports coverage
(parameters exercised / parameters with an example value) and fails below 90%.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fhirpathpy import compile as fhirpath_compile
from fhirpathpy.models import models

from conformance_tests.client import FhirClient, parse
from conformance_tests.test_examples import EXAMPLES

DATA = Path(__file__).parent / "data"
THRESHOLD = 0.90
_RESOLVE_IS = re.compile(r"^(.*)\.where\(resolve\(\) is ([A-Za-z]+)\)$")


def _definitions() -> list[dict[str, Any]]:
    bundle = json.loads((DATA / "search-parameters.json").read_bytes())
    return [e["resource"] for e in bundle["entry"]]


DEFINITIONS = _definitions()
BY_URL = {d["url"]: d for d in DEFINITIONS}


def params_for(rtype: str) -> list[dict[str, Any]]:
    return [d for d in DEFINITIONS if d.get("expression") and (rtype in d["base"] or set(d["base"]) & {"Resource", "DomainResource"})]


def _union_parts(expression: str, rtype: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expression):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    keep = []
    for p in parts:
        head = re.match(r"[A-Za-z]+", p.lstrip("("))
        if head and head.group(0) in (rtype, "Resource", "DomainResource"):
            keep.append(p)
    return keep


_compiled: dict[str, Any] = {}


def evaluate(expression: str, node: Any) -> list[Any]:
    m = _RESOLVE_IS.match(expression)
    type_filter = None
    if m:
        expression, type_filter = m.group(1), m.group(2)
    fn = _compiled.get(expression)
    if fn is None:
        fn = _compiled[expression] = fhirpath_compile(expression, model=models["r4"])
    try:
        found = fn(node)
    except Exception:  # noqa: BLE001 - an expression that fhirpathpy cannot run yields nothing here
        return []
    if type_filter:
        found = [v for v in found if isinstance(v, dict) and _ref_type(v.get("reference")) == type_filter]
    return [v for v in found if v is not None]


def _ref_type(ref: Any) -> str | None:
    if not isinstance(ref, str):
        return None
    parts = ref.split("/_history/")[0].split("/")
    return parts[-2] if len(parts) >= 2 else None


def esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("$", "\\$").replace("|", "\\|")


def _decimal(v: Any) -> Decimal | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, Decimal)):
        return Decimal(v)
    if isinstance(v, float):
        return Decimal(repr(v))
    return None


def search_values(ptype: str, value: Any) -> tuple[str, str] | None:
    """(a value that must match, a value that must not) for one value of a parameter, or None."""
    if ptype == "token":
        if isinstance(value, bool):
            return ("true" if value else "false"), ("false" if value else "true")
        if isinstance(value, str):
            return esc(value), "no-such-code-xyz"
        if isinstance(value, dict):
            coding = None
            if isinstance(value.get("coding"), list):
                coding = next((c for c in value["coding"] if isinstance(c, dict) and c.get("code")), None)
            elif "code" in value and ("system" in value or "display" in value or len(value) <= 3) and "value" not in value:
                coding = value
            if coding and coding.get("code"):
                system = coding.get("system")
                positive = f"{esc(system)}|{esc(coding['code'])}" if system else esc(str(coding["code"]))
                return positive, (f"{esc(system)}|no-such-code-xyz" if system else "no-such-code-xyz")
            if value.get("value") is not None and "unit" not in value:  # Identifier, ContactPoint
                system = value.get("system") if isinstance(value.get("system"), str) and ":" in value.get("system", "") else None
                positive = f"{esc(system)}|{esc(str(value['value']))}" if system else esc(str(value["value"]))
                return positive, "no-such-identifier-xyz"
        return None
    if ptype == "string":
        text = None
        if isinstance(value, str):
            text = value
        elif isinstance(value, dict):
            for key in ("family", "given", "text", "city", "line", "postalCode", "country", "state", "name"):
                v = value.get(key)
                if isinstance(v, list) and v and isinstance(v[0], str):
                    v = v[0]
                if isinstance(v, str) and v.strip():
                    text = v
                    break
        if text is None or not text.strip():
            return None
        return esc(text.strip()[:60]), "zzqx-no-such-string"
    if ptype == "date":
        if isinstance(value, str):
            return f"eq{value}", "eq1200-01-01"
        if isinstance(value, dict):
            if isinstance(value.get("start"), str):
                return f"ge{value['start']}", "eq1200-01-01"
            if isinstance(value.get("end"), str):
                return f"le{value['end']}", "eq1200-01-01"
            events = value.get("event")
            if isinstance(events, list) and events and isinstance(events[0], str):
                return f"eq{events[0]}", "eq1200-01-01"
        return None
    if ptype == "number":
        d = _decimal(value)
        if d is None:
            return None
        return f"eq{d}", f"eq{d + 1000}"
    if ptype == "quantity":
        if isinstance(value, dict) and _decimal(value.get("value")) is not None:
            d = _decimal(value["value"])
            assert d is not None
            if value.get("system") and value.get("code"):
                unit = f"|{esc(value['system'])}|{esc(value['code'])}"
            elif value.get("currency"):
                unit = f"|urn:iso:std:iso:4217|{esc(value['currency'])}"
            elif value.get("unit"):
                unit = f"||{esc(value['unit'])}"
            else:
                unit = ""
            return f"{d}{unit}", f"{d + 1000}{unit}"
        return None
    if ptype == "reference":
        # References to contained resources ("#id") are not searchable (FHIR R4 search, "Searching references").
        if isinstance(value, str) and not value.startswith("#"):
            return esc(value), "http://example.org/no-such-canonical-xyz"
        if isinstance(value, dict) and isinstance(value.get("reference"), str) and not value["reference"].startswith("#"):
            ref = value["reference"]
            if "://" in ref:
                return esc(ref), esc(ref + "-no-such-target")
            rtype = _ref_type(ref)
            return esc(ref), (f"{rtype}/no-such-target-xyz" if rtype else "http://example.org/no-such-target")
        return None
    if ptype == "uri":
        if isinstance(value, str):
            return esc(value), "http://example.org/no-such-uri-xyz"
        return None
    return None


def composite_values(definition: dict[str, Any], rtype: str, resource: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for root_expr in _union_parts(definition["expression"], rtype):
        for root in evaluate(root_expr, resource):
            if not isinstance(root, dict):
                continue
            positives, negatives = [], []
            for comp in definition.get("component", []):
                comp_def = BY_URL.get(comp["definition"])
                if comp_def is None:
                    break
                found = evaluate(comp["expression"], root)
                pair = next((sv for v in found if (sv := search_values(comp_def["type"], v)) is not None), None)
                if pair is None:
                    break
                positives.append(pair[0].removeprefix("eq") if comp_def["type"] != "date" else pair[0])
                negatives.append(pair[1].removeprefix("eq") if comp_def["type"] != "date" else pair[1])
            else:
                if positives:
                    out.append(("$".join(positives), "$".join(positives[:-1] + negatives[-1:])))
    return out


@pytest.fixture(scope="module")
def stored(fhir: FhirClient) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in EXAMPLES:
        raw = path.read_bytes()
        body = json.loads(raw, parse_float=Decimal)
        url = f"{body['resourceType']}/{body['id']}"
        r = fhir.request("PUT", url, data=raw)
        if body["resourceType"] == "AuditEvent" and r.status_code == 405:
            continue  # an append-only audit log (test_audit.py searches the server's own AuditEvents instead)
        assert r.status_code in (200, 201), r.text[:300]
        out[(body["resourceType"], body["id"])] = parse(fhir.get(url))
    return out


def test_every_search_parameter_finds_its_examples(fhir: FhirClient, stored: dict[tuple[str, str], dict[str, Any]]) -> None:
    candidates: dict[tuple[str, str], list[tuple[str, tuple[str, str]]]] = defaultdict(list)
    for (rtype, rid), resource in stored.items():
        for definition in params_for(rtype):
            if definition["type"] == "composite":
                pairs = composite_values(definition, rtype, resource)
            elif definition["type"] == "special":
                pairs = []
            else:
                pairs = []
                for part in _union_parts(definition["expression"], rtype):
                    for v in evaluate(part, resource):
                        sv = search_values(definition["type"], v)
                        if sv is not None:
                            pairs.append(sv)
            for pair in pairs[:2]:
                candidates[(rtype, definition["code"])].append((rid, pair))
    exercised, failures = 0, []
    for (rtype, code), items in sorted(candidates.items()):
        ok = False
        for rid, (positive, negative) in items[:3]:
            found = fhir.get(rtype, params={code: positive, "_id": rid})
            missed = fhir.get(rtype, params={code: negative, "_id": rid})
            assert found.status_code < 500 and missed.status_code < 500, (rtype, code, positive, found.text[:300])
            hits = [e["resource"]["id"] for e in parse(found).get("entry", []) if e.get("search", {}).get("mode") == "match"] if found.status_code == 200 else []
            misses = [e for e in parse(missed).get("entry", []) if e.get("search", {}).get("mode") == "match"] if missed.status_code == 200 else ["error"]
            if hits == [rid] and not misses:
                ok = True
                break
            last = (rid, positive, found.status_code, hits, negative, missed.status_code, len(misses))
        if ok:
            exercised += 1
        else:
            failures.append(f"{rtype}.{code}: {last}")
    coverage = exercised / len(candidates)
    print(f"\nsearch parameter coverage: {exercised}/{len(candidates)} = {coverage:.1%} of the (type, parameter) pairs "
          f"for which an example carries a value ({len(DEFINITIONS)} parameters defined)")
    for line in failures:
        print("  not exercised:", line)
    assert coverage >= THRESHOLD, f"coverage {coverage:.1%} is below {THRESHOLD:.0%}"
