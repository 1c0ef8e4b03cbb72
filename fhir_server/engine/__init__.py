"""The FHIR interactions, transport-agnostic: ``Engine.handle(FhirRequest) -> FhirResponse``."""
