"""Message maps: one HL7 v2 message as one transaction Bundle (HL7 v2-to-FHIR guide, message maps).

Supported: ADT A01 A02 A03 A04 A05 A06 A07 A08 A11 A13 A28 A31 A40 and ORU^R01 here; VXU^V04, ORM^O01, OML^O21,
MDM^T02 and SIU^S12 to S15 in ``clinical``. Any other type or event is ``Hl7Error`` 200/201 (the ACK says AR: the
message is kept, and can be replayed once a map exists).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from fhir_server.hl7v2 import clinical
from fhir_server.hl7v2 import datatypes as dt
from fhir_server.hl7v2 import segments as sg
from fhir_server.hl7v2.bundle import DERIVED, Builder, token
from fhir_server.hl7v2.er7 import (
    REQUIRED_MISSING,
    UNSUPPORTED_EVENT,
    UNSUPPORTED_TYPE,
    Field,
    Hl7Error,
    Location,
    Message,
    Segment,
)

JsonDict = dict[str, Any]
EVENTS = {"ORU": ("R01",), "VXU": ("V04",), "ORM": ("O01",), "OML": ("O21",), "MDM": ("T02",),
          "SIU": ("S12", "S13", "S14", "S15")}
ADT_EVENTS = ("A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08", "A11", "A13", "A28", "A31", "A40")
REPORT_STATUS = {"O": "registered", "I": "registered", "S": "partial", "A": "partial", "P": "preliminary",
                 "R": "preliminary", "N": "preliminary", "C": "corrected", "M": "corrected", "F": "final",
                 "X": "cancelled", "D": "entered-in-error"}
RESULT_STATUS = {"C": "corrected", "D": "entered-in-error", "W": "entered-in-error", "F": "final", "U": "final",
                 "I": "registered", "O": "registered", "P": "preliminary", "R": "preliminary", "S": "preliminary",
                 "X": "cancelled", "N": "cancelled"}
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
V3_INTERPRETATIONS = {"<", ">", "A", "AA", "AC", "B", "CAR", "D", "DET", "E", "EX", "EXP", "H", "HH", "HM", "HU",
                      "HX", "I", "IE", "IND", "L", "LL", "LU", "LX", "MS", "N", "NCL", "ND", "NEG", "NR", "NS",
                      "OBX", "POS", "QCF", "R", "RR", "S", "SDD", "SYN-R", "SYN-S", "TOX", "U", "UNE", "VS", "W", "WR"}
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
UCUM = "http://unitsofmeasure.org"
_RANGE = re.compile(r"\s*([<>]=?)?\s*([+-]?\d+(?:\.\d+)?)\s*(?:(?:-|–|to)\s*([+-]?\d+(?:\.\d+)?))?\s*\Z")


Known = Callable[[str, tuple[str, str]], bool]


def to_bundle(message: Message, *, zone: str = "UTC", recorded: datetime.datetime | None = None,
              known: Known | None = None) -> JsonDict:
    """The transaction Bundle of ``message``; an Hl7Error when it cannot be mapped. ``known(type, (system,
    value))`` says whether the server holds a resource with that identifier (a merge needs to know)."""
    code, event, _ = message.message_type
    ctx = sg.Context(Builder(message), zone)
    if code == "ADT":
        if event not in ADT_EVENTS:
            raise Hl7Error(UNSUPPORTED_EVENT, f"ADT^{event or ''} is not an event this server maps "
                                              f"(it maps {', '.join(ADT_EVENTS)})", Location("MSH", 1, 9, 1, 2), reject=True)
        _adt(ctx, message, event, known)
    elif code in EVENTS:
        if event not in EVENTS[code]:
            raise Hl7Error(UNSUPPORTED_EVENT, f"{code}^{event or ''} is not an event this server maps (it maps "
                                              f"{', '.join(EVENTS[code])})", Location("MSH", 1, 9, 1, 2), reject=True)
        if code == "ORU":
            _oru(ctx, message)
        elif code == "VXU":
            clinical.vxu(ctx, message)
        elif code in ("ORM", "OML"):
            clinical.orders(ctx, message)
        elif code == "MDM":
            clinical.mdm(ctx, message)
        else:
            clinical.siu(ctx, message, event)
    else:
        raise Hl7Error(UNSUPPORTED_TYPE, f"{code or 'a message'} is not a message type this server maps (it maps ADT, "
                                         "ORU^R01, VXU^V04, ORM^O01, OML^O21, MDM^T02 and SIU^S12 to S15)",
                       Location("MSH", 1, 9, 1, 1), reject=True)
    return ctx.builder.bundle(recorded=recorded)


def _required(message: Message, name: str) -> Segment:
    seg = message.segment(name)
    if seg is None:
        raise Hl7Error(REQUIRED_MISSING, f"the {name} segment is required in this message", Location(name))
    return seg


def _following(message: Message, start: Segment, names: tuple[str, ...], stop: tuple[str, ...]) -> list[Segment]:
    """The segments named ``names`` after ``start`` and before the next of ``stop``."""
    out, seen = [], False
    for s in message.segments:
        if s is start:
            seen = True
            continue
        if seen:
            if s.name in stop:
                break
            if s.name in names:
                out.append(s)
    return out


# --- ADT ------------------------------------------------------------------------------------------------------

def _adt(ctx: sg.Context, m: Message, event: str, known: Known | None) -> None:
    if event == "A40":
        pids = m.all("PID")
        if not pids:
            raise Hl7Error(REQUIRED_MISSING, "the PID segment is required in this message", Location("PID"))
        for pid in pids:  # A40 may merge several pairs: PID (PD1) MRG (PV1), repeated
            mrgs = _following(m, pid, ("MRG",), ("PID",))
            if not mrgs:
                raise Hl7Error(REQUIRED_MISSING, "each PID of an A40 needs the MRG segment naming the merged patient",
                               Location("MRG", pid.sequence))
            survivor_key = sg.patient_key(pid)
            prior = sg.prior_patient(mrgs[0], survivor_key)
            link = {"link": [{"other": {"reference": f"Patient?identifier={token(*prior)}"}, "type": "replaces"}]}
            pd1s = _following(m, pid, ("PD1",), ("PID",))
            survivor = sg.patient_to(ctx, pid, pd1s[0] if pd1s else None, None, link)
            sg.merge_to(ctx, prior, survivor, known=known is None or known("Patient", prior))
        return
    pid = _required(m, "PID")
    pkey = sg.patient_key(pid)
    patient = sg.patient_to(ctx, pid, m.segment("PD1"), m.all("NK1"))
    pv1 = m.segment("PV1")
    encounter = sg.encounter_to(ctx, pv1, patient, event, m.segment("PV2")) if pv1 is not None else None
    for al1 in m.all("AL1"):
        sg.allergy_to(ctx, al1, patient, pkey)
    for dg1 in m.all("DG1"):
        sg.condition_to(ctx, dg1, patient, pkey, encounter)
    for pr1 in m.all("PR1"):
        sg.procedure_to(ctx, pr1, patient, pkey, encounter)
    for in1 in m.all("IN1"):
        sg.coverage_to(ctx, in1, patient, pkey)


# --- ORU^R01 --------------------------------------------------------------------------------------------------

@dataclass
class _Order:
    obr: Segment
    orc: Segment | None
    observations: list[tuple[Segment, list[Segment]]] = field(default_factory=list)  # OBX with its NTEs
    notes: list[Segment] = field(default_factory=list)
    specimens: list[Segment] = field(default_factory=list)


def _orders(m: Message) -> list[tuple[Segment, list[Segment], list[_Order]]]:
    """The message's PATIENT_RESULT groups: (PID, its PD1/NK1/PV1/PV2, its ORDER_OBSERVATION groups). An NTE is a
    note on the OBX it follows, or on the order when it follows the OBR."""
    groups: list[tuple[Segment, list[Segment], list[_Order]]] = []
    orc: Segment | None = None
    notes: list[Segment] | None = None  # where the next NTE goes
    for s in m.segments:
        if s.name == "PID":
            groups.append((s, [], []))
            orc, notes = None, None
        elif not groups:
            continue
        elif s.name in ("PD1", "NK1", "PV1", "PV2") and not groups[-1][2]:
            groups[-1][1].append(s)
        elif s.name == "ORC":
            orc, notes = s, None
        elif s.name == "OBR":
            order = _Order(s, orc)
            groups[-1][2].append(order)
            orc, notes = None, order.notes
        elif s.name == "OBX" and groups[-1][2]:
            groups[-1][2][-1].observations.append((s, []))
            notes = groups[-1][2][-1].observations[-1][1]
        elif s.name == "NTE" and notes is not None:
            notes.append(s)
        elif s.name == "SPM" and groups[-1][2]:
            groups[-1][2][-1].specimens.append(s)
            notes = None
    return groups


def _oru(ctx: sg.Context, m: Message) -> None:
    groups = _orders(m)
    if not groups:
        raise Hl7Error(REQUIRED_MISSING, "the PID segment is required in this message", Location("PID"))
    for pid, around, orders in groups:
        pkey = sg.patient_key(pid)
        patient = sg.patient_to(ctx, pid, next((s for s in around if s.name == "PD1"), None),
                                [s for s in around if s.name == "NK1"])
        pv1 = next((s for s in around if s.name == "PV1"), None)
        encounter = sg.encounter_to(ctx, pv1, patient, None, next((s for s in around if s.name == "PV2"), None)) \
            if pv1 is not None else None
        if not orders:
            raise Hl7Error(REQUIRED_MISSING, "an ORU^R01 needs an OBR segment for its results", Location("OBR"))
        for order in orders:
            _report(ctx, order, patient, pkey, encounter)


def _order_key(order: _Order, pkey: tuple[str, str]) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """(placer, filler) order numbers, from OBR-2/3 or ORC-2/3."""
    placer = dt.ei_key(order.obr.first(2)) or (dt.ei_key(order.orc.first(2)) if order.orc else None)
    filler = dt.ei_key(order.obr.first(3)) or (dt.ei_key(order.orc.first(3)) if order.orc else None)
    return placer, filler


def _with_default(key: tuple[str, str], what: str) -> tuple[str, str]:
    return (key[0] or DERIVED + what, key[1])


def _report(ctx: sg.Context, order: _Order, patient: str, pkey: tuple[str, str], encounter: str | None) -> None:
    obr = order.obr
    code = dt.codeable(obr.first(4))
    if code is None:
        raise Hl7Error(REQUIRED_MISSING, "OBR-4 (what was ordered) is required", obr.location(4))
    placer, filler = _order_key(order, pkey)
    effective = ctx.when(obr, 7)
    order_id = filler or placer
    base = f"{order_id[0]}|{order_id[1]}" if order_id else \
        "|".join([pkey[0], pkey[1], (obr.first(4).value(1) if obr.first(4) else "") or "", effective or ""])  # type: ignore[union-attr]
    request: JsonDict = {"status": "completed" if (obr.value(25) or "F").upper() in ("F", "C") else "active",
                         "intent": "order", "code": code, "subject": {"reference": patient}}
    identifiers = []
    for key, kind in ((placer, "PLAC"), (filler, "FILL")):
        if key:
            identifiers.append({**({"system": key[0]} if key[0] else {}), "value": key[1],
                                "type": {"coding": [dt.table_coding(kind, "0203")]}})
    if identifiers:
        request["identifier"] = identifiers
    requester = sg.practitioner_ref(obr.first(16)) or (sg.practitioner_ref(order.orc.first(12)) if order.orc else None)
    if requester:
        request["requester"] = requester
    if encounter:
        request["encounter"] = {"reference": encounter}
    ordered = ctx.when(order.orc, 9) if order.orc is not None else None
    if ordered:
        request["authoredOn"] = ordered
    service_request = ctx.builder.upsert("ServiceRequest", request,
                                         _with_default(placer or filler or (DERIVED + "order", base), "order"))
    specimens = [ref for spm in order.specimens if (ref := _specimen(ctx, spm, patient, base)) is not None]
    results, attachments = [], []
    lines: list[str] = []
    for obx, notes in order.observations:
        if obx.first(3) is None and (obx.value(2) or "").upper() in ("TX", "FT", "ST"):
            lines.extend(v for f in obx.repetitions(5) if (v := f.value(1)) is not None)  # report text, line by line
            continue
        made = _observation(ctx, obx, notes, patient, encounter, base, effective, specimens)
        if isinstance(made, str):
            results.append({"reference": made})
        elif made is not None:
            attachments.append(made)
    status = REPORT_STATUS.get((obr.value(25) or "").upper(), "unknown")
    report: JsonDict = {"status": status, "code": code, "subject": {"reference": patient},
                        "basedOn": [{"reference": service_request}]}
    category = dt.codeable(obr.first(24), table="0074")
    if category:
        report["category"] = [category]
    if encounter:
        report["encounter"] = {"reference": encounter}
    if effective:
        report["effectiveDateTime"] = effective
    issued = ctx.when(obr, 22)
    if issued and "T" in issued:
        report["issued"] = issued
    if results:
        report["result"] = results
    if specimens:
        report["specimen"] = [{"reference": s} for s in specimens]
    if attachments:
        report["presentedForm"] = attachments
    interpreter = sg.practitioner_ref(obr.first(32))
    if interpreter:
        report["resultsInterpreter"] = [interpreter]
    conclusion = "\n".join([*lines, *(v for nte in order.notes for v in dt_iter_text(nte, 3))])
    if conclusion:
        report["conclusion"] = conclusion
    ctx.builder.upsert("DiagnosticReport", report, _with_default(filler or placer or (DERIVED + "report", base), "report"))


def dt_iter_text(seg: Segment, n: int) -> list[str]:
    return [v for f in seg.repetitions(n) if (v := f.value(1)) is not None]


def _specimen(ctx: sg.Context, spm: Segment, patient: str, base: str) -> str | None:
    s: JsonDict = {"subject": {"reference": patient}}
    kind = dt.codeable(spm.first(4), table="0487")
    if kind:
        s["type"] = kind
    collected = dt.date_time(spm.value(17), spm.location(17), ctx.zone)
    if collected:
        s["collection"] = {"collectedDateTime": collected}
    received = dt.date_time(spm.value(18), spm.location(18), ctx.zone)
    if received:
        s["receivedTime"] = received
    ids = spm.first(2)
    own = None
    if ids is not None:
        for component in (1, 2):  # EIP: placer, then filler assigned identifier (each an EI in sub-components)
            subs = ids.subcomponents(component)
            if subs and subs[0]:
                own = (dt.authority_system(*(subs[1:] + [None, None, None])[:3]) or DERIVED + "specimen-id", subs[0])
                break
    key = own or (DERIVED + "specimen", f"{base}|{spm.value(1) or ''}")
    if kind is None and own is None and collected is None:
        return None
    return ctx.builder.upsert("Specimen", s, key)


def _observation(ctx: sg.Context, obx: Segment, notes: list[Segment], patient: str, encounter: str | None, base: str,
                 effective: str | None, specimens: list[str]) -> str | JsonDict | None:
    code = dt.codeable(obx.first(3))
    if code is None:
        raise Hl7Error(REQUIRED_MISSING, "OBX-3 (what was observed) is required", obx.location(3))
    kind = (obx.value(2) or "").upper()
    if kind in ("ED", "RP"):
        return _attachment(obx)
    status = RESULT_STATUS.get((obx.value(11) or "").upper(), "unknown")
    o: JsonDict = {"status": status, "code": code, "subject": {"reference": patient},
                   "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory"}]}]}
    if encounter:
        o["encounter"] = {"reference": encounter}
    value = _value(ctx, obx, kind)
    if value is not None:
        o.update(value)
    ranges = _reference_range(obx)
    if ranges:
        o["referenceRange"] = [ranges]
    flags = []
    for f in obx.repetitions(8):
        flag = f.value(1)
        if flag:
            flags.append({"coding": [{"system": INTERPRETATION, "code": flag}] if flag in V3_INTERPRETATIONS
                          else [dt.table_coding(flag, "0078")]})
    if flags:
        o["interpretation"] = flags
    when = ctx.when(obx, 14) or effective
    if when:
        o["effectiveDateTime"] = when
    performers = [ref for f in obx.repetitions(16) if (ref := sg.practitioner_ref(f)) is not None]
    organization = obx.value(23)
    if organization:
        performers.append({"type": "Organization", "display": organization})
    if performers:
        o["performer"] = performers
    method = dt.codeable(obx.first(17))
    if method:
        o["method"] = method
    note_texts = [{"text": v} for nte in notes for v in dt_iter_text(nte, 3)]
    if note_texts:
        o["note"] = note_texts
    if specimens:
        o["specimen"] = {"reference": specimens[0]}
    first = obx.first(3)
    key = (DERIVED + "observation", "|".join([base, (first.value(3) or "") if first else "",
                                             (first.value(1) or "") if first else "", obx.value(4) or ""]))
    return ctx.builder.upsert("Observation", o, key)


def _unit(f: Field | None) -> JsonDict:
    if f is None or f.is_empty():
        return {}
    code, display, system = f.value(1), f.value(2), f.value(3)
    out: JsonDict = {"unit": display or code}
    if code and (system or "").upper() in ("UCUM", ""):  # a unit without a coding system is taken as UCUM
        out["system"] = UCUM
        out["code"] = code
    return {k: v for k, v in out.items() if v}


def _value(ctx: sg.Context, obx: Segment, kind: str) -> JsonDict | None:
    reps = obx.repetitions(5)
    if not reps or all(r.is_empty() for r in reps):
        return None
    where = obx.location(5)
    first = reps[0]
    if kind == "NM":
        number = dt.number(first.value(1), where)
        return {"valueQuantity": {"value": number, **_unit(obx.first(6))}} if number is not None else None
    if kind in ("CE", "CWE", "CNE", "CF", "CD"):
        concept = dt.codeable(first)
        return {"valueCodeableConcept": concept} if concept else None
    if kind == "SN":
        return _structured_numeric(first, obx, where)
    if kind in ("DT",):
        return {"valueDateTime": dt.date_time(first.value(1), where, ctx.zone, date_only=True)}
    if kind in ("TS", "DTM"):
        return {"valueDateTime": dt.date_time(first.value(1), where, ctx.zone)}
    if kind == "TM":
        m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,4})?([+-]\d{4})?", first.value(1) or "")
        if m is None or int(m.group(1)) > 23 or int(m.group(2) or 0) > 59 or int(m.group(3) or 0) > 59:
            raise Hl7Error("102", "not a time (HH[MM[SS]])", where)
        return {"valueTime": f"{m.group(1)}:{m.group(2) or '00'}:{m.group(3) or '00'}"}
    texts = []
    for r in reps:  # ST, TX, FT and anything else: the text as sent, decoded, repetitions as lines
        parts = [r.value(i) or "" for i in range(1, len(r.components) + 1)]
        delimiter = obx.delimiters.component
        texts.append(delimiter.join(parts).rstrip(delimiter) if kind not in ("ST", "TX", "FT") else (r.value(1) or ""))
    text = "\n".join(t for t in texts if t)
    return {"valueString": text} if text else None


def _structured_numeric(f: Field, obx: Segment, where: Location) -> JsonDict | None:
    comparator, first, separator, second = f.value(1), f.value(2), f.value(3), f.value(4)
    unit = _unit(obx.first(6))
    low = dt.number(first, where) if first else None
    high = dt.number(second, where) if second else None
    if separator in (":", "/") and low is not None and high is not None:
        return {"valueRatio": {"numerator": {"value": low}, "denominator": {"value": high}}}
    if separator in ("-", "+") and low is not None and high is not None:
        return {"valueRange": {"low": {"value": low, **unit}, "high": {"value": high, **unit}}}
    if low is None:
        return None
    quantity: JsonDict = {"value": low, **unit}
    if comparator in ("<", ">", "<=", ">="):
        quantity["comparator"] = comparator
    elif comparator not in (None, "=", ""):
        raise Hl7Error("102", "SN-1 must be one of <, >, <=, >=, = or <>", where)
    return {"valueQuantity": quantity}


def _reference_range(obx: Segment) -> JsonDict | None:
    text = obx.value(7)
    if not text:
        return None
    unit = _unit(obx.first(6))
    m = _RANGE.match(text)
    if m is None:
        return {"text": text}
    comparator, low, high = m.groups()
    if high is not None and comparator is None:
        return {"low": {"value": _num(low), **unit}, "high": {"value": _num(high), **unit}, "text": text}
    if comparator in ("<", "<="):
        return {"high": {"value": _num(low), **unit}, "text": text}
    if comparator in (">", ">="):
        return {"low": {"value": _num(low), **unit}, "text": text}
    return {"text": text}


def _num(text: str) -> int | Decimal:
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else Decimal(text)


def _attachment(obx: Segment) -> JsonDict | None:
    """An ED (source, type, subtype, encoding, data) or RP (pointer) result, as an Attachment of the report."""
    f = obx.first(5)
    if f is None:
        return None
    if (obx.value(2) or "").upper() == "RP":
        url = f.value(1)
        code = obx.first(3)
        return {"url": url, "title": (code.value(2) if code else None) or "result"} if url else None
    kind, subtype, encoding, data = f.value(2), f.value(3), (f.value(4) or "").upper(), f.raw(5)
    media = {"TEXT": "text/plain", "AP": "application/octet-stream", "IM": "image/*", "AU": "audio/*",
             "MULTIPART": "multipart/mixed", "APPLICATION": "application/octet-stream", "IMAGE": "image/*"}
    content_type = f"{(kind or '').lower()}/{subtype.lower()}" if kind and subtype and "/" not in subtype else \
        (subtype or media.get((kind or "").upper(), "application/octet-stream"))
    out: JsonDict = {"contentType": content_type}
    if encoding == "BASE64" and data:
        compact = re.sub(r"\s+", "", data)
        try:
            base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise Hl7Error("102", "ED-5 is declared Base64 and is not", obx.location(5, 1, 5)) from None
        out["data"] = compact
    elif data:
        out["data"] = base64.b64encode((f.value(5) or "").encode()).decode()
    title = obx.first(3).value(2) if obx.first(3) else None  # type: ignore[union-attr]
    if title:
        out["title"] = title
    return out
