"""SearchStore statements on both back-ends."""

from __future__ import annotations

import pytest
from sqlalchemy import Integer, cast, literal, text
from sqlalchemy.exc import DBAPIError

from fhir_server.engine.engine import Engine
from fhir_server.storage.search_store import R, SearchStore
from testsupport.engine_calls import call, patient


def test_ids_many_answers_each_query_and_leaves_the_plan_setting_as_it_was(engine: Engine, tenant: str) -> None:
    for pid in ("a", "b", "c"):
        call(engine, tenant, "PUT", f"Patient/{pid}", patient(pid, f"Fam{pid}"))
    with engine.storage.session(tenant, write=True) as repo:  # (where transactions search their conditional entries)
        postgres = repo.conn.dialect.name == "postgresql"
        if postgres:  # what a deployment (or an earlier statement of the transaction) set stays set
            repo.conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        store = SearchStore(repo)
        base = store.base_conditions(("Patient",))
        got = store.ids_many([
            ([*base, R.c.res_id.in_(["a", "b"])], 1),
            ([*base, R.c.res_id.in_(["c", "zz"])], 2),
            ([*base, R.c.res_id == "none"], 2),
            ([*base], 5),
        ])
        assert got == [["a"], ["c"], [], ["a", "b", "c"]]
        if postgres:
            assert repo.conn.execute(text("SELECT current_setting('plan_cache_mode')")).scalar_one() == "force_custom_plan"


def test_a_failing_ids_many_raises_its_own_error(engine: Engine, tenant: str) -> None:
    """Not "current transaction is aborted" from putting the plan setting back: storage_errors maps a deadlock
    or serialization failure by its SQLSTATE (to 409)."""
    if not engine.storage.db.is_postgres:
        pytest.skip("the plan setting is PostgreSQL's (and SQLite divides by zero into NULL)")
    call(engine, tenant, "PUT", "Patient/a", patient("a"))
    with pytest.raises(DBAPIError) as info, engine.storage.session(tenant, write=True) as repo:
        store = SearchStore(repo)
        base = store.base_conditions(("Patient",))
        failing = cast(literal(1) / literal(0), Integer) == 1
        store.ids_many([([*base, failing], 1), ([*base, failing], 1)])
    assert getattr(info.value.orig, "sqlstate", None) == "22012"  # division_by_zero
