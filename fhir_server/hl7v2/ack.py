"""Acknowledgements (original mode, HL7 v2 chapter 2): an ACK for every message received, whatever its state.

- AA: the message was processed and its data committed.
- AE: it could not be processed (an error in its content, or ours); ERR segments say where and why.
- AR: it was rejected unread (it does not parse, or its type, version or processing id is not one this server takes).

MSA-2 echoes the message's control id (MSH-10). The ACK is addressed back to the sender (its MSH-3/4 become the ACK's
MSH-5/6), in the message's own delimiters, version and character set. From version 2.5 on an error is reported in
ERR-2 (location), ERR-3 (code, HL7 table 0357) and ERR-4 (severity); before, in ERR-1. Error texts name places and
kinds of problem, never values: the ACK goes back over the wire and into the sender's logs.
"""

from __future__ import annotations

import datetime
import re
import uuid
from dataclasses import dataclass

from fhir_server.hl7v2.er7 import (
    CHARSETS,
    Delimiters,
    Hl7Error,
    Location,
    Message,
    Segment,
    escape,
    lines,
)

ACCEPT, ERROR, REJECT = "AA", "AE", "AR"
TABLE_0357 = "HL70357"
_TEXTS = {"100": "Segment sequence error", "101": "Required field missing", "102": "Data type error",
          "103": "Table value not found", "200": "Unsupported message type", "201": "Unsupported event code",
          "202": "Unsupported processing id", "203": "Unsupported version id", "204": "Unknown key identifier",
          "205": "Duplicate key identifier", "206": "Application record locked", "207": "Application internal error"}


@dataclass(frozen=True, slots=True)
class Original:
    """What an ACK needs of the message it answers (read from its MSH, or what could be read of it)."""

    delimiters: Delimiters
    sender: tuple[str, str] = ("", "")  # MSH-3, MSH-4 as sent
    receiver: tuple[str, str] = ("", "")  # MSH-5, MSH-6 as sent
    trigger: str = ""
    control_id: str = ""  # MSH-10 as sent
    processing_id: str = "P"
    version: str = "2.5.1"
    charset_field: str = ""  # MSH-18 as sent
    codec: str = "utf-8"

    @classmethod
    def of(cls, message: Message) -> Original:
        m = message.msh
        return cls(message.delimiters, (m.field(3), m.field(4)), (m.field(5), m.field(6)), m.value(9, 2) or "",
                   m.field(10), m.field(11) or "P", m.field(12) or "2.5.1", m.field(18), message.charset)

    @classmethod
    def of_header(cls, header: Segment) -> Original:
        """A batch's or file's header (BHS, FHS: sender and receiver where MSH has them), for a batch ACK."""
        return cls(header.delimiters, (header.field(3), header.field(4)), (header.field(5), header.field(6)),
                   codec=header.charset)

    @classmethod
    def salvage(cls, data: bytes | str) -> Original:
        """As much of an unreadable message's header as can be read, to address its rejection."""
        text = data.decode("iso8859-1") if isinstance(data, bytes) else data
        header = next((s for s in lines(text.lstrip("\ufeff\xef\xbb\xbf")) if s.startswith("MSH")), None)
        if header is None:
            return cls(Delimiters())
        try:
            d = Delimiters.of(header)
        except Hl7Error:  # the ACK is written with the default encoding characters, and the sender's field separator
            fs = header[3:4]
            d = Delimiters(fs) if fs and not fs.isalnum() and fs not in "^~\\& \t" else Delimiters()
        f = header.split(d.field)  # f[n] is MSH-(n+1)

        def at(n: int) -> str:
            return f[n - 1] if n - 1 < len(f) else ""

        message_type = at(9).split(d.component)
        charset = at(18).split(d.repetition)[0].strip().upper()
        known = charset in CHARSETS
        return cls(d, (at(3), at(4)), (at(5), at(6)), message_type[1] if len(message_type) > 1 else "", at(10),
                   at(11) or "P", at(12) or "2.5.1", at(18) if known else "", CHARSETS[charset] if known else "utf-8")


def _version(text: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text.split("^")[0])
    return tuple(int(p) for p in parts[:3]) or (2, 5, 1)


def build(original: Original, code: str, errors: list[Hl7Error] | tuple[Hl7Error, ...] = (), *,
          text: str | None = None, now: datetime.datetime | None = None) -> str:
    """The ACK (ER7 text, segments ended by CR) answering ``original`` with ``code``."""
    d = original.delimiters
    when = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%d%H%M%S%z")
    version = original.version
    modern = _version(version) >= (2, 5)
    msh = ["MSH", d.encoding_characters, original.receiver[0], original.receiver[1], original.sender[0],
           original.sender[1], when, "", d.component.join(["ACK", original.trigger, "ACK"]) if original.trigger else "ACK",
           uuid.uuid4().hex[:20].upper(), original.processing_id, version]
    if original.charset_field:
        msh += [""] * 5 + [original.charset_field]  # MSH-13 to MSH-17 empty, MSH-18
    segments = [d.field.join(msh)]
    summary = text if text is not None else ("; ".join(str(e) for e in errors) if errors else "")
    segments.append(d.field.join(["MSA", code, original.control_id, escape(summary[:80], d)]).rstrip(d.field))
    for e in errors:
        segments.append(_err(e, d, modern))
    return "".join(s + "\r" for s in segments)


def _err(e: Hl7Error, d: Delimiters, modern: bool) -> str:
    where = e.location or Location("MSH")
    message = escape(str(e.message), d)
    described = escape(_TEXTS.get(e.code, ""), d)
    if not modern:  # ERR-1 (ELD): segment^sequence^field^code&text&table
        code = d.subcomponent.join([e.code, described, TABLE_0357])
        parts = [where.segment, str(where.sequence), str(where.field) if where.field else "", code]
        return d.field.join(["ERR", d.component.join(parts)])
    location = d.component.join(where.parts())
    return d.field.join(["ERR", "", location, d.component.join([e.code, described, TABLE_0357]), e.severity,
                         "", "", "", message])


def encode(ack: str, original: Original) -> bytes:
    """The ACK's bytes, in the message's character set (what cannot be written in it is escaped as \\Xhh\\)."""
    try:
        return ack.encode(original.codec)
    except (UnicodeEncodeError, LookupError):
        return ack.encode("utf-8")
