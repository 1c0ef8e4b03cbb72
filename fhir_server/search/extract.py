"""From a resource to the plaintext values of its search index.

``extract(params, resource)`` evaluates every search parameter of the resource's
type and turns what it finds into typed index entries. Identifying values
(strings, tokens, uris) come out as *hash material*, strings that
``storage/indexing.py`` blind-indexes before they reach the database; dates,
numbers and quantities come out as ranges; references as (type, id) or URLs.

Hash material is prefixed by its kind, so that one parameter's values of different
kinds never collide: ``c`` code, ``sc`` system|code, ``s`` system, ``p`` string
prefix, ``x`` exact string, ``g`` trigram (``g*`` when a long value's trigrams
were cut short), ``ph`` phonetic key, ``u`` uri, ``ub`` uri below-prefix.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any

from fhir_server.search import ucum
from fhir_server.search.dates import InvalidDate, period
from fhir_server.search.parameters import ParameterSource, SearchParam
from fhir_server.search.paths import Typed

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{0,63}")
PREFIX_CAP = 16  # string prefixes are hashed up to this length; longer queries are confirmed after decryption
TRIGRAM_MAX_LENGTH = 64  # values up to this length get trigram hashes (:contains); longer ones a marker, confirmed
NEG_INF = -(2**62)
POS_INF = 2**62


@dataclass(frozen=True, slots=True)
class HashEntry:
    key: int  # param key (or a derived key, e.g. for :text)
    key_name: str  # the name the blind-index key is derived from: "code" or "code:text"
    material: str


@dataclass(frozen=True, slots=True)
class RangeEntry:
    key: int
    low: float | int
    high: float | int


@dataclass(frozen=True, slots=True)
class QuantityEntry:
    key: int
    key_name: str
    low: float
    high: float
    system_code: str | None  # hash material "system|code" of the unit
    code: str | None
    unit: str | None
    canonical: bool


@dataclass(frozen=True, slots=True)
class CompositeEntry:
    """A composite's value: its first component as hash material, the others as ranges (and a unit)."""

    key: int
    key_name: str
    material: str
    low: float
    high: float
    low2: float | None
    high2: float | None
    system_code: str | None
    code: str | None
    unit: str | None
    canonical: bool


@dataclass(frozen=True, slots=True)
class ReferenceEntry:
    key: int
    target_type: str | None
    target_id: str | None
    version: str | None
    url: str | None


# Bits of IndexEntries.mask(): which index tables hold rows of a resource (so a rewrite deletes only there).
MASK_HASH, MASK_DATE, MASK_NUMBER, MASK_QUANTITY, MASK_REFERENCE, MASK_COMPOSITE = 1, 2, 4, 8, 16, 32


@dataclass(slots=True)
class IndexEntries:
    hashes: list[HashEntry] = field(default_factory=list)
    dates: list[RangeEntry] = field(default_factory=list)
    numbers: list[RangeEntry] = field(default_factory=list)
    quantities: list[QuantityEntry] = field(default_factory=list)
    references: list[ReferenceEntry] = field(default_factory=list)
    composites: list[CompositeEntry] = field(default_factory=list)

    def mask(self) -> int:
        return (
            (MASK_HASH if self.hashes else 0)
            | (MASK_DATE if self.dates else 0)
            | (MASK_NUMBER if self.numbers else 0)
            | (MASK_QUANTITY if self.quantities else 0)
            | (MASK_REFERENCE if self.references else 0)
            | (MASK_COMPOSITE if self.composites else 0)
        )


def normalize(text: str) -> str:
    """Case- and accent-insensitive form of a string, whitespace collapsed."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.casefold().split())


def trigrams(text: str) -> list[str]:
    return sorted({text[i : i + 3] for i in range(len(text) - 2)}) if len(text) >= 3 else []


def soundex(text: str) -> str:
    """American Soundex of the first word (the phonetic key for the ``phonetic`` parameters)."""
    word = "".join(c for c in normalize(text) if c.isalpha())
    if not word:
        return ""
    codes = {**dict.fromkeys("bfpv", "1"), **dict.fromkeys("cgjkqsxz", "2"), **dict.fromkeys("dt", "3"),
             "l": "4", **dict.fromkeys("mn", "5"), "r": "6"}
    out = word[0].upper()
    last = codes.get(word[0], "")
    for ch in word[1:]:
        code = codes.get(ch, "")
        if code and code != last:
            out += code
        if ch not in "hw":
            last = code
    return (out + "000")[:4]


def decimal_range(value: Decimal) -> tuple[float, float]:
    """The half-open range a decimal's written precision implies: 100 -> [99.5, 100.5)."""
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        raise InvalidOperation(value)
    half = Decimal(5).scaleb(exponent - 1)
    return float(value - half), float(value + half)


