"""Writing a resource's search index rows (in the transaction that writes the resource).

Hash material from the extractor is blind-indexed here with the tenant's keys, so no
identifying value reaches the database in plaintext. A write replaces the resource's
rows (deleting only from the tables its previous version used); a deletion removes them.

On PostgreSQL each table's rows go in one statement (arrays unnested server-side), so the
cost of a write does not grow with round trips per row; the arrays are sent in PostgreSQL's
binary format (the text format escapes every element in Python: a bytea array of thousands of
blind indexes cost more than the rest of the write). SQLite takes an executemany.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import Connection, TextClause, bindparam, delete, insert, text

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

# Per table, the columns after (tenant_id, res_type, res_id), with their PostgreSQL array types.
_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "idx_hash": (("param_key", "bigint"), ("hash", "bytea")),
    "idx_date": (("param_key", "bigint"), ("low", "bigint"), ("high", "bigint")),
    "idx_number": (("param_key", "bigint"), ("low", "float8"), ("high", "float8")),
    "idx_quantity": (("param_key", "bigint"), ("low", "float8"), ("high", "float8"), ("system_code_hash", "bytea"),
                     ("code_hash", "bytea"), ("unit_hash", "bytea"), ("canonical", "boolean")),
    "idx_reference": (("param_key", "bigint"), ("target_type", "text"), ("target_id", "text"), ("target_version", "text"),
                      ("url", "text"), ("url_hash", "bytea")),
    "idx_composite": (("param_key", "bigint"), ("hash", "bytea"), ("low", "float8"), ("high", "float8"), ("low2", "float8"),
                      ("high2", "float8"), ("system_code_hash", "bytea"), ("code_hash", "bytea"), ("unit_hash", "bytea"),
                      ("canonical", "boolean")),
}


def _pg_insert(table: str) -> str:
    """One statement for any number of rows of any number of resources: the columns go as arrays (binary)."""
    columns = (("res_type", "text"), ("res_id", "text"), *_COLUMNS[table])
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(f"%({name})b::{kind}[]" for name, kind in columns)
    return f"INSERT INTO {table} (tenant_id, {names}) SELECT %(tid)s, * FROM unnest({arrays})"


# Binary arrays hold one type: the values of each column, as that type (dates are ints, numbers may be ints).
_AS = {"bigint": int, "float8": float, "text": str, "bytea": bytes, "boolean": bool}
_KINDS = {table: {"res_type": "text", "res_id": "text", **dict(columns)} for table, columns in _COLUMNS.items()}


def _typed(table: str, cols: dict[str, list[Any]]) -> dict[str, list[Any]]:
    kinds = _KINDS[table]
    out = {}
    for name, values in cols.items():
        kind = kinds[name]
        if kind in ("float8", "bigint"):
            cast = _AS[kind]
            out[name] = [None if v is None else cast(v) for v in values]
        else:
            out[name] = values
    return out


def _pg_delete(table: str) -> TextClause:
    return text(
        f"DELETE FROM {table} AS t USING unnest(CAST(:res_type AS text[]), CAST(:res_id AS text[])) AS u(rt, rid) "
        "WHERE t.tenant_id = :tid AND t.res_type = u.rt AND t.res_id = u.rid"
    )


_PG_INSERTS = {name: _pg_insert(name) for name in _COLUMNS}
_PG_DELETES = {name: _pg_delete(name) for name in _COLUMNS}


MAX_URL = 2048


def url_hash(url: str) -> bytes:
    """An index key for long URLs (not secret: references are stored in plaintext)."""
    return hashlib.sha256(url.encode()).digest()[:16]


def remove(conn: Connection, tenant_id: int, res_type: str, res_id: str, mask: int) -> None:
    """Delete a resource's index rows from the tables ``mask`` says hold some."""
    remove_many(conn, tenant_id, [(res_type, res_id, mask)])


