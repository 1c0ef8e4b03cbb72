"""The search index of AuditEvents: extracted element by element, the elements that recur taken from a cache.

Every search parameter of AuditEvent reads one top-level element (``agent``, ``entity``, ``type``, ``source``,
``recorded``, ``meta`` ...), and a list element item by item, so the index entries of a whole AuditEvent are
the union of those of its elements, and of their items (a test checks this against extracting whole events).
The records of one server repeat themselves: the same agents, source, codes; only the time, the request id and
the resources change. Their entries are extracted once per process and reused, which makes indexing a record
several times cheaper. A tenant with custom SearchParameters on AuditEvent (whose expressions may read across
elements) has its records extracted whole.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import orjson

from fhir_server.search.extract import Extractor, IndexEntries

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine
    from fhir_server.storage.repository import ResourceRepository

AUDIT_EVENT = "AuditEvent"
CACHED_PARTS = 20_000
SERVER_META = ("versionId", "lastUpdated")  # no search parameter reads them (_lastUpdated has its own column)


class AuditIndexer:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cache: OrderedDict[bytes, IndexEntries] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, repo: ResourceRepository, stored: list[tuple[str, bytes]]) -> list[IndexEntries]:
        """The index entries of stored AuditEvents (id, JSON), with the tenant's search parameters."""
        ctx = self.engine.contexts.for_repo(repo)
        local = f"/fhir/{repo.tenant.name}/"
        if ctx is not self.engine.contexts.base:
            return [ctx.extractor.extract(orjson.loads(body), local_path=local) for _, body in stored]
        return [self.by_parts(ctx.extractor, orjson.loads(body), local) for _, body in stored]

    def by_parts(self, extractor: Extractor, event: dict[str, Any], local: str) -> IndexEntries:
        out = IndexEntries()
        for key, value in event.items():
            if key in ("resourceType", "id"):
                continue
            if key == "meta" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in SERVER_META}
                if not value:
                    continue
            items = [[item] for item in value] if isinstance(value, list) else [value]
            for item in items:
                _merge(out, self._part(extractor, {"resourceType": AUDIT_EVENT, key: item}, local))
        return out

    def _part(self, extractor: Extractor, part: dict[str, Any], local: str) -> IndexEntries:
        key = local.encode() + orjson.dumps(part, option=orjson.OPT_SORT_KEYS)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        found = extractor.extract(part, local_path=local)
        with self._lock:
            self._cache[key] = found
            if len(self._cache) > CACHED_PARTS:
                self._cache.popitem(last=False)
        return found


def _merge(into: IndexEntries, part: IndexEntries) -> None:
    into.hashes.extend(part.hashes)
    into.dates.extend(part.dates)
    into.numbers.extend(part.numbers)
    into.quantities.extend(part.quantities)
    into.references.extend(part.references)
    into.composites.extend(part.composites)