def scaled_range(value: Decimal, factor: float) -> tuple[float, float]:
    """decimal_range of ``value`` converted by a unit factor, computed in decimal so that equal
    quantities written in different units give identical bounds (no binary rounding drift)."""
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        raise InvalidOperation(value)
    half = Decimal(5).scaleb(exponent - 1)
    f = Decimal(repr(factor))
    with localcontext() as ctx:
        ctx.prec = 28
        lo, hi = (value - half) * f, (value + half) * f
        lo, hi = +lo.normalize(), +hi.normalize()
    return tuple(sorted((float(round_significant(lo)), float(round_significant(hi)))))  # type: ignore[return-value]


def round_significant(value: Decimal, digits: int = 15) -> Decimal:
    if value.is_zero():
        return value
    return value.quantize(Decimal(1).scaleb(value.adjusted() - digits + 1))


def to_decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    return None


class Extractor:
    def __init__(self, params: ParameterSource) -> None:
        self.params = params
        # The resource being extracted and its local path, per thread: one extractor serves every thread of a worker
        # (request threads, and the audit chainer), which would otherwise see each other's.
        self._call = threading.local()

    def extract(self, resource: dict[str, Any], *, local_path: str | None = None) -> IndexEntries:
        """Index entries of ``resource``; ``local_path`` ("/fhir/{tenant}/") marks absolute references to
        this server's own resources, which are indexed as local (type and id) as well as by URL."""
        entries = IndexEntries()
        self._call.local_path = local_path
        self._call.resource = resource  # composites evaluate %resource expressions against it
        rtype = resource.get("resourceType", "")
        for param in self.params.indexed(rtype):
            values: list[Typed] = []
            for path in param.paths:
                values.extend(path.evaluate(resource))
            if values:
                self.add(entries, param, values)
        return entries

    def add(self, entries: IndexEntries, param: SearchParam, values: list[Typed]) -> None:
        handler = getattr(self, f"_{param.type}")
        for typed in values:
            handler(entries, param, typed)

    # --- per parameter type ------------------------------------------------------------------

    def _token(self, out: IndexEntries, p: SearchParam, t: Typed) -> None:
        for material in token_value_materials(t):
            out.hashes.append(HashEntry(p.key, p.code, material))
        v, typ = t.value, t.type
        if typ == "CodeableConcept" and isinstance(v, dict):
            for coding in v.get("coding") or []:
                self._text(out, p, coding.get("display"))
            self._text(out, p, v.get("text"))
        elif typ == "Coding" and isinstance(v, dict):
            self._text(out, p, v.get("display"))
        elif typ == "Identifier" and isinstance(v, dict):
            id_type = v.get("type") or {}
            for coding in id_type.get("coding") or []:
                if coding.get("code") is not None and v.get("value") is not None:
                    material = f"t\x00{coding.get('system') or ''}\x00{coding['code']}\x00{v['value']}"
                    out.hashes.append(HashEntry(p.sub_key(":of-type"), p.code + ":of-type", material))
            self._text(out, p, id_type.get("text"))

    def _composite(self, out: IndexEntries, p: SearchParam, root: Typed) -> None:
        """One composite value per root (the resource, or e.g. each Observation.component)."""
        resource = self._call.resource
        first, rest = p.components[0], p.components[1:]
        firsts = first.evaluate(resource, root)
        m1s = list(dict.fromkeys(
            m for v in firsts for m in (token_value_materials(v) if first.type == "token" else reference_materials(v.value))
        ))
        if not m1s:
            return
        if len(rest) == 1 and rest[0].type in ("token", "string"):
            seconds = rest[0].evaluate(resource, root)
            m2s = [m for v in seconds for m in (token_value_materials(v) if rest[0].type == "token" else string_materials(v))]
            for m1 in m1s:
                for m2 in dict.fromkeys(m2s):
                    out.hashes.append(HashEntry(p.key, p.code, f"cc\x00{m1}\x01{m2}"))
            return
        ranges: list[list[tuple[float, float, str | None, str | None, str | None, bool]]] = []
        for comp in rest:
            ranges.append([r for v in comp.evaluate(resource, root) for r in component_ranges(comp.type, v)])
        if not all(ranges):
            return
        for m1 in m1s:
            for low, high, sc, code, unit, canonical in ranges[0]:
                for second in ranges[1] if len(ranges) > 1 else [None]:
                    out.composites.append(CompositeEntry(
                        p.key, p.code, m1, low, high,
                        second[0] if second else None, second[1] if second else None, sc, code, unit, canonical,
                    ))

    def _text(self, out: IndexEntries, p: SearchParam, text: Any) -> None:
        # :text matches like a string (starts with), without :contains: no trigrams.
        if isinstance(text, str) and text.strip():
            self._string_hashes(out, p.sub_key(":text"), p.code + ":text", text, grams=False)

    def _string(self, out: IndexEntries, p: SearchParam, t: Typed) -> None:
        v, typ = t.value, t.type
        if typ == "HumanName" and isinstance(v, dict):
            parts = [v.get("text"), v.get("family"), *(v.get("given") or []), *(v.get("prefix") or []), *(v.get("suffix") or [])]
        elif typ == "Address" and isinstance(v, dict):
            parts = [v.get("text"), *(v.get("line") or []), v.get("city"), v.get("district"), v.get("state"),
                     v.get("postalCode"), v.get("country")]
        elif isinstance(v, str):
            parts = [v]
        elif isinstance(v, dict):
            parts = [x for x in v.values() if isinstance(x, str)]
        else:
            return
        for part in parts:
            if isinstance(part, str) and part.strip():
                if p.code == "phonetic":
                    for word in part.split():
                        key = soundex(word)
                        if key:
                            out.hashes.append(HashEntry(p.key, p.code, f"ph\x00{key}"))
                else:
                    self._string_hashes(out, p.key, p.code, part)

    @staticmethod
    def _string_hashes(out: IndexEntries, key: int, name: str, text: str, *, grams: bool = True) -> None:
        norm = normalize(text)
        out.hashes.append(HashEntry(key, name, f"x\x00{text}"))
        for n in range(1, min(len(norm), PREFIX_CAP) + 1):
            out.hashes.append(HashEntry(key, name, f"p\x00{norm[:n]}"))
        if not grams:
            return
        if len(norm) > TRIGRAM_MAX_LENGTH:
            out.hashes.append(HashEntry(key, name, "g*\x00"))
            return
        for g in trigrams(norm):
            out.hashes.append(HashEntry(key, name, f"g\x00{g}"))

    def _uri(self, out: IndexEntries, p: SearchParam, t: Typed) -> None:
        v = t.value
        if not isinstance(v, str):
            return
        out.hashes.append(HashEntry(p.key, p.code, f"u\x00{v}"))
        for prefix in uri_prefixes(v):
            out.hashes.append(HashEntry(p.key, p.code, f"ub\x00{prefix}"))

    def _date(self, out: IndexEntries, p: SearchParam, t: Typed) -> None:
        v, typ = t.value, t.type
        for low, high in date_ranges(v, typ):
            out.dates.append(RangeEntry(p.key, low, high))

    def _number(self, out: IndexEntries, p: SearchParam, t: Typed) -> None:
        d = to_decimal(t.value)
        if d is None and isinstance(t.value, dict):
            d = to_decimal(t.value.get("value"))
        if d is not None:
            low, high = decimal_range(d)
            out.numbers.append(RangeEntry(p.key, low, high))

    def _quantity(self, out: IndexEntries, p: SearchParam, t: Typed) -> None:
        self.quantity_into(out, p.key, p.code, t)

    @staticmethod
    def quantity_into(out: IndexEntries, key: int, key_name: str, t: Typed) -> None:
        v, typ = t.value, t.type
        if typ == "Range" and isinstance(v, dict):
            # A range is searched as the quantities at its ends.
            for end in (v.get("low"), v.get("high")):
                if isinstance(end, dict):
                    Extractor.quantity_into(out, key, key_name, Typed(end, "Quantity"))
            return
        if typ == "SampledData" or not isinstance(v, dict):
            return
        d = to_decimal(v.get("value"))
        if d is None:
            return
        low, high = decimal_range(d)
        system: Any
        code: Any
        unit: Any
        if typ == "Money":
            system, code, unit = "urn:iso:std:iso:4217", v.get("currency"), None
        else:
            system, code, unit = v.get("system"), v.get("code"), v.get("unit")
        out.quantities.append(QuantityEntry(
            key, key_name, low, high,
            f"{system or ''}|{code}" if code is not None else None,
            str(code) if code is not None else None,
            str(unit) if unit is not None else None,
            False,
        ))
        if system == ucum.UCUM_SYSTEM and isinstance(code, str):
            try:
                factor, canon = ucum.canonical(code)
            except ucum.NotConvertible:
                return
            lo, hi = scaled_range(d, factor)
            out.quantities.append(QuantityEntry(key, key_name, lo, hi, f"{ucum.UCUM_SYSTEM}|{canon}", canon, None, True))

    def _reference(self, out: IndexEntries, p: SearchParam, t: Typed) -> None:
        v = t.value
        if isinstance(v, str):  # canonical / uri
            canonical_url, _, canonical_version = v.partition("|")
            rtype, rid, _, _ = parse_reference(canonical_url)
            # A relative canonical ("Library/x", common in examples) also names a local resource.
            out.references.append(ReferenceEntry(p.key, rtype, rid, canonical_version or None, canonical_url))
            return
        if not isinstance(v, dict):
            return
        ident = v.get("identifier")
        if isinstance(ident, dict) and ident.get("value") is not None:
            key = p.sub_key(":identifier")
            system, value = ident.get("system") or "", str(ident["value"])
            out.hashes.append(HashEntry(key, p.code + ":identifier", f"c\x00{value}"))
            out.hashes.append(HashEntry(key, p.code + ":identifier", f"sc\x00{system}\x00{value}"))
        ref = v.get("reference")
        if not isinstance(ref, str) or ref.startswith("#") or not ref:
            return
        target_type, target_id, ref_version, url = parse_reference(ref)
        local_path = getattr(self._call, "local_path", None)
        if url is not None and local_path and local_path in url:
            local_type, local_id, local_version, _ = parse_reference(url.split(local_path, 1)[1])
            if local_type and local_id:
                target_type, target_id, ref_version = local_type, local_id, local_version or ref_version
        if target_type is None and url is None:
            return
        out.references.append(ReferenceEntry(p.key, target_type, target_id, ref_version, url))


