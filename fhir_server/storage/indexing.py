"""Writing a resource's search index rows (in the transaction that writes the resource).

Hash material from the extractor is blind-indexed here with the tenant's keys, so no
identifying value reaches the database in plaintext. A write replaces the resource's
rows; a deletion removes them.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import Connection, delete, insert

from fhir_server.search.extract import IndexEntries
from fhir_server.security.crypto import TenantKeys
from fhir_server.storage import schema

_TABLES = [schema.metadata.tables[name] for name in schema.INDEX_TABLES]


def url_hash(url: str) -> bytes:
    """An index key for long URLs (not secret: references are stored in plaintext)."""
    return hashlib.sha256(url.encode()).digest()[:16]


def remove(conn: Connection, tenant_id: int, res_type: str, res_id: str) -> None:
    for t in _TABLES:
        conn.execute(delete(t).where(t.c.tenant_id == tenant_id, t.c.res_type == res_type, t.c.res_id == res_id))


def write(conn: Connection, keys: TenantKeys, res_type: str, res_id: str, entries: IndexEntries, *, replace: bool) -> None:
    tid = keys.tenant_id
    if replace:
        remove(conn, tid, res_type, res_id)
    owner = {"tenant_id": tid, "res_type": res_type, "res_id": res_id}

    hashes: dict[tuple[int, bytes], dict[str, Any]] = {}
    for h in entries.hashes:
        digest = keys.blind(res_type, h.key_name, h.material)
        hashes[(h.key, digest)] = {**owner, "param_key": h.key, "hash": digest}
    if hashes:
        conn.execute(insert(schema.idx_hash), list(hashes.values()))

    dates = {(d.key, d.low, d.high) for d in entries.dates}
    if dates:
        conn.execute(insert(schema.idx_date), [{**owner, "param_key": k, "low": lo, "high": hi} for k, lo, hi in dates])

    numbers = {(n.key, n.low, n.high) for n in entries.numbers}
    if numbers:
        conn.execute(insert(schema.idx_number), [{**owner, "param_key": k, "low": lo, "high": hi} for k, lo, hi in numbers])

    if entries.quantities:
        rows = []
        for q in entries.quantities:
            unit_key = q.key_name + ":unit"
            rows.append({
                **owner,
                "param_key": q.key,
                "low": q.low,
                "high": q.high,
                "system_code_hash": keys.blind(res_type, unit_key, "sc\x00" + q.system_code) if q.system_code else None,
                "code_hash": keys.blind(res_type, unit_key, "c\x00" + q.code) if q.code else None,
                "unit_hash": keys.blind(res_type, unit_key, "c\x00" + q.unit) if q.unit else None,
                "canonical": q.canonical,
            })
        conn.execute(insert(schema.idx_quantity), rows)

    refs = {(r.key, r.target_type, r.target_id, r.version, r.url) for r in entries.references}
    if refs:
        conn.execute(
            insert(schema.idx_reference),
            [
                {**owner, "param_key": k, "target_type": tt, "target_id": ti, "target_version": tv, "url": url,
                 "url_hash": url_hash(url) if url else None}
                for k, tt, ti, tv, url in refs
            ],
        )
