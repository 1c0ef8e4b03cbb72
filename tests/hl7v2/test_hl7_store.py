"""Nothing lost: every message stored sealed before it is processed, repeats answered from the store, failures kept
for replay, and a message left half-done by a dead process taken up once."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import select, update

from fhir_server.engine.engine import Engine
from fhir_server.hl7v2 import er7, messages, store
from fhir_server.hl7v2.intake import Intake
from fhir_server.hl7v2.store import (
    ERROR,
    PROCESSED,
    PROCESSING,
    REJECTED,
    STALE_SECONDS,
)
from fhir_server.security.access import INTERNAL
from fhir_server.storage import schema
from fhir_server.storage.store import Storage
from testsupport.engine_calls import call, resource

M = schema.hl7_messages
BASE = "http://test/fhir/{}"
ADMIT = ("MSH|^~\\&|ADT|HOSP|FHIR|HOSP|20240101120000||ADT^A01|{control}|P|2.5\r"
         "PID|1||4711^^^HOSP&1.2.3&ISO^MR||Quixote^Alonso||19500101|M")


def receive(intake: Intake, tenant: str, text: str | bytes) -> Any:
    return intake.receive(tenant, BASE.format(tenant), INTERNAL, text.encode() if isinstance(text, str) else text)


def rows(storage: Storage, tenant: str) -> list[Any]:
    with storage.session(tenant, write=False, shared=False) as repo:
        return list(repo.conn.execute(select(M).where(M.c.tenant_id == repo.tenant.id).order_by(M.c.received)).all())


def patients(engine: Engine, tenant: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in resource(call(engine, tenant, "GET", "Patient")).get("entry", [])]


def test_every_message_is_stored_sealed_with_its_outcome(engine: Engine, tenant: str) -> None:
    intake = Intake(engine)
    receive(intake, tenant, ADMIT.format(control="s1"))
    receive(intake, tenant, b"not hl7 at all")
    receive(intake, tenant, "MSH|^~\\&|A|B|C|D|20240101||ZZZ^Z01|s3|P|2.5\rPID|1||1^^^H^MR")
    stored = rows(engine.storage, tenant)
    assert [(r.status, r.kind, r.error_code) for r in stored] == [
        (PROCESSED, "ADT^A01", None), (REJECTED, None, "100"), (REJECTED, "ZZZ^Z01", "200")]
    for r in stored:
        assert b"Quixote" not in bytes(r.body) and b"MSH" not in bytes(r.body)  # sealed
        assert r.ack is not None and b"MSA" not in bytes(r.ack)
    assert stored[1].dedupe is None  # nothing to tell a repeat of it by
    listed = list(intake.store.listing(tenant, status=REJECTED))
    assert [s.kind for s in listed] == [None, "ZZZ^Z01"]
    found = intake.store.load(tenant, stored[0].id)
    assert found is not None and found[1] == ADMIT.format(control="s1").encode()


def test_a_repeat_gets_the_first_ack_and_is_not_processed_again(engine: Engine, tenant: str) -> None:
    intake = Intake(engine)
    first = receive(intake, tenant, ADMIT.format(control="r1"))
    again = receive(intake, tenant, ADMIT.format(control="r1"))
    assert again.data == first.data  # byte for byte, its MSH-10 and time included
    assert again.outcomes[0].duplicate
    [patient] = patients(engine, tenant)
    assert patient["meta"]["versionId"] == "1"
    assert len(rows(engine.storage, tenant)) == 1


def test_a_repeat_of_a_failed_message_gets_its_ae(engine: Engine, tenant: str) -> None:
    intake = Intake(engine)
    bad = "MSH|^~\\&|ADT|HOSP|FHIR|HOSP|20240101120000||ADT^A01|e1|P|2.5\rPID|1||^^^HOSP^MR||X^Y"
    first = receive(intake, tenant, bad)
    assert first.outcomes[0].code == "AE"
    again = receive(intake, tenant, bad)
    assert again.data == first.data and again.outcomes[0].code == "AE"
    assert [(r.status, r.error_code) for r in rows(engine.storage, tenant)] == [(ERROR, "101")]


def test_a_failed_message_is_replayed_after_a_fix(engine: Engine, tenant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    intake = Intake(engine)
    original = messages.to_bundle

    def broken(message: er7.Message, **kw: Any) -> Any:
        raise er7.Hl7Error("207", "a mapping bug", er7.Location("PID", 1, 5))

    monkeypatch.setattr(messages, "to_bundle", broken)
    assert receive(intake, tenant, ADMIT.format(control="p1")).outcomes[0].code == "AE"
    [dead] = list(intake.store.listing(tenant, status=ERROR))
    assert patients(engine, tenant) == []
    monkeypatch.setattr(messages, "to_bundle", original)  # the fix
    outcome = intake.replay(tenant, BASE.format(tenant), INTERNAL, dead.id)
    assert outcome is not None and outcome.code == "AA"
    [row] = rows(engine.storage, tenant)
    assert (row.status, row.attempts) == (PROCESSED, 2)
    assert len(patients(engine, tenant)) == 1
    again = receive(intake, tenant, ADMIT.format(control="p1"))  # the sender's resend now finds the AA
    assert er7.parse(again.data).segment("MSA").value(1) == "AA"  # type: ignore[union-attr]


ELSEWHERE = "other-host.example:4242:0123456789ab"  # a process on another host: only time tells it is gone


def age(storage: Storage, tenant: str, seconds: int, owner: str | None = ELSEWHERE) -> None:
    """Make the tenant's messages "processing" since ``seconds`` ago, by ``owner``."""
    with storage.session(tenant, write=True, audited=False) as repo:
        repo.conn.execute(update(M).where(M.c.tenant_id == repo.tenant.id).values(
            status=PROCESSING, owner=owner, updated=M.c.updated - seconds * 1_000_000))


