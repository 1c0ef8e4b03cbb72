"""Writing a resource's search index rows (in the transaction that writes the resource).

Hash material from the extractor is blind-indexed here with the tenant's keys, so no
identifying value reaches the database in plaintext. A write replaces the resource's
rows (deleting only from the tables its previous version used); a deletion removes them.

On PostgreSQL each table's rows go in one statement (arrays unnested server-side), so the
cost of a write does not grow with round trips per row; SQLite takes an executemany.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import Connection, delete, insert, text

from fhir_server.search.extract import (
    MASK_COMPOSITE,
    MASK_DATE,
    MASK_HASH,
    MASK_NUMBER,
    MASK_QUANTITY,
    MASK_REFERENCE,
    IndexEntries,
)
from fhir_server.security.crypto import TenantKeys
from fhir_server.storage import schema

_BY_MASK = [
    (MASK_HASH, schema.idx_hash),
    (MASK_DATE, schema.idx_date),
    (MASK_NUMBER, schema.idx_number),
    (MASK_QUANTITY, schema.idx_quantity),
    (MASK_REFERENCE, schema.idx_reference),
    (MASK_COMPOSITE, schema.idx_composite),
]

_OWNER = "SELECT :tid, :rt, :rid, "
_PG_INSERTS = {
    "idx_hash": text(
        "INSERT INTO idx_hash (tenant_id, res_type, res_id, param_key, hash) " + _OWNER
        + "k, h FROM unnest(CAST(:param_key AS bigint[]), CAST(:hash AS bytea[])) AS u(k, h)"
    ),
    "idx_date": text(
        "INSERT INTO idx_date (tenant_id, res_type, res_id, param_key, low, high) " + _OWNER
        + "k, l, h FROM unnest(CAST(:param_key AS bigint[]), CAST(:low AS bigint[]), CAST(:high AS bigint[])) AS u(k, l, h)"
    ),
    "idx_number": text(
        "INSERT INTO idx_number (tenant_id, res_type, res_id, param_key, low, high) " + _OWNER
        + "k, l, h FROM unnest(CAST(:param_key AS bigint[]), CAST(:low AS float8[]), CAST(:high AS float8[])) AS u(k, l, h)"
    ),
    "idx_quantity": text(
        "INSERT INTO idx_quantity (tenant_id, res_type, res_id, param_key, low, high, system_code_hash, code_hash, unit_hash, canonical) "
        + _OWNER + "k, l, h, sc, c, un, ca FROM unnest(CAST(:param_key AS bigint[]), CAST(:low AS float8[]), CAST(:high AS float8[]), "
        "CAST(:system_code_hash AS bytea[]), CAST(:code_hash AS bytea[]), CAST(:unit_hash AS bytea[]), CAST(:canonical AS boolean[])) "
        "AS u(k, l, h, sc, c, un, ca)"
    ),
    "idx_reference": text(
        "INSERT INTO idx_reference (tenant_id, res_type, res_id, param_key, target_type, target_id, target_version, url, url_hash) "
        + _OWNER + "k, tt, ti, tv, u, uh FROM unnest(CAST(:param_key AS bigint[]), CAST(:target_type AS text[]), "
        "CAST(:target_id AS text[]), CAST(:target_version AS text[]), CAST(:url AS text[]), CAST(:url_hash AS bytea[])) "
        "AS x(k, tt, ti, tv, u, uh)"
    ),
    "idx_composite": text(
        "INSERT INTO idx_composite (tenant_id, res_type, res_id, param_key, hash, low, high, low2, high2, system_code_hash, "
        "code_hash, unit_hash, canonical) " + _OWNER + "k, h, l, hi, l2, h2, sc, c, un, ca FROM unnest(CAST(:param_key AS bigint[]), "
        "CAST(:hash AS bytea[]), CAST(:low AS float8[]), CAST(:high AS float8[]), CAST(:low2 AS float8[]), CAST(:high2 AS float8[]), "
        "CAST(:system_code_hash AS bytea[]), CAST(:code_hash AS bytea[]), CAST(:unit_hash AS bytea[]), CAST(:canonical AS boolean[])) "
        "AS u(k, h, l, hi, l2, h2, sc, c, un, ca)"
    ),
}


MAX_URL = 2048


def url_hash(url: str) -> bytes:
    """An index key for long URLs (not secret: references are stored in plaintext)."""
    return hashlib.sha256(url.encode()).digest()[:16]


def remove(conn: Connection, tenant_id: int, res_type: str, res_id: str, mask: int) -> None:
    """Delete a resource's index rows from the tables ``mask`` says hold some."""
    for bit, t in _BY_MASK:
        if mask & bit:
            conn.execute(delete(t).where(t.c.tenant_id == tenant_id, t.c.res_type == res_type, t.c.res_id == res_id))


