"""GET /v1/openapi.json: the CA API described for humans and tools, request schemas taken from the models.

The request bodies' schemas come from `pki.requests` (the same pydantic models that validate them), so the
document cannot drift from what the service accepts.
"""

from __future__ import annotations

import functools
from typing import Any

from pki.requests import (
    TOKEN_TTL_DEFAULT,
    CreateRequest,
    RenewRequest,
    RevokeRequest,
    SignRequest,
    TokenRequest,
)

PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIGH...\n-----END PRIVATE KEY-----\n"
PEM_CSR = "-----BEGIN CERTIFICATE REQUEST-----\nMIH...\n-----END CERTIFICATE REQUEST-----\n"
PLACEHOLDER = "<CA passphrase>"

MQTT_DESCRIPTION = """\
The same requests work over MQTT (mutual TLS on the lab's broker, port 8883):

* publish the JSON body of `POST /v1/ssl/sign` to `ssl/sign`, or of `POST /v1/ssl/create` to `ssl/create`;
* a certificate (the same JSON as the HTTP body) is published at QoS 1 on `ssl/<name as written>` (a MAC keeps
  its colons: `ssl/AA:BB:CC:DD:EE:01`). Every identity reads only `ssl/<its CN>` and `ssl/<its CN>/#` (a
  collector named by its MAC also `ssl/<its MAC with colons>`); only the CA reads the request topics;
* MQTT v5: set `ResponseTopic` (under `ssl/`, not a request topic) and `CorrelationData`; the reply is also
  published there with the same `CorrelationData`, and with a user property `status` holding the HTTP status;
* a refusal (4xx, 503) is published only on the ResponseTopic, and only on one under `ssl/<CN>/...`: MQTT does
  not say who published, so an error never goes to a third party's `ssl/<name>`. Retained requests are never
  processed. Wrong passphrases count against the request's name (5 within 15 minutes lock it out for the rest
  of the window).

Renewal, MQTT only, without the passphrase (like step-ca's renew or EST's simplereenroll): a device publishes
`{"csr": PEM}` (schema `RenewRequest`) to `ssl/renew/<its CN>` and reads the reply on `ssl/<its CN>`. Its current
certificate is the credential: the broker's ACL lets a certificate write only its own `ssl/renew/<CN>` (a publish
to another device's renew topic is dropped by the broker and never reaches the CA). The CSR's CN must equal the
topic's CN and its key must be new (400, field `csr`); the entity needs a current certificate that is neither
revoked nor expired (403; 404 when none was ever issued). The new certificate keeps the current one's profile,
subject, SANs and lifetime (optional `days` may only shorten it), gets a new serial, and is recorded in the
inventory (`issued_via` = `renew`, the old certificate becomes `superseded`). The reply is the `Issued` shape
without `key`; the CA writes no files: the device stores its new pair itself. A device whose certificate has
expired or been revoked enrols again with a token (`POST /v1/ssl/tokens`, then `POST /v1/ssl/sign` with `token`
and `csr`).
"""


def _schema(model: type[Any]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    schema.pop("title", None)
    return schema


def _error(description: str, example: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}, "example": example}},
    }


WRONG_PASS = _error("Wrong passphrase; nothing was written.", {"error": "wrong passphrase", "field": "pass"})
BAD = _error("A field is missing or invalid; `field` names it.", {"error": "days must be at least 1", "field": "days"})
CONFLICT = _error("A protected identity (case-insensitive: root_ca, mosquitto, dashboard, provisioner, policy, ca, "
                  "ca-<n>, ingest, ingest-<n>) as name, cn or CSR SAN, or a lab server's name (localhost, "
                  "mosquitto, dashboard, loopback, BROKER_ADDRESS, BROKER_SANS) as a SAN.",
                  {"error": "'dashboard' is a protected name used by the lab itself", "field": "name"})
TOO_LARGE = _error("The body is larger than 64 KiB.", {"error": "request body is larger than 64 KiB"})
NOT_JSON = _error("The body is not JSON (Content-Type must be application/json).",
                  {"error": "send the request as JSON (Content-Type: application/json)"})
