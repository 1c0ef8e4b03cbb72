"""Search criteria compiled into SQL over the index tables.

Each criterion becomes ``res_id IN (SELECT res_id FROM idx_... WHERE ...)`` (or NOT IN
for ``:not`` and ``:missing=true``) against the ``resources`` table, so every
criterion is an index lookup and they combine with AND. Identifying values are
turned into the same blind indexes the writer stored. Where a hash cannot decide
(a string prefix longer than the hashed prefixes, ``:contains``), the criterion
also yields a *confirmation* that the executor checks on the decrypted resource.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import re
from urllib.parse import urlsplit
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

from sqlalchemy import ColumnElement, Select, and_, false, intersect, not_, or_, select, true, union
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BooleanClauseList, Grouping

from fhir_server.clock import now_us
from fhir_server.errors import BadRequest
from fhir_server.search import ucum
from fhir_server.search.dates import InvalidDate, period
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
from fhir_server.search.query import AllOf, AnyOf, Chain, Clause, Criterion, Has, InList, split_prefix, split_unescaped, unescape
from fhir_server.security.crypto import TenantKeys
from fhir_server.storage import schema
from fhir_server.storage.indexing import url_hash

R = schema.resources
H = schema.idx_hash
D = schema.idx_date
N = schema.idx_number
Q = schema.idx_quantity
REF = schema.idx_reference
C = schema.idx_composite

Confirm = Callable[[dict[str, Any]], bool]


@dataclass
class Compiled:
    conditions: list[ColumnElement[bool]] = field(default_factory=list)
    confirmations: list[Confirm] = field(default_factory=list)


Materialize = Callable[[str, list[Any], list[Confirm]], list[str]]
FetchIds = Callable[[Any, int], "list[str] | None"]
CHAIN_LITERAL_LIMIT = 500  # a chain's intermediate set up to this size is resolved first and inlined


class Compiler:
    """Compiles clauses for one tenant. ``materialize`` runs a nested criterion that needs confirmation
    after decryption (a long string prefix inside a chain) and returns the ids that pass."""

    def __init__(self, keys: TenantKeys, extractor: Extractor, base_url: str, materialize: Materialize | None = None,
                 fetch_ids: FetchIds | None = None) -> None:
        self.keys = keys
        self.tid = keys.tenant_id
        self.extractor = extractor
        self.base_url = base_url.rstrip("/")
        self.materialize = materialize
        self.fetch_ids = fetch_ids
        self._r: Any = R

    def compile(self, clauses: tuple[Clause, ...], rtype: str) -> Compiled:
        out = Compiled()
        for clause in clauses:
            out.conditions.append(self.condition(clause, rtype, out, top=True))
        return out

    def condition(self, clause: Clause, rtype: str, out: Compiled, *, top: bool) -> Any:
        """The SQL condition of one clause on the current resource alias.

        At the top level a confirmation joins ``out.confirmations`` (checked on each result);
        nested (inside a chain, _has or an OR of options) it cannot be checked on the result, so the
        criterion's candidates are confirmed here and replaced by the list of ids that pass.
        """
        if isinstance(clause, Criterion):
            part = Compiled()
            self._criterion(part, clause, rtype)
            cond = and_(*part.conditions)
            if part.confirmations:
                if top:
                    out.confirmations.extend(part.confirmations)
                else:
                    if self.materialize is None:
                        raise BadRequest(f"{clause.raw_name}: this criterion cannot be used here", expression=clause.raw_name)
                    # Materialize on the base resources table (the store's query), not the nested alias.
                    outer, self._r = self._r, R
                    try:
                        base = Compiled()
                        self._criterion(base, clause, rtype)
                    finally:
                        self._r = outer
                    ids = self.materialize(rtype, base.conditions, base.confirmations)
                    cond = self._r.c.res_id.in_(ids)
            return cond
        if isinstance(clause, AnyOf):
            return or_(*(self.condition(o, rtype, out, top=False) for o in clause.options))
        if isinstance(clause, AllOf):
            return and_(*(self.condition(c, rtype, out, top=False) for c in clause.clauses))
        if isinstance(clause, Chain):
            targets = self._resolved(self._nested(clause.target_type, clause.inner, out))
            refs = select(REF.c.res_id).where(
                REF.c.tenant_id == self.tid,
                REF.c.res_type == rtype,
                REF.c.param_key == clause.param.key,
                REF.c.target_type == clause.target_type,
                REF.c.target_id.in_(targets),
            )
            return self._r.c.res_id.in_(refs)
        if isinstance(clause, Has):
            sources = self._resolved(self._nested(clause.source_type, clause.inner, out))
            refs = select(REF.c.target_id).where(
                REF.c.tenant_id == self.tid,
                REF.c.res_type == clause.source_type,
                REF.c.param_key == clause.param.key,
                REF.c.target_type == rtype,
                REF.c.res_id.in_(sources),
            )
            return self._r.c.res_id.in_(refs)
        if isinstance(clause, InList):
            item = self.extractor.params.get("List", "item")
            assert item is not None
            refs = select(REF.c.target_id).where(
                REF.c.tenant_id == self.tid,
                REF.c.res_type == "List",
                REF.c.res_id == clause.list_id,
                REF.c.param_key == item.key,
                REF.c.target_type == rtype,
            )
            return self._r.c.res_id.in_(refs)
        raise AssertionError(type(clause))  # pragma: no cover

    def _resolved(self, ids: Any) -> Any:
        """A small intermediate set of a chain, fetched now and inlined as literal ids.

        The planner cannot estimate a blind-indexed, nested set; with the ids in hand it can, and
        the outer query then starts from the right end. Larger sets stay subqueries.
        """
        if self.fetch_ids is None:
            return ids
        found = self.fetch_ids(ids, CHAIN_LITERAL_LIMIT)
        return ids if found is None else found

    def _nested(self, rtype: str, clause: Clause, out: Compiled) -> Any:
        """The ids of current, undeleted ``rtype`` resources matching ``clause``.

        Index rows exist only for current, undeleted resources, so a clause that is a set of ids from
        the index tables needs no `resources` row at all; others (_id, :missing=true, :not) are
        evaluated against an alias of it.
        """
        inner = schema.resources.alias()
        outer, self._r = self._r, inner
        try:
            cond = self.condition(clause, rtype, out, top=False)
        finally:
            self._r = outer
        ids = _id_set(cond, inner.c.res_id)
        if ids is not None:
            return ids
        return select(inner.c.res_id).where(
            inner.c.tenant_id == self.tid, inner.c.res_type == rtype, inner.c.deleted.is_(False), cond
        )

    # --- criteria ----------------------------------------------------------------------------

    def _criterion(self, out: Compiled, c: Criterion, rtype: str) -> None:
        p = c.param
        if p.special == "_id":
            ids = [v for v in c.values]
            if c.missing is not None:
                out.conditions.append(false() if c.missing else true())
            elif c.modifier == "not":
                out.conditions.append(self._r.c.res_id.not_in(ids))
            else:
                out.conditions.append(self._r.c.res_id.in_(ids))
            return
        if p.special == "_lastUpdated":
            if c.missing is not None:
                out.conditions.append(false() if c.missing else true())
                return
            out.conditions.append(or_(*(self._range_condition(self._r.c.last_updated, self._r.c.last_updated, v, "date") for v in c.values)))
            return
        if p.union_of:
            self._union(out, c, rtype)
            return
        table = {"string": H, "token": H, "uri": H, "date": D, "number": N, "quantity": Q, "reference": REF, "composite": H}[p.type]
        if c.missing is not None:
            has = self._r.c.res_id.in_(self._sub(table, rtype, [table.c.param_key == p.key]))
            out.conditions.append(not_(has) if c.missing else has)
            return
        getattr(self, f"_{p.type}")(out, c, rtype)

    def _union(self, out: Compiled, c: Criterion, rtype: str) -> None:
        """A parameter with no rows of its own (``SearchParam.union_of``): the criterion on each of its parts, OR-ed.

        ``:missing=true`` holds when it holds of every part, ``:not`` when no part matches. A long string prefix
        (``:text``) is confirmed on the body against any part, as the union's own expression would be.
        """
        negate = c.modifier == "not"
        positive = dataclasses.replace(c, modifier=None) if negate else c
        parts = []
        for q in c.param.union_of:
            part = Compiled()
            self._criterion(part, dataclasses.replace(positive, param=q), rtype)
            parts.append(part)
        if c.missing is True:
            out.conditions.append(and_(*(cond for part in parts for cond in part.conditions)))
            return
        cond = or_(*(and_(*part.conditions) for part in parts))
        out.conditions.append(not_(cond) if negate else cond)
        checks = [part.confirmations for part in parts if part.confirmations]
        if checks:
            # Confirmations come from the values (a prefix longer than the index holds), so every part has them
            assert len(checks) == len(parts) and not negate
            out.confirmations.append(lambda res: any(all(check(res) for check in part) for part in checks))

    def _sub(self, table: Any, rtype: str, where: list[ColumnElement[bool]]) -> Select[Any]:
        return select(table.c.res_id).where(table.c.tenant_id == self.tid, table.c.res_type == rtype, *where)

    def _hash_in(self, rtype: str, key: int, hashes: list[bytes]) -> Any:
        return self._r.c.res_id.in_(self._sub(H, rtype, [H.c.param_key == key, H.c.hash.in_(hashes)]))

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
                    alternatives.append(self._r.c.res_id.in_(self._sub(H, rtype, [H.c.param_key == key])))
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
        out.conditions.append(self._r.c.res_id.in_(self._sub(D, rtype, [D.c.param_key == c.param.key, or_(*conds)])))

    def _number(self, out: Compiled, c: Criterion, rtype: str) -> None:
        conds = [self._range_condition(N.c.low, N.c.high, v, "number") for v in c.values]
        out.conditions.append(self._r.c.res_id.in_(self._sub(N, rtype, [N.c.param_key == c.param.key, or_(*conds)])))

    def _quantity(self, out: Compiled, c: Criterion, rtype: str) -> None:
        p = c.param
        conds = [self._quantity_value(Q, rtype, p.code + ":unit", v, c.raw_name) for v in c.values]
        out.conditions.append(self._r.c.res_id.in_(self._sub(Q, rtype, [Q.c.param_key == p.key, or_(*conds)])))

    def _quantity_value(self, table: Any, rtype: str, unit_key: str, value: str, raw_name: str) -> Any:
        """[prefix]number[|system|code] against the quantity columns of ``table`` (idx_quantity, idx_composite).
        Units are blinded as storage/indexing.py's _add_unit_hashes blinds them (key ``code:unit``, "sc\\0"/"c\\0")."""
        prefix, rest = split_prefix(value)
        parts = split_unescaped(rest, "|")
        number = parts[0]
        system = parts[1] if len(parts) > 1 else ""
        code = parts[2] if len(parts) > 2 else ""
        if len(parts) > 3:
            raise BadRequest(f"{raw_name} takes [prefix]number[|system|code]", expression=raw_name)
        t = table.c
        if not code:
            # No unit: compare the values as recorded (never their canonical conversions).
            return and_(t.canonical.is_(False), self._range_condition(t.low, t.high, prefix + number, "number"))
        if not system:
            unit_hash = self._blind(rtype, unit_key, f"c\x00{code}")
            return and_(
                t.canonical.is_(False),
                or_(t.code_hash == unit_hash, t.unit_hash == unit_hash),
                self._range_condition(t.low, t.high, prefix + number, "number"),
            )
        alternatives = [and_(
            t.canonical.is_(False),
            t.system_code_hash == self._blind(rtype, unit_key, f"sc\x00{system}|{code}"),
            self._range_condition(t.low, t.high, prefix + number, "number"),
        )]
        if system == ucum.UCUM_SYSTEM:
            try:
                factor, canon = ucum.canonical(code)
            except ucum.NotConvertible:
                factor, canon = 0.0, ""
            if canon:
                lo, hi = scaled_range(Decimal(number), factor)
                alternatives.append(and_(
                    t.canonical.is_(True),
                    t.system_code_hash == self._blind(rtype, unit_key, f"sc\x00{ucum.UCUM_SYSTEM}|{canon}"),
                    self._bounds_condition(t.low, t.high, prefix, lo, hi, float(Decimal(number)) * factor, "number"),
                ))
        return or_(*alternatives)

    def _composite(self, out: Compiled, c: Criterion, rtype: str) -> None:
        p = c.param
        comps = p.components
        alternatives = []
        for v in c.values:
            parts = re.split(r"(?<!\\)\$", v)
            if len(parts) != len(comps):
                raise BadRequest(
                    f"{c.raw_name} takes {len(comps)} values joined by $ ({' $ '.join(x.type for x in comps)})",
                    expression=c.raw_name,
                )
            if comps[0].type == "token":
                m1s = token_materials(parts[0])
            else:
                ref = unescape(parts[0])
                local = ref[len(self.base_url) + 1 :] if ref.startswith(self.base_url + "/") else ref
                m1s = [f"r\x00{local.split('|', 1)[0]}"]
            if len(comps) == 2 and comps[1].type in ("token", "string"):
                if comps[1].type == "token":
                    m2s = token_materials(parts[1])
                else:
                    m2s = [f"p\x00{normalize(unescape(parts[1]))[:PREFIX_CAP]}"]
                hashes = [self._blind(rtype, p.code, f"cc\x00{m1}\x01{m2}") for m1 in m1s for m2 in m2s]
                alternatives.append(self._hash_in(rtype, p.key, hashes))
                continue
            conds: list[Any] = [C.c.param_key == p.key, C.c.hash.in_([self._blind(rtype, p.code, m) for m in m1s])]
            for i, comp in enumerate(comps[1:]):
                part = unescape(parts[i + 1])
                low, high = (C.c.low, C.c.high) if i == 0 else (C.c.low2, C.c.high2)
                if comp.type == "quantity":
                    conds.append(self._quantity_value(C, rtype, p.code + ":unit", part, c.raw_name))
                else:
                    try:
                        conds.append(self._range_condition(low, high, part, "date" if comp.type == "date" else "number"))
                    except (InvalidDate, InvalidOperation, ValueError):
                        raise BadRequest(f"{c.raw_name}: {part[:40]!r} is not a {comp.type}", expression=c.raw_name) from None
            alternatives.append(self._r.c.res_id.in_(self._sub(C, rtype, conds)))
        out.conditions.append(or_(*alternatives))

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
        out.conditions.append(self._r.c.res_id.in_(self._sub(REF, rtype, [REF.c.param_key == p.key, or_(*conds)])))

    def reference_match(self, value: str, targets: tuple[str, ...], type_filter: str | None) -> ColumnElement[bool]:
        local = value
        local_path = urlsplit(self.base_url).path.rstrip("/") + "/"
        if value.startswith(self.base_url + "/"):
            local = value[len(self.base_url) + 1 :]
        elif "://" in value and local_path != "/" and local_path in value:
            # This server's own resource named by an absolute URL (through another host name).
            candidate = value.split(local_path, 1)[1]
            if parse_reference(candidate)[0] is not None:
                local = candidate
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


