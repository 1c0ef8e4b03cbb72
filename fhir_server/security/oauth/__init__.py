"""SMART on FHIR authorization server: records (store), the OAuth 2.0 server (server), bearer tokens (bearer)."""

from urllib.parse import urlencode, urlsplit


def auth_base_for(fhir_base: str) -> str:
    """The tenant's authorization server URL (``{root}/auth/{tenant}``) from its FHIR base (``{root}/fhir/{tenant}``)."""
    root, _, tenant = fhir_base.rstrip("/").rpartition("/fhir/")
    return f"{root}/auth/{tenant}"


def smart_security(fhir_base: str) -> dict[str, object]:
    """CapabilityStatement.rest.security: SMART on FHIR, with the oauth-uris extension some clients read."""
    auth = auth_base_for(fhir_base)
    return {
        "cors": True,
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                 "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}],
                     "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)"}],
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [
                {"url": "authorize", "valueUri": f"{auth}/authorize"},
                {"url": "token", "valueUri": f"{auth}/token"},
                {"url": "introspect", "valueUri": f"{auth}/introspect"},
                {"url": "revoke", "valueUri": f"{auth}/revoke"},
            ],
        }],
        "description": f"SMART App Launch 2.0 and Backend Services; discovery at {fhir_base}/.well-known/smart-configuration",
    }


def app_launch(app_launch_url: str, iss: str, launch_id: str) -> str:
    """The URL an EHR opens to launch an app: the app's launch URL with ``iss`` and ``launch`` (SMART EHR launch)."""
    separator = "&" if urlsplit(app_launch_url).query else "?"
    return f"{app_launch_url}{separator}{urlencode({'iss': iss, 'launch': launch_id})}"