LOCKED_OUT = {
    **_error("Five wrong passphrases or tokens from this requester (source and name; an MQTT CN) within "
             "15 minutes; retry after Retry-After seconds.",
             {"error": "too many wrong passphrases or tokens from this client; try again in 840 seconds"}),
    "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds until the lockout ends."}},
}
NO_LOGIN = _error("No session and no valid API token.",
                  {"error": "log in, or send Authorization: Bearer <API token>"})
UNAVAILABLE = _error("The CA is not set up (no root yet) or cannot write its CRL.",
                     {"error": "the CA has no root certificate yet: run ./setup.sh certs"})


def _json_request(model: type[Any], examples: dict[str, Any]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"},
            "examples": {key: {"summary": summary, "value": value} for key, (summary, value) in examples.items()},
        }},
    }


def _issued(description: str) -> dict[str, Any]:
    example = {"name": "client", "ca": PEM_CERT, "crt": PEM_CERT, "key": PEM_KEY, "serial": "5e3c1f0a9b7d",
               "not_after": "2027-11-17T15:00:00+00:00"}
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Issued"}, "example": example}}}


def _pem(description: str, example: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/x-pem-file": {"schema": {"type": "string"},
                                                                              "example": example}}}


def _crl_response() -> dict[str, Any]:
    response = _pem("The CRL (RFC 5280 reason codes; superseded certificates once their grace is over).",
                    "-----BEGIN X509 CRL-----\n...\n-----END X509 CRL-----\n")
    response["content"]["application/pkix-crl"] = {"schema": {"type": "string", "format": "binary"}}
    return response


CURL_SIGN = ("curl -s http://127.0.0.1:5000/v1/ssl/sign -H 'Content-Type: application/json' "
             "-d '{\"name\": \"client\", \"days\": 360, \"pass\": \"'\"$CA_PASSPHRASE\"'\"}'")


