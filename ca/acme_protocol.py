"""ACME's protocol layer (RFC 8555 6): the flattened JWS with its nonce and url, the account (`kid`) or key
(`jwk`) that signed it, and the answers: every response carries a fresh nonce, every error is a problem document.

JWS verification with josepy (the JOSE library certbot itself uses); the nonces and accounts are in the ACME
store (`ca/acme_store.py`). The resources and their flow are in `ca/acme.py`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import josepy as jose
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Response, current_app, request, url_for

from .acme_store import VALID, AcmeAccount, AcmeStore

log = logging.getLogger("ca.acme")

ERROR = "urn:ietf:params:acme:error:"
JOSE_JSON = "application/jose+json"
ALGORITHMS = {"RS256": jose.RS256, "ES256": jose.ES256, "ES384": jose.ES384, "ES512": jose.ES512}


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


def store() -> AcmeStore:
    return current_app.extensions["acme_store"]


def b64url(data: bytes) -> str:
    return jose.b64.b64encode(data).decode()


def jwk_thumbprint(jwk: jose.JWK) -> str:
    return b64url(jwk.thumbprint())


def url(endpoint: str, **values: str) -> str:
    return url_for(f"acme.{endpoint}", _external=True, **values)


def respond(
    body: Any,
    status: int = 200,
    *,
    location: str | None = None,
    links: tuple[str, ...] = (),
    content_type: str = "application/json",
) -> Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = Response(data, status=status, content_type=content_type)
    response.headers["Replay-Nonce"] = store().new_nonce()
    response.headers["Cache-Control"] = "no-store"
    response.headers.add("Link", f'<{url("directory")}>;rel="index"')
    for link in links:
        response.headers.add("Link", link)
    if location:
        response.headers["Location"] = location
    return response


def problem_response(problem: Problem) -> Response:
    response = respond(
        {"type": ERROR + problem.kind, "detail": problem.detail, "status": problem.status},
        problem.status,
        content_type="application/problem+json",
    )
    response.headers.update(problem.headers)
    return response


def handled(view: Callable[..., Response]) -> Callable[..., Response]:
    """Every ACME view answers with a problem document, never a traceback."""

    def wrapper(**kwargs: str) -> Response:
        try:
            return view(**kwargs)
        except Problem as problem:
            log.info("acme %s -> %s %s: %s", request.path, problem.status, problem.kind, problem.detail)
            return problem_response(problem)
        except Exception:  # a bug, not the client's fault: log it, answer without details
            log.exception("acme %s failed unexpectedly", request.path)
            return problem_response(Problem("serverInternal", "internal error; the server log has the details", 500))

    wrapper.__name__ = view.__name__
    wrapper.__doc__ = view.__doc__
    return wrapper


def verify(*, new_key: bool = False) -> Signed:
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
    if not header.nonce or not store().use_nonce(header.nonce):
        raise Problem("badNonce", "unknown, used or expired nonce: get a new one")
    account = None
    if new_key:
        if header.jwk is None or header.kid is not None:
            raise Problem("malformed", "this request is signed with a jwk, not a kid")
        jwk = header.jwk
    else:
        if header.kid is None or header.jwk is not None:
            raise Problem("malformed", "this request is signed with the account's kid, not a jwk")
        account = account_of_kid(header.kid)
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


def account_of_kid(kid: str) -> AcmeAccount:
    prefix = url("account", account_id="x")[:-1]
    account = store().account(kid[len(prefix) :]) if kid.startswith(prefix) else None
    if account is None:
        raise Problem("accountDoesNotExist", "no account with this kid", 400)
    if account.status != VALID:
        raise Problem("unauthorized", f"this account is {account.status}", 401)
    return account


def post_as_get(signed: Signed) -> None:
    if signed.payload is not None:
        raise Problem("malformed", "this resource is read with POST-as-GET (an empty payload)")


def protected_has(field: str) -> bool:
    """Whether the (not yet verified) protected header names `field`: picks the key source to verify with."""
    try:
        protected = json.loads(request.get_data(cache=True)).get("protected", "")
        return field in json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
    except (ValueError, AttributeError, TypeError, binascii.Error):
        return False


def same_public_key(jwk: jose.JWK, cert: x509.Certificate) -> bool:
    fmt, enc = serialization.PublicFormat.SubjectPublicKeyInfo, serialization.Encoding.DER
    try:
        return jwk.public_key().key.public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt)
    except (AttributeError, TypeError, ValueError):
        return False
