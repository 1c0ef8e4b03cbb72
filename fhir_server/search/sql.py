"""Search criteria compiled into SQL over the index tables.

Each criterion becomes ``res_id IN (SELECT res_id FROM idx_... WHERE ...)`` (or NOT IN
for ``:not`` and ``:missing=true``) against the ``resources`` table, so every
criterion is an index lookup and they combine with AND. Identifying values are
turned into the same blind indexes the writer stored. Where a hash cannot decide
(a string prefix longer than the hashed prefixes, ``:contains``), the criterion
also yields a *confirmation* that the executor checks on the decrypted resource.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable

from sqlalchemy import ColumnElement, Select, and_, false, not_, or_, select, true

from fhir_server.clock import now_us
from fhir_server.errors import BadRequest
from fhir_server.search import ucum
from fhir_server.search.dates import period
from fhir_server.search.extract import (
    PREFIX_CAP,
    Extractor,
    decimal_range,
    normalize,
    parse_reference,
    scaled_range,
    soundex,
    trigrams,
    uri_prefixes,
)
from fhir_server.search.query import Criterion, split_prefix, split_unescaped
from fhir_server.security.crypto import TenantKeys
from fhir_server.storage import schema
from fhir_server.storage.indexing import url_hash

R = schema.resources
H = schema.idx_hash
D = schema.idx_date
N = schema.idx_number
Q = schema.idx_quantity
REF = schema.idx_reference

Confirm = Callable[[dict[str, Any]], bool]


@dataclass
class Compiled:
    conditions: list[ColumnElement[bool]] = field(default_factory=list)
    confirmations: list[Confirm] = field(default_factory=list)


class Compiler:
    def __init__(self, keys: TenantKeys, extractor: Extractor, base_url: str) -> None:
        self.keys = keys
        self.tid = keys.tenant_id
        self.extractor = extractor
        self.base_url = base_url.rstrip("/")

    def compile(self, criteria: tuple[Criterion, ...], rtype: str) -> Compiled:
        out = Compiled()
        for c in criteria:
            self._criterion(out, c, rtype)
        return out

    # --- dispatch ----------------------------------------------------------------------------

    def _criterion(self, out: Compiled, c: Criterion, rtype: str) -> None:
        p = c.param
        if p.special == "_id":
            ids = [v for v in c.values]
            if c.missing is not None:
                out.conditions.append(false() if c.missing else true())
            elif c.modifier == "not":
                out.conditions.append(R.c.res_id.not_in(ids))
            else:
                out.conditions.append(R.c.res_id.in_(ids))
            return
        if p.special == "_lastUpdated":
            if c.missing is not None:
                out.conditions.append(false() if c.missing else true())
                return
            out.conditions.append(or_(*(self._range_condition(R.c.last_updated, R.c.last_updated, v, "date") for v in c.values)))
            return
        table = {"string": H, "token": H, "uri": H, "date": D, "number": N, "quantity": Q, "reference": REF}[p.type]
        if c.missing is not None:
            has = R.c.res_id.in_(self._sub(table, rtype, [table.c.param_key == p.key]))
            out.conditions.append(not_(has) if c.missing else has)
            return
        getattr(self, f"_{p.type}")(out, c, rtype)

    def _sub(self, table: Any, rtype: str, where: list[ColumnElement[bool]]) -> Select[Any]:
        return select(table.c.res_id).where(table.c.tenant_id == self.tid, table.c.res_type == rtype, *where)

    def _hash_in(self, rtype: str, key: int, hashes: list[bytes]) -> ColumnElement[bool]:
        return R.c.res_id.in_(self._sub(H, rtype, [H.c.param_key == key, H.c.hash.in_(hashes)]))

    def _blind(self, rtype: str, key_name: str, material: str) -> bytes:
        return self.keys.blind(rtype, key_name, material)

    # --- token -------------------------------------------------------------------------------

    def _token(self, out: Compiled, c: Criterion, rtype: str) -> None:
        p = c.param
        if c.modifier == "text":
            self._string_like(out, c, rtype, p.sub_key(":text"), p.code + ":text", [v for v in c.values])
            return
        if c.modifier == "of-type":
            hashes = []
            for v in c.values:
                parts = split_unescaped(v, "|")
                if len(parts) != 3:
                    raise BadRequest(f"{c.raw_name} takes type-system|type-code|value", expression=c.raw_name)
                hashes.append(self._blind(rtype, p.code + ":of-type", f"t\x00{parts[0]}\x00{parts[1]}\x00{parts[2]}"))
            out.conditions.append(self._hash_in(rtype, p.sub_key(":of-type"), hashes))
            return
        hashes = [self._blind(rtype, p.code, m) for v in c.values for m in token_materials(v)]
        cond = self._hash_in(rtype, p.key, hashes)
        out.conditions.append(not_(cond) if c.modifier == "not" else cond)

    # --- string ------------------------------------------------------------------------------

    def _string(self, out: Compiled, c: Criterion, rtype: str) -> None:
        p = c.param
        if p.code == "phonetic":
            hashes = [self._blind(rtype, p.code, f"ph\x00{soundex(v)}") for v in c.values if soundex(v)]
            out.conditions.append(self._hash_in(rtype, p.key, hashes) if hashes else false())
            return
        self._string_like(out, c, rtype, p.key, p.code, list(c.values))

    def _string_like(self, out: Compiled, c: Criterion, rtype: str, key: int, key_name: str, values: list[str]) -> None:
        modifier = c.modifier if c.modifier in ("exact", "contains") else None
        alternatives: list[ColumnElement[bool]] = []
        checks: list[tuple[str, str]] = []
        exact_only = True
        for v in values:
            if modifier == "exact":
                alternatives.append(self._hash_in(rtype, key, [self._blind(rtype, key_name, f"x\x00{v}")]))
                continue
            norm = normalize(v)
            if modifier == "contains":
                grams = trigrams(norm)
                if grams:
                    per_gram = [self._hash_in(rtype, key, [self._blind(rtype, key_name, f"g\x00{g}")]) for g in grams]
                    overflow = self._hash_in(rtype, key, [self._blind(rtype, key_name, "g*\x00")])
                    alternatives.append(or_(and_(*per_gram), overflow))
                else:
                    # Too short for trigrams: any value of the parameter is a candidate.
                    alternatives.append(R.c.res_id.in_(self._sub(H, rtype, [H.c.param_key == key])))
                checks.append(("contains", norm))
                exact_only = False
            else:
                prefix = norm[:PREFIX_CAP]
                alternatives.append(self._hash_in(rtype, key, [self._blind(rtype, key_name, f"p\x00{prefix}")]))
                checks.append(("starts", norm))
                if len(norm) > PREFIX_CAP:
                    exact_only = False
        out.conditions.append(or_(*alternatives))
        if not exact_only:
            param = c.param
            suffix_text = key_name.endswith(":text")
            out.confirmations.append(lambda res: self._confirm_string(res, param, checks, text=suffix_text))

    def _confirm_string(self, resource: dict[str, Any], param: Any, checks: list[tuple[str, str]], *, text: bool) -> bool:
        entries = self._plain_strings(resource, param, text=text)
        for kind, needle in checks:
            for s in entries:
                if (kind == "contains" and needle in s) or (kind == "starts" and s.startswith(needle)):
                    return True
        return False

    def _plain_strings(self, resource: dict[str, Any], param: Any, *, text: bool) -> list[str]:
        """The normalised strings a parameter indexes for a resource (for confirmation)."""
        found: list[str] = []
        values = [v for path in param.paths for v in path.evaluate(resource)]
        for t in values:
            v = t.value
            if text:
                candidates: list[Any] = []
                if isinstance(v, dict):
                    candidates.append(v.get("text"))
                    candidates.extend(cd.get("display") for cd in v.get("coding") or [] if isinstance(cd, dict))
                    candidates.append(v.get("display"))
                    if isinstance(v.get("type"), dict):
                        candidates.append(v["type"].get("text"))
                found.extend(normalize(x) for x in candidates if isinstance(x, str))
            elif isinstance(v, str):
                found.append(normalize(v))
            elif isinstance(v, dict):
                for x in v.values():
                    if isinstance(x, str):
                        found.append(normalize(x))
                    elif isinstance(x, list):
                        found.extend(normalize(y) for y in x if isinstance(y, str))
        return found

    # --- uri ---------------------------------------------------------------------------------

    def _uri(self, out: Compiled, c: Criterion, rtype: str) -> None:
        p = c.param
        hashes = []
        for v in c.values:
            if c.modifier == "below":
                hashes.append(self._blind(rtype, p.code, f"ub\x00{v.rstrip('/')}"))
                hashes.append(self._blind(rtype, p.code, f"u\x00{v}"))
            elif c.modifier == "above":
                for prefix in [*uri_prefixes(v), v]:
                    hashes.append(self._blind(rtype, p.code, f"u\x00{prefix}"))
            else:
                hashes.append(self._blind(rtype, p.code, f"u\x00{v}"))
        out.conditions.append(self._hash_in(rtype, p.key, hashes))

    # --- date, number, quantity ----------------------------------------------------------------

    def _date(self, out: Compiled, c: Criterion, rtype: str) -> None:
        conds = [self._range_condition(D.c.low, D.c.high, v, "date") for v in c.values]
        out.conditions.append(R.c.res_id.in_(self._sub(D, rtype, [D.c.param_key == c.param.key, or_(*conds)])))

    def _number(self, out: Compiled, c: Criterion, rtype: str) -> None:
        conds = [self._range_condition(N.c.low, N.c.high, v, "number") for v in c.values]
        out.conditions.append(R.c.res_id.in_(self._sub(N, rtype, [N.c.param_key == c.param.key, or_(*conds)])))

    def _quantity(self, out: Compiled, c: Criterion, rtype: str) -> None:
        p = c.param
        unit_key = p.code + ":unit"
        conds = []
        for v in c.values:
            prefix, rest = split_prefix(v)
            parts = split_unescaped(rest, "|")
            number = parts[0]
            system = parts[1] if len(parts) > 1 else ""
            code = parts[2] if len(parts) > 2 else ""
            if len(parts) > 3:
                raise BadRequest(f"{c.raw_name} takes [prefix]number[|system|code]", expression=c.raw_name)
            if not code:
                # No unit: compare the values as recorded (never their canonical conversions).
                conds.append(and_(Q.c.canonical.is_(False), self._range_condition(Q.c.low, Q.c.high, prefix + number, "number")))
                continue
            if system:
                original = and_(
                    Q.c.canonical.is_(False),
                    Q.c.system_code_hash == self._blind(rtype, unit_key, f"sc\x00{system}|{code}"),
                    self._range_condition(Q.c.low, Q.c.high, prefix + number, "number"),
                )
                alternatives = [original]
                if system == ucum.UCUM_SYSTEM:
                    try:
                        factor, canon = ucum.canonical(code)
                    except ucum.NotConvertible:
                        factor, canon = 0.0, ""
                    if canon:
                        lo, hi = scaled_range(Decimal(number), factor)
                        alternatives.append(and_(
                            Q.c.canonical.is_(True),
                            Q.c.system_code_hash == self._blind(rtype, unit_key, f"sc\x00{ucum.UCUM_SYSTEM}|{canon}"),
                            self._bounds_condition(Q.c.low, Q.c.high, prefix, lo, hi, float(Decimal(number)) * factor, "number"),
                        ))
                conds.append(or_(*alternatives))
            else:
                unit_hash = self._blind(rtype, unit_key, f"c\x00{code}")
                conds.append(and_(
                    Q.c.canonical.is_(False),
                    or_(Q.c.code_hash == unit_hash, Q.c.unit_hash == unit_hash),
                    self._range_condition(Q.c.low, Q.c.high, prefix + number, "number"),
                ))
        out.conditions.append(R.c.res_id.in_(self._sub(Q, rtype, [Q.c.param_key == p.key, or_(*conds)])))

    def _range_condition(self, low: Any, high: Any, value: str, kind: str) -> Any:
        prefix, rest = split_prefix(value)
        if kind == "date":
            lo, hi = period(rest)
            return self._bounds_condition(low, high, prefix, lo, hi, None, kind)
        d = Decimal(rest)
        lo_f, hi_f = decimal_range(d)
        return self._bounds_condition(low, high, prefix, lo_f, hi_f, float(d), kind)

    @staticmethod
    def _bounds_condition(low: Any, high: Any, prefix: str, sl: Any, sh: Any, point: float | None, kind: str) -> Any:
        """FHIR prefix semantics between the search range [sl, sh] and each stored range [low, high].

        Dates are inclusive microsecond ranges; numbers and quantities half-open [low, high).
        """
        if kind == "date":
            eq = and_(low >= sl, high <= sh)
            above, below = high > sh, low < sl
            starts_after, ends_before = low > sh, high < sl
        else:
            eq = and_(low >= sl, high <= sh)
            above, below = high > sh, low < sl
            starts_after, ends_before = low >= sh, high <= sl
        if prefix == "eq":
            return eq
        if prefix == "ne":
            return not_(eq)
        if prefix == "gt":
            return above
        if prefix == "lt":
            return below
        if prefix == "ge":
            return or_(above, eq)
        if prefix == "le":
            return or_(below, eq)
        if prefix == "sa":
            return starts_after
        if prefix == "eb":
            return ends_before
        if prefix == "ap":
            if kind == "date":
                gap = abs(now_us() - sl) // 10
                return and_(low <= sh + gap, high >= sl - gap)
            margin = abs(point or 0.0) * 0.1
            return and_(low < sh + margin, high > sl - margin)
        raise BadRequest(f"Unknown prefix {prefix!r}")

    # --- reference ---------------------------------------------------------------------------

    def _reference(self, out: Compiled, c: Criterion, rtype: str) -> None:
        p = c.param
        if c.modifier == "identifier":
            hashes = [self._blind(rtype, p.code + ":identifier", m) for v in c.values for m in token_materials(v) if not m.startswith("s\x00")]
            out.conditions.append(self._hash_in(rtype, p.sub_key(":identifier"), hashes))
            return
        type_filter = c.modifier if c.modifier and c.modifier[:1].isupper() else None
        conds = []
        for v in c.values:
            try:
                conds.append(self.reference_match(v, p.targets, type_filter))
            except BadRequest as exc:
                raise BadRequest(f"{c.raw_name}: {exc}", expression=c.raw_name) from None
        out.conditions.append(R.c.res_id.in_(self._sub(REF, rtype, [REF.c.param_key == p.key, or_(*conds)])))

    def reference_match(self, value: str, targets: tuple[str, ...], type_filter: str | None) -> ColumnElement[bool]:
        local = value
        if value.startswith(self.base_url + "/"):
            local = value[len(self.base_url) + 1 :]
        if "://" in local or local.startswith("urn:"):
            url, _, version = local.partition("|")
            cond = REF.c.url_hash == url_hash(url.split("/_history/")[0])
            return and_(cond, REF.c.target_version == version) if version else cond
        rt, rid, ref_version, _ = parse_reference(local)
        if rt is None:
            if "/" in local:
                raise BadRequest(f"{local[:60]!r} is not a reference; use [Type/]id or an absolute URL")
            rid = local
            types = [type_filter] if type_filter else list(targets)
            cond = or_(
                and_(REF.c.target_id == rid, REF.c.target_type.in_(types) if types else true()),
                REF.c.url_hash == url_hash(rid),  # a canonical written as a bare name
            )
        else:
            if type_filter and type_filter != rt:
                return false()
            cond = and_(REF.c.target_type == rt, REF.c.target_id == rid)
        if ref_version:
            cond = and_(cond, REF.c.target_version == ref_version)
        return cond


def token_materials(value: str) -> list[str]:
    """The hash material that answers a token search value (code, system|code, |code, system|)."""
    parts = split_unescaped(value, "|")
    if len(parts) == 1:
        return [f"c\x00{parts[0]}"]
    system, code = parts[0], "|".join(parts[1:])
    if code == "":
        return [f"s\x00{system}"]
    return [f"sc\x00{system}\x00{code}"]

