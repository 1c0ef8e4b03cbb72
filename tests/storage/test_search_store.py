"""SearchStore statements on both back-ends."""

from __future__ import annotations

from sqlalchemy import text

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
