"""Receiving HL7 v2: a transmission in, its ACK out; each message through the engine as one transaction.

The same for every transport (HTTP, MLLP):

1. Read the transmission (``er7``). What cannot be read is stored as it came and rejected: AR, with what can be
   salvaged of its MSH.
2. Store each message (``store``, sealed) before anything else is done with it. A message received before (same
   sender and MSH-10) is answered with its first ACK and not processed again; one that a process that died left
   half-done is taken up (and found done if its Provenance, which commits with its data, exists).
3. Map it to a transaction Bundle (``messages``). A type or event without a map is AR; content that cannot be
   mapped (a required field missing, a date that is not one) is AE, located.
4. Hand the Bundle to the engine with the caller's access, exactly as a FHIR client's transaction: validation,
   authorization, encryption, indexing and the transaction's own AuditEvent happen there. AA once it committed; AE
   when the engine refused it (nothing of the message is written: a transaction is all or nothing).
5. Store the outcome and the ACK, and record the receipt (an AuditEvent, DICOM 110107 Import) in the tenant's log.

A batch or file is answered with one ACK per message, in a batch of its own (BHS ... BTS).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from fhir_server.engine.request import FhirRequest
from fhir_server.errors import FhirError
from fhir_server.hl7v2 import ack, er7, messages
from fhir_server.hl7v2.bundle import message_key, token
from fhir_server.hl7v2.er7 import INTERNAL, Hl7Error, Location
from fhir_server.hl7v2.store import ERROR, PROCESSED, REJECTED, MessageStore
from fhir_server.security import audit_events as ae
from fhir_server.storage.tenants import TenantNotFound

if TYPE_CHECKING:
    from fhir_server.engine.engine import Engine
    from fhir_server.security.access import AccessContext

log = logging.getLogger(__name__)
JsonDict = dict[str, Any]
_STATUS = {ack.ACCEPT: 200, ack.ERROR: 422, ack.REJECT: 400}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one message came to: its ACK code, errors, and (for AA) the transaction's response."""

    code: str
    errors: tuple[Hl7Error, ...]
    original: ack.Original
    response: JsonDict | None = None
    duplicate: bool = False  # a message processed before (same sender and control id): acknowledged, not redone
    ack: bytes | None = None  # a duplicate's: the first ACK, as it was sent


@dataclass(frozen=True, slots=True)
class Answer:
    """The acknowledgement of a transmission: its bytes, and each message's outcome."""

    data: bytes
    outcomes: tuple[Outcome, ...]
    codec: str


