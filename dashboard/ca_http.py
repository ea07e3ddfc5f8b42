"""The CA's HTTP API under /v1: a thin adapter over `pki.service.CAService` (decode, call, encode).

Every answer, errors included, is JSON `{"error", "field"?}` or the service's reply body; a body that is not
JSON gets 415, one over 64 KiB gets 413 (Flask's MAX_CONTENT_LENGTH, shaped by `errors.py`).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Blueprint, Flask, Response, current_app, jsonify, request

from pki.requests import BAD_REQUEST, UNSUPPORTED_MEDIA_TYPE, RequestError
from pki.service import CAService, Reply

from .auth import current_principal, require_operator
from .errors import json_error
from .openapi import openapi_document

log = logging.getLogger(__name__)

bp = Blueprint("ca_http", __name__, url_prefix="/v1")

PEM_MIMETYPE = "application/x-pem-file"
DER_CRL_MIMETYPE = "application/pkix-crl"
# Seconds between two checks of the CRL (a parse and a signature check, well under a millisecond): rewritten
# from the inventory when damaged, deleted or less than 20 days from its next update (Step 10: within 10 s).
CRL_CHECK_INTERVAL = 5


def service() -> CAService:
    return current_app.extensions["ca_service"]


def _source() -> str:
    """Who the lockout counts against: the client address the server saw (X-Forwarded-For is not trusted)."""
    return request.remote_addr or "unknown"


def _json_body() -> Any:
    if not request.is_json:
        raise RequestError(UNSUPPORTED_MEDIA_TYPE, "send the request as JSON (Content-Type: application/json)")
    data = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise RequestError(BAD_REQUEST, "the body is not valid JSON") from None


def _respond(reply: Reply) -> Response:
    # json.dumps keeps the contract's field order ({"name", "ca", "crt", "key", "serial", "not_after"}),
    # byte for byte what the MQTT endpoint publishes.
    response = Response(json.dumps(reply.body), status=reply.status, mimetype="application/json")
    response.headers.update(reply.headers)
    response.headers["Cache-Control"] = "no-store"  # replies may carry private keys and tokens
    return response


def _error(ex: RequestError) -> Response:
    return json_error(ex.status, ex.message, ex.field, ex.headers())


def _call(operation: str) -> Response:
    try:
        body = _json_body()
    except RequestError as ex:
        log.info("ssl/%s from %s -> %s (%s)", operation, _source(), ex.status, ex.message)
        return _error(ex)
    ca = service()
    source = _source()
    # A logged-in operator (session or API token) needs no `pass`; a viewer may not act at all; without a
    # session the body's own credential decides, exactly as the seed's API always did (dashboard/auth.py).
    if (refused := require_operator()) is not None:
        return refused
    principal = current_principal()
    operator = principal.name if principal is not None else None
    requester = f"{operator}@{source}" if operator else source
    if operation == "sign":
        reply = ca.sign(body, source=source, via="http", requester=requester, operator=operator)
    elif operation == "create":
        reply = ca.create(body, source=source, via="http", requester=requester, operator=operator)
    elif operation == "revoke":
        reply = ca.revoke(body, source=source, operator=operator)
    else:
        reply = ca.issue_token(body, source=source, operator=operator)
    return _respond(reply)


@bp.post("/ssl/sign")
def sign() -> Response:
    return _call("sign")


@bp.post("/ssl/create")
def create() -> Response:
    return _call("create")


@bp.post("/ssl/revoke")
def revoke() -> Response:
    return _call("revoke")


@bp.post("/ssl/tokens")
def tokens() -> Response:
    return _call("tokens")


@bp.get("/ssl/ca")
def ca_certificate() -> Response:
    try:
        return Response(service().ca_pem(), mimetype=PEM_MIMETYPE)
    except RequestError as ex:
        return _error(ex)


@bp.get("/ssl/crl")
def crl() -> Response:
    """PEM by default; DER (RFC 5280 4.2.1.13, as distribution points serve it) with Accept: application/pkix-crl."""
    try:
        pem = service().crl_pem()
    except RequestError as ex:
        return _error(ex)
    headers = {"Cache-Control": "no-cache", "Vary": "Accept"}
    if request.accept_mimetypes.best_match([PEM_MIMETYPE, DER_CRL_MIMETYPE], default=PEM_MIMETYPE) == DER_CRL_MIMETYPE:
        der = x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER)
        return Response(der, mimetype=DER_CRL_MIMETYPE, headers=headers)
    return Response(pem, mimetype=PEM_MIMETYPE, headers=headers)


@bp.get("/ssl/certs")
def certificates() -> Response:
    return _respond(service().certificates(request.args.get("name"), request.args.get("status")))


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())


def _crl_refresher(ca: CAService, interval: float, stop: threading.Event) -> None:
    """Check the CRL now and every `interval` seconds; an expired CRL would lock every client out."""
    while True:
        try:
            ca.refresh_crl()
        except Exception:  # keep the timer alive whatever happens; the next round tries again
            log.exception("CRL refresh failed")
        if stop.wait(interval):
            return


def start_crl_refresh(app: Flask, interval: float) -> threading.Event:
    """A daemon thread that keeps the CRL fresh; set the returned event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(
        target=_crl_refresher, args=(app.extensions["ca_service"], interval, stop), name="crl-refresh", daemon=True
    )
    thread.start()
    app.extensions["crl_refresh_stop"] = stop
    return stop


def ensure_ca_service(app: Flask) -> CAService:
    """The app's one CAService (HTTP and MQTT share it, so they share the lockout and the unlocked key)."""
    if "ca_service" not in app.extensions:
        app.extensions["ca_service"] = CAService(app.extensions["lab_settings"])
    return app.extensions["ca_service"]


def crl_refresh_interval(app: Flask) -> float:
    """Seconds between CRL checks of a started app: the running lab refreshes the CRL; tests opt in with
    CRL_REFRESH_SECONDS. Often enough that a superseded certificate is listed soon after its grace ends."""
    grace = app.extensions["lab_settings"].superseded_grace
    default = min(CRL_CHECK_INTERVAL, max(10, grace // 4)) if grace else CRL_CHECK_INTERVAL
    return float(app.config.get("CRL_REFRESH_SECONDS", default if app.config.get("MQTT_ENABLED") else 0))


def init_app(app: Flask) -> None:
    ensure_ca_service(app)
    app.register_blueprint(bp)

