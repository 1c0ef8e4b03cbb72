"""The SMART scope grammar: v2 and v1 clinical scopes, granular criteria, and what a registration covers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fhir_server.security.scopes import MAX_SCOPE_LENGTH, Grant, ScopeError, parse_scope, parse_scopes, within


@pytest.mark.parametrize(("scope", "context", "rtype", "letters"), [
    ("patient/Observation.rs", "patient", "Observation", "rs"),
    ("user/*.cruds", "user", None, "cruds"),
    ("system/Patient.c", "system", "Patient", "c"),
    ("patient/*.read", "patient", None, "rs"),  # v1
    ("user/Observation.write", "user", "Observation", "cud"),
    ("patient/*.*", "patient", None, "cruds"),
])
def test_clinical_scopes(scope: str, context: str, rtype: str | None, letters: str) -> None:
    grant = parse_scope(scope)
    assert isinstance(grant, Grant)
    assert (grant.context, grant.resource_type, grant.permissions) == (context, rtype, frozenset(letters))


def test_granular_criteria_are_parsed_as_a_query() -> None:
    grant = parse_scope("patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory")
    assert isinstance(grant, Grant)
    assert grant.query == (("category", "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"),)


@pytest.mark.parametrize("scope", ["patient/Observation.sr", "patient/Observation.x", "patient/Observation.", "admin/*.rs",
                                   "patient/observation.rs", "patient/Observation.read?category=x", "patient/Observation.rs?",
                                   "patient/Observation.rs?=x", "launch/other", "", "patient/Observation.crudss"])
def test_malformed_scopes(scope: str) -> None:
    with pytest.raises(ScopeError):
        parse_scope(scope)


def test_lenient_parsing_drops_unknown_scopes_and_strict_refuses_them() -> None:
    scopes = parse_scopes("openid fhirUser patient/*.rs nonsense launch/patient", lenient=True)
    assert str(scopes) == "openid fhirUser patient/*.rs launch/patient"
    assert scopes.has("openid") and not scopes.has("nonsense")
    with pytest.raises(ScopeError):
        parse_scopes("openid nonsense")
    with pytest.raises(ScopeError):
        parse_scopes("x" * (MAX_SCOPE_LENGTH + 1), lenient=True)


def test_within_keeps_what_a_registration_covers() -> None:
    registered = parse_scopes("launch/patient openid patient/*.rs user/Observation.cruds")
    asked = parse_scopes("launch/patient offline_access patient/Patient.r patient/Observation.rs?category=x "
                         "patient/Observation.c user/Observation.rs system/*.rs", lenient=True)
    assert str(within(asked, registered)) == "launch/patient patient/Patient.r patient/Observation.rs?category=x user/Observation.rs"
    granular = parse_scopes("patient/Observation.rs?category=lab")
    assert str(within(parse_scopes("patient/Observation.rs"), granular)) == ""  # wider than what is allowed
    assert str(within(parse_scopes("patient/Observation.r?category=lab"), granular)) == "patient/Observation.r?category=lab"


@given(st.sampled_from(["patient", "user", "system"]), st.sampled_from(["*", "Patient", "Observation"]),
       st.sets(st.sampled_from("cruds"), min_size=1))
def test_every_v2_permission_subset_in_order_parses(context: str, rtype: str, letters: set[str]) -> None:
    perms = "".join(c for c in "cruds" if c in letters)
    grant = parse_scope(f"{context}/{rtype}.{perms}")
    assert isinstance(grant, Grant) and grant.permissions == frozenset(letters)
    assert within(parse_scopes(f"{context}/{rtype}.{perms}"), parse_scopes(f"{context}/*.cruds")).text == (f"{context}/{rtype}.{perms}",)
