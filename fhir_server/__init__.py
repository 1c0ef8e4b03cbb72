"""fhir-server: a resource-agnostic FHIR R4 server."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fhir-server")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
