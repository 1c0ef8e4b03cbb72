"""HL7 v2 messages through the engine (both back-ends): every sample acknowledged, and what each type produces."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from fhir_server.engine.engine import Engine
from fhir_server.hl7v2 import er7
from fhir_server.hl7v2.intake import Answer, Intake
from fhir_server.security.access import INTERNAL, AccessContext
from fhir_server.security.scopes import parse_scopes
from testsupport.engine_calls import call, resource

SAMPLES = Path(__file__).parent.parent / "data" / "hl7v2"
BASE = "http://test/fhir/{}"
# Samples not acknowledged AA, and why (code and first ERR location)
NOT_ACCEPTED = {
    "lfh__sample_unix.hl7": ("AR", "102", "MSH-2"),  # "^~\\&": the escape character written twice
    "lfh__sample_win.hl7": ("AR", "102", "MSH-2"),
    "pyhl7__rep_sample_hl7.hl7": ("AE", "101", "OBR"),  # an ORU^R01 with no OBR
    "ms__DFT-P03-01.hl7": ("AR", "200", "MSH-9.1.1"),  # billing (DFT): not a type this server maps
    "v2tofhir__Message.hl7_MDM_T02.hl7": ("AE", "102", "OBX[4]-5.1.5"),  # ED "Base64" data that is a placeholder
}


def receive(engine: Engine, tenant: str, data: bytes | str, access: AccessContext = INTERNAL) -> Answer:
    raw = data.encode() if isinstance(data, str) else data
    return Intake(engine).receive(tenant, BASE.format(tenant), access, raw)


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def ack_of(answer: Answer) -> er7.Message:
    return er7.parse(answer.data)


def seg(name: str, fields: dict[int, str]) -> str:
    """A segment with ``fields`` (numbered as HL7 numbers them) and the rest empty."""
    return "|".join([name, *(fields.get(n, "") for n in range(1, max(fields) + 1))])


def search(engine: Engine, tenant: str, rtype: str, **params: str) -> list[dict[str, Any]]:
    body = resource(call(engine, tenant, "GET", rtype, params=(*params.items(), ("_count", "1000"))))
    return [e["resource"] for e in body.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("*.hl7")))
def test_every_sample_is_acknowledged(engine: Engine, tenant: str, name: str) -> None:
    answer = receive(engine, tenant, sample(name))
    code, err_code, where = NOT_ACCEPTED.get(name, ("AA", None, None))
    assert [o.code for o in answer.outcomes] == [code] * len(answer.outcomes)
    acks = [m for m in er7.parse_envelope(answer.data).messages]
    assert len(acks) == len(answer.outcomes)
    for message, outcome in zip(acks, answer.outcomes, strict=True):
        msa = message.segment("MSA")
        assert msa is not None and msa.value(1) == code and msa.field(2) == outcome.original.control_id
        if err_code is not None:
            err = message.segment("ERR")
            assert err is not None and outcome.errors[0].code == err_code and str(outcome.errors[0].location) == where


def test_adt_a01_makes_the_patient_and_the_visit(engine: Engine, tenant: str) -> None:
    answer = receive(engine, tenant, sample("ms__ADT-A01-01.hl7"))
    assert answer.outcomes[0].code == "AA"
    m = er7.parse(sample("ms__ADT-A01-01.hl7"))
    pid = m.segment("PID")
    assert pid is not None
    [patient] = search(engine, tenant, "Patient")
    assert patient["active"] is True
    assert patient["name"][0]["family"] == pid.value(5) and patient["name"][0]["given"][0] == pid.value(5, 2)
    assert patient["gender"] == {"M": "male", "F": "female"}[pid.value(8) or ""]
    born = pid.value(7) or ""
    assert patient["birthDate"] == f"{born[:4]}-{born[4:6]}-{born[6:8]}"
    values = {i["value"] for i in patient["identifier"]}
    assert {f.value(1) for f in pid.repetitions(3)} <= values
    [encounter] = search(engine, tenant, "Encounter")
    assert encounter["status"] == "in-progress" and encounter["subject"]["reference"] == f"Patient/{patient['id']}"
    assert encounter["class"]["code"] == {"I": "IMP", "E": "EMER", "O": "AMB", "P": "PRENC"}[m.segment("PV1").value(2) or ""]  # type: ignore[union-attr]
    visit = m.segment("PV1").value(19)  # type: ignore[union-attr]
    assert visit in {i["value"] for i in encounter["identifier"]}
    for rtype, segment in (("AllergyIntolerance", "AL1"), ("Condition", "DG1"), ("Procedure", "PR1"), ("Coverage", "IN1")):
        found = search(engine, tenant, rtype)
        assert len(found) == len({s.field(3) for s in m.all(segment)}) > 0, rtype
    [provenance] = search(engine, tenant, "Provenance")
    assert provenance["entity"][0]["what"]["identifier"]["value"] == m.control_id
    assert {t["reference"].split("/")[0] for t in provenance["target"]} >= {"Patient", "Encounter"}


def test_times_keep_their_zone_or_get_the_default(engine_with: Any, tenant: str) -> None:
    engine = engine_with(hl7_timezone="America/New_York")
    text = ("MSH|^~\\&|LAB|HOSP|FHIR|HOSP|20240101120000||ADT^A01|tz1|P|2.5\r"
            "PID|1||555^^^HOSP&1.2.3&ISO^MR||Doe^Jane||19800101|F\r"
            + seg("PV1", {1: "1", 2: "I", 3: "W1^101^A", 19: "V-1^^^HOSP&1.2.3&ISO^VN", 44: "20240115083000",
                          45: "20240116170000-0800"}))
    assert receive(engine, tenant, text).outcomes[0].code == "AA"
    [encounter] = search(engine, tenant, "Encounter")
    assert encounter["period"] == {"start": "2024-01-15T08:30:00-05:00", "end": "2024-01-16T17:00:00-08:00"}
    assert encounter["status"] == "in-progress"
    [patient] = search(engine, tenant, "Patient")
    assert {"system": "urn:oid:1.2.3", "value": "555"}.items() <= patient["identifier"][0].items()


ADMIT = ("MSH|^~\\&|ADT|HOSP|FHIR|HOSP|20240101120000||ADT^{event}|{control}|P|2.5\r"
         "PID|1||777^^^HOSP&1.2.3&ISO^MR||{family}^Ann||19700202|F|||1 Main St^^Springfield^IL^62701||^PRN^PH^^^217^5550100\r"
         + seg("PV1", {1: "1", 2: "I", 3: "W2^202^B", 19: "V-7^^^HOSP&1.2.3&ISO^VN", 44: "20240101100000"}) + "{discharge}")


def test_a08_updates_the_same_patient_and_a03_ends_the_visit(engine: Engine, tenant: str) -> None:
    assert receive(engine, tenant, ADMIT.format(event="A01", control="c1", family="Smith", discharge="")).outcomes[0].code == "AA"
    assert receive(engine, tenant, ADMIT.format(event="A08", control="c2", family="Smith-Jones", discharge="")).outcomes[0].code == "AA"
    [patient] = search(engine, tenant, "Patient")
    assert patient["name"][0]["family"] == "Smith-Jones" and patient["meta"]["versionId"] == "2"
    assert patient["telecom"] == [{"system": "phone", "value": "217 5550100", "use": "home"}]
    assert patient["address"][0]["city"] == "Springfield"
    receive(engine, tenant, ADMIT.format(event="A03", control="c3", family="Smith-Jones", discharge="|20240105090000"))  # PV1-45
    [encounter] = search(engine, tenant, "Encounter")
    assert encounter["status"] == "finished" and encounter["period"]["end"].startswith("2024-01-05T09:00:00")
    assert len(search(engine, tenant, "Provenance")) == 3


def test_a_repeated_message_changes_nothing(engine: Engine, tenant: str) -> None:
    data = sample("ms__ORU-R01-01.hl7")
    first = receive(engine, tenant, data)
    assert first.outcomes[0].code == "AA" and not first.outcomes[0].duplicate
    counts = {t: len(search(engine, tenant, t)) for t in ("Patient", "Observation", "DiagnosticReport", "Provenance")}
    versions = {o["id"]: o["meta"]["versionId"] for o in search(engine, tenant, "Observation")}
    again = receive(engine, tenant, data)
    assert again.outcomes[0].code == "AA" and again.outcomes[0].duplicate
    msa = ack_of(again).segment("MSA")
    assert msa is not None and msa.field(2) == er7.parse(data).control_id
    assert {t: len(search(engine, tenant, t)) for t in counts} == counts
    assert {o["id"]: o["meta"]["versionId"] for o in search(engine, tenant, "Observation")} == versions


def test_the_same_results_sent_again_under_a_new_control_id_make_no_new_versions(engine: Engine, tenant: str) -> None:
    """Not a duplicate (another MSH-10): processed again, but every resource it maps to has the content it has."""
    data = sample("ms__ORU-R01-01.hl7")
    assert receive(engine, tenant, data).outcomes[0].code == "AA"
    kinds = ("Patient", "Observation", "DiagnosticReport", "ServiceRequest")
    versions = {t: {r["id"]: r["meta"]["versionId"] for r in search(engine, tenant, t)} for t in kinds}
    control = er7.parse(data).control_id
    assert control
    resent = data.replace(f"|{control}|".encode(), f"|{control}-resent|".encode(), 1)
    answer = receive(engine, tenant, resent)
    assert answer.outcomes[0].code == "AA" and not answer.outcomes[0].duplicate
    assert {t: {r["id"]: r["meta"]["versionId"] for r in search(engine, tenant, t)} for t in kinds} == versions
    assert all(v == "1" for by_id in versions.values() for v in by_id.values())
    assert len(search(engine, tenant, "Provenance")) == 2  # each message its own record of what was received


def test_a40_merges_the_prior_patient_into_the_survivor(engine: Engine, tenant: str) -> None:
    receive(engine, tenant, ADMIT.format(event="A01", control="m1", family="Old", discharge=""))
    [prior] = search(engine, tenant, "Patient")
    merge = ("MSH|^~\\&|ADT|HOSP|FHIR|HOSP|20240201120000||ADT^A40^ADT_A39|m2|P|2.5\r"
             "PID|1||888^^^HOSP&1.2.3&ISO^MR||New^Ann||19700202|F\r"
             "MRG|777^^^HOSP&1.2.3&ISO^MR")
    assert receive(engine, tenant, merge).outcomes[0].code == "AA"
    old = resource(call(engine, tenant, "GET", f"Patient/{prior['id']}"))
    [survivor] = search(engine, tenant, "Patient", identifier="urn:oid:1.2.3|888")
    assert old["active"] is False and old["name"][0]["family"] == "Old"  # the rest of its record is kept
    assert old["link"] == [{"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}]
    assert survivor["link"] == [{"other": {"reference": f"Patient/{prior['id']}"}, "type": "replaces"}]


def test_a40_of_an_unknown_prior_patient_records_it_as_replaced(engine: Engine, tenant: str) -> None:
    assert receive(engine, tenant, sample("ms__ADT-A40-01.hl7")).outcomes[0].code == "AA"
    patients = search(engine, tenant, "Patient")
    inactive = [p for p in patients if p.get("active") is False]
    assert len(patients) == 2 and len(inactive) == 1
    assert inactive[0]["link"][0]["type"] == "replaced-by"


def test_oru_makes_the_report_its_results_and_the_order(engine: Engine, tenant: str) -> None:
    data = sample("ms__LRI_2.0-NG_CBC_Typ_Message.hl7")
    assert receive(engine, tenant, data).outcomes[0].code == "AA"
    m = er7.parse(data)
    [report] = search(engine, tenant, "DiagnosticReport")
    observations = search(engine, tenant, "Observation")
    assert len(observations) == len(m.all("OBX")) == len(report["result"])
    obr = m.segment("OBR")
    assert obr is not None
    assert report["code"]["coding"][0]["code"] == obr.value(4)
    assert report["status"] == {"F": "final", "P": "preliminary", "C": "corrected"}[obr.value(25) or ""]
    [order] = search(engine, tenant, "ServiceRequest")
    assert report["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
    numeric = [(s, o) for s in m.all("OBX") if s.value(2) == "NM"
               for o in observations if o["code"]["coding"][0]["code"] == s.value(3)]
    assert numeric
    for obx, obs in numeric:
        assert obs["valueQuantity"]["value"] == Decimal(obx.value(5) or "NaN")
        if obx.value(6):
            assert obs["valueQuantity"]["code"] == obx.value(6)
        assert obs["status"] == "final"


def test_observation_value_types(engine: Engine, tenant: str) -> None:
    text = ("MSH|^~\\&|LAB|HOSP|FHIR|HOSP|20240101120000||ORU^R01|v1|P|2.5.1\r"
            "PID|1||999^^^HOSP&1.2.3&ISO^MR||Roe^Rick||19600101|M\r"
            "OBR|1|P-1^HOSP|F-1^LAB|24331-1^Lipid panel^LN|||20240101080000|||||||||||||||20240101100000|||F\r"
            "OBX|1|NM|2093-3^Cholesterol^LN||212|mg/dL^mg/dL^UCUM|<200|H|||F\r"
            "NTE|1||fasting sample\r"
            "OBX|2|SN|2571-8^Triglyceride^LN||>^400|mg/dL|||||F\r"
            "OBX|3|SN|X-RATIO^Titer^L||^1^:^128||||||F\r"
            "OBX|4|CWE|882-1^ABO+Rh group^LN||A+^A positive^L||||||F\r"
            "OBX|5|ST|LOCAL-1^Comment^L||see note \\T\\ call||||||F\r"
            "OBX|6|DT|LOCAL-2^Date^L||20231231||||||F\r"
            "OBX|7|TX|LOCAL-3^Text^L||line one~line two||||||P\r"
            "OBX|8|NM|LOCAL-4^Bad^L||abc||||||F")
    answer = receive(engine, tenant, text)
    assert answer.outcomes[0].code == "AE"
    assert str(answer.outcomes[0].errors[0].location) == "OBX[8]-5"
    assert search(engine, tenant, "Observation") == []  # nothing of a message that fails is written
    answer = receive(engine, tenant, text.rsplit("\r", 1)[0].replace("|v1|", "|v2|"))
    assert answer.outcomes[0].code == "AA"
    by_code = {o["code"]["coding"][0]["code"]: o for o in search(engine, tenant, "Observation")}
    chol = by_code["2093-3"]
    assert chol["valueQuantity"] == {"value": 212, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}
    assert chol["referenceRange"][0]["high"]["value"] == 200
    assert chol["interpretation"][0]["coding"][0]["code"] == "H"
    assert chol["note"] == [{"text": "fasting sample"}]
    assert chol["effectiveDateTime"] == "2024-01-01T08:00:00+00:00"
    assert by_code["2571-8"]["valueQuantity"]["comparator"] == ">" and by_code["2571-8"]["valueQuantity"]["value"] == 400
    assert by_code["X-RATIO"]["valueRatio"] == {"numerator": {"value": 1}, "denominator": {"value": 128}}
    assert by_code["882-1"]["valueCodeableConcept"]["coding"][0]["code"] == "A+"
    assert by_code["LOCAL-1"]["valueString"] == "see note & call"
    assert by_code["LOCAL-2"]["valueDateTime"] == "2023-12-31"
    assert by_code["LOCAL-3"]["valueString"] == "line one\nline two" and by_code["LOCAL-3"]["status"] == "preliminary"
    [report] = search(engine, tenant, "DiagnosticReport")
    assert report["issued"] == "2024-01-01T10:00:00+00:00"
    assert {"system": "urn:id:LAB", "value": "F-1"}.items() <= report["identifier"][0].items()


def test_a_token_that_may_not_write_gets_an_ae(engine: Engine, tenant: str) -> None:
    reader = AccessContext(parse_scopes("system/*.rs"), client_id="lab-feed")
    answer = receive(engine, tenant, ADMIT.format(event="A01", control="r1", family="X", discharge=""), reader)
    assert answer.outcomes[0].code == "AE"
    assert "HTTP 403" in answer.outcomes[0].errors[0].message
    assert search(engine, tenant, "Patient") == []


def test_a_batch_gets_a_batch_of_acks(engine: Engine, tenant: str) -> None:
    answer = receive(engine, tenant, sample("pyhl7__sample_batch1_BHS.hl7"))
    envelope = er7.parse_envelope(answer.data)
    assert envelope.kind == "batch" and len(envelope.messages) == 2
    assert envelope.batches[0].trailer is not None and envelope.batches[0].trailer.value(1) == "2"
    assert [m.segment("MSA").value(1) for m in envelope.messages] == ["AA", "AA"]  # type: ignore[union-attr]


def test_every_message_gets_a_receipt_in_the_audit_log(engine: Engine, tenant: str) -> None:
    receive(engine, tenant, ADMIT.format(event="A01", control="au1", family="Zzyzx", discharge=""))
    receive(engine, tenant, b"garbage")
    engine.storage.audit_log.chain(tenant)
    events = search(engine, tenant, "AuditEvent", type="110107")
    assert sorted(e["outcome"] for e in events) == ["0", "4"]
    accepted = next(e for e in events if e["outcome"] == "0")
    assert accepted["entity"][0]["what"]["identifier"]["value"].endswith("|au1")
    assert "Zzyzx" not in str(events)  # no content of the message in its receipt
