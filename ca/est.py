"""EST (RFC 7030) under /.well-known/est/: a thin adapter over `pki.service.CAService`.

- `GET cacerts`: the root, PKCS#7 certs-only, base64 (4.1.3).
- `POST simpleenroll`: a base64 PKCS#10 body (`Content-Type: application/pkcs10`), HTTP Basic `<name>:<secret>`
  where the secret is a single-use enrolment token for `<name>` (POST /v1/ssl/tokens) or the CA passphrase;
  the CSR's CN must be `<name>`. Exactly `v1/ssl/sign` with a CSR: the same profiles, lockout and inventory.
- `POST simplereenroll`: the same body; the credential is the TLS client certificate, which must be the
  entity's current certificate (not superseded, not revoked). Exactly `ssl/renew/<CN>`.
- `GET csrattrs`: what the CA wants in a CSR (4.5): ECDSA with SHA-256.

Replies: the certificate as `application/pkcs7-mime; smime-type=certs-only`, base64 (4.2.3). Errors are
text/plain: 401 with `WWW-Authenticate: Basic` for a missing or refused credential (3.2.3), 400 for a bad CSR,
415 for another content type, 429 with Retry-After while the source is locked out.
"""

from __future__ import annotations

import base64
import binascii
import logging

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from flask import Blueprint, Flask, Response, current_app, request

from pki.authority import CAError, load_certificate
from pki.requests import MAX_CSR, RequestError
from pki.service import CAService, Reply

log = logging.getLogger(__name__)

bp = Blueprint("est", __name__, url_prefix="/.well-known/est")

REALM = 'Basic realm="iot-ca-est", charset="UTF-8"'
PKCS7_CERTS = "application/pkcs7-mime; smime-type=certs-only"
# CsrAttrs (RFC 7030 4.5.2) = SEQUENCE { OBJECT IDENTIFIER ecdsa-with-SHA256 (1.2.840.10045.4.3.2) }, DER.
# A fixed value: cryptography has no public ASN.1 encoder for this structure; `openssl asn1parse` reads it.
CSR_ATTRS_DER = bytes.fromhex("300a06082a8648ce3d040302")


def service() -> CAService:
    return current_app.extensions["ca_service"]


def _base64(data: bytes, content_type: str) -> Response:
    return Response(
        base64.encodebytes(data),
        mimetype=None,
        content_type=content_type,
        headers={"Content-Transfer-Encoding": "base64", "Cache-Control": "no-store"},
    )


def _pkcs7(certs: list[x509.Certificate]) -> Response:
    return _base64(pkcs7.serialize_certificates(certs, serialization.Encoding.DER), PKCS7_CERTS)


def _text(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(message + "\n", status=status, content_type="text/plain; charset=utf-8", headers=headers or {})


def _unauthorised(message: str) -> Response:
    return _text(401, message, {"WWW-Authenticate": REALM})


def _csr_pem() -> str | Response:
    """The request body as a PEM CSR, or the error response (415 other type, 400 not base64 DER PKCS#10)."""
    if request.mimetype != "application/pkcs10":
        return _text(415, "send the CSR as base64 DER with Content-Type: application/pkcs10")
    data = request.get_data(cache=False)
    if len(data) > MAX_CSR:
        return _text(413, f"the CSR is longer than {MAX_CSR} bytes")
    try:
        der = base64.b64decode(b"".join(data.split()), validate=True)
        csr = x509.load_der_x509_csr(der)
    except (binascii.Error, ValueError):
        return _text(400, "the body is not a base64-encoded DER PKCS#10 certificate request")
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _reply(reply: Reply, *, unauthorised: bool) -> Response:
    """The service's reply as EST: the issued certificate, or the error as text with RFC 7030's status."""
    if reply.ok:
        return _pkcs7([load_certificate(reply.body["crt"].encode())])
    message = str(reply.body.get("error", "refused"))
    if reply.status == 403 and unauthorised:
        return _unauthorised(message)
    return _text(reply.status, message, reply.headers)


@bp.get("/cacerts")
def cacerts() -> Response:
    try:
        root = load_certificate(service().ca_pem())
    except RequestError as ex:  # 503: the lab has no root yet
        return _text(ex.status, ex.message)
    return _pkcs7([root])


@bp.get("/csrattrs")
def csrattrs() -> Response:
    return _base64(CSR_ATTRS_DER, "application/csrattrs")


@bp.post("/simpleenroll")
def simpleenroll() -> Response:
    auth = request.authorization
    if auth is None or auth.type != "basic" or not auth.username or not auth.password:
        return _unauthorised("enrolment needs HTTP Basic <name>:<enrolment token or CA passphrase>")
    csr = _csr_pem()
    if isinstance(csr, Response):
        return csr
    reply = service().enrol_basic(auth.username, csr, auth.password, source=request.remote_addr or "unknown")
    return _reply(reply, unauthorised=True)


@bp.post("/simplereenroll")
def simplereenroll() -> Response:
    pem = request.environ.get("SSL_CLIENT_CERT")
    if not pem:
        return _unauthorised("re-enrolment needs the current certificate as the TLS client certificate")
    try:
        presented = load_certificate(pem.encode())
    except CAError:
        return _unauthorised("the TLS client certificate cannot be read")
    csr = _csr_pem()
    if isinstance(csr, Response):
        return csr
    return _reply(service().renew_presented(presented, csr, via="est"), unauthorised=False)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
