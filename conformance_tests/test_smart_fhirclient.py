"""The Python ``fhirclient`` package (SMART's own client library, written by nobody here) against this server:
a standalone launch with PKCE and a read of the patient, and a backend-services token with a JWT the test signs."""

from __future__ import annotations

import pytest

from conformance_tests import smart
from conformance_tests.smart import Choices, SmartSetup

fhirclient = pytest.importorskip("fhirclient.client")


def test_fhirclient_standalone_launch_with_pkce(smart_setup: SmartSetup) -> None:
    setup = smart_setup
    app = fhirclient.FHIRClient(settings={
        "app_id": setup.public.client_id,
        "api_base": setup.fhir_base,
        "redirect_uri": setup.public.redirect_uri,
        "scope": "openid fhirUser patient/Patient.rs patient/Observation.rs",  # fhirclient adds launch/patient itself
    })
    url = app.authorize_url  # reads the CapabilityStatement (its oauth-uris extension) with fhirclient's own models
    query = smart.query(url)
    assert query["code_challenge_method"] == ["S256"] and query["aud"] == [setup.fhir_base]
    redirect = smart.login_at(url, setup.public.redirect_uri, setup.user, Choices(patient=setup.patient))
    app.handle_callback(smart.with_query(setup.public.redirect_uri, {k: v[0] for k, v in redirect.items()}))
    assert app.ready and app.patient_id == setup.patient

    patient = app.patient  # a read with the access token, parsed by fhirclient's R4 models
    assert patient is not None and patient.id == setup.patient
    assert patient.name[0].family == "Aardvark"

    from fhirclient.models.observation import Observation

    found = list(Observation.where({"patient": setup.patient}).perform_resources_iter(app.server))
    assert len(found) >= 2 and all(o.subject.reference == f"Patient/{setup.patient}" for o in found)

    from fhirclient.models.patient import Patient
    from fhirclient.server import FHIRPermissionDeniedException, FHIRNotFoundException

    with pytest.raises((FHIRPermissionDeniedException, FHIRNotFoundException)):
        Patient.read(setup.other_patient, app.server)


def test_fhirclient_backend_services_with_a_signed_jwt(smart_setup: SmartSetup) -> None:
    setup = smart_setup
    token_url = smart.discover(setup.fhir_base)["token_endpoint"]
    app = fhirclient.FHIRClient(settings={
        "app_id": setup.backend.client_id,
        "api_base": setup.fhir_base,
        "scope": "system/Patient.rs system/Observation.rs",
        "jwt_token": smart.client_assertion(setup.backend, token_url, alg="ES384"),
    })
    app.wants_patient = False
    app.prepare()
    app.authorize()
    assert app.ready

    from fhirclient.models.patient import Patient

    patient = Patient.read(setup.other_patient, app.server)
    assert patient.name[0].family == "Zebra"
    bundle = list(Patient.where({"_id": f"{setup.patient},{setup.other_patient}"}).perform_resources_iter(app.server))
    assert {p.id for p in bundle} == {setup.patient, setup.other_patient}
