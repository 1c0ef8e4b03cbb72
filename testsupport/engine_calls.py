"""Calling the engine the way api/ does, without HTTP (for engine and storage tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fhir_server import fhirjson
from fhir_server.engine.engine import Engine
from fhir_server.engine.request import FhirRequest, FhirResponse
from fhir_server.security.access import INTERNAL


def call(engine: Engine, tenant: str, method: str, path: str, body: Any = None, **kw: Any) -> FhirResponse:
    """One request; the server's own access unless ``access=`` says otherwise."""
    req = FhirRequest(
        method=method,
        tenant=tenant,
        path=tuple(p for p in path.split("/") if p),
        base_url=f"http://test/fhir/{tenant}",
        access=kw.pop("access", INTERNAL),
        body=body,
        **kw,
    )
    return engine.handle(req)


def resource(resp: FhirResponse) -> dict[str, Any]:
    """The response body as plain JSON (stored fragments parsed)."""
    return fhirjson.loads_stored(fhirjson.dumps(resp.body))  # type: ignore[no-any-return]


def patient(pid: str | None = None, family: str = "Doe") -> dict[str, Any]:
    p: dict[str, Any] = {"resourceType": "Patient", "name": [{"family": family}]}
    if pid:
        p["id"] = pid
    return p


def in_threads(work: Callable[[], object], count: int) -> None:
    """Run ``work`` in ``count`` threads at once; re-raise the first error any of them met."""
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
