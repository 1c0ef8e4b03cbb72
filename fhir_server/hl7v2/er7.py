"""HL7 v2 messages in ER7 (the pipe-and-hat encoding): bytes in, segments, fields and decoded values out.

A receiver has to take what real senders send, so the reading is lenient where the standard's intent is clear and
strict where guessing would corrupt data:

- Segments end with CR, LF or CRLF (the standard says CR; files and many interfaces use the others), blank lines and
  a UTF-8 or UTF-16 byte order mark are ignored.
- The delimiters are the message's own (MSH-1 and MSH-2, including the v2.7 truncation character), whatever they are.
- The character set is MSH-18's (HL7 table 0211). Without MSH-18 the bytes are read as UTF-8, or, when they are not
  UTF-8, as Windows-1252 (what most legacy senders mean); bytes that are not valid in a declared character set are
  a rejection, located at their segment, never a guess.
- Escape sequences are decoded (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\P\\, \\Xhh..\\ as bytes of the message's character
  set, the formatting commands \\.br\\ \\.sp\\ \\.sk\\ \\.in\\ \\.ti\\ \\.ce\\ \\.fi\\ \\.nf\\, highlighting dropped);
  an escape character that starts no complete sequence is kept as it is.
- ``""`` is an explicit null (the sender says: delete this value), told apart from an empty value.

Nothing here logs, and no error message quotes a value: messages carry PHI. An ``Hl7Error`` names where the problem
is (segment, its position, field, repetition, component, sub-component) and an HL7 error code (table 0357), which
is what an ACK's ERR segment reports.

python-hl7 (the ``hl7`` package) was the first candidate; it is not used because its parser splits segments on CR
only, its ``unescape`` decodes ``\\X..\\`` byte by byte as code points (wrong for any multi-byte character set) and
logs the field's value on errors, and it does not read MSH-18.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

# HL7 table 0357 (message error condition codes) used here
SEGMENT_SEQUENCE = "100"
REQUIRED_MISSING = "101"
DATA_TYPE = "102"
TABLE_VALUE = "103"
UNSUPPORTED_TYPE = "200"
UNSUPPORTED_EVENT = "201"
UNSUPPORTED_PROCESSING_ID = "202"
UNSUPPORTED_VERSION = "203"
DUPLICATE_KEY = "205"
INTERNAL = "207"

NULL = '""'  # an explicit null, as sent
HEADERS = ("MSH", "BHS", "FHS")  # segments whose first two fields are the delimiters
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}\Z")

# HL7 table 0211 (alternate character sets), to Python codecs. "UNICODE" (v2.3-2.5) is read as UTF-8, as senders mean
# it; the ISO 2022 multi-byte sets need the switching sequences, which arrive in the bytes themselves.
CHARSETS = {
    "ASCII": "ascii", "8859/1": "iso8859-1", "8859/2": "iso8859-2", "8859/3": "iso8859-3", "8859/4": "iso8859-4",
    "8859/5": "iso8859-5", "8859/6": "iso8859-6", "8859/7": "iso8859-7", "8859/8": "iso8859-8", "8859/9": "iso8859-9",
    "8859/15": "iso8859-15", "ISO IR6": "ascii", "ISO IR100": "iso8859-1", "ISO IR14": "shift_jis",
    "ISO IR87": "iso2022_jp", "ISO IR159": "iso2022_jp_2", "GB 18030-2000": "gb18030", "KS X 1001": "euc_kr",
    "CNS 11643-1992": "big5", "BIG-5": "big5", "UNICODE": "utf-8", "UNICODE UTF-8": "utf-8", "UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16", "UNICODE UTF-32": "utf-32", "WINDOWS-1252": "cp1252", "CP1252": "cp1252",
}
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


@dataclass(frozen=True, slots=True)
class Location:
    """Where in a message: HL7's ERL (segment id, its sequence among the message's segments of that id, field,
    repetition, component, sub-component), each part optional after the segment."""

    segment: str
    sequence: int = 1
    field: int | None = None
    repetition: int | None = None
    component: int | None = None
    subcomponent: int | None = None

    def parts(self) -> list[str]:
        out = [self.segment, str(self.sequence)]
        for part in (self.field, self.repetition, self.component, self.subcomponent):
            if part is None:
                break
            out.append(str(part))
        return out

    def __str__(self) -> str:
        text = f"{self.segment}"
        if self.sequence != 1:
            text += f"[{self.sequence}]"
        if self.field is not None:
            text += f"-{self.field}"
            for part in (self.repetition, self.component, self.subcomponent):
                if part is None:
                    break
                text += f".{part}"
        return text


class Hl7Error(Exception):
    """A message that cannot be taken as sent: an HL7 error code (table 0357), where, and what is wrong (never the
    value itself). ``reject`` errors are structural (the ACK says AR); the others are processing errors (AE)."""

    def __init__(self, code: str, message: str, location: Location | None = None, *, reject: bool = False,
                 severity: str = "E") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.location = location
        self.reject = reject
        self.severity = severity  # HL7 table 0516: E error, W warning, I information

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


@dataclass(frozen=True, slots=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str | None = None

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as it is written."""
        return self.component + self.repetition + self.escape + self.subcomponent + (self.truncation or "")

    @classmethod
    def of(cls, header: str) -> Delimiters:
        """The delimiters a header segment (MSH, BHS or FHS) declares."""
        name = header[:3]
        if len(header) < 5:
            raise Hl7Error(REQUIRED_MISSING, "the header segment ends before its encoding characters",
                           Location(name, 1, 2), reject=True)
        fs = header[3]
        end = header.find(fs, 4)
        chars = header[4:] if end < 0 else header[4:end]
        if not 4 <= len(chars) <= 5:
            raise Hl7Error(DATA_TYPE, f"{name}-2 must hold 4 encoding characters (5 with the truncation character), "
                                      f"not {len(chars)}", Location(name, 1, 2), reject=True)
        found = [fs, *chars]
        if any(c.isalnum() or c in "\r\n\t " for c in found):
            raise Hl7Error(DATA_TYPE, f"{name}-1 and {name}-2 must not be letters, digits, spaces or line ends",
                           Location(name, 1, 2), reject=True)
        repeated = sorted({repr(c) for c in found if found.count(c) > 1})
        if repeated:
            raise Hl7Error(DATA_TYPE, f"{name}-1 and {name}-2 must be distinct characters: {', '.join(repeated)} "
                                      "is used twice", Location(name, 1, 2), reject=True)
        return cls(fs, chars[0], chars[1], chars[2], chars[3], chars[4] if len(chars) == 5 else None)


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment: its fields as sent (``raw[n]`` is field n, numbered as HL7 numbers them: for MSH, BHS and FHS
    field 1 is the field separator and field 2 the encoding characters)."""

    raw: tuple[str, ...]
    delimiters: Delimiters
    charset: str
    sequence: int = 1  # its place among the message's segments of the same id

    @property
    def name(self) -> str:
        return self.raw[0]

    def __len__(self) -> int:
        """The number of the last field present."""
        return len(self.raw) - 1

    def field(self, n: int) -> str:
        """Field ``n`` as sent (escaped), '' when absent."""
        return self.raw[n] if 0 < n < len(self.raw) else ""

    def repetitions(self, n: int) -> list[Field]:
        """The repetitions of field ``n`` (none when it is empty)."""
        text = self.field(n)
        if not text:
            return []
        if self.name in HEADERS and n in (1, 2):
            return [Field(((text,),), self)]
        d = self.delimiters
        return [Field(tuple(tuple(c.split(d.subcomponent)) for c in rep.split(d.component)), self)
                for rep in text.split(d.repetition)]

    def first(self, n: int) -> Field | None:
        reps = self.repetitions(n)
        return reps[0] if reps else None

    def value(self, n: int, component: int = 1, subcomponent: int = 1, repetition: int = 1) -> str | None:
        """The decoded text at field ``n`` (its ``repetition``, ``component`` and ``subcomponent``, counted from 1);
        None when empty, absent or an explicit null."""
        reps = self.repetitions(n)
        if len(reps) < repetition:
            return None
        return reps[repetition - 1].value(component, subcomponent)

    def is_null(self, n: int) -> bool:
        """Field ``n`` is the explicit null ``""``: the sender asks for the value to be removed."""
        return self.field(n) == NULL

    def location(self, n: int | None = None, repetition: int | None = None, component: int | None = None,
                 subcomponent: int | None = None) -> Location:
        return Location(self.name, self.sequence, n, repetition, component, subcomponent)

    def text(self) -> str:
        """The segment as ER7 (with its own delimiters)."""
        if self.name in HEADERS:
            return self.name + self.raw[1] + self.delimiters.field.join(self.raw[2:])
        return self.delimiters.field.join(self.raw)


@dataclass(frozen=True, slots=True)
class Field:
    """One repetition of a field: components of sub-components, as sent; ``value`` decodes."""

    components: tuple[tuple[str, ...], ...]
    segment: Segment

    def raw(self, component: int = 1, subcomponent: int = 1) -> str:
        if not 0 < component <= len(self.components):
            return ""
        subs = self.components[component - 1]
        return subs[subcomponent - 1] if 0 < subcomponent <= len(subs) else ""

    def value(self, component: int = 1, subcomponent: int = 1) -> str | None:
        """The decoded text, without leading or trailing blanks; None when that leaves nothing."""
        text = self.raw(component, subcomponent)
        if not text or text == NULL:
            return None
        return unescape(text, self.segment.delimiters, self.segment.charset).strip() or None

    def subcomponents(self, component: int = 1) -> list[str | None]:
        """The decoded sub-components of a component (a component whose type is itself composite, such as HD in CX-4)."""
        if not 0 < component <= len(self.components):
            return []
        d, cs = self.segment.delimiters, self.segment.charset
        return [None if not s or s == NULL else (unescape(s, d, cs).strip() or None) for s in self.components[component - 1]]

    def is_empty(self) -> bool:
        return all(not s or s == NULL for c in self.components for s in c)


@dataclass(slots=True)
class Message:
    """A message: its segments in order, its delimiters and character set."""

    segments: list[Segment]
    delimiters: Delimiters
    charset: str
    _by_name: dict[str, list[Segment]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for s in self.segments:
            self._by_name.setdefault(s.name, []).append(s)

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def all(self, name: str) -> list[Segment]:
        return self._by_name.get(name, [])

    def segment(self, name: str) -> Segment | None:
        found = self._by_name.get(name)
        return found[0] if found else None

    @property
    def message_type(self) -> tuple[str | None, str | None, str | None]:
        """MSH-9: message code, trigger event, message structure (e.g. ("ADT", "A01", "ADT_A01"))."""
        return self.msh.value(9, 1), self.msh.value(9, 2), self.msh.value(9, 3)

    @property
    def control_id(self) -> str | None:
        return self.msh.value(10)

    @property
    def version(self) -> str | None:
        return self.msh.value(12)

    def text(self, terminator: str = "\r") -> str:
        return "".join(s.text() + terminator for s in self.segments)


@dataclass(slots=True)
class Batch:
    """BHS ... BTS (either may be missing in what senders send) around messages."""

    header: Segment | None
    messages: list[Message]
    trailer: Segment | None


@dataclass(slots=True)
class Envelope:
    """What one transmission holds: a single message, a batch, or a file (FHS ... FTS) of batches."""

    kind: str  # "message", "batch" or "file"
    batches: list[Batch]
    header: Segment | None = None  # FHS
    trailer: Segment | None = None  # FTS
    problems: list[Hl7Error] = field(default_factory=list)  # counts in BTS-1/FTS-1 that disagree with the content

    @property
    def messages(self) -> list[Message]:
        return [m for b in self.batches for m in b.messages]


# --- reading --------------------------------------------------------------------------------------------------

def decode(data: bytes | str) -> tuple[str, str]:
    """The text of a transmission and the codec it was read with (MSH-18's, or a byte order mark's)."""
    if isinstance(data, str):
        return data.removeprefix("\ufeff"), "utf-8"
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(codec), codec
            except UnicodeDecodeError:
                raise Hl7Error(DATA_TYPE, f"the message starts with a {codec} byte order mark but is not {codec}",
                               Location("MSH"), reject=True) from None
    declared = _declared_charset(data)
    if declared is not None:
        known = CHARSETS.get(declared.upper())
        if known is None:
            raise Hl7Error(TABLE_VALUE, "MSH-18 names a character set this server does not know (HL7 table 0211)",
                           Location("MSH", 1, 18), reject=True)
        try:
            return data.decode(known), known
        except UnicodeDecodeError as exc:
            bad = exc.start
        if known == "ascii":  # a sender that says ASCII and means UTF-8, its superset: common, and harmless
            try:
                return data.decode("utf-8"), "utf-8"
            except UnicodeDecodeError as exc:
                bad = exc.start
        raise Hl7Error(DATA_TYPE, f"bytes that are not valid in the character set MSH-18 declares ({declared})",
                       _segment_at(data, bad), reject=True)
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        try:
            return data.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:
            return data.decode("iso8859-1"), "iso8859-1"


def _declared_charset(data: bytes) -> str | None:
    """MSH-18 (its first repetition), read before the message is decoded: MSH is ASCII in every character set HL7
    allows but UTF-16 and UTF-32, which announce themselves with a byte order mark."""
    text = data[:4096].decode("iso8859-1")
    start = text.find("MSH")
    if start < 0 or len(text) < start + 8:
        return None
    header = re.split(r"[\r\n]", text[start:], maxsplit=1)[0]
    fs = header[3]
    fields = header.split(fs)
    if len(fields) <= 17:  # fields[n] is MSH-(n+1): MSH-18 is fields[17]
        return None
    chars = fields[1]
    rep = chars[1] if len(chars) > 1 else "~"
    value = fields[17].split(rep)[0].strip()
    return value or None


def _segment_at(data: bytes, offset: int) -> Location:
    """The segment that holds byte ``offset``."""
    before = data[:offset].replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    lines = [line for line in before.split(b"\r") if line.strip()]
    names: dict[str, int] = {}
    for line in lines:
        name = line[:3].decode("iso8859-1")
        names[name] = names.get(name, 0) + 1
    if not lines:
        return Location("MSH")
    name = lines[-1][:3].decode("iso8859-1")
    return Location(name, names[name])


def lines(text: str) -> list[str]:
    """The segments of a transmission's text: any line end, blank lines dropped, leading blanks of a line too."""
    return [s.lstrip(" \t") for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()]


