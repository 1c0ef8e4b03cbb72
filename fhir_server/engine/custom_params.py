"""The engine's side of custom search parameters: per-tenant search contexts, and SearchParameter writes.

A tenant's search context (its parameters, extractor and query parser) is cached per process and
keyed by the tenant's ``search_epoch``, which every SearchParameter write and every finished reindex
job increments; tenants without custom parameters share the official context.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, insert, select, update

from fhir_server.clock import now_us
from fhir_server.search.custom import INDEXING, READY, CustomDefinition, TenantSearchParameters, definition_of
from fhir_server.search.extract import Extractor
from fhir_server.search.parameters import ParameterSource
from fhir_server.search.query import QueryParser
from fhir_server.storage import schema
from fhir_server.storage.repository import ResourceRepository

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine

S = schema.search_param_state
J = schema.reindex_jobs
MAX_CUSTOM = 500


@dataclass(frozen=True, slots=True)
class SearchContext:
    params: ParameterSource
    extractor: Extractor
    parser: QueryParser


class Contexts:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.base = SearchContext(engine.search_params, engine.extractor, engine.query_parser)
        self._by_tenant: dict[int, tuple[int, SearchContext]] = {}
        self._by_name: dict[str, tuple[int, SearchContext]] = {}
        self._lock = threading.Lock()

    def guess(self, tenant_name: str) -> tuple[int, SearchContext]:
        """The context last seen for a tenant, to extract index values before the transaction opens."""
        return self._by_name.get(tenant_name, (0, self.base))

    def for_repo(self, repo: ResourceRepository) -> SearchContext:
        tenant = repo.tenant
        if tenant.search_epoch == 0:
            return self.base
        cached = self._by_tenant.get(tenant.id)
        if cached is not None and cached[0] == tenant.search_epoch:
            return cached[1]
        ctx = self._load(repo)
        with self._lock:
            if len(self._by_tenant) > 1000:
                self._by_tenant.clear()
                self._by_name.clear()
            self._by_tenant[tenant.id] = (tenant.search_epoch, ctx)
            self._by_name[tenant.name] = (tenant.search_epoch, ctx)
        return ctx

    def _load(self, repo: ResourceRepository) -> SearchContext:
        base = self.engine.search_params
        customs: list[CustomDefinition] = []
        after = None
        while True:
            batch = repo.current_of_type("SearchParameter", after=after, limit=200)
            for record, _ in batch:
                resource = json.loads(record.body or b"{}")
                definition = definition_of(base, resource, strict=False)
                if definition is not None and len(customs) < MAX_CUSTOM:
                    customs.append(definition)
            if len(batch) < 200:
                break
            after = batch[-1][0].res_id
        if not customs:
            return self.base
        states = {
            (r.res_type, r.code): r.state
            for r in repo.conn.execute(select(S.c.res_type, S.c.code, S.c.state, S.c.fingerprint).where(S.c.tenant_id == repo.tenant.id))
            if any(r.code == d.code and r.res_type in d.bases and r.fingerprint == d.fingerprint for d in customs)
        }
        params = TenantSearchParameters(base, customs, states)
        settings = self.engine.settings
        return SearchContext(params, Extractor(params), QueryParser(params, default_count=settings.default_page_size,
                                                                     max_count=settings.max_page_size))


def check_definition(engine: Engine, body: dict[str, Any]) -> CustomDefinition | None:
    """Refuse (400) an active SearchParameter this server could not use, before anything is written."""
    return definition_of(engine.search_params, body, strict=True)


def after_write(engine: Engine, repo: ResourceRepository, res_id: str, old: dict[str, Any] | None,
                new: CustomDefinition | None) -> int | None:
    """Record what a SearchParameter write changed, in the same transaction. Returns a new reindex job id.

    The tenant's search epoch moves on (so every worker reloads its parameters); parameters the
    resource no longer defines are dropped; a new or changed definition is marked "indexing" and gets
    a reindex job over its base types (an unchanged one keeps its state).
    """
    tid = repo.tenant.id
    old_def = definition_of(engine.search_params, old, strict=False) if old else None
    repo.conn.execute(update(schema.tenants).where(schema.tenants.c.id == tid).values(search_epoch=schema.tenants.c.search_epoch + 1))
    if old_def is not None:
        keep = {(t, new.code) for t in new.bases} if new is not None else set()
        for rtype in old_def.bases:
            if (rtype, old_def.code) not in keep:
                repo.conn.execute(delete(S).where(S.c.tenant_id == tid, S.c.res_type == rtype, S.c.code == old_def.code))
    if new is None:
        return None
    existing = {
        r.res_type: (r.fingerprint, r.state)
        for r in repo.conn.execute(select(S.c.res_type, S.c.fingerprint, S.c.state).where(S.c.tenant_id == tid, S.c.code == new.code))
    }
    stale = [t for t in new.bases if existing.get(t) != (new.fingerprint, READY)]
    if not stale:
        return None
    job_id = create_job(repo, stale)
    now = now_us()
    for rtype in stale:
        repo.conn.execute(delete(S).where(S.c.tenant_id == tid, S.c.res_type == rtype, S.c.code == new.code))
        repo.conn.execute(insert(S).values(tenant_id=tid, res_type=rtype, code=new.code, fingerprint=new.fingerprint,
                                           state=INDEXING, job_id=job_id, updated_at=now))
    return job_id


def create_job(repo: ResourceRepository, types: list[str]) -> int:
    """A pending reindex job over ``types`` of this tenant (counted now, for progress)."""
    R = schema.resources
    total = repo.conn.execute(
        select(func.count()).select_from(R).where(R.c.tenant_id == repo.tenant.id, R.c.res_type.in_(types), R.c.deleted.is_(False))
    ).scalar_one()
    now = now_us()
    return int(repo.conn.execute(
        insert(J).values(tenant_id=repo.tenant.id, types=json.dumps(sorted(set(types))), status="pending", cursor_type=None,
                         cursor_id=None, processed=0, total=total, lease_owner=None, lease_until=0, created_at=now,
                         updated_at=now).returning(J.c.id)
    ).scalar_one())
