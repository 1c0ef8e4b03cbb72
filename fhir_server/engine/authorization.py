"""What a request's AccessContext allows, enforced in the engine and compiled into its queries.

A SMART grant (``security/scopes.py``) allows some of create, read, update, delete and search on a
resource type. It may be narrowed two ways, both expressed as search clauses:

- a ``patient/`` grant: the resource must be in the launch patient's compartment (the official
  Patient CompartmentDefinition);
- granular criteria (``patient/Observation.rs?category=...laboratory``): the resource must match them.

A resource is allowed when any one applicable grant allows it: the clauses of each grant are AND-ed,
the grants OR-ed, and the result is AND-ed into the SQL of searches (never a filter on results), and
checked by a query for single resources, inside the same unit of work as the interaction (a write is
checked after it is written, and rolled back if it falls outside).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from fhir_server.engine import compartments, search
from fhir_server.errors import Forbidden
from fhir_server.search.query import AllOf, AnyOf, Chain, Clause, Has, InList, SearchQuery
from fhir_server.security.access import AUDIT_EVENT, AccessContext
from fhir_server.security.scopes import Grant

if TYPE_CHECKING:
    from fhir_server.storage.repository import CurrentState
    from fhir_server.engine.custom_params import SearchContext
    from fhir_server.engine.engine import Engine
    from fhir_server.storage.repository import ResourceRepository

VERBS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


def grants(access: AccessContext, permission: str, rtype: str) -> list[Grant]:
    """The grants allowing ``permission`` on ``rtype`` (Forbidden when there are none)."""
    found = access.grants_for(permission, rtype)
    if not found:
        raise Forbidden(f"The access token's scopes do not allow {VERBS[permission]} of {rtype} resources")
    return found


def grants_unless_internal(access: AccessContext, permission: str, rtype: str) -> None:
    """Forbidden unless the access allows ``permission`` on some resources of ``rtype``."""
    if not access.internal:
        grants(access, permission, rtype)


_READ_STATE: Any = object()


def write_permission(engine: Engine, repo: ResourceRepository, access: AccessContext, rtype: str, rid: str, *,
                     create_only: bool, state: CurrentState | None = _READ_STATE) -> str:
    """Before a write: "c" (it creates) or "u" (it updates a resource the access may update); Forbidden otherwise.
    ``state``: the resource's current state when the caller has read it already."""
    if access.internal:
        return "c" if create_only else "u"
    if state is _READ_STATE:
        state = None if create_only else repo.current_state(rtype, rid)
    if state is None or state.deleted:
        grants(access, "c", rtype)
        if state is not None and constraint(engine, engine.contexts.for_repo(repo), access, "c", rtype) is not None:
            # Its past versions would become readable as this patient's: they may be someone else's.
            raise Forbidden(f"{rtype}/{rid} was deleted; re-creating it needs a grant not limited to a patient or "
                            "to search criteria")
        return "c"
    grants(access, "u", rtype)
    check_writable(engine, repo, access, "u", rtype, rid)
    return "u"


def compartment_patient(access: AccessContext, grant: Grant) -> str | None:
    """The patient whose compartment a grant is limited to: the launch patient for ``patient/`` scopes; for
    ``user/`` scopes of a user who is a Patient (fhirUser Patient/...), that patient (what a patient user
    may see is their own record), and of a related person, the patient they act for; None for the others
    (unrestricted by compartment)."""
    if grant.context == "patient":
        return access.patient
    if grant.context == "user" and access.fhir_user and access.fhir_user.startswith("Patient/"):
        return access.fhir_user.split("/", 1)[1]
    if grant.context == "user" and access.user_patient:
        return access.user_patient  # a related person acting for a patient
    return None


def reads_own_record(access: AccessContext, rtype: str, rid: str) -> bool:
    """The ``fhirUser`` scope lets the logged-in user read their own FHIR resource (SMART App Launch 2,
    "Scopes for requesting identity data"), whatever the clinical scopes say."""
    return access.fhir_user == f"{rtype}/{rid}" and access.scopes.has("fhirUser")


