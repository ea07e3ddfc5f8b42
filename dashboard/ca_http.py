"""The CA's HTTP API under /v1: a thin adapter over `pki.service.CAService` (decode, call, encode).

Every answer, errors included, is JSON `{"error", "field"?}` or the service's reply body; a body that is not
JSON gets 415, one over 64 KiB gets 413 (Flask's MAX_CONTENT_LENGTH, shaped by `errors.py`).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from pki.requests import BAD_REQUEST, UNSUPPORTED_MEDIA_TYPE, RequestError
from pki.service import CAService, Reply

from .errors import json_error
from .openapi import openapi_document

log = logging.getLogger(__name__)

bp = Blueprint("ca_http", __name__, url_prefix="/v1")

PEM_MIMETYPE = "application/x-pem-file"
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
    if operation == "sign":
        reply = ca.sign(body, source=source, via="http", requester=source)
    elif operation == "create":
        reply = ca.create(body, source=source, via="http", requester=source)
    elif operation == "revoke":
        reply = ca.revoke(body, source=source)
    else:
        reply = ca.issue_token(body, source=source)
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
    try:
        return Response(service().crl_pem(), mimetype=PEM_MIMETYPE, headers={"Cache-Control": "no-cache"})
    except RequestError as ex:
        return _error(ex)


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


def init_app(app: Flask) -> None:
    ensure_ca_service(app)
    app.register_blueprint(bp)
    # The running lab refreshes the CRL; tests opt in with CRL_REFRESH_SECONDS.
    interval = app.config.get("CRL_REFRESH_SECONDS", CRL_CHECK_INTERVAL if app.config.get("MQTT_ENABLED") else 0)
    if interval:
        start_crl_refresh(app, float(interval))

