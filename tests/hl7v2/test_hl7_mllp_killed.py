"""``fhir-server hl7 mllp`` killed (SIGKILL) in the middle of a stream of messages: the sender resends what was not
acknowledged (and, to be sure, everything), and each message is processed exactly once (both back-ends)."""

from __future__ import annotations

from pathlib import Path

from fhir_server.hl7v2 import mllp
from fhir_server.settings import Settings
from testsupport.backends import DatabaseUrls
from testsupport.cli import CLI, cli_environment, run
from testsupport.engine_calls import call, resource
from testsupport.hl7 import MllpClient, msa, oru, start_listener

MESSAGES = 40


def test_killed_mid_stream_then_everything_resent_is_processed_once(fresh_db: DatabaseUrls, tmp_path: Path) -> None:
    env = cli_environment(fresh_db, tmp_path)
    messages = [oru(i, observations=10) for i in range(MESSAGES)]
    proc, port = start_listener(CLI, env, tmp_path / "listener.log")
    first: list[bytes] = []
    with MllpClient("127.0.0.1", port) as c:
        c.send_raw(b"".join(mllp.frame(m) for m in messages))  # all at once: the listener works through them in turn
        while len(first) < 5:
            first.append(c.ack())
        proc.kill()
        proc.wait(30)
    stored = run(env, "hl7", "list", "--tenant", "default").stdout.splitlines()
    done = [line for line in stored if "\tprocessed\t" in line]
    assert 5 <= len(done) < MESSAGES, "the kill landed in the middle of the stream"

    proc, port = start_listener(CLI, env, tmp_path / "listener.log")
    try:
        with MllpClient("127.0.0.1", port) as c:
            again = [c.exchange(m) for m in messages]
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    assert [msa(a) for a in again] == [("AA", f"BENCH{i:09d}") for i in range(MESSAGES)]
    assert again[:5] == first  # what was acknowledged before is acknowledged with the very same ACK

    stored = run(env, "hl7", "list", "--tenant", "default").stdout.splitlines()
    assert len(stored) == MESSAGES and all("\tprocessed\t" in line for line in stored)
    from fhir_server.cli import _engine

    engine = _engine(Settings.load(environ=env))
    try:
        def total(rtype: str) -> int:
            return int(resource(call(engine, "default", "GET", rtype, params=(("_summary", "count"),)))["total"])

        assert total("DiagnosticReport") == MESSAGES
        assert total("Observation") == MESSAGES * 10
        assert total("Provenance") == MESSAGES
        assert total("Patient") == MESSAGES  # oru() cycles over 100 patients: one each here
    finally:
        engine.storage.audit_log.stop()
        engine.storage.db.dispose()
    assert run(env, "audit", "verify", "--tenant", "default", check=False).returncode == 0