def _id_set(cond: Any, res_id: Any) -> Any:
    """``cond`` as a set of ids when it is ``res_id IN (select)``, or an OR/AND of such; None otherwise."""
    if isinstance(cond, BinaryExpression) and cond.operator is operators.in_op and cond.left is res_id:
        right: Any = cond.right
        while isinstance(right, Grouping):
            right = right.element
        if isinstance(right, Select):
            return right
        inner = getattr(right, "element", None)
        return inner if isinstance(inner, Select) else None
    if isinstance(cond, BooleanClauseList) and cond.operator in (operators.or_, operators.and_) and len(cond.clauses) > 0:
        parts = [_id_set(c, res_id) for c in cond.clauses]
        if any(p is None for p in parts):
            return None
        if len(parts) == 1:
            return parts[0]
        combined = union(*parts) if cond.operator is operators.or_ else intersect(*parts)
        return select(combined.subquery().c[0])
    return None


def token_materials(value: str) -> list[str]:
    """The hash material that answers a token search value (code, system|code, |code, system|)."""
    parts = split_unescaped(value, "|")
    if len(parts) == 1:
        return [f"c\x00{parts[0]}"]
    system, code = parts[0], "|".join(parts[1:])
    if code == "":
        return [f"s\x00{system}"]
    return [f"sc\x00{system}\x00{code}"]