def coding_materials(system: Any, code: Any) -> list[str]:
    """Hash material of a (system, code) pair: code alone, system|code (|code without a system), system alone."""
    out = []
    if code is not None:
        out.append(f"c\x00{code}")
        out.append(f"sc\x00{system or ''}\x00{code}")
    if system:
        out.append(f"s\x00{system}")
    return out


def token_value_materials(t: Typed) -> list[str]:
    """The token hash material of one value, by its FHIR type."""
    v, typ = t.value, t.type
    if typ == "CodeableConcept" and isinstance(v, dict):
        return [m for c in v.get("coding") or [] if isinstance(c, dict) for m in coding_materials(c.get("system"), c.get("code"))]
    if typ in ("Coding", "Quantity", "Age", "Duration", "Count", "Distance", "SimpleQuantity") and isinstance(v, dict):
        return coding_materials(v.get("system"), v.get("code"))
    if typ == "Identifier" and isinstance(v, dict):
        return coding_materials(v.get("system"), v.get("value"))
    if typ == "ContactPoint" and isinstance(v, dict):
        return coding_materials(None, v.get("value"))
    if typ == "Reference" and isinstance(v, dict):
        ident = v.get("identifier")
        return coding_materials(ident.get("system"), ident.get("value")) if isinstance(ident, dict) else []
    if isinstance(v, bool):
        return coding_materials(None, "true" if v else "false")
    if isinstance(v, (str, int, Decimal)):
        return coding_materials(None, str(v))
    if isinstance(v, dict) and "coding" in v:  # untyped (fhirpathpy) values
        return token_value_materials(Typed(v, "CodeableConcept"))
    if isinstance(v, dict) and "code" in v:
        return coding_materials(v.get("system"), v.get("code"))
    return []