def parse(data: bytes | str) -> Message:
    """One message (a transmission with a batch or file envelope is an error here: see ``parse_envelope``)."""
    envelope = parse_envelope(data)
    if envelope.kind != "message":
        raise Hl7Error(UNSUPPORTED_TYPE, f"a {envelope.kind} of messages where one message was expected",
                       Location("BHS" if envelope.kind == "batch" else "FHS"), reject=True)
    return envelope.messages[0]


def parse_envelope(data: bytes | str) -> Envelope:
    """A transmission: one message, or a batch (BHS/BTS) or file (FHS/FTS) of them."""
    text, charset = decode(data)
    segs = lines(text)
    if not segs:
        raise Hl7Error(REQUIRED_MISSING, "the transmission is empty", Location("MSH"), reject=True)
    if segs[0][:3] not in HEADERS:
        raise Hl7Error(SEGMENT_SEQUENCE, "a message must begin with MSH (or a batch with BHS, a file with FHS)",
                       Location(_name(segs[0])), reject=True)
    envelope = Envelope("message", [])
    batch: Batch | None = None
    current: list[str] = []
    delimiters = Delimiters.of(segs[0])

    def finish_message() -> None:
        nonlocal batch
        if current:
            if batch is None:
                batch = Batch(None, [], None)
                envelope.batches.append(batch)
            batch.messages.append(_message(current, charset))
            current.clear()

    for line in segs:
        name = line[:3]
        if name == "FHS":
            if envelope.header is not None or envelope.batches or current:
                raise Hl7Error(SEGMENT_SEQUENCE, "FHS must be the first segment of a file, and come once",
                               Location("FHS"), reject=True)
            envelope.kind = "file"
            delimiters = Delimiters.of(line)
            envelope.header = _segment(line, delimiters, charset)
        elif name == "BHS":
            finish_message()
            if envelope.kind == "message":
                envelope.kind = "batch"
            delimiters = Delimiters.of(line)
            batch = Batch(_segment(line, delimiters, charset), [], None)
            envelope.batches.append(batch)
        elif name == "BTS":
            finish_message()
            if batch is None:
                batch = Batch(None, [], None)
                envelope.batches.append(batch)
                if envelope.kind == "message":
                    envelope.kind = "batch"
            batch.trailer = _segment(line, delimiters, charset)
            batch = None  # what follows is another batch
        elif name == "FTS":
            finish_message()
            envelope.trailer = _segment(line, delimiters, charset)
            if envelope.kind == "message":
                envelope.kind = "file"
        elif name == "MSH":
            finish_message()
            if envelope.trailer is not None:
                raise Hl7Error(SEGMENT_SEQUENCE, "a message after the file trailer (FTS)", Location("MSH"), reject=True)
            current.append(line)
        else:
            if not current:
                raise Hl7Error(SEGMENT_SEQUENCE, "a segment before the message header (MSH) it belongs to",
                               Location(_name(line)), reject=True)
            current.append(line)
    finish_message()
    if not envelope.messages and envelope.kind == "message":
        raise Hl7Error(REQUIRED_MISSING, "no message header (MSH)", Location("MSH"), reject=True)
    if envelope.kind == "message" and (len(envelope.batches) != 1 or len(envelope.batches[0].messages) != 1):
        envelope.kind = "batch"  # several messages without BHS: a batch in all but name
    _check_counts(envelope)
    return envelope


