"""Message maps beyond ADT and results: VXU^V04 (Immunization), ORM^O01 and OML^O21 (ServiceRequest), MDM^T02
(DocumentReference with its content) and SIU^S12-S15 (Appointment), per the HL7 v2-to-FHIR guide."""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from typing import Any

from fhir_server.hl7v2 import datatypes as dt
from fhir_server.hl7v2 import segments as sg
from fhir_server.hl7v2.bundle import DERIVED
from fhir_server.hl7v2.er7 import (
    DATA_TYPE,
    REQUIRED_MISSING,
    Hl7Error,
    Location,
    Message,
    Segment,
)

JsonDict = dict[str, Any]


def _patient(ctx: sg.Context, m: Message) -> tuple[str, tuple[str, str], str | None]:
    """The message's Patient (and Encounter, from PV1), as every one of these messages carries them."""
    pid = m.segment("PID")
    if pid is None:
        raise Hl7Error(REQUIRED_MISSING, "the PID segment is required in this message", Location("PID"))
    patient = sg.patient_to(ctx, pid, m.segment("PD1"), m.all("NK1"))
    pv1 = m.segment("PV1")
    encounter = sg.encounter_to(ctx, pv1, patient, None, m.segment("PV2")) if pv1 is not None else None
    return patient, sg.patient_key(pid), encounter


def _groups(m: Message, starter: str, members: tuple[str, ...]) -> list[list[Segment]]:
    """Segment groups that begin with ``starter`` (the members that follow it, until the next starter)."""
    groups: list[list[Segment]] = []
    for s in m.segments:
        if s.name == starter:
            groups.append([s])
        elif groups and s.name in members:
            groups[-1].append(s)
    return groups


def _first(group: list[Segment], name: str) -> Segment | None:
    return next((s for s in group if s.name == name), None)


def _key(own: tuple[str, str] | None, what: str, *parts: str | None) -> tuple[str, str]:
    if own is not None:
        return own[0] or DERIVED + what + "-id", own[1]
    return DERIVED + what, "|".join(p or "" for p in parts)


# --- VXU^V04 --------------------------------------------------------------------------------------------------

# CDC NIP001 (immunization information source) to immunization-origin; 00 is a new record (primarySource)
REPORT_ORIGIN = {"01": "record", "02": "provider", "03": "record", "04": "recall", "05": "record", "06": "record",
                 "07": "school", "08": "record"}
IMMUNIZATION_STATUS = {"CP": "completed", "PA": "completed", "RE": "not-done", "NA": "not-done"}


def vxu(ctx: sg.Context, m: Message) -> None:
    patient, pkey, encounter = _patient(ctx, m)
    groups = _groups(m, "ORC", ("TQ1", "TQ2", "RXA", "RXR", "OBX", "NTE"))
    if not groups:  # an RXA without its ORC (allowed before v2.5)
        groups = [[s] for s in m.all("RXA")]
    if not any(_first(g, "RXA") for g in groups):
        raise Hl7Error(REQUIRED_MISSING, "a VXU^V04 needs an RXA segment (the administration)", Location("RXA"))
    for group in groups:
        rxa = _first(group, "RXA")
        if rxa is not None:
            _immunization(ctx, group, rxa, patient, pkey, encounter)


