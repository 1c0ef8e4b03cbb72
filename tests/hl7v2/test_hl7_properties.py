"""Random and mutated HL7 v2 through the intake (both back-ends): always an ACK (AA, AE or AR), never an exception,
never a partial write (a message not accepted leaves the tenant's resources as they were; one accepted is whole,
and sending it again changes nothing)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from fhir_server.engine.engine import Engine
from fhir_server.hl7v2 import er7
from fhir_server.hl7v2.intake import Answer, Intake
from fhir_server.hl7v2.mllp import Deframer
from fhir_server.security.access import INTERNAL
from fhir_server.storage import schema
from testsupport.engine_calls import call, resource

SAMPLES = Path(__file__).parent.parent / "data" / "hl7v2"
TEXTS = [p.read_bytes() for p in sorted(SAMPLES.glob("*.hl7"))]
NOISE = [b"|", b"^", b"~", b"\\", b"&", b"#", b"\r", b"\n", b"\r\n", b'""', b"\\X41\\", b"\\E\\", b"\\.br\\", b"\x00",
         b"\xff\xfe", b"\xef\xbb\xbf", b"MSH|", b"MSH|^~\\&|", b"PID|1||", b"OBR|1|", b"OBX|1|NM|x||abc|",
         b"OBX|1|ED|x||^^^Base64^!!", b"MRG|", b"ZZZ|1", b"BHS|^~\\&", b"BTS|", b"FHS|", b"99999999999999999999",
         b"20240230", b"-0", "é".encode(), "é".encode("latin-1")]
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])
R = schema.resources


def _control_id(text: bytes) -> bytes | None:
    try:
        return er7.parse(text).control_id.encode() or None
    except (er7.Hl7Error, UnicodeError):
        return None


CONTROL_IDS = [_control_id(t) for t in TEXTS]


def _segments(data: bytes) -> list[bytes]:
    return data.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A sample (with a control id of its own, so it is processed, not found to be a repeat), mutated 1 to 4 times:
    bytes deleted, inserted or replaced, segments dropped, repeated or swapped, the message cut off."""
    i = draw(st.integers(0, len(TEXTS) - 1))
    data = TEXTS[i]
    if CONTROL_IDS[i]:
        data = data.replace(b"|" + CONTROL_IDS[i] + b"|", b"|" + uuid.uuid4().hex[:16].encode() + b"|", 1)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "drop", "repeat", "swap", "truncate"]))
        n = len(data)
        at = draw(st.integers(0, max(n - 1, 0)))
        if kind == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 40)):]
        elif kind == "insert":
            data = data[:at] + draw(st.sampled_from(NOISE) | st.binary(max_size=8)) + data[at:]
        elif kind == "replace":
            data = data[:at] + draw(st.sampled_from(NOISE)) + data[at + 1:]
        elif kind == "truncate":
            data = data[:at]
        else:
            segs = _segments(data)
            k = draw(st.integers(0, len(segs) - 1))
            j = draw(st.integers(0, len(segs) - 1))
            if kind == "drop":
                del segs[k]
            elif kind == "repeat":
                segs.insert(j, segs[k])
            else:
                segs[k], segs[j] = segs[j], segs[k]
            data = b"\r".join(segs)
    return data


def footprint(engine: Engine, tenant: str) -> dict[str, tuple[int, int]]:
    """Per resource type (but AuditEvent, which every message adds): how many resources, and their versions."""
    with engine.storage.session(tenant, write=False, shared=False) as repo:
        rows = repo.conn.execute(select(R.c.res_type, func.count(), func.sum(R.c.version)).where(
            R.c.tenant_id == repo.tenant.id, R.c.res_type != "AuditEvent").group_by(R.c.res_type)).all()
    return {t: (int(c), int(v)) for t, c, v in rows}


def check(engine: Engine, tenant: str, data: bytes) -> None:
    intake = Intake(engine)
    before = footprint(engine, tenant)
    answer: Answer = intake.receive(tenant, f"http://test/fhir/{tenant}", INTERNAL, data)
    acks = er7.parse_envelope(answer.data).messages
    assert len(acks) == len(answer.outcomes)  # none for a batch with no message in it: an empty batch of ACKs
    for ack, outcome in zip(acks, answer.outcomes, strict=True):
        msa = ack.segment("MSA")
        assert msa is not None and msa.value(1) == outcome.code and outcome.code in ("AA", "AE", "AR")
        if outcome.code != "AA":
            assert ack.segment("ERR") is not None, "a refusal says what was wrong and where"
    after = footprint(engine, tenant)
    written = [o for o in answer.outcomes if o.response is not None]
    if not written:
        assert after == before, "a message not accepted wrote nothing"
        return
    for outcome in written:  # accepted: its whole transaction, every entry of it
        response: dict[str, Any] = outcome.response or {}
        assert response.get("type") == "transaction-response"
        assert all(e["response"]["status"][:1] == "2" for e in response.get("entry", []))
    provenances = resource(call(engine, tenant, "GET", "Provenance", params=(("_summary", "count"),)))["total"]
    assert provenances >= len(written)
    again = intake.receive(tenant, f"http://test/fhir/{tenant}", INTERNAL, data)  # a resend changes nothing
    assert footprint(engine, tenant) == after
    assert all(o.duplicate or o.code != "AA" for o in again.outcomes)


@SETTINGS
@given(data=mutated())
def test_mutated_samples(engine: Engine, tenant: str, data: bytes) -> None:
    check(engine, tenant, data)


@settings(SETTINGS, max_examples=40)
@given(data=st.binary(max_size=600) | st.builds(lambda head, tail: head + tail,
                                               st.sampled_from([b"MSH|^~\\&|", b"MSH|", b"FHS|^~\\&|", b"BHS|^~\\&|",
                                                                b"\xef\xbb\xbfMSH|^~\\&|"]),
                                               st.binary(max_size=400)))
def test_random_bytes(engine: Engine, tenant: str, data: bytes) -> None:
    check(engine, tenant, data)


@settings(SETTINGS, max_examples=200)
@given(stream=st.lists(st.binary(max_size=50) | st.sampled_from([b"\x0b", b"\x1c", b"\r", b"\x1c\r"]), max_size=40))
def test_the_deframer_takes_any_stream(stream: list[bytes]) -> None:
    """Whatever comes over a connection, the deframer returns frames (or refusals) and never fails."""
    d = Deframer(max_size=64)
    for chunk in stream:
        for item in d.feed(chunk):
            if isinstance(item, bytes):
                assert len(item) <= 64 and b"\x0b" not in item and b"\x1c" not in item