def _check_counts(envelope: Envelope) -> None:
    for i, batch in enumerate(envelope.batches, start=1):
        if batch.trailer is not None and batch.trailer.value(1) is not None:
            declared = batch.trailer.value(1)
            if declared != str(len(batch.messages)):
                envelope.problems.append(Hl7Error(
                    SEGMENT_SEQUENCE, f"BTS-1 counts {declared} messages, the batch holds {len(batch.messages)}",
                    Location("BTS", i, 1), severity="W"))
    if envelope.trailer is not None and envelope.trailer.value(1) is not None:
        declared = envelope.trailer.value(1)
        if declared != str(len(envelope.batches)):
            envelope.problems.append(Hl7Error(
                SEGMENT_SEQUENCE, f"FTS-1 counts {declared} batches, the file holds {len(envelope.batches)}",
                Location("FTS", 1, 1), severity="W"))


def _name(line: str) -> str:
    name = line[:3]
    return name if _SEGMENT_ID.match(name) else "MSH"


def _message(segment_lines: list[str], charset: str) -> Message:
    delimiters = Delimiters.of(segment_lines[0])
    counts: dict[str, int] = {}
    segments = []
    for line in segment_lines:
        name = line[:3]
        if not _SEGMENT_ID.match(name) or (len(line) > 3 and line[3] != delimiters.field):
            raise Hl7Error(SEGMENT_SEQUENCE, "a segment whose id is not three capital letters or digits followed by "
                                             "the field separator", Location(_name(line), counts.get(name, 0) + 1),
                           reject=True)
        counts[name] = counts.get(name, 0) + 1
        segments.append(_segment(line, delimiters, charset, counts[name]))
    return Message(segments, delimiters, charset)


