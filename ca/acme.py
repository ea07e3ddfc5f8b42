"""ACME (RFC 8555) under /acme/: server certificates for the DNS names of the operator's allow-list.

A thin adapter: JWS verification with josepy (the JOSE library certbot itself uses; `ca/acme_protocol.py`), ACME
state in the inventory database (`ca/acme_store.py`), issuance and revocation by `pki.service.CAService` (profile
`server`, the CRL). This module holds the resources and the order/challenge flow.

- `GET /acme/directory`; `HEAD|GET /acme/new-nonce`; `POST` new-account, new-order, authz, chall, finalize,
  cert, revoke-cert, account (RFC 8555 7.1-7.6). Every POST is a flattened JWS (`application/jose+json`) with
  a fresh nonce and the request's URL in its protected header; the key is `jwk` for new-account and
  revoke-cert, otherwise `kid` (the account URL).
- Only `dns` identifiers in ACME_ALLOWED_NAMES (default `localhost`): anything else is `rejectedIdentifier`.
- http-01 only: the CA fetches `http://<name>:<ACME_HTTP01_PORT>/.well-known/acme-challenge/<token>` (no
  redirects followed, 10 s) when the client answers the challenge, and compares the key authorization.
- revoke-cert: signed by the account that ordered the certificate, or by the certificate's own key.
"""

from __future__ import annotations

import binascii
import datetime as dt
import http.client
import json
import logging
from collections.abc import Callable
from typing import Any

import josepy as jose
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Blueprint, Flask, Response, current_app, request

from pki.authority import serial_hex
from pki.config import Settings
from pki.service import CAService

from .acme_protocol import (
    ERROR,
    AcmeJWS,
    Problem,
    Signed,
    handled,
    jwk_thumbprint,
    post_as_get,
    protected_has,
    respond,
    same_public_key,
    store,
    url,
    verify,
)
from .acme_store import READY, AcmeAccount, AcmeAuthorization, AcmeOrder, AcmeStore

__all__ = ["AcmeJWS", "Problem", "bp", "http01_problem", "init_app"]

log = logging.getLogger(__name__)

bp = Blueprint("acme", __name__, url_prefix="/acme")

CERT_DAYS = 90  # ACME certificates are short-lived and renewed automatically (certbot renews at 30 days left)
HTTP01_TIMEOUT = 10.0
MAX_HTTP01_BODY = 1024
# RFC 5280 5.3.1 CRLReason codes ACME may send (RFC 8555 7.6); 6 (certificateHold) is not supported here.
REASONS = {
    0: "unspecified",
    1: "keyCompromise",
    2: "caCompromise",
    3: "affiliationChanged",
    4: "superseded",
    5: "cessationOfOperation",
    9: "privilegeWithdrawn",
}


def _service() -> CAService:
    return current_app.extensions["ca_service"]


def _settings() -> Settings:
    return current_app.extensions["lab_settings"]


# -- resources as JSON --------------------------------------------------------------------------------


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _account_json(account: AcmeAccount) -> dict[str, Any]:
    return {
        "status": account.status,
        "contact": json.loads(account.contact),
        "orders": url("account_orders", account_id=account.id),
    }


def _order_json(order: AcmeOrder) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": order.status,
        "expires": _iso(order.expires_at),
        "identifiers": [{"type": "dns", "value": name} for name in order.name_list],
        "authorizations": [url("authorization", authz_id=a.id) for a in store().authorizations(order.id)],
        "finalize": url("finalize", order_id=order.id),
    }
    if order.certificate_serial:
        body["certificate"] = url("certificate", serial=order.certificate_serial)
    if order.error:
        body["error"] = {"type": ERROR + "unauthorized", "detail": order.error}
    return body


def _challenge_json(authz: AcmeAuthorization) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "http-01",
        "url": url("challenge", challenge_id=authz.challenge_id),
        "token": authz.token,
        "status": authz.challenge_status,
    }
    if authz.validated_at:
        body["validated"] = _iso(authz.validated_at)
    if authz.error:
        body["error"] = {"type": ERROR + "incorrectResponse", "detail": authz.error, "status": 403}
    return body


def _authz_json(authz: AcmeAuthorization) -> dict[str, Any]:
    return {
        "status": authz.status,
        "expires": _iso(authz.expires_at),
        "identifier": {"type": "dns", "value": authz.name},
        "challenges": [_challenge_json(authz)],
    }


def _owned(item: AcmeOrder | AcmeAuthorization | None, signed: Signed, what: str) -> Any:
    if item is None or signed.account is None or item.account_id != signed.account.id:
        raise Problem("malformed", f"no such {what}", 404)
    return item


# -- views ----------------------------------------------------------------------------------------------