def beyond_wildcards(access: AccessContext, types: tuple[str, ...], permission: str = "r") -> tuple[str, ...]:
    """``types`` as an interaction over every type sees them (system history, a search without _type, a compartment's
    ``*``): the audit log only for a caller granted AuditEvent by name (a ``system/AuditEvent`` scope, or an auditor's
    ``user/`` scope); not for the server's own calls, which ask for AuditEvents when they want them."""
    if AUDIT_EVENT not in types or (not access.internal and access.grants_for(permission, AUDIT_EVENT)):
        return types
    return tuple(t for t in types if t != AUDIT_EVENT)


def permitted(access: AccessContext, permission: str, rtype: str) -> bool:
    return access.internal or bool(access.grants_for(permission, rtype))


def constraint(engine: Engine, ctx: SearchContext, access: AccessContext, permission: str, rtype: str) -> Clause | None:
    """The clause a resource of ``rtype`` must satisfy for ``permission`` (None: any resource).

    Forbidden when no grant applies, or when every applicable grant is a ``patient/`` one and there is
    no launch patient, or the type is never in a patient's compartment.
    """
    if access.internal:
        return None
    options: list[Clause] = []
    for grant in grants(access, permission, rtype):
        parts: list[Clause] = []
        patient = compartment_patient(access, grant)
        if grant.context == "patient" or patient is not None:
            if patient is None:
                continue
            membership = compartments.membership(engine, "Patient", patient, rtype)
            if membership is None:
                continue
            parts.append(membership)
        if grant.query:
            parts.extend(ctx.parser.parse((rtype,), list(grant.query), strict=True).by_type[rtype])
        if not parts:
            return None  # this grant alone allows every resource of the type
        options.append(parts[0] if len(parts) == 1 else AllOf(tuple(parts), grant.text))
    if not options:
        raise Forbidden(
            f"The access token's patient scopes do not reach {rtype} resources"
            + ("" if access.patient else " (the token has no patient context)")
        )
    return options[0] if len(options) == 1 else AnyOf(tuple(options), "scopes")


def guard_query(engine: Engine, ctx: SearchContext, access: AccessContext, query: SearchQuery) -> SearchQuery:
    """The query with every chain and ``_has`` held to the grant: a chain into, or a ``_has`` from, a type the
    access may not search is refused, and one into a type it may search only in part (a patient's compartment,
    granular criteria) sees only that part. Otherwise a search would tell what the caller may not read
    (``Patient?_has:Observation:subject:code=...``)."""
    if access.internal:
        return query
    by_type = {t: tuple(_guard(engine, ctx, access, c) for c in clauses) for t, clauses in query.by_type.items()}
    return dataclasses.replace(query, by_type=by_type)


def _guard(engine: Engine, ctx: SearchContext, access: AccessContext, clause: Clause) -> Clause:
    if isinstance(clause, (Chain, Has)):
        rtype = clause.target_type if isinstance(clause, Chain) else clause.source_type
        inner = _guard(engine, ctx, access, clause.inner)
        limit = constraint(engine, ctx, access, "s", rtype)  # Forbidden when the access may not search rtype
        return dataclasses.replace(clause, inner=inner if limit is None else AllOf((inner, limit), clause.raw_name))
    if isinstance(clause, AnyOf):  # e.g. a chain through each type a reference may point at
        options = []
        for option in clause.options:
            try:
                options.append(_guard(engine, ctx, access, option))
            except Forbidden:
                continue  # a type the access may not search: it matches nothing for this caller
        if not options:
            raise Forbidden(f"The access token's scopes do not allow searching through {clause.raw_name}")
        return dataclasses.replace(clause, options=tuple(options))
    if isinstance(clause, AllOf):
        return dataclasses.replace(clause, clauses=tuple(_guard(engine, ctx, access, c) for c in clause.clauses))
    if isinstance(clause, InList):
        grants(access, "r", "List")  # the List's entries are read
    return clause


