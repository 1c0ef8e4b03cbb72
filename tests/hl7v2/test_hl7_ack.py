"""ACKs: addressed back to the sender, MSA-2 echoing MSH-10, errors located in ERR, in the message's own encoding."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_server.hl7v2 import ack, er7
from fhir_server.hl7v2.er7 import Hl7Error, Location

SAMPLES = Path(__file__).parent.parent / "data" / "hl7v2"
NOW = datetime.datetime(2026, 12, 7, 10, 30, 5, tzinfo=datetime.UTC)


def read(name: str) -> er7.Message:
    return er7.parse((SAMPLES / name).read_bytes())


def test_an_accept_answers_the_sender() -> None:
    m = read("ms__ADT-A01-01.hl7")
    text = ack.build(ack.Original.of(m), ack.ACCEPT, now=NOW)
    answer = er7.parse(text)
    msh, msa = answer.msh, answer.segment("MSA")
    assert msa is not None
    assert (msh.field(3), msh.field(4)) == (m.msh.field(5), m.msh.field(6))
    assert (msh.field(5), msh.field(6)) == (m.msh.field(3), m.msh.field(4))
    assert msh.field(7) == "20261207103005+0000"
    assert answer.message_type == ("ACK", "A01", "ACK")
    assert msh.field(10) and msh.field(10) != m.msh.field(10) and len(msh.field(10)) <= 20
    assert (msh.field(11), msh.field(12)) == (m.msh.field(11), m.msh.field(12))
    assert (msa.value(1), msa.field(2)) == ("AA", m.msh.field(10))
    assert not answer.all("ERR")
    assert text.endswith("\r") and "\n" not in text


def test_an_error_is_located_in_err_from_version_2_5() -> None:
    m = read("ms__ORU-R01-01.hl7")  # 2.5.1
    problem = Hl7Error("101", "OBX-3 (the observation's code) is required", Location("OBX", 2, 3))
    answer = er7.parse(ack.build(ack.Original.of(m), ack.ERROR, [problem], now=NOW))
    msa, err = answer.segment("MSA"), answer.segment("ERR")
    assert msa is not None and err is not None
    assert msa.value(1) == "AE" and msa.field(2) == m.msh.field(10)
    assert [err.value(2, i) for i in range(1, 4)] == ["OBX", "2", "3"]
    assert (err.value(3), err.value(3, 2), err.value(3, 3)) == ("101", "Required field missing", "HL70357")
    assert err.value(4) == "E"
    assert err.value(8) == "OBX-3 (the observation's code) is required"


def test_an_error_is_located_in_err_1_before_version_2_5() -> None:
    m = read("ms__ADT01-23.hl7")  # 2.3
    problem = Hl7Error("103", "PV1-2 is not a patient class of HL7 table 0004", Location("PV1", 1, 2))
    answer = er7.parse(ack.build(ack.Original.of(m), ack.ERROR, [problem], now=NOW))
    err = answer.segment("ERR")
    assert err is not None
    assert [err.value(1, i) for i in range(1, 4)] == ["PV1", "1", "2"]
    assert err.first(1).subcomponents(4) == ["103", "Table value not found", "HL70357"]  # type: ignore[union-attr]


def test_a_warning_has_severity_w() -> None:
    m = read("ms__ORU-R01-01.hl7")
    warning = Hl7Error("100", "BTS-1 counts 3 messages, the batch holds 2", Location("BTS", 1, 1), severity="W")
    err = er7.parse(ack.build(ack.Original.of(m), ack.ACCEPT, [warning])).segment("ERR")
    assert err is not None and err.value(4) == "W"


def test_the_ack_uses_the_message_delimiters() -> None:
    m = read("d2_ADT_A01_nonstandard_delimiters.hl7")
    problem = Hl7Error("102", "PID-7 is not a date", Location("PID", 1, 7))
    text = ack.build(ack.Original.of(m), ack.ERROR, [problem], now=NOW)
    assert text.startswith("MSH!@*$%!REC APP!REC FAC!SEND APP!SEND FAC!")
    answer = er7.parse(text)
    assert answer.delimiters == m.delimiters
    assert answer.segment("MSA").field(2) == "0123456789"  # type: ignore[union-attr]


def test_texts_with_delimiters_are_escaped() -> None:
    m = read("ms__ORU-R01-01.hl7")
    problem = Hl7Error("207", "a|b^c~d&e\\f", Location("OBX", 1, 5))
    err = er7.parse(ack.build(ack.Original.of(m), ack.ERROR, [problem])).segment("ERR")
    assert err is not None and err.value(8) == "a|b^c~d&e\\f"


def test_the_ack_keeps_the_character_set() -> None:
    m = er7.parse(("MSH|^~\\&|A|B|C|D|20240101||ADT^A01|77|P|2.5|||AL|NE||8859/1\rPID|1").encode("iso8859-1"))
    original = ack.Original.of(m)
    text = ack.build(original, ack.ERROR, [Hl7Error("207", "Fehler bei Übernahme", Location("PID"))])
    data = ack.encode(text, original)
    assert "Übernahme".encode("iso8859-1") in data
    assert er7.parse(data).msh.value(18) == "8859/1"


def test_a_rejection_of_an_unreadable_message_still_echoes_what_it_can() -> None:
    data = (SAMPLES / "lfh__sample_unix.hl7").read_bytes()
    with pytest.raises(Hl7Error) as caught:
        er7.parse(data)
    original = ack.Original.salvage(data)
    answer = er7.parse(ack.build(original, ack.REJECT, [caught.value]))
    msa = answer.segment("MSA")
    assert msa is not None and (msa.value(1), msa.field(2)) == ("AR", "102")
    assert answer.msh.field(5) == "SE050" and answer.message_type == ("ACK", "A01", "ACK")


def test_salvage_of_nothing_gives_a_default_header() -> None:
    original = ack.Original.salvage(b"\x00garbage")
    answer = er7.parse(ack.build(original, ack.REJECT, [Hl7Error("100", "no MSH", Location("MSH"), reject=True)]))
    assert answer.segment("MSA").field(2) == ""  # type: ignore[union-attr]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_input_gets_a_readable_ack(data: bytes) -> None:
    for candidate in (data, b"MSH|" + data, b"MSH|^~\\&|" + data):
        try:
            message = er7.parse(candidate)
            original, code, errors = ack.Original.of(message), ack.ACCEPT, []
        except Hl7Error as exc:
            original, code, errors = ack.Original.salvage(candidate), ack.REJECT, [exc]
        answer = er7.parse(ack.encode(ack.build(original, code, errors), original))
        assert answer.segment("MSA").value(1) == code  # type: ignore[union-attr]
