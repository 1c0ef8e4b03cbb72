"""AuditEvents in the shapes of IHE Basic Audit Log Patterns (BALP 1.1): who did what, to what, and how it went.

RESTful interactions follow BALP's Read, Query, Create, Update and Delete patterns (and their Patient*
variants when exactly one patient is concerned; the profile is claimed only for successes, which is all BALP
profiles): ``type`` rest, ``subtype`` the restful-interaction code, the client, server and user agents with
the codes each pattern gives them, ``source`` this server, and entities for the resource, the query
(``entity.query``, base64 of the request), every patient whose data was touched (``AuditEvent?patient=``
finds them), and the request id (BALP's XrequestId). One event per interaction, also when it concerns several
patients (BALP would split a multi-patient search into one event per patient; here the count of events is
the count of interactions, and each patient is still an entity the ``patient`` parameter finds).

Other events: user authentication (DICOM 110114: logins, second factors, token grants, refreshes and
revocations), security alerts and security configuration (110113: lockouts, key rotations, tenants, users
and clients, monitoring alerts), exports (110106) and uses of the audit log itself (110101).

Nothing secret goes in: no resource body, no token (a grant is named by its id), no password.
"""

from __future__ import annotations

import base64
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from fhir_server.clock import instant, now_us

DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
LIFECYCLE = "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle"
BALP_ENTITY = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
BALP_PROFILE = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
IHE_EVENT = "urn:ihe:event-type-code"
# This server's own codes and identifier systems.
SUBTYPE = "urn:fhir-server:audit-event-subtype"
ROLE = "urn:fhir-server:role"
CLIENT_ID = "urn:fhir-server:client-id"
USERNAME = "urn:fhir-server:username"
OS_USER = "urn:fhir-server:os-user"
GRANT = "urn:fhir-server:grant"

# DICOM subtypes of a Security Alert (DCM 110113)
SECURITY_CONFIGURATION = "110129"
USER_SECURITY_ATTRIBUTES_CHANGED = "110137"
EMERGENCY_OVERRIDE_STARTED = "110127"

SERVER_NAME = "fhir-server"
MAX_DESCRIPTION = 1000

# restful-interaction code -> (action, BALP pattern)
REST = {
    "read": ("R", "Read"), "vread": ("R", "Read"), "history-instance": ("R", None), "history-type": ("R", None),
    "history-system": ("R", None), "capabilities": ("R", None), "search-type": ("E", "Query"),
    "search-system": ("E", "Query"), "create": ("C", "Create"), "update": ("U", "Update"), "patch": ("U", "Update"),
    "delete": ("D", "Delete"), "transaction": ("E", None), "batch": ("E", None), "operation": ("E", None),
}


BREAK_GLASS_PURPOSE = ("BTG", "ETREAT")  # v3-ActReason: break the glass, emergency treatment


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request came from: the caller's network address and the request id (X-Request-Id)."""

    address: str | None = None
    request_id: str | None = None


_origin: ContextVar[Origin | None] = ContextVar("fhir_audit_origin", default=None)


def set_origin(origin: Origin | None) -> None:
    """The origin of what this thread (or context) handles next: set by the HTTP layer for each request."""
    _origin.set(origin)


def current_origin() -> Origin:
    return _origin.get() or Origin()


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acted: the client application and the user of an access token, the server itself, or an operator at
    the command line; and from where."""

    client_id: str | None = None
    username: str | None = None
    fhir_user: str | None = None  # e.g. Practitioner/123
    roles: tuple[str, ...] = ()
    purpose: tuple[str, ...] = ()  # v3-ActReason codes (BTG and ETREAT for a break-glass grant)
    grant_id: str | None = None
    address: str | None = None  # the caller's network address
    internal: bool = False  # the server itself (or its command line)
    os_user: str | None = None  # the operator, at the command line


@dataclass(frozen=True, slots=True)
class Place:
    """Where it was recorded: the tenant (source.site) and this server's base URL."""

    tenant: str
    base_url: str | None = None