def write(conn: Connection, keys: TenantKeys, res_type: str, res_id: str, entries: IndexEntries, *, old_mask: int) -> None:
    tid = keys.tenant_id
    remove(conn, tid, res_type, res_id, old_mask)
    columns: dict[str, dict[str, list[Any]]] = {}

    if entries.hashes:
        seen: dict[tuple[int, bytes], None] = {}
        for h in dict.fromkeys(entries.hashes):
            seen[(h.key, keys.blind(res_type, h.key_name, h.material))] = None
        columns["idx_hash"] = {"param_key": [k for k, _ in seen], "hash": [d for _, d in seen]}
    if entries.dates:
        dates = list(dict.fromkeys((d.key, d.low, d.high) for d in entries.dates))
        columns["idx_date"] = {"param_key": [d[0] for d in dates], "low": [d[1] for d in dates], "high": [d[2] for d in dates]}
    if entries.numbers:
        numbers = list(dict.fromkeys((n.key, n.low, n.high) for n in entries.numbers))
        columns["idx_number"] = {"param_key": [n[0] for n in numbers], "low": [n[1] for n in numbers], "high": [n[2] for n in numbers]}
    if entries.quantities:
        q_cols: dict[str, list[Any]] = {k: [] for k in ("param_key", "low", "high", "system_code_hash", "code_hash", "unit_hash", "canonical")}
        for q in entries.quantities:
            unit_key = q.key_name + ":unit"
            q_cols["param_key"].append(q.key)
            q_cols["low"].append(q.low)
            q_cols["high"].append(q.high)
            q_cols["system_code_hash"].append(keys.blind(res_type, unit_key, "sc\x00" + q.system_code) if q.system_code else None)
            q_cols["code_hash"].append(keys.blind(res_type, unit_key, "c\x00" + q.code) if q.code else None)
            q_cols["unit_hash"].append(keys.blind(res_type, unit_key, "c\x00" + q.unit) if q.unit else None)
            q_cols["canonical"].append(q.canonical)
        columns["idx_quantity"] = q_cols
    if entries.references:
        refs = list(dict.fromkeys((r.key, r.target_type, r.target_id, r.version, r.url) for r in entries.references))
        columns["idx_reference"] = {
            "param_key": [r[0] for r in refs],
            "target_type": [r[1] for r in refs],
            "target_id": [r[2] for r in refs],
            "target_version": [r[3] for r in refs],
            "url": [r[4] if r[4] and len(r[4]) <= MAX_URL else None for r in refs],  # longer: by hash only
            "url_hash": [url_hash(r[4]) if r[4] else None for r in refs],
        }

    if entries.composites:
        c_cols: dict[str, list[Any]] = {
            k: [] for k in ("param_key", "hash", "low", "high", "low2", "high2", "system_code_hash", "code_hash", "unit_hash", "canonical")
        }
        for c in entries.composites:
            unit_key = c.key_name + ":unit"
            c_cols["param_key"].append(c.key)
            c_cols["hash"].append(keys.blind(res_type, c.key_name, c.material))
            c_cols["low"].append(c.low)
            c_cols["high"].append(c.high)
            c_cols["low2"].append(c.low2)
            c_cols["high2"].append(c.high2)
            c_cols["system_code_hash"].append(keys.blind(res_type, unit_key, "sc\x00" + c.system_code) if c.system_code else None)
            c_cols["code_hash"].append(keys.blind(res_type, unit_key, "c\x00" + c.code) if c.code else None)
            c_cols["unit_hash"].append(keys.blind(res_type, unit_key, "c\x00" + c.unit) if c.unit else None)
            c_cols["canonical"].append(c.canonical)
        columns["idx_composite"] = c_cols

    postgres = conn.dialect.name == "postgresql"
    for table_name, cols in columns.items():
        if postgres:
            conn.execute(_PG_INSERTS[table_name], {"tid": tid, "rt": res_type, "rid": res_id, **cols})
        else:
            names = list(cols)
            rows = [
                {"tenant_id": tid, "res_type": res_type, "res_id": res_id, **dict(zip(names, values))}
                for values in zip(*cols.values())
            ]
            conn.execute(insert(schema.metadata.tables[table_name]), rows)
