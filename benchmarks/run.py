"""Run the benchmark workloads against a PostgreSQL-backed server started as in production.

    python -m benchmarks.run [--quick] [--patients N] [--seconds S] [--profile] [--skip-d2] [--d2-patients N]

Writes benchmarks/results/<date>-<commit>.json and prints a Markdown table. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from benchmarks import datagen, profiling
from benchmarks.hl7 import mllp_workload
from benchmarks.harness import BIN, DEFAULT_ADMIN, ROOT, Database, Server, create_database, start_fhir_server, start_gunicorn_app, wrk

RESULTS = Path(__file__).resolve().parent / "results"
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, short runs (under 3 minutes)")
    parser.add_argument("--patients", type=int, default=None, help="patients in the main data set (D1 = 1000)")
    parser.add_argument("--seconds", type=int, default=None, help="duration of each wrk run")
    parser.add_argument("--only", choices=["audit", "encryption"], default=None,
                        help="run only this same-build comparison (quick to repeat while working on one cost)")
    parser.add_argument("--profile", action="store_true",
                        help="after each workload's measured run, run it again under py-spy and report where the time goes")
    parser.add_argument("--skip-d2", action="store_true", help="a full run without W8 (loading D2 takes about 25 minutes)")
    parser.add_argument("--d2-patients", type=int, default=10000, help="patients in the large data set of W8 (D2 = 10000)")
    parser.add_argument("--admin-url", default=os.environ.get("FHIR_BENCH_POSTGRES_URL") or os.environ.get("FHIR_TEST_POSTGRES_URL") or DEFAULT_ADMIN)
    args = parser.parse_args(argv)
    patients = args.patients or (60 if args.quick else 1000)
    seconds = args.seconds or (5 if args.quick else 20)
    small = 20 if args.quick else 100
    rounds = 3 if args.quick else 5  # of each same-build comparison (compared by their medians)
    work = Path(tempfile.mkdtemp(prefix="fhir-bench-"))
    if args.only:
        return _only(args.only, work, args.admin_url, list(datagen.patients(small)), seconds)
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "mode": "quick" if args.quick else "full",
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {"patients": patients, "seconds": seconds, "workers": 3, "threads": 2,
                     "auth": "SMART backend-services bearer token on every request",
                     "audit": "on: an AuditEvent for every request", "encryption": "aes-256-gcm"},
        "workloads": {},
        "baselines": {},
        "profiles": {},
        "audit_backlog": {},
    }
    databases: list[Database] = []
    servers: list[Server] = []
    try:
        db = create_database(args.admin_url)
        databases.append(db)
        server = start_fhir_server(db, work / "main")
        servers.append(server)
        _log(f"server up at {server.base_url}; loading {patients} patients")
        ingest(server, [datagen.shared_bundle()], uploaders=1)
        bundles = list(datagen.patients(patients))
        settle = _settler(server, results["audit_backlog"])
        results["workloads"]["W1"] = ingest(server, bundles, uploaders=4)
        settle("W1")
        analyze(db)  # fresh statistics, as autovacuum would gather on a database in service
        records = [_record(b) for b in bundles]
        paths = _write_paths(work, server, records)
        w = results["workloads"]
        profile = _profiler(server, work, results["profiles"], settle) if args.profile else None
        w.update(read_search_workloads(server, paths, seconds, profile, "w3", settle))
        w["W5"] = count_workload(server, paths, seconds)
        settle("W5")
        if profile:
            profile("W5", lambda s: count_workload(server, paths, s))
        _log("W5 done")
        w["W6"] = readout(server)
        settle("W6")
        if profile:
            profile("W6", lambda s: _repeat(s, lambda: readout(server)))
        _log("W6 done")
        w["chains"] = chain_queries(server, db)
        settle("chains")
        _log("chain and _has queries done")
        if profile:  # W1 again, on patients that come after the data set: D2 carries on from them
            more = _until(10, datagen.patients(args.d2_patients, start=len(records)))
            profile("W1", lambda s: ingest(server, more, uploaders=4, keep=lambda b: records.append(_record(b))))
        w["W7"] = {"status": "not run: the feature has not landed ($everything)"}
        w["W9"] = mllp_workload(server, work, seconds, processes=2)  # one listener process per core
        settle("W9")
        _log("W9 done")
        results["peak_worker_rss_mib"] = server.peak_rss_mib()
        results["baselines"] = baselines(work, db, server, paths, seconds)
        _log("baselines done")
        results["encryption"] = encryption_cost(work, args.admin_url, bundles[:small], seconds, databases, servers, rounds)
        _log("encryption comparison done")
        results["audit"] = audit_cost(work, args.admin_url, bundles[:small], seconds, databases, servers, rounds)
        _log("audit comparison done")
        if args.quick or args.skip_d2:
            w["W8"] = {"status": f"not run in this mode ({'quick' if args.quick else '--skip-d2'})"}
        else:
            _retire(servers[1:], databases[1:])  # the comparison servers: D2 has the machine to itself
            del servers[1:], databases[1:]
            del bundles
            w["W8"] = large_data_set(work, server, db, records, args.d2_patients, seconds, w, profile, settle)
            results["peak_worker_rss_mib"] = max(results["peak_worker_rss_mib"], server.peak_rss_mib())
            _log("W8 done")
    finally:
        _retire(servers, databases)
    RESULTS.mkdir(exist_ok=True)
    sized = f"-{patients}-patients" if args.patients else ""  # a non-default size never overwrites a default run
    out = RESULTS / f"{dt.date.today().isoformat()}-{results['commit']}{'-quick' if args.quick else ''}{sized}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"\nresults written to {out.relative_to(ROOT)}")
    return 0


def _retire(servers: list[Server], databases: list[Database]) -> None:
    for s in servers:
        s.stop()
    for d in databases:
        try:
            d.drop()
        except Exception as exc:  # noqa: BLE001 - cleanup must not hide the results
            _log(f"could not drop {d.name}: {exc}")


def read_search_workloads(server: Server, paths: dict[str, Path], seconds: int,
                          profile: Callable[[str, Callable[[int], Any]], None] | None, run_id: str,
                          settle: Callable[[str], None]) -> dict[str, Any]:
    """W2 (read by id, 1 and 16 connections), W3 (create/read/update/delete) and W4 (search mix): what W8 repeats.
    ``settle(name)`` after each run, so that no run's deferred audit indexing lands on the next."""
    def reads(connections: int, threads: int) -> Callable[[int], Any]:
        return lambda s: wrk(server.base_url, "paths.lua", [str(paths["reads"])], connections=connections, threads=threads,
                             seconds=s, headers=server.headers()).__dict__

    def crud(s: int, suffix: str = "") -> dict[str, Any]:
        return wrk(server.base_url, "crud.lua", [_path(server), run_id + suffix], connections=32, threads=32, seconds=s,
                   headers=server.headers()).__dict__

    def search(s: int) -> dict[str, Any]:
        return wrk(server.base_url, "paths.lua", [str(paths["search"])], connections=16, threads=2, seconds=s,
                   headers=server.headers()).__dict__

    prefix = "" if run_id == "w3" else f"{run_id} "
    one = reads(1, 1)(seconds)
    settle(f"{prefix}W2 1 connection")
    out: dict[str, Any] = {"W2": {"1 connection": one, "16 connections": reads(16, 2)(seconds)}}
    settle(f"{prefix}W2 16 connections")
    if profile:
        profile(f"{prefix}W2 16 connections", reads(16, 2))
    _log(f"{prefix}W2 done")
    out["W3"] = crud(seconds)
    settle(f"{prefix}W3")
    if profile:
        profile(f"{prefix}W3", lambda s: crud(s, "p"))
    _log(f"{prefix}W3 done")
    out["W4"] = search(seconds)
    settle(f"{prefix}W4")
    if profile:
        profile(f"{prefix}W4", search)
    _log(f"{prefix}W4 done")
    return out


