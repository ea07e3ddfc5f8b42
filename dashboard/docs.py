"""API reference: `/docs` (Swagger UI on /v1/openapi.json, vendored, offline) and `/v1/asyncapi.json`, the MQTT API
as an AsyncAPI 3.0 document whose payload schemas are generated from the request and reply models."""

from __future__ import annotations

import functools
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template
from pydantic import BaseModel, Field

from pki.config import Settings
from pki.replies import Error, Issued
from pki.requests import CreateRequest, RenewRequest, SignRequest
from pki.schemas import bound_days

from .ca_http import max_days
from .views import CONTENT_SECURITY_POLICY, static_url

bp = Blueprint("docs", __name__)

SCHEMA_REF = "#/components/schemas/{model}"


class Reading(BaseModel):
    """A thermometer's reading on iot/thermometer/<device>/temperature (extra fields are allowed)."""

    device_id: str = Field(description="The device id, its certificate's CN.")
    timestamp: str = Field(description="The device's clock, ISO 8601.")
    temperature: float = Field(description="Degrees Celsius.")
    seq: int | None = Field(None, description="The device's reading counter (gaps show lost readings).")


def _schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """JSON schemas of `models`, with their nested definitions hoisted into components.schemas."""
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(by_alias=True, ref_template=SCHEMA_REF, mode="validation")
        schemas.update(schema.pop("$defs", {}))
        schema.pop("title", None)
        schemas[model.__name__] = schema
    return schemas


def _message(name: str, summary: str, schema: str | None = None, content_type: str = "application/json") -> dict:
    payload = {"$ref": SCHEMA_REF.format(model=schema)} if schema else {"type": "string", "enum": ["online", "offline"]}
    return {"name": name, "summary": summary, "contentType": content_type, "payload": payload}


@functools.cache
def _asyncapi(broker: str, max_days: int) -> dict[str, Any]:
    messages = {
        "SignRequest": _message(
            "SignRequest", "Sign a CSR, or renew a stored key (the HTTP sign body).", "SignRequest"
        ),
        "CreateRequest": _message(
            "CreateRequest", "A new key and certificate (the HTTP create body).", "CreateRequest"
        ),
        "RenewRequest": _message(
            "RenewRequest", "A device renews itself: its current certificate is the credential.", "RenewRequest"
        ),
        "Issued": _message("Issued", "The certificate issued (QoS 1).", "Issued"),
        "Error": _message("Error", "Why a request was refused (only to the requester).", "Error"),
        "Reading": _message("Reading", "One reading, QoS 1 device -> broker.", "Reading"),
        "Presence": _message(
            "Presence", "Retained online / offline (offline is also the last will).", content_type="text/plain"
        ),
    }
    ref = {name: {"$ref": f"#/components/messages/{name}"} for name in messages}
    name_parameter = {"description": "The requester's name as it wrote it (a collector's MAC keeps its colons)."}
    channels = {
        "caSign": {
            "address": "ssl/sign",
            "messages": {"SignRequest": ref["SignRequest"]},
            "description": "Only the CA reads it; retained requests are never processed.",
        },
        "caCreate": {
            "address": "ssl/create",
            "messages": {"CreateRequest": ref["CreateRequest"]},
            "description": "Only the CA reads it; retained requests are never processed.",
        },
        "caRenew": {
            "address": "ssl/renew/{cn}",
            "messages": {"RenewRequest": ref["RenewRequest"]},
            "parameters": {
                "cn": {
                    "description": "The publishing certificate's CN: the ACL lets a "
                    "certificate write only its own renew topic."
                }
            },
        },
        "caReply": {
            "address": "ssl/{name}",
            "messages": {"Issued": ref["Issued"], "Error": ref["Error"]},
            "parameters": {"name": name_parameter},
            "description": "Replies; each identity reads only its own. MQTT v5 requests may name a "
            "ResponseTopic and CorrelationData instead.",
        },
        "telemetry": {
            "address": "iot/thermometer/{device}/temperature",
            "messages": {"Reading": ref["Reading"]},
            "parameters": {"device": {"description": "The device's CN; it may write only its own."}},
        },
        "presence": {
            "address": "iot/thermometer/{device}/status",
            "messages": {"Presence": ref["Presence"]},
            "parameters": {"device": {"description": "The device's CN."}},
        },
    }

    def request(channel: str, message: str) -> dict[str, Any]:
        return {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
            "reply": {
                "channel": {"$ref": "#/channels/caReply"},
                "messages": [
                    {"$ref": "#/channels/caReply/messages/Issued"},
                    {"$ref": "#/channels/caReply/messages/Error"},
                ],
            },
        }

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "IoT CA Lab: MQTT API",
            "version": "1",
            "description": "The CA over MQTT (the HTTP API's twin, /v1/openapi.json) and the thermometers' "
            "topics. Mutual TLS only: the certificate's CN is the MQTT user.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "broker": {
                "host": broker,
                "protocol": "mqtts",
                "protocolVersion": "5.0",
                "security": [{"$ref": "#/components/securitySchemes/clientCertificate"}],
            }
        },
        "channels": channels,
        "operations": {
            "sign": request("caSign", "SignRequest"),
            "create": request("caCreate", "CreateRequest"),
            "renew": request("caRenew", "RenewRequest"),
            "publishReading": {
                "action": "send",
                "channel": {"$ref": "#/channels/telemetry"},
                "messages": [{"$ref": "#/channels/telemetry/messages/Reading"}],
            },
            "publishPresence": {
                "action": "send",
                "channel": {"$ref": "#/channels/presence"},
                "messages": [{"$ref": "#/channels/presence/messages/Presence"}],
            },
        },
        "components": {
            "messages": messages,
            "schemas": bound_days(_schemas(SignRequest, CreateRequest, RenewRequest, Issued, Error, Reading), max_days),
            "securitySchemes": {
                "clientCertificate": {
                    "type": "X509",
                    "description": "A certificate from the lab's root; its CN is the identity the ACL applies to.",
                }
            },
        },
    }


@bp.get("/v1/asyncapi.json")
def asyncapi() -> Response:
    settings: Settings = current_app.extensions["lab_settings"]
    return jsonify(_asyncapi(f"{settings.broker_address}:{settings.broker_port}", max_days()))


@bp.get("/docs")
def docs() -> Response:
    response = Response(render_template("docs.html", static_url=static_url), mimetype="text/html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