@bp.get("/directory")
def directory() -> Response:
    return Response(
        json.dumps(
            {
                "newNonce": url("new_nonce"),
                "newAccount": url("new_account"),
                "newOrder": url("new_order"),
                "revokeCert": url("revoke_cert"),
                "meta": {"externalAccountRequired": False},
            }
        ),
        content_type="application/json",
    )


@bp.route("/new-nonce", methods=["HEAD", "GET"])
def new_nonce() -> Response:
    response = respond(b"", 200 if request.method == "HEAD" else 204)
    return response


@bp.post("/new-account")
@handled
def new_account() -> Response:
    signed = verify(new_key=True)
    payload = signed.payload or {}
    thumbprint = jwk_thumbprint(signed.jwk)
    existing = store().account_by_thumbprint(thumbprint)
    if existing is not None:
        return respond(_account_json(existing), 200, location=url("account", account_id=existing.id))
    if payload.get("onlyReturnExisting") is True:
        raise Problem("accountDoesNotExist", "no account for this key", 400)
    contact = payload.get("contact") or []
    if not isinstance(contact, list) or not all(isinstance(c, str) and c.startswith("mailto:") for c in contact):
        raise Problem("invalidContact", "contact must be a list of mailto: URLs")
    account, _created = store().add_account(thumbprint, signed.jwk.to_json(), contact)
    log.info("acme: new account %s", account.id)
    return respond(_account_json(account), 201, location=url("account", account_id=account.id))


@bp.post("/account/<account_id>")
@handled
def account(account_id: str) -> Response:
    signed = verify()
    assert signed.account is not None
    if signed.account.id != account_id:
        raise Problem("unauthorized", "this is not your account", 403)
    if signed.payload and signed.payload.get("status") == "deactivated":
        store().set_account_status(account_id, "deactivated")
    current = store().account(account_id)
    assert current is not None
    return respond(_account_json(current))


@bp.post("/account/<account_id>/orders")
@handled
def account_orders(account_id: str) -> Response:
    signed = verify()
    post_as_get(signed)
    if signed.account is None or signed.account.id != account_id:
        raise Problem("unauthorized", "this is not your account", 403)
    return respond({"orders": [url("order", order_id=o) for o in store().order_ids(account_id)]})


@bp.post("/new-order")
@handled
def new_order() -> Response:
    signed = verify()
    assert signed.account is not None
    identifiers = (signed.payload or {}).get("identifiers")
    if not isinstance(identifiers, list) or not identifiers or len(identifiers) > 10:
        raise Problem("malformed", "identifiers must be a list of 1 to 10 objects")
    allowed = set(_settings().acme_allowed_names)
    names: list[str] = []
    for item in identifiers:
        if not isinstance(item, dict) or item.get("type") != "dns" or not isinstance(item.get("value"), str):
            raise Problem("unsupportedIdentifier", "only dns identifiers are issued here")
        name = item["value"].lower().rstrip(".")
        if name not in allowed:
            raise Problem(
                "rejectedIdentifier",
                f"{name!r} is not in this CA's ACME allow-list (ACME_ALLOWED_NAMES: {', '.join(sorted(allowed))})",
            )
        if name not in names:
            names.append(name)
    if "notBefore" in (signed.payload or {}) or "notAfter" in (signed.payload or {}):
        raise Problem("malformed", "notBefore/notAfter are not supported: certificates last 90 days")
    order = store().add_order(signed.account.id, names)
    log.info("acme: order %s for %s by account %s", order.id, ", ".join(names), signed.account.id)
    return respond(_order_json(order), 201, location=url("order", order_id=order.id))


def _read_owned(find: Callable[[], Any], render: Callable[[Any], dict[str, Any]], what: str) -> Response:
    """POST-as-GET of a resource of the signing account (RFC 8555 6.3): looked up only once the JWS verifies."""
    signed = verify()
    post_as_get(signed)
    return respond(render(_owned(find(), signed, what)))


@bp.post("/order/<order_id>")
@handled
def order(order_id: str) -> Response:
    return _read_owned(lambda: store().order(order_id), _order_json, "order")


@bp.post("/authz/<authz_id>")
@handled
def authorization(authz_id: str) -> Response:
    return _read_owned(lambda: store().authorization(authz_id), _authz_json, "authorization")


@bp.post("/chall/<challenge_id>")
@handled
def challenge(challenge_id: str) -> Response:
    """The client is ready (payload `{}`): validate now; POST-as-GET just reads the challenge."""
    signed = verify()
    authz = _owned(store().by_challenge(challenge_id), signed, "challenge")
    if signed.payload is not None and store().claim_challenge(challenge_id):
        expected = f"{authz.token}.{jwk_thumbprint(signed.jwk)}"
        error = http01_problem(authz.name, _settings().acme_http01_port, authz.token, expected)
        store().finish_challenge(challenge_id, error)
        log.info("acme: http-01 for %s on port %d: %s", authz.name, _settings().acme_http01_port, error or "valid")
        authz = store().by_challenge(challenge_id)
    return respond(_challenge_json(authz), links=(f'<{url("authorization", authz_id=authz.id)}>;rel="up"',))


