"""HL7 v2 data types as FHIR data types (the HL7 v2-to-FHIR implementation guide's data type maps).

Each function takes one repetition of a field (``er7.Field``) and returns the FHIR JSON for it, or None when it holds
nothing. A value that cannot be what its type says (a date that is not a date, a number that is not a number) is an
``Hl7Error`` located at the field: the message is answered AE, and nothing of it is written.
"""

from __future__ import annotations

import datetime
import json
import re
import zoneinfo
from decimal import Decimal, InvalidOperation
from functools import cache
from importlib import resources
from typing import Any

from fhir_server.hl7v2.er7 import DATA_TYPE, Field, Hl7Error, Location

JsonDict = dict[str, Any]
V2 = "http://terminology.hl7.org/CodeSystem/v2-"

# HL7 table 0396 (coding systems) to FHIR system URIs, for the ones messages use
CODING_SYSTEMS = {
    "LN": "http://loinc.org", "LOINC": "http://loinc.org", "SCT": "http://snomed.info/sct",
    "SNM": "http://snomed.info/sct", "SNOMED": "http://snomed.info/sct", "SNOMEDCT": "http://snomed.info/sct",
    "I10": "http://hl7.org/fhir/sid/icd-10", "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "ICD10CM": "http://hl7.org/fhir/sid/icd-10-cm", "I10P": "http://www.cms.gov/Medicare/Coding/ICD10",
    "I9": "http://hl7.org/fhir/sid/icd-9-cm", "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9CDX": "http://hl7.org/fhir/sid/icd-9-cm", "CVX": "http://hl7.org/fhir/sid/cvx",
    "NDC": "http://hl7.org/fhir/sid/ndc", "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "RXN": "http://www.nlm.nih.gov/research/umls/rxnorm", "UCUM": "http://unitsofmeasure.org",
    "ANSI+": "http://unitsofmeasure.org", "ISO+": "urn:iso:std:iso:2955", "C4": "http://www.ama-assn.org/go/cpt",
    "CPT": "http://www.ama-assn.org/go/cpt", "CPT4": "http://www.ama-assn.org/go/cpt",
    "HCPCS": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "MVX": "http://hl7.org/fhir/sid/mvx",
    "NCIT": "http://ncimeta.nci.nih.gov", "NUCCPT": "http://nucc.org/provider-taxonomy",
    "CDCREC": "urn:oid:2.16.840.1.113883.6.238", "PHINQUESTION": "urn:oid:2.16.840.1.114222.4.5.232",
    "HL70005": "urn:oid:2.16.840.1.113883.6.238", "ISO3166_1": "urn:iso:std:iso:3166", "ISO639": "urn:ietf:bcp:47",
}
_HL7_TABLE = re.compile(r"HL7(\d{4})\Z")
_DTM = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?\Z")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)\Z")


@cache
def _tables() -> dict[str, dict[str, str]]:
    data = resources.files("fhir_server.capability").joinpath("data/v2_tables.json").read_text("utf-8")
    tables: dict[str, dict[str, str]] = json.loads(data)["tables"]
    return tables


def table_display(table: str, code: str) -> str | None:
    return _tables().get(table, {}).get(code) or None


def system_for(name: str | None) -> str | None:
    """The FHIR system of a v2 coding system name (CWE-3): table 0396, ``HL7nnnn`` as the v2 table's CodeSystem, a
    URI or OID as it is; None for a local or unknown system (the code is kept, without a system)."""
    if not name:
        return None
    upper = name.upper()
    if upper in CODING_SYSTEMS:
        return CODING_SYSTEMS[upper]
    table = _HL7_TABLE.match(upper)
    if table:
        return V2 + table.group(1)
    if re.fullmatch(r"\d+(\.\d+)+", name):
        return "urn:oid:" + name
    if re.match(r"(https?|urn):", name):
        return name
    return None


# --- codes ----------------------------------------------------------------------------------------------------

def codeable(f: Field | None, *, table: str | None = None) -> JsonDict | None:
    """CWE, CE, CNE (code, text, coding system; the alternate triplet in components 4 to 6; original text in 9), or
    an ID/IS code of v2 ``table`` as a coding of the table's CodeSystem."""
    if f is None or f.is_empty():
        return None
    codings = []
    for code_at, display_at, system_at in ((1, 2, 3), (4, 5, 6)):
        code, display, system_name = f.value(code_at), f.value(display_at), f.value(system_at)
        if not code and not display:
            continue
        coding: JsonDict = {}
        system = system_for(system_name)
        if system is None and table is not None and code_at == 1 and not system_name:
            system = V2 + table
        if system:
            coding["system"] = system
        if code:
            coding["code"] = code
        shown = display or (table_display(system[len(V2):], code) if system and system.startswith(V2) and code else None)
        if shown:
            coding["display"] = shown
        if code or system:
            codings.append(coding)
    out: JsonDict = {}
    if codings:
        out["coding"] = codings
    text = f.value(9) or (f.value(2) if not codings or "code" not in codings[0] else None)
    if text:
        out["text"] = text
    return out or None