def _immunization(ctx: sg.Context, group: list[Segment], rxa: Segment, patient: str, pkey: tuple[str, str],
                  encounter: str | None) -> None:
    vaccine = dt.codeable(rxa.first(5))
    if vaccine is None:
        raise Hl7Error(REQUIRED_MISSING, "RXA-5 (the vaccine given) is required", rxa.location(5))
    when = ctx.when(rxa, 3)
    if when is None:
        raise Hl7Error(REQUIRED_MISSING, "RXA-3 (when it was given) is required", rxa.location(3))
    status = "entered-in-error" if (rxa.value(21) or "").upper() == "D" else \
        IMMUNIZATION_STATUS.get((rxa.value(20) or "CP").upper(), "completed")
    i: JsonDict = {"status": status, "vaccineCode": vaccine, "patient": {"reference": patient},
                   "occurrenceDateTime": when}
    if encounter:
        i["encounter"] = {"reference": encounter}
    amount = rxa.value(6)
    if amount and amount != "999":  # 999: the amount is not known
        i["doseQuantity"] = {"value": dt.number(amount, rxa.location(6))}
        unit = rxa.first(7)
        if unit is not None and unit.value(1):
            i["doseQuantity"].update({"unit": unit.value(2) or unit.value(1), "code": unit.value(1),
                                      "system": dt.system_for(unit.value(3)) or dt.CODING_SYSTEMS["UCUM"]})
    source = rxa.value(9)
    if source:
        i["primarySource"] = source == "00"  # NIP001: 00 is a new record, 01 to 08 historical sources
        origin = REPORT_ORIGIN.get(source)
        if origin:
            i["reportOrigin"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/immunization-origin",
                                             "code": origin}], "text": rxa.value(9, 2) or source}
    performers = [{"function": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0443", "code": "AP",
                                            "display": "Administering Provider"}]}, "actor": ref}
                  for f in rxa.repetitions(10) if (ref := sg.practitioner_ref(f)) is not None]
    if performers:
        i["performer"] = performers
    lot = rxa.value(15)
    if lot:
        i["lotNumber"] = lot
    expires = ctx.when(rxa, 16, date_only=True)
    if expires and len(expires) == 10:
        i["expirationDate"] = expires
    maker = rxa.first(17)
    if maker is not None and not maker.is_empty():
        i["manufacturer"] = {"display": maker.value(2) or maker.value(1) or ""}
        if maker.value(1):
            i["manufacturer"]["identifier"] = {"system": dt.system_for(maker.value(3)) or dt.CODING_SYSTEMS["MVX"],
                                               "value": maker.value(1)}
    if status == "not-done":
        reason = dt.codeable(rxa.first(18))
        if reason:
            i["statusReason"] = reason
    rxr = _first(group, "RXR")
    if rxr is not None:
        route, site = dt.codeable(rxr.first(1), table="0162"), dt.codeable(rxr.first(2), table="0163")
        if route:
            i["route"] = route
        if site:
            i["site"] = site
    orc = _first(group, "ORC")
    own = (dt.ei_key(orc.first(3)) or dt.ei_key(orc.first(2))) if orc is not None else None
    first = rxa.first(5)
    ctx.builder.upsert("Immunization", i, _key(own, "immunization", pkey[0], pkey[1],
                                               first.value(1) if first else None, rxa.value(3)))


# --- ORM^O01, OML^O21 -----------------------------------------------------------------------------------------

ORDER_CONTROL = {"NW": "active", "XO": "active", "SC": None, "CA": "revoked", "OC": "revoked", "DC": "revoked",
                 "CR": "revoked", "OD": "revoked", "HD": "on-hold", "OH": "on-hold", "RL": "active", "RP": "active"}
ORDER_STATUS = {"CM": "completed", "CA": "revoked", "DC": "revoked", "HD": "on-hold", "IP": "active", "SC": "active",
                "A": "active", "ER": "entered-in-error", "RP": "revoked"}