def _settler(server: Server, into: dict[str, Any]) -> Callable[[str], None]:
    """``settle(name)``: after the run ``name``, the audit records the server deferred to idle moments are chained and
    indexed at once (``_index_audit_backlog``), so that this work is not measured as part of the next run; what it
    took goes into ``into``."""
    def settle(name: str) -> None:
        into[name] = _index_audit_backlog(server)

    return settle


def _profiler(server: Server, work: Path, into: dict[str, Any],
              settle: Callable[[str], None]) -> Callable[[str, Callable[[int], Any]], None]:
    """``profile(name, run)``: ``run(seconds)`` once more under py-spy (after the measured run, so that the figures
    are not the profiler's); the summary goes into ``into``, the collapsed stacks into results/profiles/."""
    folder = RESULTS / "profiles" / f"{dt.date.today().isoformat()}-{_commit()}"

    def profile(name: str, run: Callable[[int], Any]) -> None:
        if not profiling.available():
            into[name] = {"error": "py-spy is not installed (make bench-tools installs it)"}
            return
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / (name.replace(" ", "-").replace("/", "-") + ".txt")
        for _ in range(2):  # py-spy sampling a running process now and then exits without a word: once more
            into[name] = profiling.sample(server.proc.pid, out, PROFILE_SECONDS, lambda: run(PROFILE_SECONDS))
            if "error" not in into[name]:
                break
        settle(f"{name} profiled")
        _log(f"{name} profiled")

    return profile


