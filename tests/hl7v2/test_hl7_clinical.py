"""What VXU, ORM/OML, MDM and SIU messages produce (both back-ends), field by field."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from fhir_server.engine.engine import Engine
from fhir_server.hl7v2.intake import Intake
from fhir_server.security.access import INTERNAL
from testsupport.engine_calls import call, resource

SAMPLES = Path(__file__).parent.parent / "data" / "hl7v2"


def receive(engine: Engine, tenant: str, name_or_text: str) -> str:
    data = (SAMPLES / name_or_text).read_bytes() if name_or_text.endswith(".hl7") else name_or_text.encode()
    answer = Intake(engine).receive(tenant, f"http://test/fhir/{tenant}", INTERNAL, data)
    return answer.outcomes[0].code


def search(engine: Engine, tenant: str, rtype: str) -> list[dict[str, Any]]:
    body = resource(call(engine, tenant, "GET", rtype, params=(("_count", "1000"),)))
    return [e["resource"] for e in body.get("entry", [])]


def test_vxu_makes_one_immunization_per_rxa(engine: Engine, tenant: str) -> None:
    assert receive(engine, tenant, "ms__VXU.hl7") == "AA"
    [patient] = search(engine, tenant, "Patient")
    by_date = {i["occurrenceDateTime"]: i for i in search(engine, tenant, "Immunization")}
    assert sorted(by_date) == ["2013-11-12", "2014-10-12", "2015-06-24"]
    given = by_date["2015-06-24"]
    assert given["status"] == "completed" and given["primarySource"] is True
    assert given["vaccineCode"]["coding"][0] == {"system": "http://hl7.org/fhir/sid/ndc", "code": "49281-0215-88",
                                                 "display": "TENIVAC"}
    assert str(given["doseQuantity"]["value"]) == "0.5"
    assert given["doseQuantity"]["code"] == "mL"
    assert given["lotNumber"] == "315841" and given["expirationDate"] == "2015-12-16"
    assert given["manufacturer"]["identifier"] == {"system": "http://hl7.org/fhir/sid/mvx", "value": "PMC"}
    assert given["route"]["coding"][0]["code"] == "C28161" and given["site"]["coding"][0]["code"] == "RD"
    assert given["performer"][0]["actor"]["display"] == "Lily Suzanne Jackson"
    assert given["patient"]["reference"] == f"Patient/{patient['id']}"
    historical = by_date["2014-10-12"]
    assert historical["primarySource"] is False and "doseQuantity" not in historical  # 999: not known
    assert historical["reportOrigin"]["coding"][0]["code"] == "record"
    assert receive(engine, tenant, "ms__VXU.hl7") == "AA"  # a repeat: still three
    assert len(search(engine, tenant, "Immunization")) == 3


def test_a_refused_vaccination_is_not_done_with_its_reason(engine: Engine, tenant: str) -> None:
    text = ("MSH|^~\\&|IZ|CLINIC|FHIR|STATE|20240101120000||VXU^V04^VXU_V04|z1|P|2.5.1\r"
            "PID|1||321^^^CLINIC&1.2.9&ISO^MR||Kid^Ann||20200101|F\r"
            "ORC|RE||F-77^CLINIC\r"
            "RXA|0|1|20240101||08^Hep B^CVX|999||||||||||||00^Parental decision^NIP002||RE")
    assert receive(engine, tenant, text) == "AA"
    [imm] = search(engine, tenant, "Immunization")
    assert imm["status"] == "not-done" and imm["statusReason"]["coding"][0]["code"] == "00"
    assert {"value": "F-77"}.items() <= imm["identifier"][0].items()


def test_orm_makes_the_order(engine: Engine, tenant: str) -> None:
    assert receive(engine, tenant, "ms__ORM-O01-01.hl7") == "AA"
    [order] = search(engine, tenant, "ServiceRequest")
    assert order["status"] == "active" and order["intent"] == "order"  # ORC-5 SC: scheduled
    assert order["code"]["coding"][0] == {"system": "http://loinc.org", "code": "24725-4", "display": "CT Head"}
    assert {i["value"] for i in order["identifier"]} == {"1101", "1201"}
    assert order["requester"]["display"] == "JONES A ORDPROVIDER" and order["requester"]["identifier"]["value"] == "3850"
    assert order["authoredOn"].startswith("2021-10-20T11:26:00+02:15")


def test_an_order_cancelled_later_is_revoked(engine: Engine, tenant: str) -> None:
    new = ("MSH|^~\\&|CPOE|HOSP|LAB|HOSP|20240101120000||ORM^O01|o{n}|P|2.5\r"
           "PID|1||55^^^HOSP&1.2.3&ISO^MR||Roe^Jo||19900101|F\r"
           "ORC|{control}|P-9^CPOE\r"
           "OBR|1|P-9^CPOE||2345-7^Glucose^LN")
    assert receive(engine, tenant, new.format(n=1, control="NW")) == "AA"
    assert receive(engine, tenant, new.format(n=2, control="CA")) == "AA"
    [order] = search(engine, tenant, "ServiceRequest")
    assert order["status"] == "revoked" and order["meta"]["versionId"] == "2"


def test_oml_makes_the_order_and_its_specimen(engine: Engine, tenant: str) -> None:
    assert receive(engine, tenant, "ms__MDHHS-OML-O21-1.hl7") == "AA"  # an OBR without its ORC
    [order] = search(engine, tenant, "ServiceRequest")
    [specimen] = search(engine, tenant, "Specimen")
    assert order["specimen"] == [{"reference": f"Specimen/{specimen['id']}"}]
    assert specimen["type"]["coding"][0]["code"] == "67922002"
    assert order["reasonCode"][0]["coding"][0]["code"] == "V04.5"
    assert order["note"] == [{"text": "the sky is blue"}]


def test_mdm_makes_the_document_with_its_text(engine: Engine, tenant: str) -> None:
    assert receive(engine, tenant, "ms__MDM-T02-03.hl7") == "AA"
    [doc] = search(engine, tenant, "DocumentReference")
    assert doc["status"] == "current" and doc["docStatus"] == "preliminary"  # TXA-17 IP: in progress
    assert doc["type"]["coding"][0]["code"] == "DS"
    assert doc["masterIdentifier"]["value"] == "2RWRVAJ627408"
    text = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
    assert text.startswith("Toilet cylinder crackers model step-mother visor opening communication\nColumnist draft")
    assert doc["content"][0]["attachment"]["contentType"].startswith("text/plain")


def test_siu_books_and_cancels_the_appointment(engine: Engine, tenant: str) -> None:
    assert receive(engine, tenant, "ms__SIU-S12-01.hl7") == "AA"
    [appointment] = search(engine, tenant, "Appointment")
    assert appointment["status"] == "booked"
    assert (appointment["start"], appointment["end"]) == ("2021-09-24T09:30:00+02:15", "2021-09-24T10:20:00+02:15")
    assert appointment["serviceType"][0]["coding"][0]["code"] == "76164006"
    kinds = {p["actor"].get("type", "Patient") for p in appointment["participant"]}
    assert {"Location", "Practitioner", "Device"} <= kinds
    assert any(p["actor"].get("reference", "").startswith("Patient/") for p in appointment["participant"])
    sample = (SAMPLES / "ms__SIU-S12-01.hl7").read_text("utf-8-sig")
    cancel = sample.replace("SIU^S12^SIU_S12", "SIU^S15^SIU_S15").replace("|MSG00012|", "|MSG00013|", 1)
    assert receive(engine, tenant, cancel) == "AA"
    [appointment] = search(engine, tenant, "Appointment")
    assert appointment["status"] == "cancelled" and appointment["meta"]["versionId"] == "2"


def test_siu_with_the_older_timing_field(engine: Engine, tenant: str) -> None:
    assert receive(engine, tenant, "v2tofhir_ig__SIU_S12.hl7") == "AA"
    [appointment] = search(engine, tenant, "Appointment")
    assert (appointment["start"], appointment["end"]) == ("2015-06-13T14:00:00+00:00", "2016-06-21T14:15:00+00:00")
    assert appointment["appointmentType"]["coding"][0]["code"] == "Normal"
    assert appointment["reasonCode"][0]["coding"][0]["code"] == "OV15"