def http01_problem(name: str, port: int, token: str, expected: str) -> str | None:
    """Fetch the http-01 resource (RFC 8555 8.3); None when it holds the key authorization, else why not."""
    connection = http.client.HTTPConnection(name, port, timeout=HTTP01_TIMEOUT)
    try:
        connection.request("GET", f"/.well-known/acme-challenge/{token}", headers={"Host": name})
        response = connection.getresponse()
        body = response.read(MAX_HTTP01_BODY + 1)
    except (OSError, http.client.HTTPException) as ex:
        return f"cannot fetch http://{name}:{port}/.well-known/acme-challenge/{token}: {ex}"
    finally:
        connection.close()
    if response.status != 200:
        return f"http://{name}:{port}/.well-known/acme-challenge/{token} answered HTTP {response.status}"
    if len(body) > MAX_HTTP01_BODY or body.rstrip() != expected.encode():
        return f"http://{name}:{port}/.well-known/acme-challenge/{token} does not hold the key authorization"
    return None


@bp.post("/finalize/<order_id>")
@handled
def finalize(order_id: str) -> Response:
    signed = verify()
    current = _owned(store().order(order_id), signed, "order")
    csr_b64 = (signed.payload or {}).get("csr")
    if not isinstance(csr_b64, str):
        raise Problem("malformed", "csr (base64url DER) is required")
    try:
        csr = x509.load_der_x509_csr(jose.b64.b64decode(csr_b64))
    except (ValueError, binascii.Error, TypeError):
        raise Problem("badCSR", "csr is not a base64url DER PKCS#10 request") from None
    if current.status != READY or not store().start_finalize(order_id):
        raise Problem("orderNotReady", f"the order is {current.status}, not ready", 403)
    names = current.name_list
    allowed = set(_settings().acme_allowed_names)
    if not set(names) <= allowed:  # the allow-list shrank since the order was made
        store().finish_finalize(order_id, None)
        raise Problem("rejectedIdentifier", "a name of this order is no longer in the ACME allow-list")
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    reply = _service().issue_server(pem, names, days=CERT_DAYS, requester=f"acme:{signed.account.id}")
    if not reply.ok:
        store().finish_finalize(order_id, None)
        kind = "badCSR" if reply.status == 400 else "serverInternal"
        raise Problem(kind, str(reply.body.get("error")), 400 if reply.status == 400 else 500)
    store().finish_finalize(order_id, reply.body["serial"])
    log.info("acme: order %s finalized: serial %s", order_id, reply.body["serial"])
    return respond(_order_json(store().order(order_id)), location=url("order", order_id=order_id))


@bp.post("/cert/<serial>")
@handled
def certificate(serial: str) -> Response:
    signed = verify()
    post_as_get(signed)
    assert signed.account is not None
    record = _service().inventory.by_serial(serial)
    if record is None or not store().owns_certificate(signed.account.id, serial):
        raise Problem("malformed", "no such certificate", 404)
    chain = record.pem.encode() + _service().ca_pem()
    return respond(chain, content_type="application/pem-certificate-chain")


@bp.post("/revoke-cert")
@handled
def revoke_cert() -> Response:
    """Signed by the ordering account (kid) or by the certificate's own key (jwk), RFC 8555 7.6."""
    header_has_jwk = protected_has("jwk")
    signed = verify(new_key=header_has_jwk)
    payload = signed.payload or {}
    try:
        cert = x509.load_der_x509_certificate(jose.b64.b64decode(str(payload.get("certificate", ""))))
    except (ValueError, binascii.Error, TypeError):
        raise Problem("malformed", "certificate (base64url DER) is required") from None
    reason_code = payload.get("reason", 0)
    if reason_code not in REASONS or isinstance(reason_code, bool):
        raise Problem("badRevocationReason", f"reason must be one of {sorted(REASONS)}")
    serial = serial_hex(cert)
    if signed.account is not None:
        allowed = store().owns_certificate(signed.account.id, serial)
    else:
        allowed = same_public_key(signed.jwk, cert)
    if not allowed:
        raise Problem(
            "unauthorized", "only the account that ordered this certificate, or its own key, may revoke it", 403
        )
    reply = _service().revoke_certificate(cert, REASONS[reason_code], source=f"acme:{serial}")
    if not reply.ok:
        raise Problem("malformed", str(reply.body.get("error")), reply.status)
    if not reply.body.get("revoked"):
        raise Problem("alreadyRevoked", "this certificate is already revoked")
    return respond(b"", 200)


def init_app(app: Flask) -> None:
    app.extensions["acme_store"] = AcmeStore(app.extensions["ca_service"].inventory)
    app.register_blueprint(bp)