def coding(system: str, code: str) -> dict[str, str]:
    """A coding, without its display: BALP leaves displays out, and every one would be indexed for :text searches
    of every record. The codes' meanings are in this module and in docs/audit.md."""
    return {"system": system, "code": code}


def outcome_code(status: int) -> str:
    """AuditEvent.outcome of an HTTP status: 0 success, 4 the request's fault, 8 the server's."""
    return "0" if status < 400 else "4" if status < 500 else "8"


def resource_entity(reference: str) -> dict[str, Any]:
    return {"what": {"reference": reference}, "type": coding(ENTITY_TYPE, "2"),
            "role": coding(OBJECT_ROLE, "4")}


def patient_entity(patient_id: str) -> dict[str, Any]:
    return {"what": {"reference": f"Patient/{patient_id}"}, "type": coding(ENTITY_TYPE, "1"),
            "role": coding(OBJECT_ROLE, "1")}


def query_entity(request_line: str) -> dict[str, Any]:
    return {"type": coding(ENTITY_TYPE, "2"), "role": coding(OBJECT_ROLE, "24"),
            "query": base64.b64encode(request_line.encode()).decode()}


def request_entity(request_id: str) -> dict[str, Any]:
    return {"what": {"identifier": {"value": request_id}},
            "type": coding(BALP_ENTITY, "XrequestId")}


def grant_entity(grant_id: str) -> dict[str, Any]:
    return {"what": {"identifier": {"system": GRANT, "value": grant_id}}, "type": coding(ENTITY_TYPE, "2"),
            "role": coding(OBJECT_ROLE, "13")}


def event_entity(event_id: str) -> dict[str, Any]:
    return {"what": {"reference": f"AuditEvent/{event_id}"}, "type": coding(ENTITY_TYPE, "2"),
            "role": coding(OBJECT_ROLE, "13")}


def rest_event(kind: str, status: int, description: str | None, actor: Actor, place: Place, *, resources: list[str],
               patients: list[str], request_line: str | None, request_id: str | None) -> dict[str, Any]:
    """A RESTful interaction (``kind``: a restful-interaction code) that ended with HTTP ``status``."""
    action, pattern = REST[kind]
    outcome = outcome_code(status)
    entities = [resource_entity(r) for r in resources]
    if request_line is not None and (pattern == "Query" or kind.startswith(("history-", "operation", "batch", "transaction"))
                                     or not resources):
        entities.append(query_entity(request_line))
    entities.extend(patient_entity(p) for p in patients)
    if request_id:
        entities.append(request_entity(request_id))
    profile = None
    if pattern is not None and outcome == "0" and (resources or pattern == "Query"):
        profile = f"{BALP_PROFILE}{'Patient' if len(patients) == 1 else ''}{pattern}"
    client_type, server_type, user_type = _agent_types(pattern or ("Read" if action == "R" else "Query"))
    event = _event(coding(EVENT_TYPE, "rest"), [coding(RESTFUL, kind)], action, outcome, description,
                   _agents(actor, place, client_type, server_type, user_type), _source(place, "4"), entities, profile)
    return event


def complete_read(event: dict[str, Any], *, status: int, description: str | None, version: int | None,
                  patients: list[str]) -> dict[str, Any]:
    """A read's event as ``rest_event`` made it before the read's outcome was known (a success, its one resource
    unversioned, no patients), completed with what the read found: the same event ``rest_event`` makes with
    these (but for its id and time)."""
    done = {**event, "entity": [dict(e) for e in event.get("entity", [])]}
    outcome = outcome_code(status)
    done["outcome"] = outcome
    if description:
        done["outcomeDesc"] = description[:MAX_DESCRIPTION]
    meta = {k: v for k, v in done.get("meta", {}).items() if k != "profile"}
    if outcome == "0":
        if version is not None:
            reference = done["entity"][0]["what"]["reference"]
            done["entity"][0] = {**done["entity"][0], "what": {"reference": f"{reference}/_history/{version}"}}
        done["entity"][1:1] = [patient_entity(p) for p in patients]
        meta["profile"] = [f"{BALP_PROFILE}{'Patient' if len(patients) == 1 else ''}Read"]
    if meta:
        done["meta"] = meta
    else:
        done.pop("meta", None)
    return done