def reference_materials(value: Any) -> list[str]:
    """Hash material of a reference used as a composite's first component."""
    if isinstance(value, str):
        return [f"r\x00{value.split('|', 1)[0]}"]
    if isinstance(value, dict) and isinstance(value.get("reference"), str) and not value["reference"].startswith("#"):
        rtype, rid, _, url = parse_reference(value["reference"])
        if rtype and rid:
            return [f"r\x00{rtype}/{rid}"]
        if url:
            return [f"r\x00{url}"]
    return []


def string_materials(t: Typed) -> list[str]:
    """Exact and prefix material of a string used as a composite component (prefixes up to PREFIX_CAP)."""
    if isinstance(t.value, str):
        values = [t.value]
    elif isinstance(t.value, dict):
        values = [x for x in t.value.values() if isinstance(x, str)]
    else:
        values = []
    out = []
    for text in values:
        norm = normalize(text)
        out.append(f"x\x00{text}")
        out.extend(f"p\x00{norm[:n]}" for n in range(1, min(len(norm), PREFIX_CAP) + 1))
    return out


def component_ranges(ptype: str, t: Typed) -> list[tuple[float, float, str | None, str | None, str | None, bool]]:
    """(low, high, unit system|code, unit code, unit text, canonical) of a composite's range component."""
    if ptype == "date":
        return [(float(lo), float(hi), None, None, None, False) for lo, hi in date_ranges(t.value, t.type)]
    if ptype == "number":
        d = to_decimal(t.value)
        return [(*decimal_range(d), None, None, None, False)] if d is not None else []
    if ptype == "quantity":
        entries = IndexEntries()
        Extractor.quantity_into(entries, 0, "", t)
        return [(q.low, q.high, q.system_code, q.code, q.unit, q.canonical) for q in entries.quantities]
    return []


