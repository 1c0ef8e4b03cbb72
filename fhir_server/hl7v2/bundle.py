"""One transaction Bundle per message: conditional writes keyed on business identifiers, and a Provenance.

Every resource a message describes is written by a conditional update on its business identifier (PUT
``Type?identifier=system|value``): the first message creates it, a repeat or an update (A08) finds and replaces the
same one. Resources that v2 gives no identifier of their own (an allergy, a diagnosis, an observation) get one
derived from what identifies them in the message (the patient, the order, the code and sub-id), under systems of
the form ``urn:id:hl7v2:<what>``. References between entries are ``urn:uuid:`` full URLs, which the transaction
resolves to the ids the conditional updates find or create.
"""

from __future__ import annotations

import datetime
import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from fhir_server.hl7v2.er7 import Message

JsonDict = dict[str, Any]
DERIVED = "urn:id:hl7v2:"


def message_key(message: Message) -> tuple[str, str] | None:
    """A message's identity: its sender (MSH-3 and MSH-4) and control id (MSH-10); None without a control id."""
    control_id = message.control_id
    if not control_id:
        return None
    sender = "/".join(v or "" for v in (message.msh.value(3), message.msh.value(4)))
    return DERIVED + "message:" + re.sub(r"[^A-Za-z0-9._~/-]", "_", sender), control_id


def token(system: str, value: str) -> str:
    """``system|value`` for a token search, escaped as FHIR search escapes (\\ | , $) and then for the URL."""
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$")
    return quote(f"{esc(system)}|{esc(value)}", safe="")


@dataclass
class Entry:
    full_url: str
    resource: JsonDict
    method: str
    url: str
    if_none_exist: str | None = None


@dataclass
class Builder:
    """The entries of one message's transaction, in the order they are added."""

    message: Message
    entries: list[Entry] = field(default_factory=list)
    _keys: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def upsert(self, rtype: str, resource: JsonDict, key: tuple[str, str] | None) -> str:
        """Add ``resource`` (conditionally updated on ``key``, an identifier it carries; created when there is
        none) and return its ``urn:uuid:`` full URL. The same key twice in one message is one resource: the later
        description wins."""
        resource = {"resourceType": rtype, **resource}
        if key is not None:
            system, value = key
            ident = {"system": system, "value": value} if system else {"value": value}
            identifiers = resource.setdefault("identifier", [])
            if not any(i.get("value") == value and i.get("system", "") == system for i in identifiers):
                identifiers.insert(0, ident)
            known = self._keys.get((rtype, system, value))
            if known is not None:
                for e in self.entries:
                    if e.full_url == known:
                        e.resource = resource
                return known
            full_url = f"urn:uuid:{uuid.uuid4()}"
            self._keys[(rtype, system, value)] = full_url
            query = f"identifier={token(system, value)}" if system else f"identifier={quote(value, safe='')}"
            self.entries.append(Entry(full_url, resource, "PUT", f"{rtype}?{query}"))
            return full_url
        full_url = f"urn:uuid:{uuid.uuid4()}"
        self.entries.append(Entry(full_url, resource, "POST", rtype))
        return full_url

    def create_if_none(self, rtype: str, resource: JsonDict, key: tuple[str, str]) -> str:
        """A conditional create: ``resource`` unless one with identifier ``key`` exists (then nothing is written)."""
        system, value = key
        resource = {"resourceType": rtype, "identifier": [{"system": system, "value": value}], **resource}
        full_url = f"urn:uuid:{uuid.uuid4()}"
        self.entries.append(Entry(full_url, resource, "POST", rtype, f"identifier={token(system, value)}"))
        return full_url

    def patch(self, rtype: str, key: tuple[str, str], parameters: JsonDict) -> None:
        """A conditional FHIRPath Patch of the one resource with identifier ``key``."""
        system, value = key
        self.entries.append(Entry(f"urn:uuid:{uuid.uuid4()}", parameters, "PATCH",
                                  f"{rtype}?identifier={token(system, value)}"))

    def bundle(self, *, recorded: datetime.datetime | None = None) -> JsonDict:
        """The transaction, with a Provenance of the message: who sent it (MSH-3/4), its control id (MSH-10) and
        the transformation, targeting every resource written."""
        entries = [{"fullUrl": e.full_url, "resource": e.resource,
                    "request": {"method": e.method, "url": e.url,
                                **({"ifNoneExist": e.if_none_exist} if e.if_none_exist else {})}}
                   for e in self.entries]
        targets = [{"reference": e.full_url} for e in self.entries if e.method != "PATCH"]
        if targets:
            request: JsonDict = {"method": "POST", "url": "Provenance"}
            key = message_key(self.message)
            if key is not None:  # once per message: a repeat that gets this far adds no second one
                request["ifNoneExist"] = f"entity:identifier={token(*key)}"
            entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": self._provenance(targets, recorded),
                            "request": request})
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    def _provenance(self, targets: list[JsonDict], recorded: datetime.datetime | None) -> JsonDict:
        msh = self.message.msh
        app, facility = msh.value(3), msh.value(4)
        sender = " ".join(p for p in (app, facility and f"({facility})") if p) or "HL7 v2 sender"
        code, event, _ = self.message.message_type
        when = (recorded or datetime.datetime.now(datetime.UTC)).isoformat(timespec="milliseconds")
        entity: JsonDict = {"role": "source", "what": {"display": f"HL7 v2 message {code}^{event}"}}
        key = message_key(self.message)
        if key is not None:
            entity["what"]["identifier"] = {"system": key[0], "value": key[1]}
        return {
            "resourceType": "Provenance",
            "target": targets,
            "recorded": when.replace("+00:00", "Z"),
            "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                                     "code": "UPDATE", "display": "revise"}],
                         "text": "HL7 v2 to FHIR transformation"},
            "agent": [
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                      "code": "author", "display": "Author"}]},
                 "who": {"display": sender}},
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                      "code": "assembler", "display": "Assembler"}]},
                 "who": {"display": "fhir-server HL7 v2 adapter"}},
            ],
            "entity": [entity],
        }