def _agent_types(pattern: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(client, server, user) agent types of a BALP pattern. BALP's Read names the client the destination of the
    data, its Query, Create and Update the source of the request; Delete the application and the custodian."""
    source, destination = coding(DCM, "110153"), coding(DCM, "110152")
    recipient, author = coding(PARTICIPATION, "IRCP"), coding(PARTICIPATION, "AUT")
    if pattern == "Read":
        return destination, source, recipient
    if pattern == "Query":
        return source, destination, recipient
    if pattern == "Delete":
        return coding(DCM, "110150"), coding(PROVENANCE_PARTICIPANT, "custodian"), author
    return source, destination, author  # Create, Update


def auth_event(subtype: list[dict[str, str]], status: int, description: str | None, actor: Actor, place: Place, *,
               grant_id: str | None = None, request_id: str | None = None, alert: bool = False) -> dict[str, Any]:
    """User authentication (logins, second factors, token grants, refreshes, revocations) or, with ``alert``, a
    security alert of the authorization server (an account locked)."""
    event_type = coding(DCM, "110113") if alert else coding(DCM, "110114")
    entities = [grant_entity(grant_id)] if grant_id else []
    if request_id:
        entities.append(request_entity(request_id))
    client_type = coding(DCM, "110150")
    server_type = coding("https://profiles.ihe.net/ITI/BALP/CodeSystem/UserAgentTypes", "AuthzOauthService")
    return _event(event_type, subtype, "E", outcome_code(status), description,
                  _agents(actor, place, client_type, server_type, coding(PARTICIPATION, "IRCP")),
                  _source(place, "6"), entities, None)


def security_event(code: str, description: str, actor: Actor, place: Place, *, dicom_subtype: str = SECURITY_CONFIGURATION,
                   entities: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A change to the security configuration (keys, tenants, users, clients) or a monitoring alert."""
    subtypes = [coding(DCM, dicom_subtype), coding(SUBTYPE, code)]
    return _event(coding(DCM, "110113"), subtypes, "E", "0", description,
                  _agents(actor, place, coding(DCM, "110150"), None, coding(PARTICIPATION, "AUT")),
                  _source(place, "4"), entities or [], None)


def log_use_event(code: str, description: str, actor: Actor, place: Place, *, export: bool,
                  query: str | None = None, outcome: str = "0") -> dict[str, Any]:
    """The audit log read at the command line: an export (DICOM 110106, a disclosure) or a verification (110101)."""
    event_type = coding(DCM, "110106") if export else coding(DCM, "110101")
    subtypes = [coding(SUBTYPE, code)]
    if export:
        subtypes.insert(0, coding(LIFECYCLE, "disclose"))
    entities = [query_entity(query)] if query else []
    return _event(event_type, subtypes, "R" if export else "E", outcome, description,
                  _agents(actor, place, coding(DCM, "110153"), None, coding(PARTICIPATION, "IRCP")),
                  _source(place, "4"), entities, None)


HL7V2_MESSAGE = "urn:fhir-server:hl7v2-message"  # identifier system of received HL7 v2 messages: sender|MSH-10


def import_event(code: str, status: int, description: str | None, actor: Actor, place: Place, *, message: str,
                 request_id: str | None = None) -> dict[str, Any]:
    """Data received into the server (DICOM 110107 Import): an HL7 v2 message (``message``: sender and control id,
    no content), with the outcome of its processing."""
    entities = [{"what": {"identifier": {"system": HL7V2_MESSAGE, "value": message[:200]}},
                 "type": coding(ENTITY_TYPE, "2"), "role": coding(OBJECT_ROLE, "3")}]
    if request_id:
        entities.append(request_entity(request_id))
    return _event(coding(DCM, "110107"), [coding(SUBTYPE, code)], "C", outcome_code(status), description,
                  _agents(actor, place, coding(DCM, "110153"), coding(DCM, "110152"), coding(PARTICIPATION, "AUT")),
                  _source(place, "4"), entities, None)


def _event(event_type: dict[str, str], subtypes: list[dict[str, str]], action: str, outcome: str, description: str | None,
           agents: list[dict[str, Any]], source: dict[str, Any], entities: list[dict[str, Any]], profile: str | None) -> dict[str, Any]:
    event: dict[str, Any] = {"resourceType": "AuditEvent", "id": str(uuid.uuid4())}
    if profile:
        event["meta"] = {"profile": [profile]}
    event.update({"type": event_type, "subtype": subtypes, "action": action, "recorded": instant(now_us()), "outcome": outcome})
    if description:
        event["outcomeDesc"] = description[:MAX_DESCRIPTION]
    event["agent"] = agents
    event["source"] = source
    if entities:
        event["entity"] = entities
    return event


def _source(place: Place, source_type: str) -> dict[str, Any]:
    observer = {"display": f"{SERVER_NAME} {place.base_url}" if place.base_url else SERVER_NAME}
    return {"site": place.tenant, "observer": observer, "type": [coding(SOURCE_TYPE, source_type)]}


def _agents(actor: Actor, place: Place, client_type: dict[str, str], server_type: dict[str, str] | None,
            user_type: dict[str, str]) -> list[dict[str, Any]]:
    has_user = bool(actor.username or actor.os_user)
    agents: list[dict[str, Any]] = []
    if actor.internal:
        client: dict[str, Any] = {"type": {"coding": [coding(DCM, "110150")]},
                                  "who": {"display": "fhir-server command line" if actor.os_user else SERVER_NAME},
                                  "requestor": not has_user}
    else:
        who: dict[str, Any] = ({"identifier": {"system": CLIENT_ID, "value": actor.client_id}, "display": actor.client_id}
                               if actor.client_id else {"display": "anonymous (no valid access token)"})
        client = {"type": {"coding": [client_type]}, "who": who, "requestor": not has_user}
        if actor.client_id:
            client["altId"] = actor.client_id
    if actor.address:
        client["network"] = {"address": actor.address, "type": "2"}
    agents.append(client)
    if server_type is not None:
        # The server's own base URL is source.observer's: as agent.network.address (BALP's server slice) it would be
        # indexed on every record, for an address search that every record matches.
        agents.append({"type": {"coding": [server_type]}, "who": {"display": SERVER_NAME}, "requestor": False})
    if has_user:
        agents.append(_user_agent(actor, user_type))
    return agents


def _user_agent(actor: Actor, user_type: dict[str, str]) -> dict[str, Any]:
    name = actor.username or actor.os_user or ""
    who: dict[str, Any] = {"identifier": {"system": USERNAME if actor.username else OS_USER, "value": name}, "display": name}
    if actor.fhir_user:
        who["reference"] = actor.fhir_user
    user: dict[str, Any] = {"type": {"coding": [user_type]}, "who": who, "altId": name, "name": name, "requestor": True}
    if actor.roles:
        user["role"] = [{"coding": [coding(ROLE, r)]} for r in actor.roles]
    if actor.grant_id:
        user["policy"] = [_grant_uri(actor.grant_id)]
    if actor.purpose:
        user["purposeOfUse"] = [{"coding": [coding(ACT_REASON, p)]} for p in actor.purpose]
    return user


def _grant_uri(grant_id: str) -> str:
    try:
        return uuid.UUID(hex=grant_id).urn
    except ValueError:
        return f"{GRANT}:{grant_id}"