class Intake:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.zone = engine.settings.hl7_timezone
        self.store = MessageStore(engine.storage)

    def receive(self, tenant: str, base_url: str, access: AccessContext, data: bytes) -> Answer:
        """Store and process a transmission; its ACK. Raises TenantNotFound for an unknown tenant, and
        AuditUnavailable (503) when a receipt cannot be recorded."""
        try:
            envelope = er7.parse_envelope(data)
        except Hl7Error as exc:
            original = ack.Original.salvage(data)
            outcome = Outcome(ack.REJECT, (exc,), original)
            admission = self.store.admit(tenant, data, None, None)
            return self._answer([self._finish(tenant, base_url, access, admission.id, outcome)], None)
        if not envelope.messages:  # a batch or file with nothing in it: answered by an empty batch of ACKs
            header = envelope.header or next((b.header for b in envelope.batches if b.header is not None), None)
            nobody = ack.Original.of_header(header) if header is not None else ack.Original(er7.Delimiters())
            return self._answer([], envelope, nobody)
        single = envelope.kind == "message"
        outcomes = []
        for m in envelope.messages:
            raw = data if single else m.text().encode(m.charset, errors="replace")
            outcomes.append(self._admitted(tenant, base_url, access, m, raw, envelope.problems))
        return self._answer(outcomes, None if single else envelope)

    def replay(self, tenant: str, base_url: str, access: AccessContext, message_id: str) -> Outcome | None:
        """Process a stored message again (after a mapping fix): its new outcome, or None when another process
        is working on it now. Raises KeyError for an unknown id."""
        found = self.store.load(tenant, message_id)
        if found is None:
            raise KeyError(message_id)
        if not self.store.claim(tenant, message_id):
            return None
        _, data = found
        try:
            message = er7.parse(data)
        except Hl7Error as exc:
            outcome = Outcome(ack.REJECT, (exc,), ack.Original.salvage(data))
        else:
            try:
                outcome = self._process(tenant, base_url, access, message, [])
            except BaseException:
                self._release(tenant, message_id)
                raise
        return self._finish(tenant, base_url, access, message_id, outcome)

    def _admitted(self, tenant: str, base_url: str, access: AccessContext, message: er7.Message, raw: bytes,
                  problems: list[Hl7Error]) -> Outcome:
        original = ack.Original.of(message)
        code, event, _ = message.message_type
        admission = self.store.admit(tenant, raw, f"{code or ''}^{event or ''}", message_key(message))
        if admission.earlier is not None and not _same(admission.earlier_body, message):
            # another message under a control id the sender used before: kept (as an error), not taken for a repeat
            clash = Hl7Error("205", "MSH-10 was used by this sender for a different message before; each message "
                                    "needs a control id of its own", Location("MSH", 1, 10))
            admission = self.store.admit(tenant, raw, f"{code or ''}^{event or ''}", None)
            return self._finish(tenant, base_url, access, admission.id, Outcome(ack.ERROR, (clash,), original))
        if admission.earlier is not None:  # received before: its first ACK, and nothing done again
            earlier = er7.parse(admission.earlier)
            msa = earlier.segment("MSA")
            outcome = Outcome((msa.value(1) if msa else None) or ack.ACCEPT, (), original, duplicate=True,
                              ack=admission.earlier)
            self._record(tenant, base_url, access, outcome)
            return outcome
        if admission.busy:
            busy = Hl7Error("206", "the same message (sender and MSH-10) is being processed now; send it again "
                                   "later", Location("MSH", 1, 10))
            outcome = Outcome(ack.ERROR, (busy,), original)
            self._record(tenant, base_url, access, outcome)
            return outcome
        try:
            outcome = self._process(tenant, base_url, access, message, problems, fresh=admission.fresh)
        except BaseException:
            self._release(tenant, admission.id)
            raise
        return self._finish(tenant, base_url, access, admission.id, outcome)

    def refuse(self, tenant: str, base_url: str, access: AccessContext, head: bytes, error: Hl7Error) -> bytes:
        """The rejection (AR) of a transmission that was not taken at all (larger than the limit: not stored, and
        addressed from what of its MSH came first); recorded in the audit log like every message received."""
        outcome = Outcome(ack.REJECT, (error,), ack.Original.salvage(head))
        self._record(tenant, base_url, access, outcome)
        return self._ack_bytes(outcome)

    def _release(self, tenant: str, message_id: str) -> None:
        try:
            self.store.release(tenant, message_id)
        except Exception:  # the database is gone too: the message is taken up once its claim is stale
            log.warning("could not release HL7 v2 message %s after a failure", message_id, exc_info=True)

    def _process(self, tenant: str, base_url: str, access: AccessContext, message: er7.Message,
                 problems: list[Hl7Error], *, fresh: bool = False) -> Outcome:
        original = ack.Original.of(message)
        key = message_key(message)
        if not fresh and key is not None and self._known(tenant, base_url, access, "Provenance", key, "entity:identifier"):
            # Taken up again (left by a process that died, or replayed): its data may have committed before the
            # process that did it could say so. Then it is not done again. A message stored just now (``fresh``)
            # cannot have been processed: the store is where every message starts.
            return Outcome(ack.ACCEPT, tuple(problems), original)
        try:
            bundle = messages.to_bundle(message, zone=self.zone, known=lambda t, k: self._known(tenant, base_url, access, t, k))
        except Hl7Error as exc:
            return Outcome(ack.REJECT if exc.reject else ack.ERROR, (exc,), original)
        req = FhirRequest("POST", tenant, (), base_url, access, body=bundle)
        try:
            resp = self.engine.handle(req)
        except TenantNotFound:
            raise
        except FhirError as exc:
            if exc.status >= 500:
                raise  # ours, not the message's: it stays "processing", and is taken up when it comes again
            return Outcome(ack.ERROR, (_refusal(exc),), original)
        body = resp.body if isinstance(resp.body, dict) else None
        return Outcome(ack.ACCEPT, tuple(problems), original, body)

    def _finish(self, tenant: str, base_url: str, access: AccessContext, message_id: str, outcome: Outcome) -> Outcome:
        """Store the outcome and its ACK (the very bytes that are sent, and sent again to a repeat); the receipt."""
        status = {ack.ACCEPT: PROCESSED, ack.ERROR: ERROR, ack.REJECT: REJECTED}[outcome.code]
        first = next((e for e in outcome.errors if e.severity == "E"), None)
        outcome = dataclasses.replace(outcome, ack=self._ack_bytes(outcome))
        assert outcome.ack is not None
        self.store.finish(tenant, message_id, status, first.code if first else None, outcome.ack)
        self._record(tenant, base_url, access, outcome)
        return outcome

    def _known(self, tenant: str, base_url: str, access: AccessContext, rtype: str, key: tuple[str, str],
               param: str = "identifier") -> bool:
        """A resource with this identifier exists (as the caller may see: one it may not read counts as unknown)."""
        req = FhirRequest("GET", tenant, (rtype,), base_url, access,
                          params=((param, unquote(token(*key))), ("_summary", "count")))
        try:
            resp = self.engine.handle(req)
        except FhirError:
            return False
        return isinstance(resp.body, dict) and int(resp.body.get("total", 0)) > 0

    def _record(self, tenant: str, base_url: str, access: AccessContext, outcome: Outcome) -> None:
        if not self.engine.audit.enabled:
            return
        origin = ae.current_origin()
        actor = ae.Actor(client_id=access.client_id, username=access.username, fhir_user=access.fhir_user,
                         roles=access.roles, grant_id=access.token_id, address=origin.address, internal=access.internal)
        sender = "|".join(outcome.original.sender)
        description = "duplicate: processed before" if outcome.duplicate else None if outcome.code == ack.ACCEPT else \
            f"{outcome.code}: " + "; ".join(f"{e.code} at {e.location or 'MSH'}" for e in outcome.errors)
        event = ae.import_event("hl7v2-message", _STATUS[outcome.code], description, actor, ae.Place(tenant, base_url),
                                message=f"{sender}|{outcome.original.control_id}", request_id=origin.request_id)
        self.engine.audit.append(tenant, [event])

    @staticmethod
    def _ack_text(outcome: Outcome) -> str:
        if outcome.ack is not None:
            return outcome.ack.decode(outcome.original.codec, errors="replace")
        return ack.build(outcome.original, outcome.code, outcome.errors)

    def _ack_bytes(self, outcome: Outcome) -> bytes:
        return outcome.ack if outcome.ack is not None else ack.encode(self._ack_text(outcome), outcome.original)

    def _answer(self, outcomes: list[Outcome], envelope: er7.Envelope | None,
                addressed: ack.Original | None = None) -> Answer:
        first = outcomes[0].original if outcomes else addressed
        assert first is not None
        if envelope is None:
            return Answer(self._ack_bytes(outcomes[0]), tuple(outcomes), first.codec)
        texts = [self._ack_text(o) for o in outcomes]  # a batch of ACKs
        d = first.delimiters
        now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S%z")
        header = envelope.batches[0].header if envelope.batches else None
        reference = header.field(11) if header is not None else ""
        bhs = d.field.join(["BHS", d.encoding_characters, first.receiver[0], first.receiver[1], first.sender[0],
                            first.sender[1], now, "", "", "", uuid.uuid4().hex[:20].upper(), reference])
        text = bhs.rstrip(d.field) + "\r" + "".join(texts) + d.field.join(["BTS", str(len(texts))]) + "\r"
        return Answer(ack.encode(text, first), tuple(outcomes), first.codec)