@functools.cache
def openapi_document() -> dict[str, Any]:
    sign_examples = {
        "renew": ("The seed's body: re-sign the stored key of an existing entity (renewal).",
                  {"name": "client", "pass": PLACEHOLDER, "days": 360}),
        "csr": ("Sign a CSR; the private key never leaves the caller.",
                {"name": "AA:BB:CC:DD:EE:FF", "days": "360", "pass": PLACEHOLDER, "csr": PEM_CSR}),
        "token": ("First enrolment with a single-use token instead of the passphrase.",
                  {"name": "device042", "days": 90, "token": "<token from /v1/ssl/tokens>", "csr": PEM_CSR}),
    }
    create_examples = {
        "seed": ("The seed's full body.", {
            "name": "AA:BB:CC:DD:EE:FF", "days": "360", "pass": PLACEHOLDER, "country": "BR", "state": "SP",
            "locality": "Campinas", "org": "ACME", "unit": "Sensors", "cn": "AABBCCDDEEFF",
            "email": "ops@example.com"}),
        "minimal": ("Only the required fields; the CN is the name.",
                    {"name": "client", "days": 360, "pass": PLACEHOLDER}),
    }
    post_errors = {"400": BAD, "403": WRONG_PASS, "409": CONFLICT, "413": TOO_LARGE, "415": NOT_JSON,
                   "429": LOCKED_OUT, "503": UNAVAILABLE}
    paths: dict[str, Any] = {
        "/v1/ssl/sign": {"post": {
            "summary": "Issue or renew the certificate of an entity",
            "description": (
                "With `csr` (PEM), the CSR's signature is verified, its CN must equal `name`, and only its DNS, "
                "IP and e-mail SANs are copied; the certificate is stored under certs/<name>/ (a stored key "
                "that no longer matches is moved to <name>.key.previous). Without `csr`, the entity's stored "
                "key (made by `create` or the generator) is re-signed with the same subject and SANs: renewal; "
                "the reply then includes that key.\n\nExample: `" + CURL_SIGN + "`"),
            "requestBody": _json_request(SignRequest, sign_examples),
            "responses": {"201": _issued("Signed."), **post_errors,
                          "403": _error("Wrong passphrase, or an unknown, used, expired or other name's token.",
                                        {"error": "wrong passphrase", "field": "pass"}),
                          "404": _error("No csr and no stored key for this name.",
                                        {"error": "no stored key for client: send a csr, or create the entity "
                                                  "first", "field": "name"})},
        }},
        "/v1/ssl/create": {"post": {
            "summary": "Create a key and a certificate with the given subject",
            "description": (
                "The CA makes the key (EC P-256, or RSA with KEY_TYPE=rsa) and signs it. Required: name, days, "
                "pass. Optional subject fields: country (2 letters), state, locality, org, unit, cn (default: "
                "name; a host name also becomes a DNS SAN), email (subject emailAddress and an e-mail SAN). "
                "Blank optional fields count as absent. Repeating an identical request (every field but pass "
                "equal) while the certificate is valid returns the same certificate and key with 200."),
            "requestBody": _json_request(CreateRequest, create_examples),
            "responses": {"201": _issued("Created; `key` is the new private key (PKCS#8 PEM, unencrypted)."),
                          "200": _issued("Identical request repeated: the same certificate (same serial)."),
                          **post_errors},
        }},
        "/v1/ssl/revoke": {"post": {
            "summary": "Revoke a certificate (by serial) or every unexpired certificate of a name",
            "description": (
                "Marks the certificates revoked, writes a new CRL (verified before it replaces the old one), "
                "denies the identity every topic in the broker's ACL (this also stops a connection that is "
                "already open) and makes Mosquitto reload both. New TLS connections with a revoked certificate "
                "are refused. Revoking again is harmless (`already_revoked`)."),
            "requestBody": _json_request(RevokeRequest, {
                "name": ("Cut a device off.", {"name": "device001", "pass": PLACEHOLDER, "reason": "keyCompromise"}),
                "serial": ("One certificate.", {"serial": "5e3c1f0a9b7d", "pass": PLACEHOLDER})}),
            "responses": {
                "200": {"description": "Revoked.", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Revoked"},
                    "example": {"name": "device001", "revoked": ["5e3c1f0a9b7d"], "reason": "keyCompromise",
                                "already_revoked": []}}}},
                **post_errors,
                "404": _error("No certificate with that name or serial.",
                              {"error": "no certificate was issued to device009", "field": "name"})},
        }},
        "/v1/ssl/tokens": {"post": {
            "summary": "Issue a single-use enrolment token for one name",
            "description": (
                f"The token replaces `pass` in one `sign` request with a CSR for that name, until it expires "
                f"(`ttl` seconds, default {TOKEN_TTL_DEFAULT}); that request gets a device certificate (client "
                f"authentication only), which the device then renews itself over MQTT (`ssl/renew/<CN>`). "
                f"Only the token's SHA-256 is stored."),
            "requestBody": _json_request(TokenRequest, {
                "token": ("A token for a new device.", {"name": "device042", "pass": PLACEHOLDER, "ttl": 3600})}),
            "responses": {
                "201": {"description": "The token (shown once).", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Token"},
                    "example": {"name": "device042", "token": "q3V...", "expires_at": "2026-11-22T16:00:00+00:00"}}}},
                **post_errors},
        }},
        "/v1/ssl/ca": {"get": {
            "summary": "The root CA certificate (PEM)",
            "responses": {"200": _pem("The root certificate.", PEM_CERT), "503": UNAVAILABLE},
        }},
        "/v1/ssl/crl": {"get": {
            "summary": "The current CRL, the one the broker enforces: PEM, or DER with Accept: application/pkix-crl",
            "responses": {"200": _crl_response(),
                          "503": UNAVAILABLE},
        }},
        "/v1/ssl/certs": {"get": {
            "summary": "The inventory: every certificate the CA issued",
            "parameters": [
                {"name": "name", "in": "query", "schema": {"type": "string"}, "example": "device001",
                 "description": "Only this entity (colons removed as in requests)."},
                {"name": "status", "in": "query", "example": "valid", "schema": {"type": "string", "enum": [
                    "active", "superseded", "revoked", "valid", "expiring", "expired"]},
                 "description": "Stored status (active/superseded/revoked) or computed state "
                                "(valid/expiring/expired)."},
            ],
            "responses": {
                "200": {"description": "Certificates, oldest first.", "content": {"application/json": {
                    "schema": {"type": "object", "properties": {"certificates": {
                        "type": "array", "items": {"$ref": "#/components/schemas/InventoryRow"}}}},
                    "example": {"certificates": [{
                        "serial": "5e3c1f0a9b7d", "name": "device001", "common_name": "device001",
                        "role": "device", "subject": "CN=device001,O=IoT CA Lab", "issuer": "CN=IoT Lab Root CA,"
                        "O=IoT CA Lab", "not_before": "2026-11-22T14:55:00+00:00",
                        "not_after": "2027-11-22T15:00:00+00:00", "days_left": 365.0, "fingerprint_sha256": "ab12...",
                        "issued_via": "cli", "requester": None, "status": "active", "state": "valid",
                        "issued_at": "2026-11-22T15:00:00+00:00", "revoked_at": None,
                        "revocation_reason": None}]}}}},
                "400": _error("Bad filter.", {"error": "status must be one of ...", "field": "status"}),
                "401": NO_LOGIN,
            },
            "security": [{"bearer": []}, {"session": []}],
        }},
        "/v1/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        "/v1/asyncapi.json": {"get": {"summary": "The MQTT API (the CA's topics and the thermometers')",
                                      "responses": {"200": {"description": "AsyncAPI 3.0"}}}},
        "/healthz": {"get": {
            "summary": "Liveness, and whether the dashboard's MQTT connection is up",
            "responses": {"200": {"description": "Up.", "content": {"application/json": {
                "example": {"status": "ok", "mqtt": {"connected": True, "broker": "localhost:8883"}}}}}},
        }},
    }
    string = {"type": "string"}
    schemas: dict[str, Any] = {
        "SignRequest": _schema(SignRequest),
        "CreateRequest": _schema(CreateRequest),
        "RevokeRequest": _schema(RevokeRequest),
        "TokenRequest": _schema(TokenRequest),
        "RenewRequest": _schema(RenewRequest),
        "Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string", "description": "What is wrong, never containing a secret."},
            "field": {"type": "string", "description": "The request field at fault."}}},
        "Issued": {"type": "object", "required": ["name", "ca", "crt", "serial", "not_after"], "properties": {
            "name": {**string, "description": "The normalised name (colons removed)."},
            "ca": {**string, "description": "Root certificate, PEM."},
            "crt": {**string, "description": "The issued certificate, PEM."},
            "key": {**string, "description": "Private key (PKCS#8 PEM), only when the CA holds it: create, and "
                                             "sign without csr."},
            "serial": {**string, "description": "Serial number, hex."},
            "not_after": {**string, "format": "date-time"}}},
        "Revoked": {"type": "object", "properties": {
            "name": string, "reason": string,
            "revoked": {"type": "array", "items": string},
            "already_revoked": {"type": "array", "items": string}}},
        "Token": {"type": "object", "properties": {
            "name": string, "token": {**string, "format": "password"},
            "expires_at": {**string, "format": "date-time"}}},
        "InventoryRow": {"type": "object", "additionalProperties": True, "properties": {
            key: string for key in ("serial", "name", "common_name", "role", "subject", "issuer", "not_before",
                                    "not_after", "fingerprint_sha256", "issued_via", "status", "state")}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "IoT CA Lab: CA API", "version": "1", "description": MQTT_DESCRIPTION},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": (
                "An API token (`python -m dashboard.users token`, or the dashboard's API tokens panel), scoped "
                "viewer or operator. On the POST routes an operator token replaces `pass`; a viewer's gets 403.")},
            "session": {"type": "apiKey", "in": "cookie", "name": "iotca_session", "description": (
                "The dashboard's login; state-changing requests also need the page's X-CSRF-Token header.")}}},
        "x-mqtt": {
            "ssl/sign": {"publish": "#/components/schemas/SignRequest", "reply": "ssl/<name>"},
            "ssl/create": {"publish": "#/components/schemas/CreateRequest", "reply": "ssl/<name>"},
            "ssl/sign/<CN>": {"publish": "#/components/schemas/SignRequest", "reply": "ssl/<name>",
                              "lockout": "counted on the publishing certificate's CN (only <CN> may write here)"},
            "ssl/create/<CN>": {"publish": "#/components/schemas/CreateRequest", "reply": "ssl/<name>",
                                "lockout": "counted on the publishing certificate's CN"},
            "ssl/renew/<CN>": {
                "publish": "#/components/schemas/RenewRequest", "reply": "ssl/<CN>",
                "credential": "the publishing certificate (the ACL lets a CN write only ssl/renew/<its CN>)",
                "responses": {"201": "#/components/schemas/Issued", "400": "bad csr (CN differs or key reused)",
                              "403": "revoked or expired", "404": "nothing issued to this CN",
                              "409": "a protected name"}},
        },
    }
