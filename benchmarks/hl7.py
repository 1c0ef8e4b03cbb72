"""W9: HL7 v2 ORU^R01 results (10 OBX each) over MLLP into the benchmark's server database.

``fhir-server hl7 mllp`` runs as a user runs it (production settings, the server's database, on loopback), next to
the FHIR server; senders on ``connections`` connections each send a message and wait for its ACK before the next
(HL7 original mode), for ``seconds``. Every message has a control id and order numbers of its own and is for one of
100 patients, so each one is a transaction of a DiagnosticReport, 10 Observations, a ServiceRequest, a Provenance
and the patient's conditional update (the same content after its first message: no new version). Figures: messages
per second, ACK latency (p50, p99), and how many were not AA.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import BIN, Server
from testsupport.hl7 import MllpClient, msa, oru, start_listener

_SERIES = iter(range(10**9))  # every message of every run a control id of its own
_LOCK = threading.Lock()


def _next() -> int:
    with _LOCK:
        return next(_SERIES)


def mllp_workload(server: Server, workdir: Path, seconds: int, *, connections: int = 4,
                  processes: int = 1) -> dict[str, Any]:
    proc, port = start_listener([str(BIN / "fhir-server")], server.env, workdir / "mllp.log", processes=processes)
    try:
        with MllpClient("127.0.0.1", port) as warm:  # the patients made, the listener's caches warm
            for _ in range(100):
                warm.exchange(oru(_next()))
        latencies: list[float] = []
        failures: list[str] = []
        deadline = time.monotonic() + seconds

        def sender() -> None:
            mine: list[float] = []
            with MllpClient("127.0.0.1", port) as c:
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    code, _ = msa(c.exchange(oru(_next())))
                    mine.append(time.perf_counter() - started)
                    if code != "AA":
                        failures.append(code or "?")
            latencies.extend(mine)

        started = time.monotonic()
        threads = [threading.Thread(target=sender) for _ in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(60)
    latencies.sort()
    n = len(latencies)
    return {
        "messages": n, "seconds": round(elapsed, 1), "messages_per_s": round(n / elapsed, 1),
        "p50_ms": round(latencies[n // 2] * 1000, 1) if n else None,
        "p99_ms": round(latencies[min(n - 1, int(n * 0.99))] * 1000, 1) if n else None,
        "not_aa": len(failures), "connections": connections, "listener_processes": processes,
        "observations_per_message": 10,
    }