def _segment(line: str, delimiters: Delimiters, charset: str, sequence: int = 1) -> Segment:
    name = line[:3]
    if name in HEADERS:
        header = Delimiters.of(line)
        rest = line[4:].split(header.field)
        return Segment((name, header.field, *rest), header, charset, sequence)
    return Segment(tuple(line.split(delimiters.field)), delimiters, charset, sequence)


# --- escapes --------------------------------------------------------------------------------------------------

_FORMATTING = {".br": "\n", ".fi": "", ".nf": "", ".ce": "\n", "H": "", "N": ""}


def unescape(text: str, d: Delimiters, charset: str = "utf-8") -> str:
    """Decode the escape sequences of one value (HL7 v2 chapter 2, "Use of escape sequences in text fields")."""
    esc = d.escape
    if esc not in text:
        return text
    out: list[str] = []
    i = 0
    while True:
        start = text.find(esc, i)
        if start < 0:
            out.append(text[i:])
            break
        out.append(text[i:start])
        end = text.find(esc, start + 1)
        decoded = None if end < 0 else _sequence(text[start + 1:end], d, charset)
        if decoded is None:  # not a sequence: the escape character stands for itself
            out.append(esc)
            i = start + 1
        else:
            out.append(decoded)
            i = end + 1
    return "".join(out)


