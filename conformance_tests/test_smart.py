"""SMART App Launch 2.0 and Backend Services, as Inferno's SMART App Launch STU2 and ONC (g)(10) kits check them.

Discovery, the standalone and EHR launches through the server's own pages (no browser needed: plain
forms), the token response's fields and headers, refresh with and without scope, PKCE, codes, clients,
audiences, unauthorized access, limited and granular scopes, revocation, introspection, patient and
encounter context, OpenID Connect, and backend services with signed client assertions.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet

from conformance_tests import smart
from conformance_tests.client import FhirClient
from conformance_tests.smart import Choices, SmartSetup

LAB = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
REQUIRED_CAPABILITIES = {
    "launch-ehr", "launch-standalone", "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
    "sso-openid-connect", "context-ehr-patient", "context-ehr-encounter", "context-standalone-patient", "context-banner",
    "context-style", "permission-offline", "permission-online", "permission-patient", "permission-user", "permission-v1",
    "permission-v2", "authorize-post",
}


@pytest.fixture(scope="module")
def setup(smart_setup: SmartSetup) -> SmartSetup:
    return smart_setup


@pytest.fixture(scope="module")
def config(setup: SmartSetup) -> dict[str, Any]:
    return smart.discover(setup.fhir_base)


def fhir_as(setup: SmartSetup, token: str) -> FhirClient:
    return FhirClient(setup.fhir_base).with_token(token)


def assert_token_response(resp: requests.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    assert "no-store" in resp.headers.get("Cache-Control", "")
    assert resp.headers.get("Pragma") == "no-cache"
    assert resp.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = resp.json()
    assert body["access_token"] and body["token_type"].lower() == "bearer"
    assert isinstance(body["expires_in"], int) and 0 < body["expires_in"] <= 3600
    assert isinstance(body["scope"], str)
    return body


def assert_oauth_error(resp: requests.Response, *errors: str) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert body["error"] in errors, body
    assert "access_token" not in body


# --- discovery ---------------------------------------------------------------------------------------------

def test_smart_configuration_is_open_json_with_every_required_field(setup: SmartSetup) -> None:
    resp = requests.get(f"{setup.fhir_base}/.well-known/smart-configuration", headers={"Accept": "application/fhir+json"}, timeout=30)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    config = resp.json()
    for key in ("issuer", "jwks_uri", "authorization_endpoint", "token_endpoint", "introspection_endpoint", "revocation_endpoint",
                "grant_types_supported", "scopes_supported", "response_types_supported", "capabilities",
                "code_challenge_methods_supported", "token_endpoint_auth_methods_supported"):
        assert config.get(key), key
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert {"authorization_code", "client_credentials"} <= set(config["grant_types_supported"])
    assert {"private_key_jwt", "client_secret_basic"} <= set(config["token_endpoint_auth_methods_supported"])
    assert {"RS384", "ES384"} <= set(config["token_endpoint_auth_signing_alg_values_supported"])
    assert REQUIRED_CAPABILITIES <= set(config["capabilities"])
    assert requests.get(config["jwks_uri"], timeout=30).json()["keys"]


def test_capability_statement_names_smart_and_its_endpoints(setup: SmartSetup, config: dict[str, Any]) -> None:
    statement = requests.get(f"{setup.fhir_base}/metadata", headers={"Accept": "application/fhir+json"}, timeout=30).json()
    security = statement["rest"][0]["security"]
    codes = {c["code"] for s in security["service"] for c in s["coding"]}
    assert "SMART-on-FHIR" in codes
    uris = {e["url"]: e["valueUri"] for ext in security["extension"]
            if ext["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris" for e in ext["extension"]}
    assert uris["authorize"] == config["authorization_endpoint"]
    assert uris["token"] == config["token_endpoint"]


def test_openid_configuration(setup: SmartSetup, config: dict[str, Any]) -> None:
    oidc = requests.get(f"{config['issuer']}/.well-known/openid-configuration", timeout=30).json()
    assert oidc["issuer"] == config["issuer"]
    assert "RS256" in oidc["id_token_signing_alg_values_supported"]
    assert requests.get(oidc["jwks_uri"], timeout=30).status_code == 200


# --- unauthorized access -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token", "Basic dXNlcjpwYXNz", "Bearer", "Bearer " + "x" * 5000])
def test_fhir_requests_without_a_valid_token_are_401(setup: SmartSetup, authorization: str | None) -> None:
    headers = {"Accept": "application/fhir+json", **({"Authorization": authorization} if authorization else {})}
    resp = requests.get(f"{setup.fhir_base}/Patient/{setup.patient}", headers=headers, timeout=30)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert resp.json()["resourceType"] == "OperationOutcome"
    resp = requests.get(f"{setup.fhir_base}/Observation", params={"patient": setup.patient}, headers=headers, timeout=30)
    assert resp.status_code == 401


def test_metadata_and_discovery_need_no_token(setup: SmartSetup) -> None:
    assert requests.get(f"{setup.fhir_base}/metadata", timeout=30).status_code == 200
    assert requests.get(f"{setup.fhir_base}/.well-known/smart-configuration", timeout=30).status_code == 200


# --- the standalone launch -------------------------------------------------------------------------------------------

def test_standalone_launch_confidential_client(setup: SmartSetup, config: dict[str, Any]) -> None:
    scope = "launch/patient openid fhirUser offline_access patient/Patient.rs patient/Observation.rs"
    verifier, challenge = smart.pkce()
    params = smart.authorize_params(setup, setup.confidential, scope, challenge, nonce="n-0S6_WzA2Mj")
    redirect = smart.login(setup, params, setup.user, Choices(patient=setup.patient))
    assert redirect["state"] == [params["state"]]
    resp = smart.token_request(setup, setup.confidential, {"grant_type": "authorization_code", "code": redirect["code"][0],
                                                           "redirect_uri": setup.confidential.redirect_uri, "code_verifier": verifier})
    body = assert_token_response(resp)
    assert body["patient"] == setup.patient
    assert body["refresh_token"]
    assert set(body["scope"].split()) == set(scope.split())
    assert body["need_patient_banner"] in (True, False)
    assert body["smart_style_url"].startswith("http")
    assert requests.get(body["smart_style_url"], timeout=30).status_code == 200

    # The ID token: RS256, signed by a key of the server's JWKS, naming the user and the client.
    jwks = KeySet.import_key_set(requests.get(config["jwks_uri"], timeout=30).json())
    id_token = jwt.decode(body["id_token"], jwks, algorithms=["RS256"])
    claims = id_token.claims
    assert id_token.header["alg"] == "RS256"
    assert claims["iss"] == config["issuer"] and claims["aud"] in (setup.confidential.client_id, [setup.confidential.client_id])
    assert claims["sub"] and claims["exp"] > time.time() and claims["nonce"] == "n-0S6_WzA2Mj"
    assert claims["fhirUser"].startswith(setup.fhir_base + "/")

    client = fhir_as(setup, body["access_token"])
    assert client.get(claims["fhirUser"]).status_code == 200  # the fhirUser scope: read yourself
    assert client.get(f"Patient/{setup.patient}").status_code == 200
    found = client.get("Observation", params={"patient": setup.patient}).json()
    assert len(found.get("entry", [])) == 2
    everything = client.get("Observation").json()  # the patient/ grant keeps a search to the patient's compartment
    assert {e["resource"]["subject"]["reference"] for e in everything.get("entry", [])} == {f"Patient/{setup.patient}"}
    assert client.get(f"Patient/{setup.other_patient}").status_code in (403, 404)
    assert client.get("Encounter", params={"patient": setup.patient}).status_code == 403  # not granted
    write = client.post("Observation", {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                        "subject": {"reference": f"Patient/{setup.patient}"}})
    assert write.status_code == 403  # rs only


def test_standalone_launch_public_client_with_authorize_post(setup: SmartSetup) -> None:
    verifier, challenge = smart.pkce()
    params = smart.authorize_params(setup, setup.public, "launch/patient patient/*.rs", challenge)
    redirect = smart.login(setup, params, setup.user, Choices(patient=setup.other_patient), method="POST")
    resp = smart.token_request(setup, setup.public, {"grant_type": "authorization_code", "code": redirect["code"][0],
                                                     "redirect_uri": setup.public.redirect_uri, "code_verifier": verifier})
    body = assert_token_response(resp)
    assert body["patient"] == setup.other_patient
    assert "refresh_token" not in body  # neither offline_access nor online_access
    client = fhir_as(setup, body["access_token"])
    assert client.get(f"Patient/{setup.other_patient}").status_code == 200
    assert client.get(f"Patient/{setup.patient}").status_code in (403, 404)


def test_a_user_can_deny(setup: SmartSetup) -> None:
    _, challenge = smart.pkce()
    params = smart.authorize_params(setup, setup.confidential, "launch/patient patient/*.rs", challenge)
    redirect = smart.login(setup, params, setup.user, Choices(deny=True))
    assert redirect["error"] == ["access_denied"] and redirect["state"] == [params["state"]]
    assert "code" not in redirect


# --- refresh --------------------------------------------------------------------------------------------------------------

def test_refresh_without_and_with_scope_rotates_the_refresh_token(setup: SmartSetup) -> None:
    first = smart.launch_token(setup, "launch/patient offline_access patient/Patient.rs patient/Observation.rs",
                               choices=Choices(patient=setup.patient))
    resp = smart.token_request(setup, setup.confidential, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    second = assert_token_response(resp)
    assert set(second["scope"].split()) == set(first["scope"].split())
    assert second["refresh_token"] != first["refresh_token"] and second["patient"] == setup.patient
    resp = smart.token_request(setup, setup.confidential, {"grant_type": "refresh_token", "refresh_token": second["refresh_token"],
                                                           "scope": "patient/Patient.rs offline_access"})
    third = assert_token_response(resp)
    assert set(third["scope"].split()) == {"patient/Patient.rs", "offline_access"}
    client = fhir_as(setup, third["access_token"])
    assert client.get(f"Patient/{setup.patient}").status_code == 200
    assert client.get("Observation").status_code == 403  # narrowed on refresh

    # Asking for more than was granted fails.
    escalate = smart.token_request(setup, setup.confidential, {"grant_type": "refresh_token", "refresh_token": third["refresh_token"],
                                                               "scope": "patient/*.cruds offline_access"})
    assert_oauth_error(escalate, "invalid_scope")
    # A rotated refresh token presented again is refused, and takes its grant with it.
    replay = smart.token_request(setup, setup.confidential, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert_oauth_error(replay, "invalid_grant")
    assert client.get(f"Patient/{setup.patient}").status_code == 401


def test_refresh_needs_the_clients_own_credentials(setup: SmartSetup) -> None:
    first = smart.launch_token(setup, "launch/patient online_access patient/Patient.rs", choices=Choices(patient=setup.patient))
    assert first["refresh_token"]
    wrong = smart.token_request(setup, setup.public, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert_oauth_error(wrong, "invalid_grant", "invalid_client")


# --- PKCE, codes, clients, audiences, redirects -------------------------------------------------------------------------------

def _code(setup: SmartSetup, scope: str = "launch/patient patient/Patient.rs") -> tuple[str, str]:
    verifier, challenge = smart.pkce()
    redirect = smart.login(setup, smart.authorize_params(setup, setup.confidential, scope, challenge), setup.user,
                           Choices(patient=setup.patient))
    return redirect["code"][0], verifier


def _exchange(setup: SmartSetup, code: str, verifier: str | None, **extra: str) -> requests.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": setup.confidential.redirect_uri, **extra}
    if verifier is not None:
        data["code_verifier"] = verifier
    return smart.token_request(setup, setup.confidential, data)


def test_token_exchange_refuses_bad_pkce_verifiers(setup: SmartSetup) -> None:
    code, verifier = _code(setup)
    _, other_challenge = smart.pkce()
    challenge = smart.challenge_of(verifier)
    assert_oauth_error(_exchange(setup, code, None), "invalid_request", "invalid_grant")
    assert_oauth_error(_exchange(setup, code, ""), "invalid_request", "invalid_grant")
    assert_oauth_error(_exchange(setup, code, "x" * 43 + "wrong"), "invalid_request", "invalid_grant")
    assert_oauth_error(_exchange(setup, code, challenge), "invalid_request", "invalid_grant")  # the challenge as verifier
    assert_oauth_error(_exchange(setup, code, other_challenge), "invalid_request", "invalid_grant")
    assert_token_response(_exchange(setup, code, verifier))  # failed attempts do not spend the code


@pytest.mark.parametrize("pkce_params", [{}, {"code_challenge_method": "plain"}, {"code_challenge": ""},
                                         {"code_challenge_method": ""}])
def test_authorize_refuses_missing_or_plain_pkce(setup: SmartSetup, pkce_params: dict[str, str]) -> None:
    verifier, challenge = smart.pkce()
    params = smart.authorize_params(setup, setup.confidential, "launch/patient patient/*.rs", challenge)
    for key in ("code_challenge", "code_challenge_method"):
        params.pop(key)
    if pkce_params.get("code_challenge_method") == "plain":
        params["code_challenge"] = verifier
    params.update({k: v for k, v in pkce_params.items()})
    resp = requests.get(smart.discover(setup.fhir_base)["authorization_endpoint"], params=params, allow_redirects=False, timeout=30)
    assert resp.status_code == 302
    redirect = smart.query(resp.headers["Location"])
    assert redirect["error"] == ["invalid_request"] and "code" not in redirect
    assert resp.headers["Location"].startswith(setup.confidential.redirect_uri)


def test_a_code_works_once_and_its_reuse_revokes_the_grant(setup: SmartSetup) -> None:
    code, verifier = _code(setup)
    body = assert_token_response(_exchange(setup, code, verifier))
    client = fhir_as(setup, body["access_token"])
    assert client.get(f"Patient/{setup.patient}").status_code == 200
    assert_oauth_error(_exchange(setup, code, verifier), "invalid_grant")
    assert client.get(f"Patient/{setup.patient}").status_code == 401


def test_invalid_code_client_and_redirect_uri(setup: SmartSetup, config: dict[str, Any]) -> None:
    code, verifier = _code(setup)
    assert_oauth_error(_exchange(setup, "not-a-code", verifier), "invalid_grant")
    assert_oauth_error(_exchange(setup, code, verifier, redirect_uri="http://127.0.0.1:9/elsewhere"), "invalid_grant")
    wrong_secret = requests.post(config["token_endpoint"], auth=(setup.confidential.client_id, "wrong"), timeout=30,
                                 data={"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                                       "redirect_uri": setup.confidential.redirect_uri})
    assert wrong_secret.status_code == 401 and wrong_secret.json()["error"] == "invalid_client"
    unknown = requests.post(config["token_endpoint"], auth=("no-such-client", "x"), timeout=30,
                            data={"grant_type": "authorization_code", "code": code, "code_verifier": verifier})
    assert unknown.status_code == 401 and unknown.json()["error"] == "invalid_client"
    assert_oauth_error(requests.post(config["token_endpoint"], data={"grant_type": "password", "username": "a", "password": "b"},
                                     auth=(setup.confidential.client_id, setup.confidential.client_secret or ""), timeout=30),
                       "unsupported_grant_type", "unauthorized_client")
    assert_token_response(_exchange(setup, code, verifier))  # none of that spent the code


def test_authorize_refuses_a_wrong_aud(setup: SmartSetup, config: dict[str, Any]) -> None:
    _, challenge = smart.pkce()
    params = smart.authorize_params(setup, setup.confidential, "launch/patient patient/*.rs", challenge,
                                    aud="https://evil.example/fhir")
    resp = requests.get(config["authorization_endpoint"], params=params, allow_redirects=False, timeout=30)
    assert resp.status_code == 302
    redirect = smart.query(resp.headers["Location"])
    assert redirect["error"] == ["invalid_request"] and redirect["state"] == [params["state"]] and "code" not in redirect


@pytest.mark.parametrize("redirect_uri", ["https://evil.example/cb", smart.REDIRECT_URI + "/more", smart.REDIRECT_URI + "?x=1",
                                          "//evil.example", "javascript:alert(1)"])
def test_authorize_never_redirects_to_an_unregistered_uri(setup: SmartSetup, config: dict[str, Any], redirect_uri: str) -> None:
    _, challenge = smart.pkce()
    params = smart.authorize_params(setup, setup.confidential, "launch/patient patient/*.rs", challenge, redirect_uri=redirect_uri)
    resp = requests.get(config["authorization_endpoint"], params=params, allow_redirects=False, timeout=30)
    assert 400 <= resp.status_code < 500
    assert "Location" not in resp.headers


def test_authorize_with_an_unknown_client_or_oversized_parameters(setup: SmartSetup, config: dict[str, Any]) -> None:
    _, challenge = smart.pkce()
    unknown = smart.authorize_params(setup, smart.Client("no-such-client"), "patient/*.rs", challenge)
    resp = requests.get(config["authorization_endpoint"], params=unknown, allow_redirects=False, timeout=30)
    assert 400 <= resp.status_code < 500 and "Location" not in resp.headers
    huge = smart.authorize_params(setup, setup.confidential, "patient/Patient.rs " * 5000, challenge, state="s" * 20000)
    resp = requests.post(config["authorization_endpoint"], data=huge, allow_redirects=False, timeout=30)
    assert 300 <= resp.status_code < 500
    resp = requests.post(config["token_endpoint"], data={"grant_type": "authorization_code", "code": "c" * 100_000},
                         auth=(setup.confidential.client_id, setup.confidential.client_secret or ""), timeout=30)
    assert 400 <= resp.status_code < 500


# --- scopes: limited, granular, v1 --------------------------------------------------------------------------------------------

def test_limited_scopes_a_user_unticked_are_not_granted(setup: SmartSetup) -> None:
    body = smart.launch_token(setup, "launch/patient patient/Patient.rs patient/Observation.rs patient/Encounter.rs",
                              choices=Choices(patient=setup.patient, untick=("patient/Observation.rs",)))
    assert set(body["scope"].split()) == {"launch/patient", "patient/Patient.rs", "patient/Encounter.rs"}
    client = fhir_as(setup, body["access_token"])
    assert client.get(f"Patient/{setup.patient}").status_code == 200
    assert client.get(f"Encounter/{setup.encounter}").status_code == 200
    resp = client.get("Observation", params={"patient": setup.patient})
    assert resp.status_code == 403 and resp.json()["resourceType"] == "OperationOutcome"


def test_granular_scopes_narrow_searches_and_reads(setup: SmartSetup) -> None:
    scope = f"launch/patient patient/Patient.rs patient/Observation.rs?category={LAB}"
    body = smart.launch_token(setup, scope, choices=Choices(patient=setup.patient))
    assert f"patient/Observation.rs?category={LAB}" in body["scope"].split()
    client = fhir_as(setup, body["access_token"])
    found = client.get("Observation", params={"patient": setup.patient}).json()
    categories = [c["code"] for e in found["entry"] for cat in e["resource"]["category"] for c in cat["coding"]]
    assert categories == ["laboratory"]
    vital = client.get("Observation", params={"patient": setup.patient, "category": "vital-signs"}).json()
    assert vital.get("entry", []) == []
    # Reading the vital-signs Observation by id is refused: it is outside the grant.
    full = smart.launch_token(setup, "launch/patient patient/Observation.rs", choices=Choices(patient=setup.patient))
    all_obs = fhir_as(setup, full["access_token"]).get("Observation", params={"patient": setup.patient}).json()
    vital_id = next(e["resource"]["id"] for e in all_obs["entry"]
                    if e["resource"]["category"][0]["coding"][0]["code"] == "vital-signs")
    assert client.get(f"Observation/{vital_id}").status_code in (403, 404)


def test_a_user_can_narrow_resource_scopes_to_categories(setup: SmartSetup) -> None:
    """ONC (g)(10) granular scope selection: asked for patient/Observation.rs and patient/Condition.rs, the user
    grants only some categories of each."""
    condition = "http://terminology.hl7.org/CodeSystem/condition-category|problem-list-item"
    lab_scope = f"patient/Observation.rs?category={LAB}"
    problem_scope = f"patient/Condition.rs?category={condition}"
    body = smart.launch_token(setup, "launch/patient patient/Patient.rs patient/Observation.rs patient/Condition.rs",
                              choices=Choices(patient=setup.patient, untick=("patient/Observation.rs", "patient/Condition.rs"),
                                              tick=(lab_scope, problem_scope)))
    assert set(body["scope"].split()) == {"launch/patient", "patient/Patient.rs", lab_scope, problem_scope}
    client = fhir_as(setup, body["access_token"])
    found = client.get("Observation", params={"patient": setup.patient}).json()
    assert [c["code"] for e in found["entry"] for cat in e["resource"]["category"] for c in cat["coding"]] == ["laboratory"]
    assert client.get("Condition", params={"patient": setup.patient}).status_code == 200


def test_discovery_is_readable_from_any_origin(setup: SmartSetup) -> None:
    for path in (".well-known/smart-configuration", "metadata"):
        resp = requests.get(f"{setup.fhir_base}/{path}", headers={"Origin": "https://inferno.example"}, timeout=30)
        assert resp.headers.get("Access-Control-Allow-Origin") in ("*", "https://inferno.example"), path


def test_v1_scopes(setup: SmartSetup) -> None:
    body = smart.launch_token(setup, "launch/patient patient/*.read", choices=Choices(patient=setup.patient))
    client = fhir_as(setup, body["access_token"])
    assert client.get(f"Patient/{setup.patient}").status_code == 200
    assert client.get("Observation").status_code == 200
    write = client.post("Observation", {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                        "subject": {"reference": f"Patient/{setup.patient}"}})
    assert write.status_code == 403


def test_patient_write_scopes_stay_in_the_compartment(setup: SmartSetup) -> None:
    body = smart.launch_token(setup, "launch/patient patient/Observation.cruds", choices=Choices(patient=setup.patient))
    client = fhir_as(setup, body["access_token"])
    mine = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": f"Patient/{setup.patient}"}}
    created = client.post("Observation", mine)
    assert created.status_code == 201
    theirs = {**mine, "subject": {"reference": f"Patient/{setup.other_patient}"}}
    assert client.post("Observation", theirs).status_code == 403
    moved = {**created.json(), "subject": {"reference": f"Patient/{setup.other_patient}"}}
    assert client.put(f"Observation/{moved['id']}", moved).status_code == 403
    assert client.delete(f"Observation/{moved['id']}").status_code in (200, 204)


# --- revocation and introspection --------------------------------------------------------------------------------------------------

def test_revocation_takes_effect_at_once(setup: SmartSetup, config: dict[str, Any]) -> None:
    body = smart.launch_token(setup, "launch/patient offline_access patient/Patient.rs", choices=Choices(patient=setup.patient))
    client = fhir_as(setup, body["access_token"])
    assert client.get(f"Patient/{setup.patient}").status_code == 200
    auth = (setup.confidential.client_id, setup.confidential.client_secret or "")
    introspect = requests.post(config["introspection_endpoint"], data={"token": body["access_token"]}, auth=auth, timeout=30).json()
    assert introspect["active"] is True and introspect["patient"] == setup.patient and introspect["client_id"] == setup.confidential.client_id
    assert introspect["scope"] == body["scope"]
    assert requests.post(config["revocation_endpoint"], data={"token": body["access_token"]}, auth=auth, timeout=30).status_code == 200
    assert client.get(f"Patient/{setup.patient}").status_code == 401
    introspect = requests.post(config["introspection_endpoint"], data={"token": body["access_token"]}, auth=auth, timeout=30).json()
    assert introspect == {"active": False}
    # Revoking the refresh token ends the grant: it cannot be refreshed any more.
    assert requests.post(config["revocation_endpoint"], data={"token": body["refresh_token"], "token_type_hint": "refresh_token"},
                         auth=auth, timeout=30).status_code == 200
    again = smart.token_request(setup, setup.confidential, {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert_oauth_error(again, "invalid_grant")
    # An unknown token: revocation says 200 all the same (RFC 7009), introspection says inactive.
    assert requests.post(config["revocation_endpoint"], data={"token": "unknown"}, auth=auth, timeout=30).status_code == 200
    assert requests.post(config["introspection_endpoint"], data={"token": "unknown"}, auth=auth, timeout=30).json() == {"active": False}


# --- EHR launch: patient and encounter context --------------------------------------------------------------------------------------

def test_ehr_launch_with_patient_and_encounter_context(setup: SmartSetup, config: dict[str, Any]) -> None:
    if setup.launch is None:
        pytest.skip("no way to make an EHR launch on this server")
    launch = setup.launch(setup.patient, setup.encounter)
    body = smart.launch_token(setup, "launch openid fhirUser patient/Patient.rs patient/Encounter.rs", launch=launch)
    assert body["patient"] == setup.patient and body["encounter"] == setup.encounter
    assert "need_patient_banner" in body and "smart_style_url" in body
    client = fhir_as(setup, body["access_token"])
    assert client.get(f"Encounter/{setup.encounter}").status_code == 200

    _, challenge = smart.pkce()
    params = smart.authorize_params(setup, setup.confidential, "launch patient/*.rs", challenge, launch="not-a-launch")
    resp = requests.get(config["authorization_endpoint"], params=params, allow_redirects=False, timeout=30)
    assert resp.status_code == 302 and smart.query(resp.headers["Location"])["error"] == ["invalid_request"]


# --- multi-factor login and break-glass -------------------------------------------------------------------------------------------------

def test_mfa_user_logs_in_with_totp_and_can_break_the_glass(setup: SmartSetup) -> None:
    body = smart.launch_token(setup, "launch/patient offline_access patient/Patient.rs", user=setup.mfa_user,
                              choices=Choices(patient=setup.patient, break_glass_reason="unconscious patient in the ED"))
    assert "user/*.rs" in body["scope"].split()
    assert body["expires_in"] <= 900 and "refresh_token" not in body
    client = fhir_as(setup, body["access_token"])
    assert client.get(f"Patient/{setup.other_patient}").status_code == 200  # emergency access reaches beyond the patient


def test_wrong_totp_code_is_refused(setup: SmartSetup) -> None:
    _, challenge = smart.pkce()
    params = smart.authorize_params(setup, setup.confidential, "launch/patient patient/*.rs", challenge)
    http = requests.Session()
    wrong = smart.User(setup.mfa_user.username, setup.mfa_user.password, "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    with pytest.raises(AssertionError, match="401"):
        smart.login(setup, params, wrong, http=http)


# --- backend services ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_backend_services_token_with_a_signed_assertion(setup: SmartSetup, config: dict[str, Any], alg: str) -> None:
    assertion = smart.client_assertion(setup.backend, config["token_endpoint"], alg=alg)
    body = assert_token_response(smart.backend_token_request(setup, "system/Patient.rs system/Observation.rs", assertion))
    assert body["expires_in"] <= 300 and "refresh_token" not in body
    assert set(body["scope"].split()) == {"system/Patient.rs", "system/Observation.rs"}
    client = fhir_as(setup, body["access_token"])
    assert client.get(f"Patient/{setup.other_patient}").status_code == 200
    assert client.get("Observation", params={"patient": setup.patient}).json()["resourceType"] == "Bundle"
    assert client.get("Encounter").status_code == 403  # not in the token's scope
    # The same assertion a second time: its jti was used.
    assert_oauth_error(smart.backend_token_request(setup, "system/Patient.rs", assertion), "invalid_client")


def test_backend_services_scopes_stay_within_the_registration(setup: SmartSetup) -> None:
    assert_oauth_error(smart.backend_token_request(setup, "patient/*.rs"), "invalid_scope")
    assert_oauth_error(smart.backend_token_request(setup, "system/Observation.cruds"), "invalid_scope")
    body = assert_token_response(smart.backend_token_request(setup, "system/Patient.cruds system/Observation.c"))
    assert body["scope"] == "system/Patient.cruds"


def _bad_assertions(setup: SmartSetup, token_url: str) -> dict[str, str]:
    kid, _ = smart.signing_key(setup.backend)
    now = int(time.time())
    claims = {"iss": setup.backend.client_id, "sub": setup.backend.client_id, "aud": token_url, "exp": now + 120, "jti": "j"}
    rsa_public = next(k for k in setup.backend.private_jwks["keys"] if k["kty"] == "RSA")  # type: ignore[index]
    public_pem = smart.RSAKey.import_key({k: v for k, v in rsa_public.items() if k in ("kty", "n", "e")}).as_pem(private=False)
    return {
        "alg none": smart.unsigned({**claims, "jti": "none-1"}, {"alg": "none", "kid": kid, "typ": "JWT"}),
        "HS256 with the public key": smart.hs256({**claims, "jti": "hs-1"}, {"alg": "HS256", "kid": kid, "typ": "JWT"}, public_pem),
        "RS256": smart.client_assertion(setup.backend, token_url, alg="RS384", header={"alg": "RS256"}),
        "expired": smart.client_assertion(setup.backend, token_url, lifetime=-120),
        "exp too far ahead": smart.client_assertion(setup.backend, token_url, lifetime=3600),
        "not yet valid": smart.client_assertion(setup.backend, token_url, claims={"nbf": now + 600, "iat": now + 600}),
        "absurd exp": smart.client_assertion(setup.backend, token_url, claims={"exp": 1e300}),
        "control characters in jti": smart.client_assertion(setup.backend, token_url, claims={"jti": "a\u0000b"}),
        "unknown kid": smart.client_assertion(setup.backend, token_url, header={"kid": "no-such-key"}),
        "wrong aud": smart.client_assertion(setup.backend, token_url, claims={"aud": "https://evil.example/token"}),
        "wrong iss": smart.client_assertion(setup.backend, token_url, claims={"iss": "someone-else"}),
        "no jti": smart.client_assertion(setup.backend, token_url, claims={"jti": None}),
        "signed by another key": smart.client_assertion(setup.backend, token_url,
                                                        key=smart.RSAKey.generate_key(2048, private=True)),
        "malformed": "not.a.jwt",
        "garbage": "x" * 5000,
    }


def test_backend_services_refuse_bad_assertions(setup: SmartSetup, config: dict[str, Any]) -> None:
    for name, assertion in _bad_assertions(setup, config["token_endpoint"]).items():
        resp = smart.backend_token_request(setup, "system/Patient.rs", assertion)
        assert resp.status_code == 400, (name, resp.status_code, resp.text[:300])  # RFC 6749 5.2: no Authorization header
        assert resp.json()["error"] in ("invalid_client", "invalid_request", "invalid_grant"), (name, resp.text)
        assert "access_token" not in resp.json(), name
    wrong_type = smart.backend_token_request(setup, "system/Patient.rs", client_assertion_type="not_an_assertion_type")
    assert wrong_type.status_code == 400 and wrong_type.json()["error"] == "invalid_client"