def remove_many(conn: Connection, tenant_id: int, items: list[tuple[str, str, int]]) -> None:
    """Delete the index rows of resources given as (type, id, mask): one statement per table concerned."""
    postgres = conn.dialect.name == "postgresql"
    for bit, t in _BY_MASK:
        keys = [(rt, rid) for rt, rid, mask in items if mask & bit]
        if not keys:
            continue
        if len(keys) == 1:
            conn.execute(delete(t).where(t.c.tenant_id == tenant_id, t.c.res_type == keys[0][0], t.c.res_id == keys[0][1]))
        elif postgres:
            conn.execute(_PG_DELETES[t.name], {"tid": tenant_id, "res_type": [k[0] for k in keys], "res_id": [k[1] for k in keys]})
        else:
            stmt = delete(t).where(t.c.tenant_id == tenant_id, t.c.res_type == bindparam("rt"), t.c.res_id == bindparam("rid"))
            conn.execute(stmt, [{"rt": rt, "rid": rid} for rt, rid in keys])


def write(conn: Connection, keys: TenantKeys, res_type: str, res_id: str, entries: IndexEntries, *, old_mask: int) -> None:
    """Replace one resource's index rows."""
    write_many(conn, keys, [(res_type, res_id, entries, old_mask)])


def write_many(conn: Connection, keys: TenantKeys, items: list[tuple[str, str, IndexEntries, int]]) -> None:
    """Replace the index rows of resources given as (type, id, entries, mask of their old rows).

    The rows of all of them go to each table in one statement.
    """
    tid = keys.tenant_id
    remove_many(conn, tid, [(rt, rid, old_mask) for rt, rid, _, old_mask in items if old_mask])
    columns: dict[str, dict[str, list[Any]]] = {}
    for res_type, res_id, entries, _ in items:
        for table, cols in _rows(keys, res_type, entries).items():
            into = columns.get(table)
            if into is None:
                into = columns[table] = {"res_type": [], "res_id": [], **{name: [] for name, _ in _COLUMNS[table]}}
            n = len(cols["param_key"])
            into["res_type"].extend([res_type] * n)
            into["res_id"].extend([res_id] * n)
            for name, values in cols.items():
                into[name].extend(values)
    postgres = conn.dialect.name == "postgresql"
    for table_name, cols in columns.items():
        if postgres:
            driver = conn.connection.driver_connection  # the driver's own execute: binary arrays (see the module)
            assert driver is not None
            driver.execute(_PG_INSERTS[table_name], {"tid": tid, **_typed(table_name, cols)})
        else:
            names = list(cols)
            rows = [{"tenant_id": tid, **dict(zip(names, values))} for values in zip(*cols.values())]
            conn.execute(insert(schema.metadata.tables[table_name]), rows)


def _add_unit_hashes(cols: dict[str, list[Any]], keys: TenantKeys, res_type: str, key_name: str, system_code: str | None,
                     code: str | None, unit: str | None) -> None:
    """The blind indexes of a quantity's unit (system|code, code, written unit) for idx_quantity and idx_composite,
    under the parameter's ``:unit`` key; search/sql.py's _quantity_value blinds the query's values the same way."""
    unit_key = key_name + ":unit"
    cols["system_code_hash"].append(keys.blind(res_type, unit_key, "sc\x00" + system_code) if system_code else None)
    cols["code_hash"].append(keys.blind(res_type, unit_key, "c\x00" + code) if code else None)
    cols["unit_hash"].append(keys.blind(res_type, unit_key, "c\x00" + unit) if unit else None)


def _rows(keys: TenantKeys, res_type: str, entries: IndexEntries) -> dict[str, dict[str, list[Any]]]:
    """One resource's index rows, by table, as columns (identifying values blind-indexed)."""
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
            q_cols["param_key"].append(q.key)
            q_cols["low"].append(q.low)
            q_cols["high"].append(q.high)
            _add_unit_hashes(q_cols, keys, res_type, q.key_name, q.system_code, q.code, q.unit)
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
            c_cols["param_key"].append(c.key)
            c_cols["hash"].append(keys.blind(res_type, c.key_name, c.material))
            c_cols["low"].append(c.low)
            c_cols["high"].append(c.high)
            c_cols["low2"].append(c.low2)
            c_cols["high2"].append(c.high2)
            _add_unit_hashes(c_cols, keys, res_type, c.key_name, c.system_code, c.code, c.unit)
            c_cols["canonical"].append(c.canonical)
        columns["idx_composite"] = c_cols

    return columns