def orders(ctx: sg.Context, m: Message) -> None:
    patient, pkey, encounter = _patient(ctx, m)
    groups: list[list[Segment]] = []  # an ORC and its OBR (either may come alone), with what follows them
    for s in m.segments:
        if s.name == "ORC" or (s.name == "OBR" and not (groups and groups[-1][0].name == "ORC"
                                                        and _first(groups[-1], "OBR") is None)):
            groups.append([s])
        elif groups and s.name in ("TQ1", "OBR", "NTE", "DG1", "OBX", "SPM", "SAC", "RQD", "PRT"):
            groups[-1].append(s)
    if not any(_first(g, "OBR") for g in groups):
        raise Hl7Error(REQUIRED_MISSING, "an order message needs an OBR segment (what is ordered)", Location("OBR"))
    for group in groups:
        obr = _first(group, "OBR")
        if obr is None:
            continue
        orc = _first(group, "ORC") or Segment(("ORC",), obr.delimiters, obr.charset)
        code = dt.codeable(obr.first(4))
        if code is None:
            raise Hl7Error(REQUIRED_MISSING, "OBR-4 (what is ordered) is required", obr.location(4))
        status = ORDER_STATUS.get((orc.value(5) or "").upper()) or ORDER_CONTROL.get((orc.value(1) or "").upper()) or "active"
        r: JsonDict = {"status": status, "intent": "order", "code": code, "subject": {"reference": patient}}
        placer = dt.ei_key(orc.first(2)) or dt.ei_key(obr.first(2))
        filler = dt.ei_key(orc.first(3)) or dt.ei_key(obr.first(3))
        identifiers = [{**({"system": k[0]} if k[0] else {}), "value": k[1], "type": {"coding": [dt.table_coding(t, "0203")]}}
                       for k, t in ((placer, "PLAC"), (filler, "FILL")) if k]
        if identifiers:
            r["identifier"] = identifiers
        group_number = dt.ei_key(orc.first(4))
        if group_number:
            r["requisition"] = {**({"system": group_number[0]} if group_number[0] else {}), "value": group_number[1]}
        if encounter:
            r["encounter"] = {"reference": encounter}
        requester = sg.practitioner_ref(orc.first(12)) or sg.practitioner_ref(obr.first(16))
        if requester:
            r["requester"] = requester
        authored = ctx.when(orc, 9)
        if authored:
            r["authoredOn"] = authored
        tq1 = _first(group, "TQ1")
        start = ctx.when(tq1, 7) if tq1 is not None else None
        if start:
            r["occurrenceDateTime"] = start
        priority = (tq1.value(9) if tq1 is not None else None) or ""
        if priority.upper() in ("S", "A"):
            r["priority"] = "stat" if priority.upper() == "S" else "asap"
        reasons = [c for dg1 in group if dg1.name == "DG1" and (c := dt.codeable(dg1.first(3))) is not None]
        reasons += [c for f in obr.repetitions(31) if (c := dt.codeable(f)) is not None]
        if reasons:
            r["reasonCode"] = reasons
        notes = [{"text": v} for nte in group if nte.name == "NTE" for f in nte.repetitions(3) if (v := f.value(1))]
        if notes:
            r["note"] = notes
        base = f"{(filler or placer or ('', ''))[1]}"
        specimens = [ref for spm in group if spm.name == "SPM"
                     if (ref := _order_specimen(ctx, spm, patient, pkey, base)) is not None]
        if specimens:
            r["specimen"] = [{"reference": s} for s in specimens]
        first = obr.first(4)
        ctx.builder.upsert("ServiceRequest", r, _key(placer or filler, "order", pkey[0], pkey[1],
                                                     first.value(1) if first else None, authored))


def _order_specimen(ctx: sg.Context, spm: Segment, patient: str, pkey: tuple[str, str], base: str) -> str | None:
    kind = dt.codeable(spm.first(4), table="0487")
    if kind is None:
        return None
    s: JsonDict = {"subject": {"reference": patient}, "type": kind}
    collected = dt.date_time(spm.value(17), spm.location(17), ctx.zone)
    if collected:
        s["collection"] = {"collectedDateTime": collected}
    ids = spm.first(2)
    subs = ids.subcomponents(1) if ids is not None else []
    own = (dt.authority_system(*(subs[1:] + [None, None, None])[:3]) or "", subs[0]) if subs and subs[0] else None
    return ctx.builder.upsert("Specimen", s, _key(own, "specimen", pkey[0], pkey[1], base, spm.value(1)))


# --- MDM^T02 --------------------------------------------------------------------------------------------------

DOC_STATUS = {"AU": "final", "LA": "final", "DO": "final", "IP": "preliminary", "IN": "preliminary",
              "PA": "preliminary", "DI": "preliminary"}
DOC_AVAILABILITY = {"AV": "current", "UN": "current", "OB": "superseded", "CA": "entered-in-error"}


