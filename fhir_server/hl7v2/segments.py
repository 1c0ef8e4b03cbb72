"""Segment maps (HL7 v2-to-FHIR guide): PID, PD1, NK1, PV1, AL1, DG1, IN1, PR1, MRG as FHIR resources.

Each ``*_to`` function adds what its segment describes to a ``Builder`` and returns the full URL of the resource, so
that message maps (``messages.py``) can link them. Keys (business identifiers) follow ``bundle.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhir_server.hl7v2 import datatypes as dt
from fhir_server.hl7v2.bundle import DERIVED, Builder
from fhir_server.hl7v2.er7 import REQUIRED_MISSING, Field, Hl7Error, Segment

JsonDict = dict[str, Any]
GENDER = {"M": "male", "F": "female", "O": "other", "A": "other", "N": "unknown", "U": "unknown", "X": "other"}
MARITAL = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
PATIENT_CLASS = {"E": "EMER", "I": "IMP", "O": "AMB", "P": "PRENC", "R": "AMB", "B": "IMP", "C": "AMB"}
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ALLERGY_CATEGORY = {"DA": "medication", "MA": "medication", "FA": "food", "EA": "environment", "AA": "environment",
                    "LA": "environment", "PA": "environment"}
ALLERGY_SEVERITY = {"SV": "severe", "MO": "moderate", "MI": "mild"}
ALLERGY_CRITICALITY = {"SV": "high", "MO": "low", "MI": "low"}
DIAGNOSIS = "http://terminology.hl7.org/CodeSystem/condition-category"


@dataclass(frozen=True, slots=True)
class Context:
    builder: Builder
    zone: str  # the time zone of times sent without one (an IANA name)

    def when(self, seg: Segment, n: int, *, date_only: bool = False) -> str | None:
        return dt.date_time(seg.value(n), seg.location(n), self.zone, date_only=date_only)


def patient_key(pid: Segment, n: int = 3) -> tuple[str, str]:
    """The identifier a Patient is found by: the first medical record number (CX-5 MR) of PID-3 with an assigning
    authority, else the first identifier with one, else the first."""
    identifiers = [(f, dt.identifier(f)) for f in pid.repetitions(n)]
    found = [(f, i) for f, i in identifiers if i is not None]
    if not found:
        raise Hl7Error(REQUIRED_MISSING, f"{pid.name}-{n} (the patient's identifier) is required", pid.location(n))
    ranked = sorted(found, key=lambda fi: (not (fi[0].value(5) == "MR" and "system" in fi[1]), "system" not in fi[1]))
    best = ranked[0][1]
    return best.get("system", ""), best["value"]


def patient_to(ctx: Context, pid: Segment, pd1: Segment | None = None, nk1s: list[Segment] | None = None,
               extra: JsonDict | None = None) -> str:
    """PID (with PD1 and NK1s) as a Patient, conditionally updated on its identifier."""
    key = patient_key(pid)
    p: JsonDict = {"identifier": [i for f in pid.repetitions(3) if (i := dt.identifier(f)) is not None]}
    p["active"] = True
    names = [n for f in pid.repetitions(5) if (n := dt.human_name(f)) is not None]
    if names:
        p["name"] = names
    telecom = [t for f in pid.repetitions(13) if (t := dt.contact_point(f, "home")) is not None]
    telecom += [t for f in pid.repetitions(14) if (t := dt.contact_point(f, "work")) is not None]
    if telecom:
        p["telecom"] = telecom
    sex = pid.value(8)
    if sex:
        p["gender"] = GENDER.get(sex.upper(), "unknown")
    born = ctx.when(pid, 7, date_only=True)
    if born:
        p["birthDate"] = born
    died, dead = ctx.when(pid, 29), pid.value(30)
    if died:
        p["deceasedDateTime"] = died
    elif dead:
        p["deceasedBoolean"] = dead.upper() == "Y"
    addresses = [a for f in pid.repetitions(11) if (a := dt.address(f)) is not None]
    if addresses:
        p["address"] = addresses
    marital = pid.value(16)
    if marital:
        coding = dt.table_coding(marital, "0002")
        v3 = marital if marital in ("A", "D", "I", "L", "M", "P", "S", "T", "U", "W") else None
        p["maritalStatus"] = {"coding": [{"system": MARITAL, "code": v3}] if v3 else [coding]}
    language = dt.codeable(pid.first(15), table="0296")
    if language:
        p["communication"] = [{"language": language}]
    births = pid.value(24)
    order = pid.value(25)
    if order and order.isdigit():
        p["multipleBirthInteger"] = int(order)
    elif births:
        p["multipleBirthBoolean"] = births.upper() == "Y"
    contacts = [c for nk1 in nk1s or [] if (c := contact(nk1)) is not None]
    if contacts:
        p["contact"] = contacts
    if pd1 is not None:
        gp = [ref for f in pd1.repetitions(4) if (ref := practitioner_ref(f)) is not None]
        if gp:
            p["generalPractitioner"] = gp
    p.update(extra or {})
    return ctx.builder.upsert("Patient", p, key)


def contact(nk1: Segment) -> JsonDict | None:
    """NK1 (next of kin, associated parties) as a Patient.contact."""
    c: JsonDict = {}
    name = dt.human_name(nk1.first(2))
    if name:
        c["name"] = name
    relationship = dt.codeable(nk1.first(3), table="0063")
    role = dt.codeable(nk1.first(7), table="0131")
    if relationship or role:
        c["relationship"] = [r for r in (relationship, role) if r]
    address = dt.address(nk1.first(4))
    if address:
        c["address"] = address
    telecom = [t for f in nk1.repetitions(5) if (t := dt.contact_point(f, "home")) is not None]
    telecom += [t for f in nk1.repetitions(6) if (t := dt.contact_point(f, "work")) is not None]
    if telecom:
        c["telecom"] = telecom
    organization = nk1.value(13)
    if organization:
        c["organization"] = {"display": organization}
    return c or None


def practitioner_ref(f: Field | None) -> JsonDict | None:
    """XCN as a logical reference (its identifier, and the name as display)."""
    if f is None or f.is_empty():
        return None
    out: JsonDict = {"type": "Practitioner"}
    ident = dt.identifier(f, authority_at=9, type_at=13)
    if ident:
        out["identifier"] = ident
    name = dt.practitioner_name(f)
    if name:
        out["display"] = " ".join([*name.get("prefix", []), *name.get("given", []), name.get("family", ""),
                                   *name.get("suffix", [])]).strip()
    return out if len(out) > 1 else None


ENCOUNTER_STATUS = {"A01": "in-progress", "A02": "in-progress", "A03": "finished", "A04": "arrived",
                    "A05": "planned", "A06": "in-progress", "A07": "in-progress", "A11": "cancelled",
                    "A12": "in-progress", "A13": "in-progress", "A14": "planned", "A27": "cancelled",
                    "A38": "cancelled"}


def encounter_to(ctx: Context, pv1: Segment, patient: str, event: str | None, pv2: Segment | None = None) -> str | None:
    """PV1 (and PV2) as an Encounter of ``patient``, keyed on the visit number (PV1-19); None when PV1 says the
    patient class is "not applicable" (N) or holds nothing."""
    klass = (pv1.value(2) or "").upper()
    if klass == "N" or (not klass and pv1.first(19) is None):
        return None
    e: JsonDict = {}
    visit = dt.identifier(pv1.first(19))
    discharged = ctx.when(pv1, 45)
    status = ENCOUNTER_STATUS.get(event or "", "finished" if discharged else "in-progress")
    e["status"] = status
    code = PATIENT_CLASS.get(klass)
    e["class"] = ({"system": ACT_CODE, "code": code} if code else
                  {"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "code": "UNK", "display": "unknown"})
    e["subject"] = {"reference": patient}
    kind = dt.codeable(pv1.first(4), table="0007")
    if kind:
        e["type"] = [kind]
    participants = []
    for n, role in ((7, "ATND"), (8, "REF"), (9, "CON"), (17, "ADM")):
        for f in pv1.repetitions(n):
            ref = practitioner_ref(f)
            if ref:
                participants.append({"type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                                           "code": role}]}], "individual": ref})
    if participants:
        e["participant"] = participants
    start = ctx.when(pv1, 44)
    if start or discharged:
        e["period"] = {k: v for k, v in (("start", start), ("end", discharged)) if v}
    location = pv1.first(3)
    if location is not None and not location.is_empty():
        parts = [p for p in (location.value(1), location.value(2), location.value(3), location.value(4)) if p]
        e["location"] = [{"location": {"display": " ".join(parts)}, "status": "active" if status != "finished" else "completed"}]
    hospitalization: JsonDict = {}
    admit_source = dt.codeable(pv1.first(14), table="0023")
    if admit_source:
        hospitalization["admitSource"] = admit_source
    disposition = dt.codeable(pv1.first(36), table="0112")
    if disposition:
        hospitalization["dischargeDisposition"] = disposition
    if hospitalization:
        e["hospitalization"] = hospitalization
    if pv2 is not None:
        reason = dt.codeable(pv2.first(3))
        if reason:
            e["reasonCode"] = [reason]
    if visit is None:
        return ctx.builder.upsert("Encounter", e, None)
    return ctx.builder.upsert("Encounter", e, (visit.get("system", ""), visit["value"]))


def _derived(what: str, patient: tuple[str, str], *parts: str | None) -> tuple[str, str]:
    return DERIVED + what, "|".join([patient[0], patient[1], *(p or "" for p in parts)])


def allergy_to(ctx: Context, al1: Segment, patient: str, pkey: tuple[str, str]) -> str | None:
    code = dt.codeable(al1.first(3))
    if code is None:
        return None
    a: JsonDict = {"patient": {"reference": patient}, "code": code,
                   "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                                                  "code": "active"}]}}
    category = ALLERGY_CATEGORY.get((al1.value(2) or "").upper())
    if category:
        a["category"] = [category]
    severity = (al1.value(4) or "").upper()
    if severity in ALLERGY_CRITICALITY:
        a["criticality"] = ALLERGY_CRITICALITY[severity]
    reactions = [{"text": r} for r in (f.value(1) for f in al1.repetitions(5)) if r]
    if reactions:
        manifestation = [{"text": r["text"]} for r in reactions]
        reaction: JsonDict = {"manifestation": manifestation}
        if severity in ALLERGY_SEVERITY:
            reaction["severity"] = ALLERGY_SEVERITY[severity]
        a["reaction"] = [reaction]
    onset = ctx.when(al1, 6, date_only=True)
    if onset:
        a["onsetDateTime"] = onset
    first = al1.first(3)
    return ctx.builder.upsert("AllergyIntolerance", a, _derived("allergy", pkey, first.value(3) if first else None,
                                                                 first.value(1) if first else None))


def condition_to(ctx: Context, dg1: Segment, patient: str, pkey: tuple[str, str], encounter: str | None) -> str | None:
    code = dt.codeable(dg1.first(3))
    if code is None:
        return None
    c: JsonDict = {"subject": {"reference": patient}, "code": code,
                   "category": [{"coding": [{"system": DIAGNOSIS, "code": "encounter-diagnosis"}]}]}
    if encounter:
        c["encounter"] = {"reference": encounter}
    when = ctx.when(dg1, 5)
    if when:
        c["onsetDateTime"] = when
    kind = dg1.value(6)
    if kind:  # DG1-6, the diagnosis type (admitting, working, final)
        c["category"].append({"coding": [dt.table_coding(kind, "0052")]})
    own = dt.identifier(dg1.first(20), authority_at=2, type_at=None)
    first = dg1.first(3)
    key = (own.get("system", DERIVED + "diagnosis-id"), own["value"]) if own else \
        _derived("diagnosis", pkey, first.value(3) if first else None, first.value(1) if first else None, kind)
    return ctx.builder.upsert("Condition", c, key)


def procedure_to(ctx: Context, pr1: Segment, patient: str, pkey: tuple[str, str], encounter: str | None) -> str | None:
    code = dt.codeable(pr1.first(3))
    if code is None:
        return None
    p: JsonDict = {"status": "completed", "subject": {"reference": patient}, "code": code}
    if encounter:
        p["encounter"] = {"reference": encounter}
    when = ctx.when(pr1, 5)
    if when:
        p["performedDateTime"] = when
    performers = [{"actor": ref} for f in pr1.repetitions(12) if (ref := practitioner_ref(f)) is not None]
    if performers:
        p["performer"] = performers
    first = pr1.first(3)
    own = dt.identifier(pr1.first(19), authority_at=2, type_at=None)
    key = (own.get("system", DERIVED + "procedure-id"), own["value"]) if own else \
        _derived("procedure", pkey, first.value(3) if first else None, first.value(1) if first else None,
                 pr1.value(5))
    return ctx.builder.upsert("Procedure", p, key)


def coverage_to(ctx: Context, in1: Segment, patient: str, pkey: tuple[str, str]) -> str | None:
    company = in1.value(4) or in1.value(3)
    plan = dt.codeable(in1.first(2))
    if company is None and plan is None:
        return None
    c: JsonDict = {"status": "active", "beneficiary": {"reference": patient},
                   "payor": [{"display": company or "unknown payer"}]}
    company_id = dt.identifier(in1.first(3))
    if company_id:
        c["payor"][0]["identifier"] = company_id
    if plan:
        c["class"] = [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-class",
                                            "code": "plan"}]},
                       "value": in1.value(2) or plan.get("text", "plan"), **({"name": in1.value(2, 2)} if in1.value(2, 2) else {})}]
    start, end = ctx.when(in1, 12, date_only=True), ctx.when(in1, 13, date_only=True)
    if start or end:
        c["period"] = {k: v for k, v in (("start", start), ("end", end)) if v}
    relationship = in1.value(17)
    if relationship:
        c["relationship"] = {"coding": [dt.table_coding(relationship, "0063")]}
    policy = in1.value(36)
    if policy:
        c["subscriberId"] = policy
    group = in1.value(8)
    if group:
        c.setdefault("class", []).append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-class",
                                                               "code": "group"}]}, "value": group})
    key = _derived("coverage", pkey, in1.value(3), policy or in1.value(2))
    return ctx.builder.upsert("Coverage", c, key)


def prior_patient(mrg: Segment, survivor_key: tuple[str, str]) -> tuple[str, str]:
    """The patient MRG-1 names (merged into the survivor)."""
    prior = patient_key(mrg, 1)
    if prior == survivor_key:
        raise Hl7Error("205", "MRG-1 names the surviving patient itself", mrg.location(1))
    return prior


def merge_to(ctx: Context, prior: tuple[str, str], survivor: str, *, known: bool = True) -> None:
    """The prior patient becomes inactive, ``replaced-by`` the survivor: a conditional FHIRPath Patch, which keeps
    the rest of its record; when the server does not know it (``known``), it is created as such (a conditional
    create: a record made meanwhile by someone else is left alone)."""
    if not known:
        ctx.builder.create_if_none("Patient", {"active": False, "link": [{"other": {"reference": survivor},
                                                                         "type": "replaced-by"}]}, prior)
        return
    link = {"name": "link", "part": [{"name": "other", "valueReference": {"reference": survivor}},
                                     {"name": "type", "valueCode": "replaced-by"}]}
    ctx.builder.patch("Patient", prior, {"resourceType": "Parameters", "parameter": [
        {"name": "operation", "part": [{"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Patient.active"}]},
        {"name": "operation", "part": [{"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"},
                                       {"name": "name", "valueString": "active"}, {"name": "value", "valueBoolean": False}]},
        {"name": "operation", "part": [{"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"},
                                       {"name": "name", "valueString": "link"}, {"name": "value", "part": link["part"]}]},
    ]})
