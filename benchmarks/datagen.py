"""Deterministic, realistic patient records for the benchmarks, as FHIR transaction Bundles.

``patients(n, seed)`` yields one Bundle per patient (about 100 resources): the Patient, Encounters,
vital-sign and laboratory Observations with LOINC codes and UCUM units, Conditions (SNOMED CT),
MedicationRequests (RxNorm), Procedures, Immunizations (CVX), DiagnosticReports grouping the labs,
and AllergyIntolerances. The same (n, seed) always gives the same resources and ids.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from typing import Any

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"

FAMILIES = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
            "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin",
            "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson"]
GIVEN_F = ["Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen"]
GIVEN_M = ["James", "Robert", "John", "Michael", "David", "William", "Richard", "Joseph", "Thomas", "Charles"]
CITIES = [("Boston", "MA", "02108"), ("Springfield", "IL", "62701"), ("Austin", "TX", "73301"), ("Denver", "CO", "80201"),
          ("Portland", "OR", "97201"), ("Madison", "WI", "53703"), ("Raleigh", "NC", "27601")]
VITALS = [  # code, display, unit, low, high
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 95, 170),
    ("8462-4", "Diastolic blood pressure", "mm[Hg]", 55, 105),
    ("8867-4", "Heart rate", "/min", 50, 120),
    ("9279-1", "Respiratory rate", "/min", 10, 24),
    ("8310-5", "Body temperature", "Cel", 36, 39),
    ("29463-7", "Body weight", "kg", 45, 130),
    ("8302-2", "Body height", "cm", 150, 200),
    ("39156-5", "Body mass index", "kg/m2", 18, 40),
]
LABS = [
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 70, 200),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 120, 280),
    ("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL", 50, 300),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 10, 18),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.5, 1.8),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 3.5, 12),
]
CONDITIONS = [("44054006", "Diabetes mellitus type 2"), ("38341003", "Hypertensive disorder"), ("195967001", "Asthma"),
              ("55822004", "Hyperlipidemia"), ("40055000", "Chronic sinusitis"), ("271737000", "Anemia")]
MEDS = [("860975", "Metformin 500 MG Oral Tablet"), ("314076", "Lisinopril 10 MG Oral Tablet"),
        ("617314", "Atorvastatin 10 MG Oral Tablet"), ("895994", "Albuterol 0.09 MG/ACTUAT inhaler")]
PROCEDURES = [("73761001", "Colonoscopy"), ("80146002", "Appendectomy"), ("274804006", "Evaluation of psychiatric state")]
VACCINES = [("140", "Influenza, seasonal, injectable"), ("208", "SARS-COV-2 (COVID-19) vaccine"), ("113", "Td (adult)")]
ALLERGIES = [("91936005", "Allergy to penicillin"), ("300913006", "Shellfish allergy"), ("232350006", "House dust mite allergy")]


SYSTEMS = ["Northwind Health", "Riverside Care Network"]
CLINICS = 6
PRACTITIONERS = 24


def shared_bundle() -> dict[str, Any]:
    """Health systems, their clinics and the practitioners patients are registered with (loaded first)."""
    resources: list[dict[str, Any]] = []
    for s, name in enumerate(SYSTEMS):
        resources.append({"resourceType": "Organization", "id": f"sys-{s}", "name": name, "active": True})
    for c in range(CLINICS):
        resources.append({"resourceType": "Organization", "id": f"clinic-{c}", "name": f"Clinic {c}", "active": True,
                          "partOf": {"reference": f"Organization/sys-{c % len(SYSTEMS)}"}})
    rnd = random.Random("practitioners")
    for p in range(PRACTITIONERS):
        resources.append({"resourceType": "Practitioner", "id": f"prac-{p}", "active": True,
                          "name": [{"family": rnd.choice(FAMILIES), "given": [rnd.choice(GIVEN_F + GIVEN_M)], "prefix": ["Dr."]}]})
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in resources]}


def patients(n: int, seed: int = 20261123, *, start: int = 0) -> Iterator[dict[str, Any]]:
    """Patients ``start`` to ``n - 1``: each is seeded by its own number, so patient i is the same in every data set
    (D2 is D1 and 9,000 more)."""
    for i in range(start, n):
        yield patient_bundle(i, random.Random(f"{seed}-{i}"))


def patient_bundle(index: int, rnd: random.Random) -> dict[str, Any]:
    pid = f"pat-{index:06d}"
    resources: list[dict[str, Any]] = []
    female = rnd.random() < 0.5
    city, state, postal = rnd.choice(CITIES)
    birth = dt.date(1930, 1, 1) + dt.timedelta(days=rnd.randrange(0, 365 * 85))
    resources.append({
        "resourceType": "Patient", "id": pid,
        "identifier": [{"system": "http://hospital.example.org/mrn", "value": f"MRN{index:08d}",
                        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}],
        "name": [{"use": "official", "family": rnd.choice(FAMILIES), "given": [rnd.choice(GIVEN_F if female else GIVEN_M)]}],
        "gender": "female" if female else "male",
        "birthDate": birth.isoformat(),
        "telecom": [{"system": "phone", "value": f"555-{rnd.randrange(1000, 9999)}", "use": "home"}],
        "address": [{"line": [f"{rnd.randrange(1, 999)} Main Street"], "city": city, "state": state, "postalCode": postal}],
        "generalPractitioner": [{"reference": f"Practitioner/prac-{rnd.randrange(PRACTITIONERS)}"}],
        "managingOrganization": {"reference": f"Organization/clinic-{rnd.randrange(CLINICS)}"},
    })
    start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(days=rnd.randrange(0, 365))
    encounters = []
    for e in range(7):
        when = start + dt.timedelta(days=60 * e + rnd.randrange(0, 30), hours=rnd.randrange(8, 17))
        eid = f"{pid}-enc-{e}"
        encounters.append((eid, when))
        resources.append({
            "resourceType": "Encounter", "id": eid, "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [{"coding": [{"system": SNOMED, "code": "185349003", "display": "Encounter for check up"}]}],
            "subject": {"reference": f"Patient/{pid}"},
            "period": {"start": _ts(when), "end": _ts(when + dt.timedelta(minutes=30))},
        })
    n_obs = 0
    for eid, when in encounters:
        for code, display, unit, lo, hi in VITALS[: 4 + rnd.randrange(0, 5)]:
            n_obs += 1
            resources.append(_observation(f"{pid}-obs-{n_obs}", pid, eid, when, code, display, unit, rnd.uniform(lo, hi), "vital-signs"))
        lab_ids = []
        for code, display, unit, lo, hi in LABS[: 3 + rnd.randrange(0, 4)]:
            n_obs += 1
            oid = f"{pid}-obs-{n_obs}"
            lab_ids.append(oid)
            resources.append(_observation(oid, pid, eid, when, code, display, unit, rnd.uniform(lo, hi), "laboratory"))
        resources.append({
            "resourceType": "DiagnosticReport", "id": f"{eid}-report", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}],
            "code": {"coding": [{"system": LOINC, "code": "24323-8", "display": "Comprehensive metabolic panel"}]},
            "subject": {"reference": f"Patient/{pid}"}, "encounter": {"reference": f"Encounter/{eid}"},
            "effectiveDateTime": _ts(when), "issued": _ts(when + dt.timedelta(hours=4)),
            "result": [{"reference": f"Observation/{o}"} for o in lab_ids],
        })
    for c, (code, display) in enumerate(rnd.sample(CONDITIONS, 3)):
        resources.append({
            "resourceType": "Condition", "id": f"{pid}-cond-{c}",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}]}],
            "code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
            "subject": {"reference": f"Patient/{pid}"}, "onsetDateTime": _ts(start - dt.timedelta(days=rnd.randrange(30, 3000))),
        })
    for m, (code, display) in enumerate(rnd.sample(MEDS, 2)):
        resources.append({
            "resourceType": "MedicationRequest", "id": f"{pid}-med-{m}", "status": "active", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code, "display": display}], "text": display},
            "subject": {"reference": f"Patient/{pid}"}, "encounter": {"reference": f"Encounter/{encounters[0][0]}"},
            "authoredOn": _ts(encounters[0][1]),
            "dosageInstruction": [{"text": "Take one tablet daily", "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}}],
        })
    for p, (code, display) in enumerate(rnd.sample(PROCEDURES, 1)):
        resources.append({
            "resourceType": "Procedure", "id": f"{pid}-proc-{p}", "status": "completed",
            "code": {"coding": [{"system": SNOMED, "code": code, "display": display}]},
            "subject": {"reference": f"Patient/{pid}"}, "performedDateTime": _ts(encounters[1][1]),
        })
    for v, (code, display) in enumerate(VACCINES):
        resources.append({
            "resourceType": "Immunization", "id": f"{pid}-imm-{v}", "status": "completed",
            "vaccineCode": {"coding": [{"system": CVX, "code": code, "display": display}]},
            "patient": {"reference": f"Patient/{pid}"}, "occurrenceDateTime": _ts(encounters[v % len(encounters)][1]),
            "primarySource": True,
        })
    code, display = rnd.choice(ALLERGIES)
    resources.append({
        "resourceType": "AllergyIntolerance", "id": f"{pid}-allergy",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
        "code": {"coding": [{"system": SNOMED, "code": code, "display": display}]},
        "patient": {"reference": f"Patient/{pid}"}, "recordedDate": _ts(start),
    })
    return {
        "resourceType": "Bundle", "type": "transaction",
        "entry": [{"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r,
                   "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources],
    }


def _observation(oid: str, pid: str, eid: str, when: dt.datetime, code: str, display: str, unit: str, value: float,
                 category: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": oid, "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{pid}"}, "encounter": {"reference": f"Encounter/{eid}"},
        "effectiveDateTime": _ts(when),
        "valueQuantity": {"value": round(value, 1), "unit": unit, "system": UCUM, "code": unit},
    }


def _ts(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")