def mdm(ctx: sg.Context, m: Message) -> None:
    patient, pkey, encounter = _patient(ctx, m)
    txa = m.segment("TXA")
    if txa is None:
        raise Hl7Error(REQUIRED_MISSING, "the TXA segment (the document's header) is required", Location("TXA"))
    d: JsonDict = {"status": DOC_AVAILABILITY.get((txa.value(19) or "AV").upper(), "current"),
                   "subject": {"reference": patient}}
    doc_status = DOC_STATUS.get((txa.value(17) or "").upper())
    if doc_status:
        d["docStatus"] = doc_status
    kind = dt.codeable(txa.first(2), table="0270")
    if kind:
        d["type"] = kind
    when = ctx.when(txa, 4) or ctx.when(txa, 6)
    if when and "T" in when:
        d["date"] = when
    authors = [ref for n in (5, 9) for f in txa.repetitions(n) if (ref := sg.practitioner_ref(f)) is not None]
    if authors:
        d["author"] = authors[:1] if len(authors) > 1 and authors[0] == authors[-1] else authors
    authenticator = sg.practitioner_ref(txa.first(22)) or sg.practitioner_ref(txa.first(10))
    if authenticator:
        d["authenticator"] = authenticator
    if encounter:
        d["context"] = {"encounter": [{"reference": encounter}]}
    d["content"] = [{"attachment": _document(m)}]
    own = dt.ei_key(txa.first(12))
    d.setdefault("masterIdentifier", {"value": own[1], **({"system": own[0]} if own[0] else {})} if own else None)
    if d["masterIdentifier"] is None:
        del d["masterIdentifier"]
    ctx.builder.upsert("DocumentReference", d, _key(own, "document", pkey[0], pkey[1], txa.value(2), txa.value(4)))


def _document(m: Message) -> JsonDict:
    """The document's content: its text OBX lines (TX, FT, ST), or an encapsulated (ED) document."""
    lines: list[str] = []
    for obx in m.all("OBX"):
        kind = (obx.value(2) or "").upper()
        if kind == "ED":
            f = obx.first(5)
            if f is not None and (f.value(4) or "").upper() == "BASE64" and f.raw(5):
                data = re.sub(r"\s+", "", f.raw(5))
                try:
                    base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError):
                    raise Hl7Error(DATA_TYPE, "ED-5 is declared Base64 and is not", obx.location(5, 1, 5)) from None
                subtype = (f.value(3) or "octet-stream").lower()
                main = (f.value(2) or "application").lower()
                main = {"ap": "application", "text": "text", "im": "image", "image": "image"}.get(main, "application")
                return {"contentType": f"{main}/{subtype}", "data": data}
        lines.extend(v for f in obx.repetitions(5) if (v := f.value(1)) is not None)
    if not lines:
        raise Hl7Error(REQUIRED_MISSING, "an MDM^T02 needs OBX segments with the document's content", Location("OBX"))
    return {"contentType": "text/plain; charset=utf-8", "data": base64.b64encode("\n".join(lines).encode()).decode()}


# --- SIU^S12-S15 ----------------------------------------------------------------------------------------------

APPOINTMENT_EVENT = {"S12": "booked", "S13": "booked", "S14": "booked", "S15": "cancelled", "S17": "cancelled",
                     "S26": "noshow"}
FILLER_STATUS = {"BOOKED": "booked", "PENDING": "pending", "WAITLIST": "waitlist", "CANCELLED": "cancelled",
                 "DELETED": "cancelled", "NOSHOW": "noshow", "COMPLETE": "fulfilled", "STARTED": "arrived",
                 "OVERBOOK": "booked", "BLOCKED": "booked", "DC": "cancelled"}


