"""MLLP framing over a byte stream cut anywhere."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_server.hl7v2 import er7, mllp

STREAM = (Path(__file__).parent.parent / "data" / "hl7v2" / "d3_mllp_stream_two_messages.bin").read_bytes()


def test_the_two_frame_stream_sample() -> None:
    frames = mllp.Deframer().feed(STREAM)
    assert len(frames) == 2
    messages = [er7.parse(f) for f in frames if isinstance(f, bytes)]
    assert [(m.message_type, m.control_id) for m in messages] == [
        (("ADT", "A01", "ADT_A01"), "4637382"), (("ORU", "R01", "ORU_R01"), "20251014154001-425")]


def test_byte_by_byte() -> None:
    d = mllp.Deframer()
    frames = [f for b in STREAM for f in d.feed(bytes([b]))]
    assert frames == mllp.Deframer().feed(STREAM) and not d.inside and d.dropped == 0


def test_noise_between_frames_is_dropped() -> None:
    d = mllp.Deframer()
    out = d.feed(b"\r\n  " + mllp.frame(b"MSH|one") + b"\n\n" + mllp.frame(b"MSH|two") + b"xx")
    assert out == [b"MSH|one", b"MSH|two"] and d.dropped == 8


def test_a_frame_cut_off_by_a_new_start_is_dropped() -> None:
    d = mllp.Deframer()
    assert d.feed(b"\x0bMSH|cut") == []
    assert d.inside
    assert d.feed(b"\x0bMSH|whole\x1c\r") == [b"MSH|whole"] and d.dropped == len(b"MSH|cut")


def test_an_end_without_its_carriage_return() -> None:
    d = mllp.Deframer()
    assert d.feed(b"\x0bMSH|a\x1c\x0bMSH|b\x1c") == [b"MSH|a", b"MSH|b"]
    assert d.feed(b"\r\x0bMSH|c\x1c\r") == [b"MSH|c"] and d.dropped == 0


def test_a_frame_over_the_limit_is_refused_as_it_grows() -> None:
    d = mllp.Deframer(max_size=10)
    out = d.feed(b"\x0b" + b"x" * 8)
    assert out == []
    out = d.feed(b"y" * 100)
    assert len(out) == 1 and isinstance(out[0], mllp.FrameTooLarge)
    assert d.feed(b"z" * 1000) == []  # skipped, not buffered
    assert d.feed(b"\x1c\r" + mllp.frame(b"MSH|ok")) == [b"MSH|ok"]


def test_five_megabytes_in_pieces() -> None:
    payload = b"MSH|^~\\&|A\r" + b"OBX|1|ED|x||" + b"A" * (5 * 1024 * 1024) + b"\r"
    d = mllp.Deframer()
    data = mllp.frame(payload)
    frames = [f for i in range(0, len(data), 65536) for f in d.feed(data[i:i + 65536])]
    assert frames == [payload]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b"")), max_size=5),
       st.lists(st.integers(min_value=1, max_value=40), max_size=20))
def test_any_cut_gives_the_same_frames(payloads: list[bytes], cuts: list[int]) -> None:
    data = b"".join(mllp.frame(p) for p in payloads)
    d, out, i = mllp.Deframer(), [], 0
    for size in cuts:
        out += d.feed(data[i:i + size])
        i += size
    out += d.feed(data[i:])
    assert out == payloads
