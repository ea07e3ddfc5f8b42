"""GET /v1/openapi.json: the CA API, generated from the pydantic models of the requests (`pki.requests`), the replies
(`pki.replies`) and /healthz (`dashboard.health`).

Every schema in the document is a model's own JSON schema, the one that validates the request or shapes the
reply, so the document cannot drift from what the server accepts; what is written here is the prose, the
examples and which route answers which model with which status. `days` is bounded by the CA's remaining life,
filled in when the document is served (`pki.schemas.bound_days`). tests/test_openapi.py validates the document
(openapi-spec-validator) and runs schemathesis against a live dashboard.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from pki.replies import Certificates, Error, Issued, Revoked, Token
from pki.requests import (
    MAX_DAYS_WITHOUT_CA,
    TOKEN_TTL_DEFAULT,
    CertificatesQuery,
    CreateRequest,
    RenewRequest,
    RevokeRequest,
    SignRequest,
    TokenRequest,
)
from pki.schemas import bound_days

from .health import Health
from .openapi_objects import JSON, PEM, REF, Answer, Route

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


CURL_SIGN = (
    "curl -s http://127.0.0.1:5000/v1/ssl/sign -H 'Content-Type: application/json' "
    '-d \'{"name": "client", "days": 360, "pass": "\'"$CA_PASSPHRASE"\'"}\''
)
# Who may call: anyone; a session or an API token; anyone with the body's own credential, or a logged-in operator.
PUBLIC: list[dict[str, list[str]]] = []
LOGIN = [{"bearer": []}, {"session": []}]
OPTIONAL_LOGIN = [{}, {"bearer": []}, {"session": []}]
MODELS: tuple[type[BaseModel], ...] = (
    SignRequest,
    CreateRequest,
    RevokeRequest,
    TokenRequest,
    RenewRequest,
    Issued,
    Error,
    Revoked,
    Token,
    Certificates,
    Health,
)


def _error(description: str, example: dict[str, Any] | None = None) -> Answer:
    return Answer(description, Error, example)


WRONG_PASS = _error(
    "Wrong passphrase (or a viewer's login); nothing was written.", {"error": "wrong passphrase", "field": "pass"}
)
BAD = _error("A field is missing or invalid; `field` names it.", {"error": "days must be at least 1", "field": "days"})
CONFLICT = _error(
    "A protected identity (case-insensitive: root_ca, mosquitto, dashboard, provisioner, policy, ca, "
    "ca-<n>, ingest, ingest-<n>) as name, cn or CSR SAN, or a lab server's name (localhost, mosquitto, "
    "dashboard, loopback, BROKER_ADDRESS, BROKER_SANS) as a SAN.",
    {"error": "'dashboard' is a protected name used by the lab itself", "field": "name"},
)
TOO_LARGE = _error("The body is larger than 64 KiB.", {"error": "request body is larger than 64 KiB"})
NOT_JSON = _error(
    "The body is not JSON (Content-Type must be application/json).",
    {"error": "send the request as JSON (Content-Type: application/json)"},
)
LOCKED_OUT = Answer(
    "Five wrong passphrases or tokens from this requester (source and name; an MQTT CN) within 15 minutes; retry "
    "after Retry-After seconds.",
    Error,
    {"error": "too many wrong passphrases or tokens from this client; try again in 840 seconds"},
    headers={"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds until the lockout ends."}},
)
NO_LOGIN = _error("No session and no valid API token.", {"error": "log in, or send Authorization: Bearer <API token>"})
BAD_TOKEN = _error("An Authorization header that is not a valid API token.", {"error": "unknown or revoked API token"})
UNAVAILABLE = _error(
    "The CA is not set up (no root yet), its key is locked, or it cannot write its CRL.",
    {"error": "the CA has no root certificate yet: run ./setup.sh certs"},
)
POST_ERRORS = {
    "400": BAD,
    "401": BAD_TOKEN,
    "403": WRONG_PASS,
    "409": CONFLICT,
    "413": TOO_LARGE,
    "415": NOT_JSON,
    "429": LOCKED_OUT,
    "503": UNAVAILABLE,
}
# The seed's `create` body, every subject field (tests/test_service.py sends it with the real passphrase).
SEED_CREATE = {
    "name": "AA:BB:CC:DD:EE:FF",
    "days": "360",
    "pass": PLACEHOLDER,
    "country": "BR",
    "state": "SP",
    "locality": "Campinas",
    "org": "ACME",
    "unit": "Sensors",
    "cn": "AABBCCDDEEFF",
    "email": "ops@example.com",
}
ISSUED_EXAMPLE = {
    "name": "client",
    "ca": PEM_CERT,
    "crt": PEM_CERT,
    "key": PEM_KEY,
    "serial": "5e3c1f0a9b7d",
    "not_after": "2027-11-17T15:00:00+00:00",
}
ROW_EXAMPLE = {
    "serial": "5e3c1f0a9b7d",
    "name": "device001",
    "common_name": "device001",
    "role": "device",
    "subject": "CN=device001,O=IoT CA Lab",
    "issuer": "CN=IoT Lab Root CA,O=IoT CA Lab",
    "not_before": "2026-11-22T14:55:00+00:00",
    "not_after": "2027-11-22T15:00:00+00:00",
    "days_left": 365.0,
    "fingerprint_sha256": "ab12...",
    "issued_via": "cli",
    "requester": None,
    "status": "active",
    "issued_at": "2026-11-22T15:00:00+00:00",
    "revoked_at": None,
    "revocation_reason": None,
    "state": "valid",
}
DOCUMENT = Answer("A JSON document.", media={JSON: {"schema": {"type": "object"}}})


ROUTES = (
    Route(
        "post",
        "/v1/ssl/sign",
        "Issue or renew the certificate of an entity",
        security=OPTIONAL_LOGIN,
        description=(
            "With `csr` (PEM), the CSR's signature is verified, its CN must equal `name`, and only its DNS, IP and "
            "e-mail SANs are copied; no file of the entity changes (the key stays with the caller). Without `csr`, "
            "the entity's stored key (made by `create` or the generator) is re-signed with the same subject and "
            "SANs: renewal; the reply then includes that key. `token` (an enrolment token) replaces `pass` when a "
            "`csr` is given. A logged-in operator (session or operator API token) needs no `pass`.\n\n"
            "Example: `" + CURL_SIGN + "`"
        ),
        body=SignRequest,
        examples={
            "renew": (
                "The seed's body: re-sign the stored key of an existing entity (renewal).",
                {"name": "client", "pass": PLACEHOLDER, "days": 360},
            ),
            "csr": (
                "Sign a CSR; the private key never leaves the caller.",
                {"name": "AA:BB:CC:DD:EE:FF", "days": "360", "pass": PLACEHOLDER, "csr": PEM_CSR},
            ),
            "token": (
                "First enrolment with a single-use token instead of the passphrase.",
                {"name": "device042", "days": 90, "token": "<token from /v1/ssl/tokens>", "csr": PEM_CSR},
            ),
        },
        answers={
            "201": Answer("Signed.", Issued, ISSUED_EXAMPLE),
            **POST_ERRORS,
            "403": _error(
                "Wrong passphrase; an unknown, used, expired or other name's token; a viewer's "
                "login; or a stored key whose certificate was superseded or revoked.",
                {"error": "wrong passphrase", "field": "pass"},
            ),
            "404": _error(
                "No csr and no stored key for this name.",
                {"error": "no stored key for client: send a csr, or create the entity first", "field": "name"},
            ),
        },
    ),
    Route(
        "post",
        "/v1/ssl/create",
        "Create a key and a certificate with the given subject",
        security=OPTIONAL_LOGIN,
        description=(
            "The CA makes the key (EC P-256, or RSA with KEY_TYPE=rsa) and signs it. Required: name, days, pass "
            "(or a logged-in operator). Optional subject fields: country (2 letters), state, locality, org, unit, "
            "cn (a host name; the subject CN is always name, a differing cn becomes a DNS SAN), email (subject "
            "emailAddress and an e-mail SAN). Blank or null optional fields count as absent. Repeating an "
            "identical request (every field but pass equal) while the certificate is valid returns the same "
            "certificate and key with 200."
        ),
        body=CreateRequest,
        examples={
            "seed": ("The seed's full body.", SEED_CREATE),
            "minimal": (
                "Only the required fields; the CN is the name.",
                {"name": "client", "days": 360, "pass": PLACEHOLDER},
            ),
        },
        answers={
            "201": Answer("Created; `key` is the new private key (PKCS#8 PEM, unencrypted).", Issued, ISSUED_EXAMPLE),
            "200": Answer("Identical request repeated: the same certificate (same serial).", Issued, ISSUED_EXAMPLE),
            **POST_ERRORS,
        },
    ),
    Route(
        "post",
        "/v1/ssl/revoke",
        "Revoke a certificate (by serial) or every unexpired certificate of a name",
        security=OPTIONAL_LOGIN,
        description=(
            "Marks the certificates revoked, writes a new CRL (verified before it replaces the old one), denies the "
            "identity every topic in the broker's ACL (this also stops a connection that is already open) and makes "
            "Mosquitto reload both. New TLS connections with a revoked certificate are refused. Revoking again is "
            "harmless (`already_revoked`)."
        ),
        body=RevokeRequest,
        examples={
            "name": ("Cut a device off.", {"name": "device001", "pass": PLACEHOLDER, "reason": "keyCompromise"}),
            "serial": ("One certificate.", {"serial": "5e3c1f0a9b7d", "pass": PLACEHOLDER}),
        },
        answers={
            "200": Answer(
                "Revoked.",
                Revoked,
                {"name": "device001", "revoked": ["5e3c1f0a9b7d"], "reason": "keyCompromise", "already_revoked": []},
            ),
            **POST_ERRORS,
            "404": _error(
                "No certificate with that name or serial.",
                {"error": "no certificate was issued to device009", "field": "name"},
            ),
        },
    ),
    Route(
        "post",
        "/v1/ssl/tokens",
        "Issue a single-use enrolment token for one name",
        security=OPTIONAL_LOGIN,
        description=(
            f"The token replaces `pass` in one `sign` request with a CSR for that name, until it expires (`ttl` "
            f"seconds, default {TOKEN_TTL_DEFAULT}); that request gets a device certificate (client authentication "
            f"only), which the device then renews itself over MQTT (`ssl/renew/<CN>`). Only the token's SHA-256 is "
            f"stored."
        ),
        body=TokenRequest,
        examples={"token": ("A token for a new device.", {"name": "device042", "pass": PLACEHOLDER, "ttl": 3600})},
        answers={
            "201": Answer(
                "The token (shown once).",
                Token,
                {"name": "device042", "token": "q8Jm...", "expires_at": "2026-11-22T16:00:00+00:00"},
            ),
            **POST_ERRORS,
        },
    ),
    Route(
        "get",
        "/v1/ssl/ca",
        "The root CA certificate (PEM)",
        security=PUBLIC,
        answers={
            "200": Answer("The root certificate.", media={PEM: {"schema": {"type": "string"}, "example": PEM_CERT}}),
            "503": UNAVAILABLE,
        },
    ),
    Route(
        "get",
        "/v1/ssl/crl",
        "The current CRL, the one the broker enforces: PEM, or DER with Accept: application/pkix-crl",
        security=PUBLIC,
        answers={
            "200": Answer(
                "The CRL (RFC 5280 reason codes; superseded certificates once their grace is over).",
                media={
                    PEM: {"schema": {"type": "string"}},
                    "application/pkix-crl": {"schema": {"type": "string", "format": "binary"}},
                },
            ),
            "503": UNAVAILABLE,
        },
    ),
    Route(
        "get",
        "/v1/ssl/certs",
        "The inventory: every certificate the CA issued",
        security=LOGIN,
        query=CertificatesQuery,
        answers={
            "200": Answer("Certificates, oldest first.", Certificates, {"certificates": [ROW_EXAMPLE]}),
            "400": _error("Bad filter.", {"error": "status must be one of ...", "field": "status"}),
            "401": NO_LOGIN,
        },
    ),
    Route("get", "/v1/openapi.json", "This document (OpenAPI 3.1)", security=PUBLIC, answers={"200": DOCUMENT}),
    Route(
        "get",
        "/v1/asyncapi.json",
        "The MQTT API (the CA's topics and the thermometers'), AsyncAPI 3.0",
        security=LOGIN,
        answers={"200": DOCUMENT, "401": NO_LOGIN},
    ),
    Route(
        "get",
        "/healthz",
        "Health: 200 while everything works, 503 (with the reasons) while degraded",
        security=PUBLIC,
        description="Degraded: the MQTT connection this process runs is down, the database does not answer, or "
        "the CRL the broker enforces is expired, missing or not the current root's.",
        answers={"200": Answer("Healthy.", Health), "503": Answer("Degraded; `reasons` says why.", Health)},
    ),
    Route(
        "get",
        "/metrics",
        "Prometheus metrics (text exposition format)",
        security=LOGIN,
        description="Counters and histograms of this process, and the inventory's facts computed at scrape time; "
        "the README lists the families. Scrape with a viewer API token.",
        answers={"200": Answer("The metrics.", media={"text/plain": {"schema": {"type": "string"}}}), "401": NO_LOGIN},
    ),
)


@functools.cache
def openapi_document(max_days: int = MAX_DAYS_WITHOUT_CA) -> dict[str, Any]:
    """The document, with `days` at most `max_days` (the CA's remaining life when it is served)."""
    _, definitions = models_json_schema([(model, "validation") for model in MODELS], by_alias=True, ref_template=REF)
    schemas = bound_days(definitions["$defs"], max_days)
    queries = {route.query.__name__: route.query.model_json_schema(by_alias=True) for route in ROUTES if route.query}
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = route.render(queries)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "IoT CA Lab: CA API",
            "version": "1",
            "description": MQTT_DESCRIPTION + "\nThe MQTT API as an AsyncAPI 3.0 document: `GET /v1/asyncapi.json`.\n",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "An API token (`python -m dashboard.users token`, or the dashboard's API tokens panel), scoped "
                        "viewer or operator. On the POST routes an operator token replaces `pass`; a viewer's gets 403."
                    ),
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "iotca_session",
                    "description": (
                        "The dashboard's login; state-changing requests also need the page's X-CSRF-Token header."
                    ),
                },
            },
        },
    }