def _sequence(body: str, d: Delimiters, charset: str) -> str | None:
    simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": d.escape}
    if body in simple:
        return simple[body]
    if body == "P":
        return d.truncation or ""
    if body in _FORMATTING:
        return _FORMATTING[body]
    if body.startswith((".sp", ".sk", ".in", ".ti")):
        count = body[3:].strip()
        number = int(count) if re.fullmatch(r"[+-]?\d{1,3}", count) else (1 if not count else None)
        if number is None:
            return None
        if body.startswith(".sp"):
            return "\n" * max(number, 1)
        if body.startswith(".sk"):
            return " " * max(number, 0)
        return ""  # indentation: no meaning in plain text
    if body[:1] == "X" and len(body) > 1 and len(body) % 2 == 1 and re.fullmatch(r"[0-9A-Fa-f]+", body[1:]):
        raw = bytes.fromhex(body[1:])
        try:
            return raw.decode(charset)
        except (UnicodeDecodeError, LookupError):
            return raw.decode("iso8859-1")
    if body[:1] in ("C", "M") and re.fullmatch(r"[0-9A-Fa-f]{4}|[0-9A-Fa-f]{6}", body[1:]):
        return ""  # ISO 2022 character set switches: the text is already decoded
    if body[:1] == "Z" and len(body) > 1:
        return ""  # locally defined: no meaning agreed with this server
    return None


def escape(text: str, d: Delimiters) -> str:
    """``text`` as an ER7 value: every delimiter escaped, line ends as \\.br\\."""
    e = d.escape
    table = {e: f"{e}E{e}", d.field: f"{e}F{e}", d.component: f"{e}S{e}", d.subcomponent: f"{e}T{e}",
             d.repetition: f"{e}R{e}"}
    if d.truncation:
        table[d.truncation] = f"{e}P{e}"
    out = []
    for c in text.replace("\r\n", "\n").replace("\r", "\n"):
        out.append(f"{e}.br{e}" if c == "\n" else table.get(c, c))
    return "".join(out)


def iter_values(segment: Segment, n: int, component: int = 1) -> Iterator[str]:
    """The decoded ``component`` of every repetition of field ``n`` that has one."""
    for rep in segment.repetitions(n):
        value = rep.value(component)
        if value is not None:
            yield value