def parse_reference(ref: str) -> tuple[str | None, str | None, str | None, str | None]:
    """(type, id, version, absolute url) of a literal reference.

    A relative reference (``Patient/1``, ``Patient/1/_history/2``) gives type and id. An absolute
    one gives its URL (and the type it names, for type filters) but no local id: it points at
    another server unless the query names it by the same URL.
    """
    version: str | None = None
    path = ref.split("?", 1)[0]
    if "/_history/" in path:
        path, _, version = path.partition("/_history/")
        if not _ID.fullmatch(version):
            version = None
    parts = path.split("/")
    rtype = parts[-2] if len(parts) >= 2 and _TYPE_NAME.fullmatch(parts[-2]) and _ID.fullmatch(parts[-1]) else None
    if "://" in ref or ref.startswith("urn:"):
        return rtype, None, version, path
    if rtype is not None and len(parts) == 2:
        return rtype, parts[-1], version, None
    return None, None, None, None


def uri_prefixes(uri: str) -> list[str]:
    """The prefixes of a URL at path boundaries, for :below (``http://a/b/c`` -> ``http://a``, ``http://a/b``)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return []
    segments = rest.split("/")
    return [f"{scheme}://{'/'.join(segments[:i])}" for i in range(1, len(segments))]


def date_ranges(value: Any, typ: str) -> list[tuple[int, int]]:
    """Inclusive microsecond ranges of a date-like value (date, dateTime, instant, Period, Timing)."""
    if isinstance(value, str):
        try:
            return [period(value)]
        except InvalidDate:
            return []
    if not isinstance(value, dict):
        return []
    if typ == "Period" or (not typ and ("start" in value or "end" in value)):
        start, end = value.get("start"), value.get("end")
        try:
            low = period(start)[0] if isinstance(start, str) else NEG_INF
            high = period(end)[1] if isinstance(end, str) else POS_INF
        except InvalidDate:
            return []
        return [(low, high)] if (start or end) else []
    if typ == "Timing":
        out = []
        for event in value.get("event") or []:
            out.extend(date_ranges(event, "dateTime"))
        bounds = (value.get("repeat") or {}).get("boundsPeriod")
        if isinstance(bounds, dict):
            out.extend(date_ranges(bounds, "Period"))
        return out
    return []