def table_coding(code: str | None, table: str) -> JsonDict | None:
    """An ID/IS code of v2 ``table``: a Coding of the table's CodeSystem, with its display."""
    if not code:
        return None
    coding: JsonDict = {"system": V2 + table, "code": code}
    display = table_display(table, code)
    if display:
        coding["display"] = display
    return coding


# --- identifiers ----------------------------------------------------------------------------------------------

def authority_system(namespace: str | None, universal: str | None, kind: str | None) -> str | None:
    """The system of an assigning authority (HD: namespace, universal id, its type): ``urn:oid:`` for an ISO OID,
    ``urn:uuid:`` for a UUID, a URI as it is; a namespace alone becomes ``urn:id:<namespace>``."""
    if universal:
        k = (kind or "").upper()
        if k == "ISO" or (not k and re.fullmatch(r"\d+(\.\d+)+", universal)):
            return "urn:oid:" + universal
        if k == "UUID":
            return "urn:uuid:" + universal.lower()
        if k in ("URI", "URL") or re.match(r"(https?|urn):", universal):
            return universal
    if namespace:
        return "urn:id:" + re.sub(r"[^A-Za-z0-9._~-]", "_", namespace)
    return None


def identifier(f: Field | None, *, authority_at: int = 4, type_at: int | None = 5) -> JsonDict | None:
    """CX (id, check digit, scheme, assigning authority HD, identifier type, facility, start, end) or EI (entity id,
    namespace, universal id, its type) as an Identifier."""
    if f is None:
        return None
    value = f.value(1)
    if not value:
        return None
    out: JsonDict = {"value": value}
    if authority_at == 2:  # EI: the authority is components 2 to 4
        system = authority_system(f.value(2), f.value(3), f.value(4))
    else:
        subs = f.subcomponents(authority_at)
        system = authority_system(*(subs + [None, None, None])[:3])
    if system:
        out["system"] = system
    if type_at is not None:
        kind = f.value(type_at)
        if kind:
            out["type"] = {"coding": [table_coding(kind, "0203")]}
    return out


def ei_key(f: Field | None) -> tuple[str, str] | None:
    """(system, value) of an EI (an order number, a filler id), for conditional references."""
    ident = identifier(f, authority_at=2, type_at=None)
    if ident is None:
        return None
    return ident.get("system", ""), ident["value"]


# --- names, addresses, telecoms -------------------------------------------------------------------------------

NAME_USE = {"L": "official", "D": "usual", "M": "maiden", "N": "nickname", "A": "usual", "S": "anonymous",
            "B": "official", "BAD": "old", "TEMP": "temp", "U": "usual"}


def human_name(f: Field | None) -> JsonDict | None:
    """XPN (family, given, second given, suffix, prefix, degree, name type) as a HumanName."""
    if f is None:
        return None
    family, given, middle = f.value(1), f.value(2), f.value(3)
    suffix, prefix, degree, kind = f.value(4), f.value(5), f.value(6), f.value(7)
    out: JsonDict = {}
    if family:
        out["family"] = family
    names = [n for part in (given, middle) if part for n in [part]]
    if names:
        out["given"] = names
    if prefix:
        out["prefix"] = [prefix]
    suffixes = [s for s in (suffix, degree) if s]
    if suffixes:
        out["suffix"] = suffixes
    if not out:
        return None
    if kind and kind.upper() in NAME_USE:
        out["use"] = NAME_USE[kind.upper()]
    return out


def practitioner_name(f: Field) -> JsonDict | None:
    """XCN's name (components 2 to 7) as a HumanName."""
    family, given, middle, suffix, prefix, degree = (f.value(i) for i in range(2, 8))
    out: JsonDict = {}
    if family:
        out["family"] = family
    if given or middle:
        out["given"] = [n for n in (given, middle) if n]
    if prefix:
        out["prefix"] = [prefix]
    if suffix or degree:
        out["suffix"] = [s for s in (suffix, degree) if s]
    return out or None


ADDRESS_USE = {"H": ("home", None), "P": ("home", None), "B": ("work", None), "O": ("work", None),
               "C": ("temp", None), "BA": ("old", None), "M": (None, "postal"), "SH": (None, "postal"),
               "BDL": (None, "postal"), "F": ("home", None), "L": ("home", None)}