PROFILE_SECONDS = 8


def _repeat(seconds: int, run: Callable[[], Any]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        run()


def _until(seconds: float, items: Iterable[Any]) -> Iterator[Any]:
    """``items`` until ``seconds`` have passed since the first was taken."""
    deadline = None
    for item in items:
        deadline = deadline or time.monotonic() + seconds
        if time.monotonic() > deadline:
            return
        yield item


def _only(which: str, work: Path, admin_url: str, bundles: list[dict[str, Any]], seconds: int) -> int:
    databases: list[Database] = []
    servers: list[Server] = []
    try:
        compare = audit_cost if which == "audit" else encryption_cost
        result = compare(work, admin_url, bundles, seconds, databases, servers)
    finally:
        for s in servers:
            s.stop()
        for d in databases:
            d.drop()
    print(json.dumps({k: result[k] for k in ("median_rps", "all_rps", "cost_pct", "goal", "indexing") if k in result}))
    return 0


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _path(server: Server) -> str:
    return "/" + server.base_url.split("/", 3)[3] + "/"


# --- W1: ingest --------------------------------------------------------------------------------------

def ingest(server: Server, bundles: Iterable[dict[str, Any]], *, uploaders: int,
           keep: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Each patient's record posted as one transaction Bundle, by ``uploaders`` concurrent clients. ``bundles`` may be
    a generator (D2 is never in memory whole); ``keep`` sees each Bundle once the server has stored it."""
    source = iter(bundles)
    lock = threading.Lock()
    total = 0
    failures: list[str] = []

    def uploader() -> None:
        nonlocal total
        http = requests.Session()
        while True:
            with lock:
                bundle = None if failures else next(source, None)
            if bundle is None:
                return
            r = http.post(server.base_url, data=json.dumps(bundle), headers={**FHIR_JSON, **server.headers()}, timeout=300)
            with lock:
                if r.status_code != 200:
                    failures.append(f"ingest failed: {r.status_code} {r.text[:300]}")  # the other uploaders stop
                    raise RuntimeError(failures[-1])
                total += len(bundle["entry"])
                if keep:
                    keep(bundle)

    started = time.monotonic()
    with ThreadPoolExecutor(uploaders) as pool:
        for done in [pool.submit(uploader) for _ in range(uploaders)]:
            done.result()
    elapsed = time.monotonic() - started
    return {"resources": total, "seconds": round(elapsed, 1), "resources_per_s": round(total / elapsed, 1),
            "method": f"one transaction Bundle per patient, {uploaders} concurrent uploaders"}


def analyze(db: Database) -> None:
    import psycopg

    with psycopg.connect(db.owner_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("ANALYZE")


def _record(bundle: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """What the workloads need of a stored patient Bundle: its resources' ``Type/id`` and the Patient."""
    return [e["request"]["url"] for e in bundle["entry"]], bundle["entry"][0]["resource"]


def _write_paths(work: Path, server: Server, records: list[tuple[list[str], dict[str, Any]]], name: str = "") -> dict[str, Path]:
    base = _path(server)
    rnd = random.Random(7)
    ids = [url for urls, _ in records for url in urls]
    reads = [f"{base}{url}" for url in ids]
    rnd.shuffle(reads)
    patients = [patient for _, patient in records]
    searches = []
    for i in range(400):
        p = rnd.choice(patients)
        kind = i % 5
        if kind == 0:  # token
            code = rnd.choice(datagen.VITALS + datagen.LABS)[0]
            searches.append(f"{base}Observation?code=http://loinc.org|{code}&patient=Patient/{p['id']}&_count=20")
        elif kind == 1:  # date
            day = dt.date(2020, 1, 1) + dt.timedelta(days=rnd.randrange(0, 700))
            searches.append(f"{base}Encounter?date=ge{day.isoformat()}&date=lt{(day + dt.timedelta(days=7)).isoformat()}&_count=20")
        elif kind == 2:  # reference
            searches.append(f"{base}Condition?subject=Patient/{p['id']}&_count=20")
        elif kind == 3:  # string
            searches.append(f"{base}Patient?family={p['name'][0]['family'][:4]}&_count=20")
        else:  # _include
            searches.append(f"{base}MedicationRequest?patient={p['id']}&_include=MedicationRequest:patient&_count=20")
    paths = {kind: work / f"{kind}{name}.txt" for kind in ("reads", "search", "ids")}
    paths["reads"].write_text("\n".join(reads) + "\n")
    paths["search"].write_text("\n".join(searches) + "\n")
    paths["ids"].write_text("\n".join(ids) + "\n")
    return paths


# --- W8: the large data set ------------------------------------------------------------------------------

def large_data_set(work: Path, server: Server, db: Database, records: list[tuple[list[str], dict[str, Any]]],
                   size: int, seconds: int, d1: dict[str, Any],
                   profile: Callable[[str, Callable[[int], Any]], None] | None,
                   settle: Callable[[str], None]) -> dict[str, Any]:
    """D2: the same server loaded on to ``size`` patients, then W2 to W4 again, compared with their D1 figures.
    ``records`` holds every patient stored so far, in order (ingest's uploaders take patients in order and store
    every one they take), so D2 carries on from the next."""
    loaded = len(records)
    _log(f"loading D2: patients {loaded} to {size - 1}")
    load = ingest(server, datagen.patients(size, start=loaded), uploaders=4, keep=lambda b: records.append(_record(b)))
    _log(f"D2 loaded: {load['resources']} resources in {load['seconds']} s")
    settle("D2 load")
    analyze(db)
    paths = _write_paths(work, server, records, "-d2")
    out: dict[str, Any] = {"patients": size, "load": load, **read_search_workloads(server, paths, seconds, profile, "w8", settle)}
    one, many = ("1 connection", "16 connections")
    out["slowdown"] = {  # how many times slower on D2 than on D1 (goal: at most 2)
        "W2 p50 at 1 connection": round(out["W2"][one]["p50_ms"] / d1["W2"][one]["p50_ms"], 2),
        "W2 req/s at 16 connections": round(d1["W2"][many]["rps"] / out["W2"][many]["rps"], 2),
        "W3 req/s": round(d1["W3"]["rps"] / out["W3"]["rps"], 2),
        "W4 req/s": round(d1["W4"]["rps"] / out["W4"]["rps"], 2),
        "W4 p95": round(out["W4"]["p95_ms"] / d1["W4"]["p95_ms"], 2),
    }
    return out


# --- W5, W6 --------------------------------------------------------------------------------------------

def count_workload(server: Server, paths: dict[str, Path], seconds: int) -> dict[str, Any]:
    url = f"{_path(server)}Observation?code=http://loinc.org|8480-6&_summary=count"
    matches = requests.get(server.base_url.split("/fhir/")[0] + url, headers=server.headers(), timeout=60).json()["total"]
    file = paths["reads"].parent / "count.txt"
    file.write_text(url + "\n")
    r = wrk(server.base_url, "paths.lua", [str(file)], connections=4, threads=2, seconds=seconds, headers=server.headers())
    return {**r.__dict__, "matches_per_request": matches, "matches_counted_per_s": round(matches * r.rps)}


def readout(server: Server) -> dict[str, Any]:
    http = requests.Session()
    url: str | None = f"{server.base_url}/Observation?_count=1000"
    total = pages = 0
    started = time.monotonic()
    while url:
        r = http.get(url, headers=server.headers(), timeout=300)
        r.raise_for_status()
        bundle = r.json()
        total += len(bundle.get("entry", []))
        pages += 1
        url = next((l["url"] for l in bundle["link"] if l["relation"] == "next"), None)
        if url:  # the server names its public (https) URL; the benchmark plays the proxy that terminates TLS
            url = url.replace("https://", "http://", 1)
    elapsed = time.monotonic() - started
    return {"resources": total, "pages": pages, "seconds": round(elapsed, 2), "resources_per_s": round(total / elapsed, 1)}


# --- chains and _has (search across references) ------------------------------------------------------------

CHAIN_QUERIES = {
    "three-link chain": ("Observation", [("patient.organization.partof.name", "Northwind"), ("code", "http://loinc.org|8480-6"), ("_count", "20")]),
    "nested _has": ("Practitioner", [("_has:Patient:general-practitioner:_has:Observation:patient:code", "http://loinc.org|2339-0")]),
}


def chain_queries(server: Server, db: Database) -> dict[str, Any]:
    """Latency over HTTP (median of 20) and the PostgreSQL plan (EXPLAIN ANALYZE) of each query."""
    import psycopg

    from fhir_server.capability.registry import load_registry
    from fhir_server.engine.engine import Engine
    from fhir_server.engine.request import FhirRequest
    from fhir_server.security.access import INTERNAL
    from fhir_server.security.crypto import cipher_named
    from fhir_server.security.keys import provider_from_settings
    from fhir_server.settings import Settings
    from fhir_server.storage.database import Database as FhirDatabase
    from fhir_server.storage.store import Storage
    from sqlalchemy import event

    http = requests.Session()
    observations = http.get(f"{server.base_url}/Observation", params={"_summary": "count"}, headers=server.headers(),
                            timeout=60).json()["total"]
    settings = Settings.load(environ=server.env, background_jobs=False)
    fhir_db = FhirDatabase(settings.effective_database_url, settings)
    engine = Engine(load_registry(), Storage(fhir_db, provider_from_settings(settings), cipher_named(settings.cipher), settings), settings)
    out: dict[str, Any] = {"observations": observations}
    for name, (rtype, params) in CHAIN_QUERIES.items():
        times = []
        total = None
        for _ in range(20):
            started = time.monotonic()
            r = http.get(f"{server.base_url}/{rtype}", params=params, headers=server.headers(), timeout=60)
            times.append(time.monotonic() - started)
            r.raise_for_status()
            total = r.json().get("total")
        captured: list[tuple[str, Any]] = []

        def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
            if statement.lstrip().upper().startswith("SELECT") and "resource_versions" in statement:
                captured.append((statement, parameters))

        event.listen(fhir_db.engine, "before_cursor_execute", capture)
        engine.handle(FhirRequest("GET", "default", (rtype,), server.base_url, INTERNAL, params=tuple(params)))
        event.remove(fhir_db.engine, "before_cursor_execute", capture)
        plan: list[str] = []
        if captured:
            sql, parameters = captured[0]
            with psycopg.connect(db.app_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
                conn.execute("SELECT set_config('fhir.tenant_id', (SELECT id::text FROM tenants WHERE name = 'default'), false)")
                plan = [row[0] for row in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, parameters)]
        times.sort()
        out[name] = {"query": f"{rtype}?" + "&".join(f"{k}={v}" for k, v in params), "matches": total,
                     "p50_ms": round(1000 * times[len(times) // 2], 1), "max_ms": round(1000 * times[-1], 1), "plan": plan,
                     "uses_indexes": any("Index" in line for line in plan)}
    fhir_db.dispose()
    return out


# --- baselines ------------------------------------------------------------------------------------------

def baselines(work: Path, db: Database, server: Server, paths: dict[str, Path], seconds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    http = start_gunicorn_app("benchmarks.baseline_app:http_app()", work / "b_http", {})
    try:
        fixed = work / "fixed.txt"
        fixed.write_text("/fixed\n")
        out["B_http"] = wrk(http.base_url, "paths.lua", [str(fixed)], connections=16, threads=2, seconds=seconds,
                             headers=server.headers()).__dict__  # the same request headers as the server gets
    finally:
        http.stop()
    pk = start_gunicorn_app("benchmarks.baseline_app:pk_app()", work / "b_pk", {**server.env, "BENCH_IDS_FILE": str(paths["ids"])})
    try:
        pk_path = work / "pk.txt"
        pk_path.write_text("/pk\n")
        out["B_pk"] = wrk(pk.base_url, "paths.lua", [str(pk_path)], connections=16, threads=2, seconds=seconds,
                           headers=server.headers()).__dict__
    finally:
        pk.stop()
    out["B_copy"] = copy_baseline(db)
    return out


def copy_baseline(db: Database) -> dict[str, Any]:
    """PostgreSQL COPY of the same (encrypted) resource and index rows into empty tables of the same shape."""
    import psycopg

    url = db.owner_url.replace("postgresql+psycopg://", "postgresql://")
    tables = ["resources", "resource_versions", "idx_hash", "idx_date", "idx_number", "idx_quantity", "idx_reference"]
    with psycopg.connect(url) as conn:
        conn.execute("SELECT set_config('fhir.tenant_id', (SELECT id::text FROM tenants WHERE name = 'default'), false)")
        dumps: dict[str, bytes] = {}
        for t in tables:
            buf = io.BytesIO()
            with conn.cursor().copy(f"COPY (SELECT * FROM {t}) TO STDOUT") as cp:  # row-level security forbids COPY t TO
                for chunk in cp:
                    buf.write(chunk)
            dumps[t] = buf.getvalue()
        resources = conn.execute("SELECT count(*) FROM resources").fetchone()[0]  # type: ignore[index]
        for t in tables:
            conn.execute(f"CREATE TEMP TABLE copy_{t} (LIKE {t})")
        started = time.monotonic()
        for t in tables:
            with conn.cursor().copy(f"COPY copy_{t} FROM STDIN") as cp:
                cp.write(dumps[t])
        conn.commit()
        elapsed = time.monotonic() - started
        rows = {t: conn.execute(f"SELECT count(*) FROM copy_{t}").fetchone()[0] for t in tables}  # type: ignore[index]
    return {"resources": resources, "rows": rows, "bytes": sum(len(d) for d in dumps.values()),
            "seconds": round(elapsed, 3), "resources_per_s": round(resources / elapsed, 1)}


# --- the cost of encryption, and of auditing ---------------------------------------------------------------

def encryption_cost(work: Path, admin_url: str, bundles: list[dict[str, Any]], seconds: int,
                    databases: list[Database], servers: list[Server], rounds: int = 5) -> dict[str, Any]:
    """The same build with AES-256-GCM and with the null cipher, same data, in one run, alternating; both audit, so
    both settle their audit backlog after each run (else it lands on the other's next run)."""
    out = same_build_compared(work, admin_url, bundles, seconds, databases, servers,
                              {"aes-256-gcm": {"FHIR_CIPHER": "aes-256-gcm"}, "null": {"FHIR_CIPHER": "null"}},
                              settle={"aes-256-gcm": _index_audit_backlog, "null": _index_audit_backlog}, rounds=rounds)
    return {**out, "cost_pct": _cost(out["median_rps"], "null", "aes-256-gcm"), "goal": "< 15% on create and read"}


def audit_cost(work: Path, admin_url: str, bundles: list[dict[str, Any]], seconds: int,
               databases: list[Database], servers: list[Server], rounds: int = 5) -> dict[str, Any]:
    """The same build with auditing on and off (FHIR_AUDIT=false, which production refuses: both servers run as
    development here, alike but for that), same data, in one run, alternating."""
    out = same_build_compared(work, admin_url, bundles, seconds, databases, servers,
                              {"audit on": {"FHIR_ENV": "development"},
                               "audit off": {"FHIR_ENV": "development", "FHIR_AUDIT": "false"}},
                              settle={"audit on": _index_audit_backlog}, rounds=rounds)
    return {**out, "cost_pct": _cost(out["median_rps"], "audit off", "audit on"), "goal": "< 20% on read",
            "indexing": out["settled"].get("audit on")}


def _index_audit_backlog(server: Server) -> dict[str, Any]:
    """After a run: the records the server left for idle moments, chained and indexed now (by the command line, so
    that this work does not land on the other server's next run), with the time and CPU it took."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    out = subprocess.run([str(BIN / "fhir-server"), "audit", "chain", "--tenant", "default"], env=server.env, check=True,
                         capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    indexed = int(out.split(" indexed")[0].rsplit(" ", 1)[1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"records": indexed, "seconds": round(time.monotonic() - started, 2), "client_cpu_s": round(cpu, 2)}


def _cost(median: dict[str, dict[str, float]], without: str, with_: str) -> dict[str, float]:
    return {k: round(100 * (median[without][k] - median[with_][k]) / median[without][k], 1) for k in ("create", "read")}


def same_build_compared(work: Path, admin_url: str, bundles: list[dict[str, Any]], seconds: int, databases: list[Database],
                        servers: list[Server], variants: dict[str, dict[str, str]],
                        settle: dict[str, Callable[[Server], dict[str, Any]]] | None = None, rounds: int = 5) -> dict[str, Any]:
    """Two servers of this build that differ only in ``variants``' settings, on databases with the same data: create
    and read throughput (16 connections), ``rounds`` short runs each, interleaved, compared by their medians (this
    machine's noise is larger than the effects measured). ``settle`` finishes a variant's deferred work after each
    of its runs, before the next run starts; what it reports is summed."""
    runs: dict[str, dict[str, list[float]]] = {name: {"create": [], "read": []} for name in variants}
    settled: dict[str, dict[str, float]] = {}
    pair: dict[str, Server] = {}
    for name, env in variants.items():
        db = create_database(admin_url)
        databases.append(db)
        label = name.replace(" ", "-")
        srv = start_fhir_server(db, work / f"variant-{label}", cipher=env.get("FHIR_CIPHER", "aes-256-gcm"),
                                extra_env={k: v for k, v in env.items() if k != "FHIR_CIPHER"})
        servers.append(srv)
        ingest(srv, bundles, uploaders=4)
        analyze(db)
        pair[name] = srv
    first = next(iter(pair.values()))
    reads = work / f"reads-{'-'.join(n.replace(' ', '') for n in variants)}.txt"
    reads.write_text("\n".join(f"{_path(first)}{e['request']['url']}" for b in bundles for e in b["entry"]) + "\n")
    span = max(2, seconds // 2)
    for round_ in range(rounds):
        order = list(pair.items()) if round_ % 2 == 0 else list(reversed(pair.items()))
        for name, srv in order:
            c = wrk(srv.base_url, "crud.lua", [_path(srv), f"cmp{round_}", "create-only"], connections=16, threads=16, seconds=span, headers=srv.headers())
            r = wrk(srv.base_url, "paths.lua", [str(reads)], connections=16, threads=2, seconds=span, headers=srv.headers())
            runs[name]["create"].append(c.rps)
            runs[name]["read"].append(r.rps)
            if settle and name in settle:
                done = settle[name](srv)
                total = settled.setdefault(name, {})
                for k, v in done.items():
                    total[k] = round(total.get(k, 0) + v, 2)
    median = {c: {k: sorted(v)[len(v) // 2] for k, v in w.items()} for c, w in runs.items()}
    return {"median_rps": median, "all_rps": runs, "settled": settled}


# --- report ---------------------------------------------------------------------------------------------------

def report(r: dict[str, Any]) -> str:
    w, b = r["workloads"], r["baselines"]
    rows = [("id", "workload", "result", "goal", "verdict")]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    w1 = w["W1"]
    rows.append(("W1", "transaction-Bundle ingest, one Bundle per patient, 4 uploaders", f"{w1['resources_per_s']} resources/s ({w1['resources']} resources)",
                 ">= 1,200 resources/s (transaction Bundles)", verdict(w1["resources_per_s"] >= 1200)))
    one, many = w["W2"]["1 connection"], w["W2"]["16 connections"]
    pk = b.get("B_pk", {}).get("rps", 0)
    rows.append(("W2", "read by id, 1 connection", f"p50 {one['p50_ms']} ms ({one['rps']} req/s)", "p50 <= 2 ms", verdict(one["p50_ms"] <= 2)))
    rows.append(("W2", "read by id, 16 connections", f"{many['rps']} req/s, p99 {many['p99_ms']} ms, {many['errors']} errors",
                 ">= 2,500 req/s and >= 0.5 x B_pk", verdict(many["rps"] >= 2500 and many["rps"] >= 0.5 * pk and many["errors"] == 0)))
    w3 = w["W3"]
    rows.append(("W3", "create/read/update/delete, 9 types, 32 connections", f"{w3['rps']} req/s, p99 {w3['p99_ms']} ms, {w3['errors']} errors",
                 ">= 1,000 req/s, p99 <= 50 ms", verdict(w3["rps"] >= 1000 and w3["p99_ms"] <= 50 and w3["errors"] == 0)))
    w4 = w["W4"]
    rows.append(("W4", "search mix (token, date, reference, string, _include), 16 connections",
                 f"{w4['rps']} req/s, p95 {w4['p95_ms']} ms, {w4['errors']} errors", ">= 600 req/s, p95 <= 25 ms",
                 verdict(w4["rps"] >= 600 and w4["p95_ms"] <= 25 and w4["errors"] == 0)))
    w5 = w["W5"]
    rows.append(("W5", "Observation?code=...&_summary=count", f"{w5['matches_counted_per_s']:,} matches/s ({w5['rps']} req/s x {w5['matches_per_request']})",
                 ">= 2,000,000 matches/s", verdict(w5["matches_counted_per_s"] >= 2_000_000)))
    w6 = w["W6"]
    rows.append(("W6", "paged read-out of all Observations, _count=1000", f"{w6['resources_per_s']} resources/s ({w6['resources']} in {w6['pages']} pages)",
                 ">= 15,000 resources/s", verdict(w6["resources_per_s"] >= 15000)))
    ch = w["chains"]
    for name in ("three-link chain", "nested _has"):
        c = ch[name]
        rows.append(("chain", f"{name}: {c['query']} over {ch['observations']} Observations",
                     f"p50 {c['p50_ms']} ms ({c['matches']} matches; indexes used: {c['uses_indexes']})",
                     "< 100 ms", verdict(c["p50_ms"] < 100 and c["uses_indexes"])))
    w8 = w["W8"]
    if "slowdown" in w8:
        for k, ratio in w8["slowdown"].items():
            rows.append(("W8", f"{k} on D2 ({w8['patients']} patients) vs D1", f"{ratio}x", "<= 2x", verdict(ratio <= 2)))
        e = w8["W2"]["16 connections"], w8["W3"], w8["W4"]
        rows.append(("W8", "D2 figures: W2/16, W3, W4",
                     f"p50/1 {w8['W2']['1 connection']['p50_ms']} ms; {e[0]['rps']} / {e[1]['rps']} (p99 {e[1]['p99_ms']} ms) / "
                     f"{e[2]['rps']} req/s (p95 {e[2]['p95_ms']} ms); {sum(x['errors'] for x in e)} errors",
                     "see W2-W4", verdict(all(x["errors"] == 0 for x in e))))
        rows.append(("W8", "D2 loading (not a goal)", f"{w8['load']['resources_per_s']} resources/s ({w8['load']['resources']} in {w8['load']['seconds']} s)", "-", ""))
    else:
        rows.append(("W8", w8["status"], "-", "-", "-"))
    rows.append(("W7", w["W7"]["status"], "-", "-", "-"))
    w9 = w["W9"]
    rows.append(("W9", f"HL7 v2 ORU^R01 (10 OBX) over MLLP, {w9['connections']} connections, "
                 f"{w9['listener_processes']} listener processes, ACK after commit",
                 f"{w9['messages_per_s']} messages/s, p50 {w9['p50_ms']} ms, p99 {w9['p99_ms']} ms, {w9['not_aa']} not AA",
                 ">= 100 messages/s", verdict(w9["messages_per_s"] >= 100 and w9["not_aa"] == 0)))
    rows.append(("B_http", "gunicorn + Flask, fixed 1 KB JSON, 16 connections", f"{b['B_http']['rps']} req/s, p50 {b['B_http']['p50_ms']} ms", "baseline", ""))
    rows.append(("B_pk", "PK SELECT + decrypt of one encrypted row, 16 connections", f"{b['B_pk']['rps']} req/s, p50 {b['B_pk']['p50_ms']} ms", "baseline", ""))
    rows.append(("B_copy", "PostgreSQL COPY of the same resource and index rows", f"{b['B_copy']['resources_per_s']} resources/s", "baseline", ""))
    enc = r["encryption"]
    rows.append(("enc", "AES-256-GCM vs null cipher (create / read, 16 connections)",
                 f"create {enc['cost_pct']['create']}% / read {enc['cost_pct']['read']}% slower "
                 f"(medians {enc['median_rps']['aes-256-gcm']['create']}/{enc['median_rps']['null']['create']} and "
                 f"{enc['median_rps']['aes-256-gcm']['read']}/{enc['median_rps']['null']['read']} req/s)",
                 "< 15%", verdict(enc["cost_pct"]["create"] < 15 and enc["cost_pct"]["read"] < 15)))
    audit = r.get("audit")
    if audit:
        rows.append(("audit", "auditing on vs off (create / read, 16 connections)",
                     f"create {audit['cost_pct']['create']}% / read {audit['cost_pct']['read']}% slower "
                     f"(medians {audit['median_rps']['audit on']['create']}/{audit['median_rps']['audit off']['create']} and "
                     f"{audit['median_rps']['audit on']['read']}/{audit['median_rps']['audit off']['read']} req/s)",
                     "< 20% on read", verdict(audit["cost_pct"]["read"] < 20)))
    lines = [f"Benchmark {r['mode']} run, commit {r['commit']}, {r['date']}, {r['machine']['cpus']} CPUs; "
             f"{r['settings']['patients']} patients; server peak RSS per worker {r.get('peak_worker_rss_mib')} MiB; "
             f"wrk CPU during W2/16: {w['W2']['16 connections']['client_cpu_pct']}%", ""]
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(str(c).ljust(widths[j]) for j, c in enumerate(row)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    backlog = r.get("audit_backlog")
    if backlog:
        lines += ["", "Audit backlog settled after each run (records chained and indexed, seconds), not measured in the next: "
                      + "; ".join(f"{name} {b['records']} in {b['seconds']} s" for name, b in backlog.items())]
    if r.get("profiles"):
        lines += ["", f"Profiles (py-spy, {profiling.RATE} Hz, {PROFILE_SECONDS} s of each workload run again; share of "
                      "the server's samples; stacks in benchmarks/results/profiles/):"]
        lines += [profiling.markdown(name, p) for name, p in r["profiles"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
