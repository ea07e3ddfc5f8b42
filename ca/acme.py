"""ACME (RFC 8555) under /acme/: server certificates for the DNS names of the operator's allow-list.

A thin adapter: JWS verification with josepy (the JOSE library certbot itself uses), ACME state in the inventory
database (`ca/acme_store.py`), issuance and revocation by `pki.service.CAService` (profile `server`, the CRL).

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

import base64
import binascii
import datetime as dt
import http.client
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import josepy as jose
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Blueprint, Flask, Response, current_app, request, url_for

from pki.authority import serial_hex
from pki.config import Settings
from pki.service import CAService

from .acme_store import READY, VALID, AcmeAccount, AcmeAuthorization, AcmeOrder, AcmeStore

log = logging.getLogger(__name__)

bp = Blueprint("acme", __name__, url_prefix="/acme")

ERROR = "urn:ietf:params:acme:error:"
JOSE_JSON = "application/jose+json"
ALGORITHMS = {"RS256": jose.RS256, "ES256": jose.ES256, "ES384": jose.ES384, "ES512": jose.ES512}
CERT_DAYS = 90  # ACME certificates are short-lived and renewed automatically (certbot renews at 30 days left)
HTTP01_TIMEOUT = 10.0
MAX_HTTP01_BODY = 1024
# RFC 5280 5.3.1 CRLReason codes ACME may send (RFC 8555 7.6); 6 (certificateHold) is not supported here.
REASONS = {0: "unspecified", 1: "keyCompromise", 2: "caCompromise", 3: "affiliationChanged", 4: "superseded",
           5: "cessationOfOperation", 9: "privilegeWithdrawn"}


# -- JWS with ACME's protected header fields (nonce, url), as josepy's docs say: subclass the Header -------

class AcmeHeader(jose.Header):
    nonce: str | None = jose.field("nonce", omitempty=True)
    url: str | None = jose.field("url", omitempty=True)


class AcmeSignature(jose.Signature):
    __slots__ = ("combined",)
    header_cls = AcmeHeader
    header: AcmeHeader = jose.field("header", omitempty=True, default=AcmeHeader(), decoder=AcmeHeader.from_json)


class AcmeJWS(jose.JWS):
    __slots__ = ("payload", "signatures")
    signature_cls = AcmeSignature


class Problem(Exception):
    """An RFC 7807 problem document with an ACME error type (RFC 8555 6.7)."""

    def __init__(self, kind: str, detail: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.status, self.headers = kind, detail, status, headers or {}


@dataclass(frozen=True)
class Signed:
    """A verified request: its payload (None for POST-as-GET), the JWK that signed it, the account if by kid."""

    payload: dict[str, Any] | None
    jwk: jose.JWK
    account: AcmeAccount | None


def _service() -> CAService:
    return current_app.extensions["ca_service"]


def _store() -> AcmeStore:
    return current_app.extensions["acme_store"]


def _settings() -> Settings:
    return current_app.extensions["lab_settings"]


def _b64url(data: bytes) -> str:
    return jose.b64.b64encode(data).decode()


def _thumbprint(jwk: jose.JWK) -> str:
    return _b64url(jwk.thumbprint())


def _url(endpoint: str, **values: str) -> str:
    return url_for(f"acme.{endpoint}", _external=True, **values)


def _respond(body: Any, status: int = 200, *, location: str | None = None, links: tuple[str, ...] = (),
             content_type: str = "application/json") -> Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = Response(data, status=status, content_type=content_type)
    response.headers["Replay-Nonce"] = _store().new_nonce()
    response.headers["Cache-Control"] = "no-store"
    response.headers.add("Link", f'<{_url("directory")}>;rel="index"')
    for link in links:
        response.headers.add("Link", link)
    if location:
        response.headers["Location"] = location
    return response


def _problem(problem: Problem) -> Response:
    response = _respond({"type": ERROR + problem.kind, "detail": problem.detail, "status": problem.status},
                        problem.status, content_type="application/problem+json")
    response.headers.update(problem.headers)
    return response


def _handled(view: Callable[..., Response]) -> Callable[..., Response]:
    """Every ACME view answers with a problem document, never a traceback."""

    def wrapper(**kwargs: str) -> Response:
        try:
            return view(**kwargs)
        except Problem as problem:
            log.info("acme %s -> %s %s: %s", request.path, problem.status, problem.kind, problem.detail)
            return _problem(problem)
        except Exception:  # a bug, not the client's fault: log it, answer without details
            log.exception("acme %s failed unexpectedly", request.path)
            return _problem(Problem("serverInternal", "internal error; the server log has the details", 500))

    wrapper.__name__ = view.__name__
    wrapper.__doc__ = view.__doc__
    return wrapper


def _verify(*, new_key: bool = False) -> Signed:
    """Check the JWS (RFC 8555 6.2-6.5): media type, flattened form, alg, url, nonce, key (`jwk` only when
    `new_key`, else `kid` of a valid account), signature; then decode the payload."""
    if request.mimetype != JOSE_JSON:
        raise Problem("malformed", f"send a JWS with Content-Type: {JOSE_JSON}", 415)
    try:
        body = json.loads(request.get_data(cache=False))
    except (ValueError, RecursionError):
        raise Problem("malformed", "the body is not JSON") from None
    if not isinstance(body, dict) or set(body) != {"protected", "payload", "signature"}:
        raise Problem("malformed", "the body must be a flattened JWS: protected, payload and signature only")
    try:
        jws = AcmeJWS.from_json(body)
        header = jws.signature.combined
    except (jose.DeserializationError, TypeError, ValueError, KeyError, AssertionError):
        raise Problem("malformed", "the JWS cannot be parsed") from None
    if header.alg is None or header.alg.name not in ALGORITHMS:
        raise Problem("badSignatureAlgorithm", f"use one of {', '.join(ALGORITHMS)}")
    if header.url != request.url:
        raise Problem("unauthorized", "the JWS url does not match the request URL", 401)
    if not header.nonce or not _store().use_nonce(header.nonce):
        raise Problem("badNonce", "unknown, used or expired nonce: get a new one")
    account = None
    if new_key:
        if header.jwk is None or header.kid is not None:
            raise Problem("malformed", "this request is signed with a jwk, not a kid")
        jwk = header.jwk
    else:
        if header.kid is None or header.jwk is not None:
            raise Problem("malformed", "this request is signed with the account's kid, not a jwk")
        account = _account_of_kid(header.kid)
        jwk = jose.JWK.json_loads(account.jwk)
    try:
        ok = jws.verify(jwk)
    except Exception:  # a key type that does not match the alg, a malformed signature
        ok = False
    if not ok:
        raise Problem("malformed", "the JWS signature does not verify")
    if not jws.payload:
        return Signed(None, jwk, account)
    try:
        payload = json.loads(jws.payload)
    except (ValueError, RecursionError):
        raise Problem("malformed", "the JWS payload is not JSON") from None
    if not isinstance(payload, dict):
        raise Problem("malformed", "the JWS payload must be a JSON object")
    return Signed(payload, jwk, account)


def _account_of_kid(kid: str) -> AcmeAccount:
    prefix = _url("account", account_id="x")[:-1]
    account = _store().account(kid[len(prefix):]) if kid.startswith(prefix) else None
    if account is None:
        raise Problem("accountDoesNotExist", "no account with this kid", 400)
    if account.status != VALID:
        raise Problem("unauthorized", f"this account is {account.status}", 401)
    return account


def _post_as_get(signed: Signed) -> None:
    if signed.payload is not None:
        raise Problem("malformed", "this resource is read with POST-as-GET (an empty payload)")


# -- resources as JSON --------------------------------------------------------------------------------

def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _account_json(account: AcmeAccount) -> dict[str, Any]:
    return {"status": account.status, "contact": json.loads(account.contact),
            "orders": _url("account_orders", account_id=account.id)}


def _order_json(order: AcmeOrder) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": order.status,
        "expires": _iso(order.expires_at),
        "identifiers": [{"type": "dns", "value": name} for name in order.name_list],
        "authorizations": [_url("authorization", authz_id=a.id) for a in _store().authorizations(order.id)],
        "finalize": _url("finalize", order_id=order.id),
    }
    if order.certificate_serial:
        body["certificate"] = _url("certificate", serial=order.certificate_serial)
    if order.error:
        body["error"] = {"type": ERROR + "unauthorized", "detail": order.error}
    return body


def _challenge_json(authz: AcmeAuthorization) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "http-01", "url": _url("challenge", challenge_id=authz.challenge_id),
                            "token": authz.token, "status": authz.challenge_status}
    if authz.validated_at:
        body["validated"] = _iso(authz.validated_at)
    if authz.error:
        body["error"] = {"type": ERROR + "incorrectResponse", "detail": authz.error, "status": 403}
    return body


def _authz_json(authz: AcmeAuthorization) -> dict[str, Any]:
    return {"status": authz.status, "expires": _iso(authz.expires_at),
            "identifier": {"type": "dns", "value": authz.name}, "challenges": [_challenge_json(authz)]}


def _owned(item: AcmeOrder | AcmeAuthorization | None, signed: Signed, what: str) -> Any:
    if item is None or signed.account is None or item.account_id != signed.account.id:
        raise Problem("malformed", f"no such {what}", 404)
    return item


# -- views ----------------------------------------------------------------------------------------------

@bp.get("/directory")
def directory() -> Response:
    return Response(json.dumps({
        "newNonce": _url("new_nonce"),
        "newAccount": _url("new_account"),
        "newOrder": _url("new_order"),
        "revokeCert": _url("revoke_cert"),
        "meta": {"externalAccountRequired": False},
    }), content_type="application/json")


@bp.route("/new-nonce", methods=["HEAD", "GET"])
def new_nonce() -> Response:
    response = _respond(b"", 200 if request.method == "HEAD" else 204)
    return response


@bp.post("/new-account")
@_handled
def new_account() -> Response:
    signed = _verify(new_key=True)
    payload = signed.payload or {}
    thumbprint = _thumbprint(signed.jwk)
    existing = _store().account_by_thumbprint(thumbprint)
    if existing is not None:
        return _respond(_account_json(existing), 200, location=_url("account", account_id=existing.id))
    if payload.get("onlyReturnExisting") is True:
        raise Problem("accountDoesNotExist", "no account for this key", 400)
    contact = payload.get("contact") or []
    if not isinstance(contact, list) or not all(isinstance(c, str) and c.startswith("mailto:") for c in contact):
        raise Problem("invalidContact", "contact must be a list of mailto: URLs")
    account, _created = _store().add_account(thumbprint, signed.jwk.to_json(), contact)
    log.info("acme: new account %s", account.id)
    return _respond(_account_json(account), 201, location=_url("account", account_id=account.id))


@bp.post("/account/<account_id>")
@_handled
def account(account_id: str) -> Response:
    signed = _verify()
    assert signed.account is not None
    if signed.account.id != account_id:
        raise Problem("unauthorized", "this is not your account", 403)
    if signed.payload and signed.payload.get("status") == "deactivated":
        _store().set_account_status(account_id, "deactivated")
    current = _store().account(account_id)
    assert current is not None
    return _respond(_account_json(current))


@bp.post("/account/<account_id>/orders")
@_handled
def account_orders(account_id: str) -> Response:
    signed = _verify()
    _post_as_get(signed)
    if signed.account is None or signed.account.id != account_id:
        raise Problem("unauthorized", "this is not your account", 403)
    return _respond({"orders": [_url("order", order_id=o) for o in _store().order_ids(account_id)]})


@bp.post("/new-order")
@_handled
def new_order() -> Response:
    signed = _verify()
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
            raise Problem("rejectedIdentifier", f"{name!r} is not in this CA's ACME allow-list "
                                                f"(ACME_ALLOWED_NAMES: {', '.join(sorted(allowed))})")
        if name not in names:
            names.append(name)
    if "notBefore" in (signed.payload or {}) or "notAfter" in (signed.payload or {}):
        raise Problem("malformed", "notBefore/notAfter are not supported: certificates last 90 days")
    order = _store().add_order(signed.account.id, names)
    log.info("acme: order %s for %s by account %s", order.id, ", ".join(names), signed.account.id)
    return _respond(_order_json(order), 201, location=_url("order", order_id=order.id))


@bp.post("/order/<order_id>")
@_handled
def order(order_id: str) -> Response:
    signed = _verify()
    _post_as_get(signed)
    return _respond(_order_json(_owned(_store().order(order_id), signed, "order")))


@bp.post("/authz/<authz_id>")
@_handled
def authorization(authz_id: str) -> Response:
    signed = _verify()
    _post_as_get(signed)
    return _respond(_authz_json(_owned(_store().authorization(authz_id), signed, "authorization")))


@bp.post("/chall/<challenge_id>")
@_handled
def challenge(challenge_id: str) -> Response:
    """The client is ready (payload `{}`): validate now; POST-as-GET just reads the challenge."""
    signed = _verify()
    authz = _owned(_store().by_challenge(challenge_id), signed, "challenge")
    if signed.payload is not None and _store().claim_challenge(challenge_id):
        expected = f"{authz.token}.{_thumbprint(signed.jwk)}"
        error = http01_problem(authz.name, _settings().acme_http01_port, authz.token, expected)
        _store().finish_challenge(challenge_id, error)
        log.info("acme: http-01 for %s on port %d: %s", authz.name, _settings().acme_http01_port,
                 error or "valid")
        authz = _store().by_challenge(challenge_id)
    return _respond(_challenge_json(authz), links=(f'<{_url("authorization", authz_id=authz.id)}>;rel="up"',))


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
@_handled
def finalize(order_id: str) -> Response:
    signed = _verify()
    current = _owned(_store().order(order_id), signed, "order")
    csr_b64 = (signed.payload or {}).get("csr")
    if not isinstance(csr_b64, str):
        raise Problem("malformed", "csr (base64url DER) is required")
    try:
        csr = x509.load_der_x509_csr(jose.b64.b64decode(csr_b64))
    except (ValueError, binascii.Error, TypeError):
        raise Problem("badCSR", "csr is not a base64url DER PKCS#10 request") from None
    if current.status != READY or not _store().start_finalize(order_id):
        raise Problem("orderNotReady", f"the order is {current.status}, not ready", 403)
    names = current.name_list
    allowed = set(_settings().acme_allowed_names)
    if not set(names) <= allowed:  # the allow-list shrank since the order was made
        _store().finish_finalize(order_id, None)
        raise Problem("rejectedIdentifier", "a name of this order is no longer in the ACME allow-list")
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    reply = _service().issue_server(pem, names, days=CERT_DAYS, requester=f"acme:{signed.account.id}")
    if not reply.ok:
        _store().finish_finalize(order_id, None)
        kind = "badCSR" if reply.status == 400 else "serverInternal"
        raise Problem(kind, str(reply.body.get("error")), 400 if reply.status == 400 else 500)
    _store().finish_finalize(order_id, reply.body["serial"])
    log.info("acme: order %s finalized: serial %s", order_id, reply.body["serial"])
    return _respond(_order_json(_store().order(order_id)), location=_url("order", order_id=order_id))


@bp.post("/cert/<serial>")
@_handled
def certificate(serial: str) -> Response:
    signed = _verify()
    _post_as_get(signed)
    assert signed.account is not None
    record = _service().inventory.by_serial(serial)
    if record is None or not _store().owns_certificate(signed.account.id, serial):
        raise Problem("malformed", "no such certificate", 404)
    chain = record.pem.encode() + _service().ca_pem()
    return _respond(chain, content_type="application/pem-certificate-chain")


@bp.post("/revoke-cert")
@_handled
def revoke_cert() -> Response:
    """Signed by the ordering account (kid) or by the certificate's own key (jwk), RFC 8555 7.6."""
    header_has_jwk = _protected_has("jwk")
    signed = _verify(new_key=header_has_jwk)
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
        allowed = _store().owns_certificate(signed.account.id, serial)
    else:
        allowed = _same_public_key(signed.jwk, cert)
    if not allowed:
        raise Problem("unauthorized", "only the account that ordered this certificate, or its own key, may revoke it",
                      403)
    reply = _service().revoke_certificate(cert, REASONS[reason_code], source=f"acme:{serial}")
    if not reply.ok:
        raise Problem("malformed", str(reply.body.get("error")), reply.status)
    if not reply.body.get("revoked"):
        raise Problem("alreadyRevoked", "this certificate is already revoked")
    return _respond(b"", 200)


def _protected_has(field: str) -> bool:
    """Whether the (not yet verified) protected header names `field`: picks the key source to verify with."""
    try:
        protected = json.loads(request.get_data(cache=True)).get("protected", "")
        return field in json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
    except (ValueError, AttributeError, TypeError, binascii.Error):
        return False


def _same_public_key(jwk: jose.JWK, cert: x509.Certificate) -> bool:
    fmt, enc = serialization.PublicFormat.SubjectPublicKeyInfo, serialization.Encoding.DER
    try:
        return jwk.public_key().key.public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt)
    except (AttributeError, TypeError, ValueError):
        return False


def init_app(app: Flask) -> None:
    app.extensions["acme_store"] = AcmeStore(app.extensions["ca_service"].inventory)
    app.register_blueprint(bp)
