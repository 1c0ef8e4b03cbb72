"""Compartment search: ``GET [base]/Patient/123/Observation`` and ``GET [base]/Patient/123/*``.

Driven by the official CompartmentDefinitions (compiled into ``capability/data/compartments.json``):
a resource is in ``Patient/123``'s compartment when one of the parameters the definition lists for
its type references ``Patient/123``. The compartment's own resource is in it too.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources as package_data
from typing import TYPE_CHECKING

from sqlalchemy import select

from fhir_server.engine import authorization
from fhir_server.engine import search as searching
from fhir_server.engine.request import FhirRequest, FhirResponse
from fhir_server.engine import resources as instances  # (module import: resources imports this module too)
from fhir_server.errors import BadRequest, NotFound
from fhir_server.search.query import AnyOf, Clause, Criterion
from fhir_server.storage import schema

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine
    from fhir_server.search.parameters import SearchParam
    from fhir_server.storage.repository import ResourceRepository


@cache
def definitions() -> dict[str, dict[str, list[str]]]:
    """Compartment type -> resource type -> the parameters that put a resource of that type in it."""
    with package_data.files("fhir_server.capability").joinpath("data/compartments.json").open("rb") as fh:
        data: dict[str, dict[str, list[str]]] = json.load(fh)["compartments"]
    return data


def _reference_params(engine: Engine, compartment: str, rtype: str) -> list[SearchParam]:
    """The supported reference parameters that put a resource of ``rtype`` in a ``compartment``."""
    params = (engine.search_params.get(rtype, code) for code in definitions().get(compartment, {}).get(rtype, []))
    return [p for p in params if p is not None and p.supported and p.type == "reference"]


def patient_params(engine: Engine, rtype: str) -> list[SearchParam]:
    """The reference parameters that put a resource of ``rtype`` in a Patient's compartment (cached)."""
    found = engine.patient_params.get(rtype)
    if found is None:
        found = engine.patient_params[rtype] = _reference_params(engine, "Patient", rtype)
    return found


def membership(engine: Engine, compartment: str, focal_id: str, rtype: str) -> Clause | None:
    """The clause "in compartment/focal_id" for resources of ``rtype`` (None if the type is never in it)."""
    target = f"{compartment}/{focal_id}"
    options: list[Clause] = [Criterion(param, None, (target,), f"compartment:{param.code}")
                             for param in _reference_params(engine, compartment, rtype)]
    if rtype == compartment:
        id_param = engine.search_params.get(rtype, "_id")
        assert id_param is not None
        options.append(Criterion(id_param, None, (focal_id,), "compartment:_id"))
    if not options:
        return None
    return options[0] if len(options) == 1 else AnyOf(tuple(options), "compartment")


def patients_referenced(engine: Engine, repo: ResourceRepository, rtype: str, rid: str) -> set[str]:
    """The ids of the Patients in whose compartment the resource, as indexed in this unit of work, is (by the
    Patient CompartmentDefinition's parameters; a Patient is in its own)."""
    keys = [param.key for param in _reference_params(engine, "Patient", rtype)]
    found = {rid} if rtype == "Patient" else set()
    if keys:
        ref = schema.idx_reference
        rows = repo.conn.execute(select(ref.c.target_id).where(
            ref.c.tenant_id == repo.tenant.id, ref.c.res_type == rtype, ref.c.res_id == rid, ref.c.param_key.in_(keys),
            ref.c.target_type == "Patient", ref.c.target_id.is_not(None)))
        found.update(r.target_id for r in rows)
    return found


def search_compartment(engine: Engine, req: FhirRequest, compartment: str, focal_id: str, target: str) -> FhirResponse:
    instances.check_id(focal_id)
    if compartment not in definitions():
        raise NotFound(
            f"{compartment} is not a compartment; compartments are {', '.join(sorted(definitions()))}",
            code="not-supported",
        )
    if target == "*":
        every = tuple(t for t in engine.registry.resource_types if t in definitions()[compartment] or t == compartment)
        types = authorization.beyond_wildcards(req.access, every, "s")
    else:
        if not engine.registry.is_resource_type(target):
            raise NotFound(f"Unknown resource type {target[:64]!r}", code="not-supported")
        types = (target,)
    extra: dict[str, tuple[Clause, ...]] = {}
    for rtype in types:
        clause = membership(engine, compartment, focal_id, rtype)
        if clause is None:
            raise BadRequest(f"{rtype} resources are never in the {compartment} compartment", code="not-supported")
        extra[rtype] = (clause,)
    pairs = [(k, v) for k, v in req.params if k != "_type"]
    return searching.search(
        engine, req, types, pairs, system=target == "*", extra=extra, path=f"{compartment}/{focal_id}/{target}"
    )

