"""HL7 v2 over HTTP: ``POST /hl7v2/{tenant}`` with a message (or a batch) as the body; the ACK as the answer.

Authorized like every FHIR call (a bearer token; the token's scopes must allow the writes the message makes, or
the ACK says AE with the refusal). The answer is HTTP 200 with the ACK whatever its code: AA, AE and AR are the
application's answer, not the transport's. A missing or invalid token is HTTP 401, a body over the limit 413, a
body of another media type 415, each with an OperationOutcome, as on the FHIR endpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Blueprint, Response, current_app, request

from fhir_server.api.routes import _base_url
from fhir_server.engine.storage_errors import storage_errors
from fhir_server.errors import PayloadTooLarge, UnsupportedMediaType
from fhir_server.security.oauth.bearer import access_for_token, bearer_token

if TYPE_CHECKING:
    from fhir_server.hl7v2.intake import Intake
    from fhir_server.settings import Settings
    from fhir_server.storage.store import Storage

bp = Blueprint("hl7v2", __name__)
MEDIA_TYPES = ("x-application/hl7-v2+er7", "application/hl7-v2", "application/hl7-v2+er7", "text/plain",
               "application/edi-hl7v2", "application/octet-stream")


@bp.route("/hl7v2/<tenant>", methods=["POST"])
def receive(tenant: str) -> Response:
    settings: Settings = current_app.extensions["fhir_settings"]
    storage: Storage = current_app.extensions["fhir_storage"]
    base_url = _base_url(settings, tenant)
    token = bearer_token(base_url, request.headers.get("Authorization"))
    with storage_errors(tenant):
        access = access_for_token(storage, tenant, base_url, token)
    media_type = (request.mimetype or "").lower()
    if media_type not in MEDIA_TYPES:
        raise UnsupportedMediaType(f"POST an HL7 v2 message as one of {', '.join(MEDIA_TYPES[:2])} or text/plain, "
                                   f"not {media_type or 'a body without Content-Type'}")
    if (request.content_length or 0) > settings.hl7_max_message_bytes:
        raise PayloadTooLarge(f"An HL7 v2 transmission may hold at most {settings.hl7_max_message_bytes} bytes")
    data = request.get_data(cache=False)
    if len(data) > settings.hl7_max_message_bytes:
        raise PayloadTooLarge(f"An HL7 v2 transmission may hold at most {settings.hl7_max_message_bytes} bytes")
    intake: Intake = current_app.extensions["fhir_hl7v2"]
    with storage_errors(tenant):
        answer = intake.receive(tenant, base_url, access, data)
    charset = {"utf-8": "utf-8", "ascii": "us-ascii"}.get(answer.codec, answer.codec)
    return Response(answer.data, status=200, content_type=f"x-application/hl7-v2+er7; charset={charset}")
