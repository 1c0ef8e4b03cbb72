"""SMART on FHIR scopes: the grammar (App Launch 2.x, with the v1 forms) and what a grant allows.

A clinical scope is ``context/Type.permissions[?query]``:

- context: ``patient`` (the launch patient's compartment), ``user`` (what the user may see) or
  ``system`` (a backend service);
- Type: a resource type or ``*``;
- permissions, v2: a non-empty subset of ``cruds`` in that order (create, read, update, delete,
  search); v1: ``read`` (= ``rs``), ``write`` (= ``cud``) or ``*`` (= ``cruds``);
- query (v2 only, "granular scopes"): search criteria the resources must also match, e.g.
  ``patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory``.
  The search parser reads them, so they become part of the SQL of every search (never a filter
  applied to results afterwards).

The other scopes (``openid``, ``fhirUser``, ``launch``, ``launch/patient``, ``offline_access``...) ask for
context or tokens and grant no data access by themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

PERMISSIONS = "cruds"
V1 = {"read": "rs", "write": "cud", "*": "cruds"}
CONTEXTS = ("patient", "user", "system")
OTHER_SCOPES = frozenset({
    "openid", "fhirUser", "profile", "launch", "launch/patient", "launch/encounter", "offline_access", "online_access",
})
_CLINICAL = re.compile(r"(patient|user|system)/(\*|[A-Z][A-Za-z]{1,63})\.([a-z*]{1,5})(?:\?(.+))?")
MAX_SCOPE_LENGTH = 4096


class ScopeError(ValueError):
    """A scope string that is not a SMART scope."""


@dataclass(frozen=True, slots=True)
class Grant:
    """One clinical scope: ``context/type.permissions?query``."""

    context: str  # patient | user | system
    resource_type: str | None  # None for "*"
    permissions: frozenset[str]  # letters of "cruds"
    query: tuple[tuple[str, str], ...] = ()  # granular criteria (v2)
    text: str = ""

    def covers(self, permission: str, resource_type: str) -> bool:
        return permission in self.permissions and self.resource_type in (None, resource_type)


@dataclass(frozen=True, slots=True)
class Scopes:
    """A parsed scope string."""

    grants: tuple[Grant, ...] = ()
    other: frozenset[str] = field(default_factory=frozenset)  # openid, launch/patient, offline_access, ...
    text: tuple[str, ...] = ()  # every scope, as written, in order

    def __str__(self) -> str:
        return " ".join(self.text)

    def has(self, scope: str) -> bool:
        return scope in self.other


def parse_scope(scope: str, *, known_types: frozenset[str] | None = None) -> Grant | str:
    """One scope: a Grant for a clinical scope, the string itself for the others. ScopeError if neither."""
    if scope in OTHER_SCOPES:
        return scope
    m = _CLINICAL.fullmatch(scope)
    if m is None:
        raise ScopeError(f"{scope[:80]!r} is not a SMART scope")
    context, rtype, perms, query = m.groups()
    if known_types is not None and rtype != "*" and rtype not in known_types:
        raise ScopeError(f"{scope[:80]!r} names an unknown resource type")
    if perms in V1:
        if query:
            raise ScopeError(f"{scope[:80]!r}: only v2 scopes (.cruds) take search criteria")
        letters = V1[perms]
    else:
        if perms == "*" or not _in_order(perms):
            raise ScopeError(f"{scope[:80]!r}: permissions are a subset of 'cruds', in that order, or read, write or *")
        letters = perms
    pairs: tuple[tuple[str, str], ...] = ()
    if query:
        pairs = tuple(parse_qsl(query, keep_blank_values=True))
        if not pairs or any(not k for k, _ in pairs):
            raise ScopeError(f"{scope[:80]!r}: the criteria after '?' are not a query string")
    return Grant(context, None if rtype == "*" else rtype, frozenset(letters), pairs, scope)


def parse_scopes(text: str, *, known_types: frozenset[str] | None = None, lenient: bool = False) -> Scopes:
    """A space-separated scope string. ``lenient`` drops the scopes this server does not know (a client may
    ask for more than there is: the grant is then narrower), instead of failing."""
    if len(text) > MAX_SCOPE_LENGTH:
        raise ScopeError(f"The scope string is longer than {MAX_SCOPE_LENGTH} characters")
    grants: list[Grant] = []
    other: set[str] = set()
    kept: list[str] = []
    for scope in dict.fromkeys(text.split()):
        try:
            parsed = parse_scope(scope, known_types=known_types)
        except ScopeError:
            if lenient:
                continue
            raise
        kept.append(scope)
        if isinstance(parsed, Grant):
            grants.append(parsed)
        else:
            other.add(parsed)
    return Scopes(tuple(grants), frozenset(other), tuple(kept))


def _in_order(perms: str) -> bool:
    position = -1
    for letter in perms:
        i = PERMISSIONS.find(letter)
        if i <= position:
            return False
        position = i
    return True


def within(requested: Scopes, allowed: Scopes) -> Scopes:
    """The requested scopes that ``allowed`` covers (a client's registered scopes; an earlier grant).

    A clinical scope is covered when an allowed one of the same context (contexts are not mixed) has
    its type (or ``*``), all its permissions, and either no criteria or the same criteria. The other
    scopes are covered when listed.
    """
    kept: list[str] = []
    for text in requested.text:
        parsed = parse_scope(text)
        if isinstance(parsed, Grant):
            if any(_covers(a, parsed) for a in allowed.grants):
                kept.append(text)
        elif parsed in allowed.other:
            kept.append(text)
    return parse_scopes(" ".join(kept))


def _covers(allowed: Grant, wanted: Grant) -> bool:
    return (
        allowed.context == wanted.context
        and allowed.resource_type in (None, wanted.resource_type)
        and wanted.permissions <= allowed.permissions
        and (not allowed.query or allowed.query == wanted.query)
    )
