"""Reading ER7: every sample message, the delimiters, line ends, character sets, escapes, nulls and envelopes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_server.hl7v2 import er7
from fhir_server.hl7v2.er7 import Delimiters, Hl7Error

SAMPLES = Path(__file__).parent.parent / "data" / "hl7v2"
# Malformed samples, and what is wrong with them
MALFORMED = {
    "lfh__sample_unix.hl7": ("102", "MSH-2"),  # "^~\\&": the escape character written twice
    "lfh__sample_win.hl7": ("102", "MSH-2"),
}


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def message_files() -> list[str]:
    return sorted(p.name for p in SAMPLES.glob("*.hl7"))


@pytest.mark.parametrize("name", message_files())
def test_every_sample_reads_or_is_rejected_precisely(name: str) -> None:
    if name in MALFORMED:
        with pytest.raises(Hl7Error) as caught:
            er7.parse_envelope(sample(name))
        code, where = MALFORMED[name]
        assert caught.value.code == code and caught.value.reject
        assert str(caught.value.location) == where
        return
    envelope = er7.parse_envelope(sample(name))
    assert envelope.messages
    for m in envelope.messages:
        assert m.msh.name == "MSH" and m.message_type[0] and m.control_id
        assert all(len(s.name) == 3 for s in m.segments)
        # what was read writes back as it was sent (segment ends aside)
        again = er7.parse(m.text())
        assert [s.raw for s in again.segments] == [s.raw for s in m.segments]


def test_the_message_header_and_its_fields() -> None:
    m = er7.parse(sample("ms__ADT-A01-01.hl7"))
    assert m.message_type == ("ADT", "A01", "ADT_A01")
    assert m.version == "2.8"
    assert m.msh.field(1) == "|" and m.msh.field(2) == "^~\\&"
    assert m.msh.repetitions(2)[0].raw() == "^~\\&"  # the encoding characters are not split
    pv1 = m.segment("PV1")
    assert pv1 is not None
    assert pv1.value(14) == "NHS Provider-General (inc.A&E-this Hosp)"  # \T\ is the sub-component separator
    assert pv1.field(14) == "NHS Provider-General (inc.A\\T\\E-this Hosp)"


def test_components_subcomponents_and_repetitions() -> None:
    m = er7.parse(sample("v2tofhir__Message.hl7_MDM_T02.hl7"))
    pid = m.segment("PID")
    assert pid is not None
    assert [r.value(1) for r in pid.repetitions(3)] == ["000322330"]
    assert pid.first(3).subcomponents(4) == ["REDDING HOSPITAL", "1.1.1.1", "GUID"]  # CX-4, an HD
    assert pid.value(3, 4) == "REDDING HOSPITAL" and pid.value(3, 4, 2) == "1.1.1.1"
    assert pid.value(3, 9) is None and pid.value(99) is None and pid.value(3, repetition=2) is None


def test_formatted_text_has_its_line_breaks() -> None:
    m = er7.parse(sample("v2tofhir__Message.hl7_MDM_T02.hl7"))
    text = m.all("OBX")[1].value(5)
    assert text is not None
    assert text.startswith("Critical Values Entered On:  08/22/2023 2:11 EDT \n Performed On:")
    assert "\\" not in text


def test_nonstandard_delimiters() -> None:
    m = er7.parse(sample("d2_ADT_A01_nonstandard_delimiters.hl7"))
    assert m.delimiters == Delimiters("!", "@", "*", "$", "%")
    pid = m.segment("PID")
    assert pid is not None
    assert (pid.value(3), pid.value(3, 4), pid.value(3, 5)) == ("123-456-789", "HOSPITAL", "MR")
    assert (pid.value(5), pid.value(5, 2)) == ("SURNAME", "NAME")
    assert [r.value() for r in pid.repetitions(13)] == ["555", "444"]
    assert m.message_type == ("ADT", "A01", "ADT_A01")


def test_the_truncation_character_is_a_delimiter_of_its_own() -> None:
    m = er7.parse(sample("v2tofhir_ig__ORU_R01.hl7"))
    assert m.delimiters.truncation == "#" and m.delimiters.encoding_characters == "^~\\&#"
    assert m.msh.value(3) == "LabApp" and m.msh.value(3, 2) == "9.8.7.6.5"
    assert m.charset == "utf-8"  # MSH-18 "UNICODE UTF-8"
    assert er7.unescape("a\\P\\b", m.delimiters) == "a#b"


@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n", "\n\r\n", "\r\n\r\n"])
def test_any_line_ending_and_blank_lines(ending: str) -> None:
    text = ending.join(["MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5", "EVN|A01|20240101", "", "PID|1||123^^^H^MR"])
    m = er7.parse((text + ending * 3).encode())
    assert [s.name for s in m.segments] == ["MSH", "EVN", "PID"]
    assert m.segment("PID").value(3) == "123"  # type: ignore[union-attr]


def test_mixed_endings_and_trailing_blank_lines_sample() -> None:
    m = er7.parse(sample("d4_ADT_A01_mixed_CRLF_LF_trailing_blank_lines.hl7"))
    assert [s.name for s in m.segments][:3] == ["MSH", "EVN", "PID"]
    assert all(not s.raw[-1].endswith(("\r", "\n")) for s in m.segments)


def test_a_byte_order_mark_is_skipped() -> None:
    data = sample("ms__ADT01-23.hl7")
    assert data.startswith(b"\xef\xbb\xbf")
    m = er7.parse(data)
    assert m.msh.name == "MSH" and m.control_id == "599102"
    utf16 = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|7|P|2.5\rPID|1||1^^^H^MR||Müller^Jürgen".encode("utf-16")
    assert er7.parse(utf16).segment("PID").value(5) == "Müller"  # type: ignore[union-attr]


def header(charset: str = "") -> str:
    return "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|9|P|2.5|||AL|NE||" + charset


def test_msh18_names_the_character_set() -> None:
    latin1 = (header("8859/1") + "\rPID|1||1^^^H^MR||Müller^Zoë").encode("iso8859-1")
    m = er7.parse(latin1)
    assert m.charset == "iso8859-1" and m.segment("PID").value(5, 2) == "Zoë"  # type: ignore[union-attr]
    utf8 = (header("UNICODE UTF-8") + "\rPID|1||1^^^H^MR||王^小明").encode()
    assert er7.parse(utf8).segment("PID").value(5) == "王"  # type: ignore[union-attr]


def test_bytes_invalid_in_the_declared_character_set_are_rejected_where_they_are() -> None:
    data = (header("UNICODE UTF-8") + "\rEVN|A01\rPID|1||1^^^H^MR||").encode() + b"M\xfcller"
    with pytest.raises(Hl7Error) as caught:
        er7.parse(data)
    assert caught.value.code == "102" and caught.value.reject and str(caught.value.location) == "PID"
    assert "M\xfcller" not in str(caught.value) and "ller" not in str(caught.value)  # no value in the error


def test_an_unknown_character_set_is_a_table_error() -> None:
    with pytest.raises(Hl7Error) as caught:
        er7.parse(header("KLINGON").encode())
    assert caught.value.code == "103" and str(caught.value.location) == "MSH-18"


def test_ascii_that_is_utf8_is_read_as_utf8() -> None:
    m = er7.parse((header("ASCII") + "\rPID|1||1^^^H^MR||Müller").encode())
    assert m.charset == "utf-8" and m.segment("PID").value(5) == "Müller"  # type: ignore[union-attr]


def test_undeclared_bytes_fall_back_to_windows_1252() -> None:
    m = er7.parse((header() + "\rPID|1||1^^^H^MR||O\u2019Brien").encode("cp1252"))
    assert m.charset == "cp1252" and m.segment("PID").value(5) == "O\u2019Brien"  # type: ignore[union-attr]


D = Delimiters()


@pytest.mark.parametrize("escaped,plain", [
    ("a\\F\\b", "a|b"), ("a\\S\\b", "a^b"), ("a\\T\\b", "a&b"), ("a\\R\\b", "a~b"), ("a\\E\\b", "a\\b"),
    ("line\\.br\\next", "line\nnext"), ("a\\.sp\\b", "a\nb"), ("a\\.sp3\\b", "a\n\n\nb"), ("a\\.sk2\\b", "a  b"),
    ("\\.in+4\\a\\.ti-2\\b\\.fi\\\\.nf\\", "ab"), ("\\.ce\\title", "\ntitle"), ("\\H\\bold\\N\\", "bold"),
    ("\\X41\\", "A"), ("\\XC3A9\\", "é"), ("\\X0D0A\\", "\r\n"), ("\\Zlocal\\x", "x"), ("\\C2842\\x", "x"),
    ("50\\", "50\\"), ("a\\b", "a\\b"), ("\\Q\\", "\\Q\\"), ("\\X4\\", "\\X4\\"), ("\\\\", "\\\\"),
    ("no escapes", "no escapes"), ("\\E\\F\\E\\", "\\F\\"),
])
def test_escape_sequences(escaped: str, plain: str) -> None:
    assert er7.unescape(escaped, D) == plain


def test_hex_escapes_are_bytes_of_the_message_character_set() -> None:
    assert er7.unescape("\\XE9\\", D, "iso8859-1") == "é"
    assert er7.unescape("\\XE9\\", D, "utf-8") == "é"  # not UTF-8: read as Latin-1 rather than lost


def test_explicit_nulls_are_told_from_empty_values() -> None:
    m = er7.parse(header() + '\rPID|1||1^^^H^MR||""|||""^x')
    pid = m.segment("PID")
    assert pid is not None
    assert pid.is_null(5) and pid.value(5) is None
    assert not pid.is_null(6) and pid.value(6) is None
    assert pid.first(8).raw(1) == '""' and pid.value(8) is None and pid.value(8, 2) == "x"  # type: ignore[union-attr]


def test_z_segments_are_kept() -> None:
    m = er7.parse(header() + "\rPID|1||1\rZPD|custom^value|x")
    assert [s.name for s in m.segments] == ["MSH", "PID", "ZPD"]
    assert m.segment("ZPD").value(1, 2) == "value"  # type: ignore[union-attr]


def test_segment_sequence_numbers() -> None:
    m = er7.parse(header() + "\rOBX|1\rNTE|1\rOBX|2")
    assert [(s.name, s.sequence) for s in m.segments] == [("MSH", 1), ("OBX", 1), ("NTE", 1), ("OBX", 2)]
    assert str(m.all("OBX")[1].location(5, 1, 2)) == "OBX[2]-5.1.2"
    assert m.all("OBX")[1].location(5, 1, 2).parts() == ["OBX", "2", "5", "1", "2"]


def test_a_batch() -> None:
    envelope = er7.parse_envelope(sample("pyhl7__sample_batch1_BHS.hl7"))
    assert envelope.kind == "batch" and len(envelope.batches) == 1
    batch = envelope.batches[0]
    assert batch.header is not None and batch.header.value(4) == "ABCHS"
    assert batch.trailer is not None
    assert [m.control_id for m in envelope.messages] == [m.msh.field(10) for m in envelope.messages]
    assert len(envelope.messages) == 2 and not envelope.problems
    with pytest.raises(Hl7Error) as caught:
        er7.parse(sample("pyhl7__sample_batch1_BHS.hl7"))
    assert caught.value.code == "200"


def test_a_file() -> None:
    envelope = er7.parse_envelope(sample("pyhl7__sample_file_FHS.hl7"))
    assert envelope.kind == "file" and envelope.header is not None and envelope.trailer is not None
    assert envelope.header.value(4) == "ABCHS" and envelope.header.value(10) == "abchs20070101123401.hl7"
    assert len(envelope.batches) == 1 and envelope.messages and not envelope.problems


def test_counts_that_disagree_are_reported_as_warnings() -> None:
    text = "BHS|^~\\&|A\r" + header() + "\rPID|1\r" + header() + "\rPID|2\rBTS|3"
    envelope = er7.parse_envelope(text)
    assert len(envelope.messages) == 2
    [problem] = envelope.problems
    assert problem.severity == "W" and str(problem.location) == "BTS-1"


def test_messages_without_a_batch_header_are_a_batch() -> None:
    envelope = er7.parse_envelope(header() + "\rPID|1\r" + header() + "\rPID|2")
    assert envelope.kind == "batch" and len(envelope.messages) == 2


@pytest.mark.parametrize("text,code,where", [
    ("", "101", "MSH"),
    ("   \r\n\n", "101", "MSH"),
    ("PID|1||1", "100", "PID"),
    ("MSH", "101", "MSH-2"),
    ("MSH|^~", "102", "MSH-2"),
    ("MSH|^~\\&&|A", "102", "MSH-2"),
    ("MSH|^~a&|A", "102", "MSH-2"),
    ("MSH|^~\\&|A\rpid|1", "100", "MSH"),
    ("MSH|^~\\&|A\rPIDX|1", "100", "PID"),
    ("MSH|^~\\&|A\rFTS|1\rMSH|^~\\&|B", "100", "MSH"),
    ("BHS|^~\\&\rPID|1", "100", "PID"),
])
def test_structural_errors(text: str, code: str, where: str) -> None:
    with pytest.raises(Hl7Error) as caught:
        er7.parse_envelope(text)
    assert caught.value.reject and caught.value.code == code
    assert str(caught.value.location) == where


# --- properties -------------------------------------------------------------------------------------------------

SPECIAL = "|^~\\&#"
text_values = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.lists(text_values, min_size=1, max_size=3), min_size=1, max_size=3), min_size=1, max_size=6))
def test_escaped_values_read_back_as_written(fields: list[list[list[str]]]) -> None:
    d = Delimiters(truncation="#")
    written = [d.repetition.join(d.component.join(er7.escape(c, d) for c in rep) for rep in f) for f in fields]
    m = er7.parse("MSH|^~\\&#|A|B|C|D|20240101||ADT^A01|1|P|2.7\rZZZ|" + "|".join(written))
    z = m.segment("ZZZ")
    assert z is not None
    for n, f in enumerate(fields, start=1):
        reps = z.repetitions(n)
        if not "".join(c for rep in f for c in rep):
            assert reps == [] or all(r.is_empty() for r in reps)
            continue
        for rep, values in zip(reps, f, strict=True):
            for i, value in enumerate(values, start=1):
                expected = value.replace("\r\n", "\n").replace("\r", "\n").strip()
                assert (rep.value(i) or "") == ("" if expected == '""' else expected)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_either_read_or_are_an_hl7_error(data: bytes) -> None:
    for candidate in (data, b"MSH|^~\\&|" + data, b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\r" + data):
        try:
            envelope = er7.parse_envelope(candidate)
        except Hl7Error as exc:
            assert exc.code in ("100", "101", "102", "103", "200") and exc.location is not None
            continue
        for m in envelope.messages:
            for s in m.segments:
                for n in range(1, len(s) + 1):
                    for rep in s.repetitions(n):
                        for c in range(1, len(rep.components) + 1):
                            rep.value(c)
