"""The engine: one entry point, ``Engine.handle(FhirRequest) -> FhirResponse``, for every door.

It routes the request to its interaction, and turns storage and crypto failures
into ``FhirError``s (so callers see one error type). It knows nothing of HTTP.
"""

from __future__ import annotations

import threading
from typing import Any

from fhir_server.capability.registry import Registry
from fhir_server.capability.statement import Features, capability_statement
from fhir_server.clock import now_us
from fhir_server.engine import authorization, bundles, compartments, conditional, custom_params, history, resources, search
from fhir_server.engine.audit_trail import AuditTrail
from fhir_server.engine.auditing import AUDIT_EVENT, refuse_audit_write
from fhir_server.engine.reindex import JobRunner
from fhir_server.engine.features import custom_features, search_features
from fhir_server.engine.request import FhirRequest, FhirResponse
from fhir_server.engine.storage_errors import storage_errors
from fhir_server.errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    NotFound,
)
from fhir_server.fhirjson import RawJson, dumps
from fhir_server.search.extract import Extractor
from fhir_server.search.parameters import load_search_parameters
from fhir_server.search.query import QueryParser
from fhir_server.settings import Settings
from fhir_server.storage.store import Storage


class Engine:
    def __init__(self, registry: Registry, storage: Storage, settings: Settings, features: Features | None = None) -> None:
        self.registry = registry
        self.storage = storage
        self.settings = settings
        self.search_params = load_search_parameters()
        self.extractor = Extractor(self.search_params)
        self.query_parser = QueryParser(
            self.search_params, default_count=settings.default_page_size, max_count=settings.max_page_size
        )
        self.features = features or search_features(self.search_params, conditional_delete=settings.conditional_delete)
        self.contexts = custom_params.Contexts(self)
        self.jobs: JobRunner | None = None  # set by the app when background jobs run in this process
        self.started_at = now_us()
        self._statements: dict[str, RawJson] = {}
        self._lock = threading.Lock()
        self.patient_params: dict[str, list[Any]] = {}  # compartments.patient_params' cache
        self.audit = AuditTrail(self)

    def handle(self, req: FhirRequest) -> FhirResponse:
        """One interaction, recorded in the audit log before its answer is returned (AuditUnavailable, a 503,
        when its record cannot be written)."""
        act, token = self.audit.begin(req)
        try:
            try:
                with storage_errors(req.tenant):
                    resp = self._route(req)
            except Exception as exc:
                self.audit.failed(act, exc)
                raise
            self.audit.succeeded(act, resp)
            return resp
        finally:
            self.audit.end(token)

    def _route(self, req: FhirRequest) -> FhirResponse:
        path, method = req.path, req.method
        n = len(path)
        if method == "HEAD":
            method = "GET"
        if n == 0:
            if method == "GET":
                return self.system_search(req)
            if method == "POST":
                return bundles.process(self, req)
            raise MethodNotAllowed(f"{method} is not allowed on the base URL; use GET (search) or POST (batch, transaction)")
        head = path[0]
        if head == "_search" and n == 1:
            self._only(method, ("POST",))
            return self.system_search(req)
        if head == "metadata" and n == 1:
            self._only(method, ("GET",))
            return self.capabilities(req)
        if head == "_history" and n == 1:
            self._only(method, ("GET",))
            return history.history(self, req)
        if head.startswith("$"):
            raise NotFound(f"Unknown operation {head[:64]!r}", code="not-supported")
        rtype = self._resource_type(head)
        if rtype == AUDIT_EVENT and (method in ("PUT", "PATCH", "DELETE") or (method == "POST" and n == 1)):
            refuse_audit_write(method)
        if n == 1:
            if method == "POST":
                if req.if_none_exist is not None:
                    return conditional.create(self, req, rtype)
                return resources.create(self, req, rtype)
            if method == "GET":
                return search.search(self, req, (rtype,), list(req.params), system=False)
            if method == "PUT":
                return conditional.update(self, req, rtype)
            if method == "DELETE":
                return conditional.delete(self, req, rtype)
            if method == "PATCH":
                return conditional.patch(self, req, rtype, None)
            raise MethodNotAllowed(f"{method} is not allowed on {rtype}")
        second = path[1]
        if second == "_history" and n == 2:
            self._only(method, ("GET",))
            return history.history(self, req, rtype)
        if second == "_search" and n == 2:
            self._only(method, ("POST",))
            return search.search(self, req, (rtype,), list(req.params), system=False)
        if second.startswith("$"):
            raise NotFound(f"Unknown operation {second[:64]!r} on {rtype}", code="not-supported")
        rid = second
        if n == 2:
            if method == "GET":
                return resources.read(self, req, rtype, rid)
            if method == "PUT":
                return resources.update(self, req, rtype, rid)
            if method == "DELETE":
                return resources.delete(self, req, rtype, rid)
            if method == "PATCH":
                return conditional.patch(self, req, rtype, rid)
            raise MethodNotAllowed(f"{method} is not allowed on {rtype}/{rid[:64]}; use GET, PUT, PATCH or DELETE")
        if path[2] == "_history":
            if n == 3:
                self._only(method, ("GET",))
                return history.history(self, req, rtype, rid)
            if n == 4:
                self._only(method, ("GET",))
                return resources.vread(self, req, rtype, rid, path[3])
        if path[2].startswith("$"):
            raise NotFound(f"Unknown operation {path[2][:64]!r} on {rtype}/{rid[:64]}", code="not-supported")
        if n == 3:
            self._only(method, ("GET",))
            return compartments.search_compartment(self, req, rtype, rid, path[2])
        raise NotFound(f"No FHIR interaction at {'/'.join(p[:64] for p in path)[:200]!r}")

    def system_search(self, req: FhirRequest) -> FhirResponse:
        """GET [base]?_type=A,B&...: search across types (only parameters common to them all)."""
        type_values = [t.strip() for v in req.param_values("_type") for t in v.split(",") if t.strip()]
        for t in type_values:
            if not self.registry.is_resource_type(t):
                raise BadRequest(f"_type names an unknown resource type {t[:64]!r}", expression="_type")
        if type_values:
            types = tuple(type_values)
        elif req.access.internal:
            types = authorization.beyond_wildcards(req.access, self.registry.resource_types, "s")
        else:  # every type the access may search
            types = tuple(t for t in self.registry.resource_types if req.access.grants_for("s", t))
            if not types:
                raise Forbidden("The access token's scopes allow no search")
        pairs = [(k, v) for k, v in req.params if k != "_type"]
        return search.search(self, req, tuple(dict.fromkeys(types)), pairs, system=True)

    def _resource_type(self, name: str) -> str:
        if self.registry.is_resource_type(name):
            return name
        raise NotFound(f"Unknown resource type {name[:64]!r}; this server serves the FHIR R4 resource types", code="not-supported")

    @staticmethod
    def _only(method: str, allowed: tuple[str, ...]) -> None:
        if method not in allowed:
            raise MethodNotAllowed(f"{method} is not allowed here; use {' or '.join(allowed)}")

    def capabilities(self, req: FhirRequest) -> FhirResponse:
        with self.storage.session(req.tenant, write=False) as repo:  # an unknown tenant is a 404 here too
            ctx = self.contexts.for_repo(repo)
            key = f"{req.base_url} {repo.tenant.id if ctx is not self.contexts.base else ''} {repo.tenant.search_epoch}"
        statement = self._statements.get(key)
        if statement is None:
            features = self.features if ctx is self.contexts.base else custom_features(self.features, ctx.params)
            body: dict[str, Any] = capability_statement(self.registry, req.base_url, self.started_at, features)
            statement = RawJson(dumps(body))
            with self._lock:
                if len(self._statements) > 256:  # base URLs come from Host headers: keep the cache bounded
                    self._statements.clear()
                self._statements[key] = statement
        return FhirResponse(200, statement)