def test_a_message_a_dead_process_left_is_taken_up_once(engine: Engine, tenant: str) -> None:
    intake = Intake(engine)
    receive(intake, tenant, ADMIT.format(control="k1"))  # its data committed; then the process "died"
    age(engine.storage, tenant, STALE_SECONDS + 5)
    again = receive(intake, tenant, ADMIT.format(control="k1"))
    assert again.outcomes[0].code == "AA" and not again.outcomes[0].duplicate
    [patient] = patients(engine, tenant)
    assert patient["meta"]["versionId"] == "1"  # found committed (its Provenance): not written again
    [row] = rows(engine.storage, tenant)
    assert (row.status, row.attempts) == (PROCESSED, 2)


def test_a_message_being_processed_elsewhere_is_busy(engine: Engine, tenant: str) -> None:
    intake = Intake(engine)
    receive(intake, tenant, ADMIT.format(control="b1"))
    age(engine.storage, tenant, 1)  # "processing", and fresh: another process is at it
    busy = receive(intake, tenant, ADMIT.format(control="b1"))
    assert busy.outcomes[0].code == "AE" and busy.outcomes[0].errors[0].code == "206"
    assert intake.replay(tenant, BASE.format(tenant), INTERNAL, rows(engine.storage, tenant)[0].id) is None
    age(engine.storage, tenant, 0, owner=f"{store._HOST}:{os.getppid()}:0123456789ab")  # a live process here
    assert receive(intake, tenant, ADMIT.format(control="b1")).outcomes[0].errors[0].code == "206"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("who", ["dead", "earlier instance", "released"])
def test_a_message_whose_owner_is_known_to_be_gone_is_taken_up_at_once(engine: Engine, tenant: str, who: str) -> None:
    intake = Intake(engine)
    receive(intake, tenant, ADMIT.format(control="g1"))
    owner = {"dead": f"{store._HOST}:{_dead_pid()}:0123456789ab",  # a process of this host that no longer runs
             "earlier instance": f"{store._HOST}:{os.getpid()}:000000000000",  # this pid, an earlier process
             "released": None}[who]  # an attempt that failed and let it go
    age(engine.storage, tenant, 1, owner=owner)
    again = receive(intake, tenant, ADMIT.format(control="g1"))
    assert again.outcomes[0].code == "AA" and not again.outcomes[0].duplicate
    [row] = rows(engine.storage, tenant)
    assert (row.status, row.attempts, row.owner) == (PROCESSED, 2, None)
    assert store.abandoned(owner) and not store.abandoned(store.owner()) and not store.abandoned(ELSEWHERE)


def test_a_reused_control_id_for_another_message_is_kept_as_an_error(engine: Engine, tenant: str) -> None:
    intake = Intake(engine)
    receive(intake, tenant, ADMIT.format(control="u1"))
    resent = ADMIT.format(control="u1").replace("20240101120000", "20240101120500")  # a retry, stamped anew
    assert receive(intake, tenant, resent).outcomes[0].duplicate
    other = ADMIT.format(control="u1").replace("Quixote", "Panza")
    clash = receive(intake, tenant, other)
    assert clash.outcomes[0].code == "AE" and clash.outcomes[0].errors[0].code == "205"
    assert [(r.status, r.error_code) for r in rows(engine.storage, tenant)] == [(PROCESSED, None), (ERROR, "205")]
    assert [p["name"][0]["family"] for p in patients(engine, tenant)] == ["Quixote"]