def siu(ctx: sg.Context, m: Message, event: str) -> None:
    sch = m.segment("SCH")
    if sch is None:
        raise Hl7Error(REQUIRED_MISSING, "the SCH segment (the appointment) is required", Location("SCH"))
    patient = None
    if m.segment("PID") is not None:
        patient, _, _ = _patient(ctx, m)
    filler_status = FILLER_STATUS.get((sch.value(25) or "").upper())
    a: JsonDict = {"status": APPOINTMENT_EVENT.get(event) if event in ("S15", "S17", "S26") else
                   (filler_status or APPOINTMENT_EVENT.get(event, "booked"))}
    start, end = _slot(ctx, m, sch)
    if start and not end:
        minutes = sch.value(9)
        if minutes and minutes.isdigit():
            unit = (sch.value(10) or "min").lower()
            factor = 60 if unit.startswith("h") else 1
            end = _plus_minutes(start, int(minutes) * factor)
    if start and end:
        a["start"], a["end"] = start, end
    elif a["status"] not in ("proposed", "cancelled", "waitlist"):
        a["status"] = "proposed"  # a booked appointment has a start and an end (invariant app-3)
    reason = dt.codeable(sch.first(6))
    if reason:
        a["reasonCode"] = [reason]
    kind = dt.codeable(sch.first(8), table="0277")
    if kind:
        a["appointmentType"] = kind
    service = dt.codeable(sch.first(7))
    text = service.get("text") or next((c.get("display") for c in service.get("coding", []) if c.get("display")), None) \
        if service else None
    if text:
        a["description"] = text
    services = [c for ais in m.all("AIS") if (c := dt.codeable(ais.first(3))) is not None]
    if services:
        a["serviceType"] = services
    participants: list[JsonDict] = []
    if patient:
        participants.append({"actor": {"reference": patient}, "status": "accepted"})
    for aip in m.all("AIP"):
        ref = sg.practitioner_ref(aip.first(3))
        if ref:
            participants.append({"actor": ref, "status": "accepted"})
    for ail in m.all("AIL"):
        place = ail.first(3)
        if place is not None and not place.is_empty():
            parts = [p for p in (place.value(1), place.value(2), place.value(3), place.value(4), place.value(9)) if p]
            participants.append({"actor": {"type": "Location", "display": " ".join(parts)}, "status": "accepted"})
    for aig in m.all("AIG"):
        resource = dt.codeable(aig.first(3))
        if resource:
            shown = resource.get("text") or next((c.get("display") or c.get("code") for c in resource.get("coding", [])), "")
            participants.append({"actor": {"type": "Device", "display": shown}, "status": "accepted"})
    if not participants:
        raise Hl7Error(REQUIRED_MISSING, "an appointment needs a participant (PID, AIP, AIL or AIG)", Location("SCH"))
    a["participant"] = participants
    filler, placer = dt.ei_key(sch.first(2)), dt.ei_key(sch.first(1))
    identifiers = [{**({"system": k[0]} if k[0] else {}), "value": k[1], "type": {"coding": [dt.table_coding(t, "0203")]}}
                   for k, t in ((placer, "PLAC"), (filler, "FILL")) if k]
    if identifiers:
        a["identifier"] = identifiers
    if filler is None and placer is None:
        raise Hl7Error(REQUIRED_MISSING, "SCH-1 or SCH-2 (the appointment's id) is required", sch.location(2))
    ctx.builder.upsert("Appointment", a, _key(filler or placer, "appointment"))


def _slot(ctx: sg.Context, m: Message, sch: Segment) -> tuple[str | None, str | None]:
    """Start and end: TQ1-7/8 (v2.5 on), else SCH-11's TQ (components 4 and 5), else the first AIS-4."""
    tq1 = m.segment("TQ1")
    if tq1 is not None and tq1.value(7):
        return ctx.when(tq1, 7), ctx.when(tq1, 8)
    timing = sch.first(11)
    if timing is not None and timing.value(4):
        where = sch.location(11, 1, 4)
        return (dt.date_time(timing.value(4), where, ctx.zone),
                dt.date_time(timing.value(5), sch.location(11, 1, 5), ctx.zone))
    ais = m.segment("AIS")
    if ais is not None and ais.value(4):
        return ctx.when(ais, 4), None
    return None, None


def _plus_minutes(when: str, minutes: int) -> str | None:
    try:
        moment = datetime.datetime.fromisoformat(when)
    except ValueError:
        return None
    if moment.tzinfo is None or "T" not in when:
        return None
    return (moment + datetime.timedelta(minutes=minutes)).isoformat()