def check_instance(engine: Engine, repo: ResourceRepository, access: AccessContext, permission: str, rtype: str,
                   rid: str) -> None:
    """The resource as it now stands in this unit of work is within the grant (Forbidden otherwise)."""
    check_instances(engine, repo, access, permission, rtype, [rid])


def instance_unrestricted(engine: Engine, repo: ResourceRepository, access: AccessContext, permission: str,
                          rtype: str) -> bool:
    """Whether ``check_instance`` would pass for any resource of ``rtype`` (the grant is not limited to a
    compartment). False also when it would refuse every one: that refusal is left to ``check_instance``."""
    if access.internal:
        return True
    try:
        return constraint(engine, engine.contexts.for_repo(repo), access, permission, rtype) is None
    except Forbidden:
        return False


def check_writable(engine: Engine, repo: ResourceRepository, access: AccessContext, permission: str, rtype: str,
                   rid: str) -> None:
    """A resource a write is about to change (u, d) or has written (c, u): within the grant, and, where the grant
    is limited to a patient's compartment, in no other patient's compartment: a patient-limited app cannot put
    data into another patient's record by naming them in a second reference (performer, author, ...)."""
    check_instance(engine, repo, access, permission, rtype, rid)
    if access.internal:
        return
    limits = {compartment_patient(access, grant) for grant in grants(access, permission, rtype)}
    if None in limits:
        return  # a grant not limited to one patient allows it
    others = sorted(compartments.patients_referenced(engine, repo, rtype, rid) - limits)
    if others:
        raise Forbidden(f"{rtype}/{rid} would also be in the record of Patient/{others[0]}, outside the access token's "
                        "patient scope")


def may_read(engine: Engine, repo: ResourceRepository, access: AccessContext, rtype: str, rid: str) -> bool:
    """Whether the access may read this resource (a write that found an existing one returns it only then)."""
    if not permitted(access, "r", rtype):
        return False
    try:
        check_instance(engine, repo, access, "r", rtype, rid)
    except Forbidden:
        return False
    return True


def check_instances(engine: Engine, repo: ResourceRepository, access: AccessContext, permission: str, rtype: str,
                    rids: list[str]) -> None:
    if access.internal or not rids:
        return
    clause = constraint(engine, engine.contexts.for_repo(repo), access, permission, rtype)
    if clause is None:
        return
    allowed = set(allowed_ids(engine, repo, rtype, rids, clause))
    outside = [rid for rid in rids if rid not in allowed]
    if outside:
        raise Forbidden(f"{rtype}/{outside[0]} is outside what the access token's scopes allow ({VERBS[permission]})")


def allowed_ids(engine: Engine, repo: ResourceRepository, rtype: str, rids: list[str], clause: Clause) -> list[str]:
    """Those of ``rids`` that satisfy ``clause``."""
    out: list[str] = []
    for start in range(0, len(rids), 200):
        chunk = rids[start : start + 200]
        out.extend(search.ids_matching(engine, repo, rtype, [("_id", ",".join(chunk))], (clause,), limit=len(chunk)))
    return out


def filter_keys(engine: Engine, repo: ResourceRepository, access: AccessContext, permission: str,
                keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Those of the (type, id) keys the access allows ``permission`` on (for included resources)."""
    if access.internal:
        return set(keys)
    ctx = engine.contexts.for_repo(repo)
    by_type: dict[str, list[str]] = {}
    for rtype, rid in keys:
        by_type.setdefault(rtype, []).append(rid)
    kept: set[tuple[str, str]] = set()
    for rtype, rids in by_type.items():
        if not access.grants_for(permission, rtype):
            continue
        try:
            clause = constraint(engine, ctx, access, permission, rtype)
        except Forbidden:
            continue
        ids = rids if clause is None else allowed_ids(engine, repo, rtype, rids, clause)
        kept.update((rtype, rid) for rid in ids)
    return kept