def address(f: Field | None) -> JsonDict | None:
    """XAD (street, other designation, city, state, zip, country, type, ..., county) as an Address."""
    if f is None:
        return None
    lines = [v for v in (f.value(1), f.value(2)) if v]
    out: JsonDict = {}
    if lines:
        out["line"] = lines
    for key, at in (("city", 3), ("state", 4), ("postalCode", 5), ("country", 6), ("district", 9)):
        v = f.value(at)
        if v:
            out[key] = v
    if not out:
        return None
    use, kind = ADDRESS_USE.get((f.value(7) or "").upper(), (None, None))
    if use:
        out["use"] = use
    if kind:
        out["type"] = kind
    return out


TELECOM_USE = {"PRN": "home", "ORN": "home", "VHN": "home", "WPN": "work", "EMR": None, "NET": None, "BPN": None,
               "ASN": None, "PRS": "mobile"}
EQUIPMENT = {"PH": "phone", "FX": "fax", "CP": "phone", "BP": "pager", "INTERNET": "email", "X.400": "email",
             "MD": "other", "TDD": "other", "TTY": "other", "SAT": "phone"}


def contact_point(f: Field | None, default_use: str | None = None) -> JsonDict | None:
    """XTN (number as text, use, equipment, email, country, area, local number, extension, ..., unformatted) as a
    ContactPoint."""
    if f is None:
        return None
    use_code, equipment, email = (f.value(2) or "").upper(), (f.value(3) or "").upper(), f.value(4)
    out: JsonDict = {}
    if email or use_code == "NET" or equipment in ("INTERNET", "X.400"):
        value = email or f.value(1)
        system = "email"
    else:
        parts = [p for p in (f.value(5), f.value(6), f.value(7)) if p]
        value = f.value(12) or (" ".join(parts) if parts else f.value(1))
        extension = f.value(8)
        if value and extension:
            value += f" ext. {extension}"
        system = EQUIPMENT.get(equipment, "phone")
    if not value:
        return None
    out["system"] = system
    out["value"] = value
    use = TELECOM_USE.get(use_code, default_use) if use_code else default_use
    if equipment == "CP" or use_code == "PRS":
        use = "mobile"
    if use:
        out["use"] = use
    return out


# --- dates and numbers ----------------------------------------------------------------------------------------

def date_time(text: str | None, where: Location, zone: str = "UTC", *, date_only: bool = False) -> str | None:
    """A DTM/TS/DT as a FHIR dateTime (or date): the precision sent, its time zone kept, ``zone`` (an IANA name)
    where it has none. A value that is not a date/time is an Hl7Error at ``where``."""
    if not text:
        return None
    m = _DTM.match(text.strip())
    if m is None:
        raise Hl7Error(DATA_TYPE, "not a date/time (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])", where)
    year, month, day, hour, minute, second, fraction, offset = m.groups()
    try:
        datetime.date(int(year), int(month or 1), int(day or 1))
        if hour is not None and not (int(hour) < 24 and int(minute or 0) < 60 and int(second or 0) < 60):
            raise ValueError
        if offset is not None and not (int(offset[1:3]) <= 14 and int(offset[3:]) < 60):
            raise ValueError
    except ValueError:
        raise Hl7Error(DATA_TYPE, "not a valid calendar date/time", where) from None
    if month is None:
        return year
    if day is None:
        return f"{year}-{month}"
    date = f"{year}-{month}-{day}"
    if hour is None or date_only:
        return date
    clock = f"{hour}:{minute or '00'}:{second or '00'}" + (f".{fraction}" if fraction else "")
    if offset is None:
        local = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute or 0), int(second or 0))
        delta = local.replace(tzinfo=_zone(zone)).utcoffset() or datetime.timedelta(0)
        minutes = int(delta.total_seconds()) // 60
        sign = "+" if minutes >= 0 else "-"
        offset = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return f"{date}T{clock}{offset[:3]}:{offset[3:]}"


@cache
def _zone(name: str) -> datetime.tzinfo:
    return datetime.UTC if name.upper() in ("UTC", "Z") else zoneinfo.ZoneInfo(name)


def number(text: str | None, where: Location) -> int | Decimal | None:
    """An NM as a JSON number: an integer, or a decimal with the precision sent ("1.50" stays 1.50). Not a
    number: an Hl7Error at ``where``."""
    if text is None:
        return None
    t = text.strip()
    if not _NUMBER.match(t):
        raise Hl7Error(DATA_TYPE, "not a number", where)
    try:
        d = Decimal(t)
    except InvalidOperation:
        raise Hl7Error(DATA_TYPE, "not a number", where) from None
    return int(d) if "." not in t else d
