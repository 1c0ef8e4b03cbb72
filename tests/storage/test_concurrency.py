"""Concurrent writers: gapless versions and exactly-one-wins under If-Match."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from fhir_server.engine.engine import Engine
from fhir_server.errors import PreconditionFailed

from testsupport.engine_calls import call, patient

THREADS = 12


def run_concurrently(n: int, fn) -> list:  # type: ignore[no-untyped-def, type-arg]
    barrier = threading.Barrier(n)

    def task(i: int):  # type: ignore[no-untyped-def]
        barrier.wait()
        try:
            return fn(i)
        except Exception as exc:  # noqa: BLE001 - the test inspects what each thread got
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(task, range(n)))


def test_concurrent_updates_yield_gapless_versions(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/c", patient("c"))
    results = run_concurrently(THREADS, lambda i: call(engine, tenant, "PUT", "Patient/c", patient("c", f"F{i}")))
    assert all(not isinstance(r, Exception) for r in results), results
    versions = sorted(int(r.headers["ETag"][3:-1]) for r in results)
    assert versions == list(range(2, THREADS + 2))
    history = call(engine, tenant, "GET", "Patient/c/_history", params=(("_count", "100"),)).body
    assert history["total"] == THREADS + 1  # type: ignore[index]


def test_concurrent_if_match_exactly_one_wins(engine: Engine, tenant: str) -> None:
    call(engine, tenant, "PUT", "Patient/m", patient("m"))
    results = run_concurrently(THREADS, lambda i: call(engine, tenant, "PUT", "Patient/m", patient("m", f"F{i}"), if_match='W/"1"'))
    wins = [r for r in results if not isinstance(r, Exception)]
    losses = [r for r in results if isinstance(r, PreconditionFailed)]
    assert len(wins) == 1 and len(losses) == THREADS - 1, results
    assert wins[0].headers["ETag"] == 'W/"2"'


def test_concurrent_create_on_update_of_one_id(engine: Engine, tenant: str) -> None:
    results = run_concurrently(THREADS, lambda i: call(engine, tenant, "PUT", "Patient/new", patient("new", f"F{i}")))
    assert all(not isinstance(r, Exception) for r in results), results
    assert sorted(r.status for r in results) == [200] * (THREADS - 1) + [201]
    assert sorted(int(r.headers["ETag"][3:-1]) for r in results) == list(range(1, THREADS + 1))


@pytest.mark.parametrize("n", [THREADS])
def test_concurrent_creates_all_land(engine: Engine, tenant: str, n: int) -> None:
    results = run_concurrently(n, lambda i: call(engine, tenant, "POST", "Patient", patient()))
    assert all(r.status == 201 for r in results), results
    history = call(engine, tenant, "GET", "Patient/_history", params=(("_count", "100"),)).body
    assert len(history["entry"]) == n  # type: ignore[index]