def _same(earlier: bytes | None, message: er7.Message) -> bool:
    """The same message sent again: its segments as before, but for MSH-7 (a sender may stamp each try anew)."""
    if earlier is None:
        return False
    try:
        before = er7.parse(earlier)
    except Hl7Error:
        return False

    def shape(m: er7.Message) -> list[tuple[str, ...]]:
        return [s.raw[:7] + s.raw[8:] if s.name == "MSH" else s.raw for s in m.segments]

    return shape(before) == shape(message)


def _refusal(exc: FhirError) -> Hl7Error:
    """The engine's refusal of a message's Bundle, as an ACK's error: for bad content (400, 422) where and what kind
    (its diagnostics would quote values); otherwise the diagnostics (authorization, conflicts)."""
    errors = [i for i in exc.issues if i.severity in ("error", "fatal")]
    if exc.status in (400, 422):
        where = ", ".join(e for i in errors for e in i.expression)[:300] or "the resources"
        kinds = ", ".join(sorted({i.code for i in errors})) or exc.code
        text = f"the FHIR resources made of this message were refused (HTTP {exc.status}: {kinds} in {where})"
    else:
        text = f"HTTP {exc.status}: " + ("; ".join(i.diagnostics for i in errors)[:300] or exc.code)
    return Hl7Error(INTERNAL, text, Location("MSH"))
